// The readable reference forward pass: one sequence, token by token, fp32
// arithmetic on the workspace's 16-bit weights, a contiguous KV cache, every
// op a plain loop. It runs the same model program as the fast backends
// (backend/model_program.hpp), so it is what every faster path (the batched
// CPU backend, the CUDA kernels) is checked against, and it is checked
// against Hugging Face's logits in ../shared/golden.
#pragma once

#include <memory>
#include <vector>

#include "backend/model_program.hpp"

namespace tmc {

class ReferenceModel {
public:
    // Rank 0 of a tp=1 workspace, running `program` (model_program(ws)).
    ReferenceModel(const Workspace& ws, std::shared_ptr<const ModelProgram> program);

    struct Cache {
        std::vector<std::vector<float>> k, v;  // per layer: [len * kv_size]
        int len = 0;
    };
    Cache new_cache() const;

    // Runs `tokens` at positions cache.len, cache.len+1, ...; appends their K/V
    // to the cache; returns the logits of the last token (vocab_size floats).
    std::vector<float> forward(const std::vector<int>& tokens, Cache& cache) const;

    const ModelConfig& config() const { return program_->config(); }

private:
    std::shared_ptr<const ModelProgram> program_;
    std::vector<WeightView> w_;  // by WeightId
};

}  // namespace tmc
