// ModelConfig: the architecture and dimensions of a model, as the engine
// needs them; EngineConfig: the settings a user may edit in a workspace's
// config.ini. Both are read from and written to config.ini (formats/workspace.md).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tm/dtype.hpp"

namespace tmc {

struct ModelConfig {
    std::string name;          // free text, e.g. "tinytech-25m"
    std::string architecture;  // LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
    int hidden_size = 0;
    int num_layers = 0;
    int num_heads = 0;
    int num_kv_heads = 0;
    int head_dim = 0;
    int intermediate_size = 0;
    int vocab_size = 0;
    double rms_norm_eps = 1e-6;
    double rope_theta = 10000.0;
    // RoPE scaling as config.json names it: "default", "linear" or "llama3".
    std::string rope_type = "default";
    double rope_factor = 1.0;
    double rope_low_freq_factor = 1.0;
    double rope_high_freq_factor = 4.0;
    int rope_original_max_position = 8192;
    int max_position_embeddings = 2048;
    int sliding_window = 0;  // 0: none
    bool tie_word_embeddings = false;
    bool attn_bias = false;  // q/k/v projections carry a bias (Qwen2)
    bool qk_norm = false;    // RMSNorm on q and k per head (Qwen3)
    DType weight_dtype = DType::BF16;
    int bos_token_id = -1;  // -1: none
    std::vector<int> eos_token_ids;

    int q_size() const { return num_heads * head_dim; }
    int kv_size() const { return num_kv_heads * head_dim; }
};

struct EngineConfig {
    int tp = 1;
    // LMDeploy's meaning: 0 = fp16/bf16 KV cache, 8 = int8 KV, 4 = int4 KV.
    int quant_policy = 0;
    // With quant_policy 4 or 8: false = scales computed per token and head as
    // K/V are written ("online"); true = the per-layer, per-head scales that
    // tm-qparams wrote into the workspace ("static").
    bool kv_static = false;
    int session_len = 0;  // 0: the model's max_position_embeddings
    int cache_block_seq_len = 64;
    // Fraction of free device memory (GPU) given to the KV cache pool.
    double cache_max_entry_count = 0.8;
};

// Reads a Hugging Face config.json (and generation_config.json beside it, if
// present). Throws tmc::Error naming the file and the field.
ModelConfig model_config_from_hf(const std::string& hf_dir);

// config.ini text <-> configs. Unknown keys are refused, so a typo in a
// hand edit is reported rather than silently ignored.
std::string config_ini_text(const ModelConfig& m, const EngineConfig& e);
void parse_config_ini(const std::string& text, const std::string& path, ModelConfig* m,
                      EngineConfig* e);

}  // namespace tmc
