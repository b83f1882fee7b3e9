// Names of the tensors in a workspace, as the engine reads them
// (formats/workspace.md lists shapes and the tensor-parallel split).
#pragma once

#include <string>

namespace tmc::wname {

inline std::string layer(int l, const char* what) { return "layers." + std::to_string(l) + "." + what; }

constexpr const char* kEmbedding = "tok_embeddings.weight";  // [vocab, hidden], replicated
constexpr const char* kFinalNorm = "norm.weight";             // [hidden], replicated
constexpr const char* kOutput = "output.weight";              // [vocab/tp, hidden], untied models only
// Per layer (suffixes for layer()):
constexpr const char* kAttnNorm = "attention_norm.weight";    // [hidden]
constexpr const char* kWqkv = "attention.wqkv.weight";        // [(hq+2*hkv)*hd/tp, hidden]
constexpr const char* kBqkv = "attention.wqkv.bias";          // [(hq+2*hkv)*hd/tp]
constexpr const char* kQNorm = "attention.q_norm.weight";     // [hd]
constexpr const char* kKNorm = "attention.k_norm.weight";     // [hd]
constexpr const char* kWo = "attention.wo.weight";            // [hidden, hq*hd/tp]
constexpr const char* kFfnNorm = "ffn_norm.weight";           // [hidden]
constexpr const char* kW13 = "feed_forward.w13.weight";       // [2*inter/tp, hidden]: gate rows, then up rows
constexpr const char* kW2 = "feed_forward.w2.weight";         // [hidden, inter/tp]

}  // namespace tmc::wname
