// How a model's heads and MLP columns are divided over tensor-parallel ranks.
#pragma once

#include <string>

#include "tm/model_config.hpp"

namespace tmc {

struct TpSplit {
    int tp = 1;
    int heads = 0;     // query heads per rank
    int kv_heads = 0;  // KV heads per rank (1 when replicated)
    int inter = 0;     // MLP intermediate columns per rank
    bool vocab_split = false;  // untied output split by vocabulary rows

    // First KV head of `rank` in the full model.
    int kv_head_begin(int rank) const;
    int num_model_kv_heads = 0;

    // Throws tmc::Error explaining which dimension does not divide.
    static TpSplit make(const ModelConfig& m, int tp);
};

// What one rank computes: the model's config with its heads, KV heads and
// MLP columns, and the rows of the output projection it holds (the whole
// vocabulary, or vocab / tp when an untied lm_head is split).
struct RankShape {
    ModelConfig cfg;
    int out_rows = 0;
};
RankShape rank_shape(const ModelConfig& m, int tp);

}  // namespace tmc
