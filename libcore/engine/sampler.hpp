// Sampling: penalties, temperature, top-k, top-p, min-p and a per-request
// random stream (xoshiro256**), so that a seeded request draws the same
// tokens whatever else is in the batch.
#pragma once

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "tm/engine.hpp"

namespace tmc {

class Rng {
public:
    explicit Rng(uint64_t seed = 0);
    uint64_t next();
    double uniform();  // [0, 1)

private:
    uint64_t s_[4];
};

class Sampler {
public:
    explicit Sampler(int vocab_size);
    // Picks the next token from `logits` (modified in place). `prompt` and
    // `output` are the sequence's tokens so far, for the penalties.
    int sample(float* logits, const SamplingParams& p, std::span<const int> prompt, std::span<const int> output,
               Rng& rng);

private:
    void apply_penalties(float* logits, const SamplingParams& p, std::span<const int> prompt,
                         std::span<const int> output);
    int vocab_;
    std::vector<uint32_t> stamp_;  // per token: last call that saw it
    std::vector<int> count_;
    uint32_t call_ = 0;
    std::vector<std::pair<float, int>> cand_;
    std::vector<double> blocks_;
};

}  // namespace tmc
