// The readable reference forward pass: one sequence, fp32 arithmetic on the
// workspace's 16-bit weights, a contiguous KV cache. It is what every faster
// path (the batched CPU backend, the CUDA kernels) is checked against, and
// it is checked against Hugging Face's logits in ../shared/golden.
#pragma once

#include <vector>

#include "tm/workspace.hpp"

namespace tmc {

class ReferenceModel {
public:
    // Rank 0 of a tp=1 workspace.
    explicit ReferenceModel(const Workspace& ws);

    struct Cache {
        std::vector<std::vector<float>> k, v;  // per layer: [len * kv_size]
        int len = 0;
    };
    Cache new_cache() const;

    // Runs `tokens` at positions cache.len, cache.len+1, ...; appends their K/V
    // to the cache; returns the logits of the last token (vocab_size floats).
    std::vector<float> forward(const std::vector<int>& tokens, Cache& cache) const;

    const ModelConfig& config() const { return cfg_; }

private:
    struct Layer {
        WeightView attn_norm, wqkv, bqkv, q_norm, k_norm, wo, ffn_norm, w13, w2;
    };
    const ModelConfig& cfg_;
    WeightView emb_, final_norm_, output_;
    std::vector<Layer> layers_;
    std::vector<float> inv_freq_;
};

}  // namespace tmc
