// The model recipe (model/decoder.cpp): the weights it lists for each
// architecture, the order of its ops, its tensor-parallel shapes; and the
// CUDA backend's switches (read once from the environment).
#include "model/decoder.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "test_util.hpp"
#include "tm/error.hpp"

namespace {

// Records the ops a program calls, one short line each.
struct Recorder final : tmc::ForwardOps {
    const std::vector<tmc::WeightSpec>& w;
    std::vector<std::string> ops;
    explicit Recorder(const std::vector<tmc::WeightSpec>& weights) : w(weights) {}
    std::string n(tmc::WeightId id) { return id == tmc::kNoWeight ? "-" : w[size_t(id)].name; }
    void embed(tmc::WeightId t) override { ops.push_back("embed " + n(t)); }
    void rmsnorm(tmc::WeightId g) override { ops.push_back("rmsnorm " + n(g)); }
    void linear(tmc::WeightId m, tmc::Buf, tmc::Buf) override { ops.push_back("linear " + n(m)); }
    void add_linear(tmc::WeightId m, tmc::Buf) override { ops.push_back("add_linear " + n(m)); }
    void qkv_rope_cache(const tmc::QkvEpilogue& e) override {
        ops.push_back("qkv_rope_cache " + std::to_string(e.layer) + " " + n(e.bias) + " " + n(e.q_norm) + " " +
                      n(e.k_norm));
    }
    void attention(int l) override { ops.push_back("attention " + std::to_string(l)); }
    void silu_mul() override { ops.push_back("silu_mul"); }
    void logits(tmc::WeightId f, tmc::WeightId o) override { ops.push_back("logits " + n(f) + " " + n(o)); }
};

tmc::ModelConfig small(const char* arch) {
    tmc::ModelConfig c;
    c.architecture = arch;
    c.hidden_size = 64, c.intermediate_size = 128, c.num_layers = 2, c.num_heads = 4, c.num_kv_heads = 2;
    c.head_dim = 16, c.vocab_size = 100, c.max_position_embeddings = 128, c.rms_norm_eps = 1e-6;
    c.weight_dtype = tmc::DType::BF16;
    return c;
}

}  // namespace

TEST(ModelProgram, LlamaLayerInOrder) {
    tmc::ModelConfig c = small("LlamaForCausalLM");
    c.num_layers = 1;
    c.tie_word_embeddings = true;
    auto p = tmc::decoder_program(c, 1);
    Recorder r(p->weights());
    p->forward(r);
    const std::vector<std::string> want = {
        "embed tok_embeddings.weight",
        "rmsnorm layers.0.attention_norm.weight",
        "linear layers.0.attention.wqkv.weight",
        "qkv_rope_cache 0 - - -",
        "attention 0",
        "add_linear layers.0.attention.wo.weight",
        "rmsnorm layers.0.ffn_norm.weight",
        "linear layers.0.feed_forward.w13.weight",
        "silu_mul",
        "add_linear layers.0.feed_forward.w2.weight",
        "logits norm.weight tok_embeddings.weight",  // tied: the embedding table
    };
    EXPECT_EQ(r.ops, want);
    // Shapes: [qkv rows, hidden] for the packed projection, the output layer as a linear layer.
    for (auto& w : p->weights()) {
        if (w.name == "layers.0.attention.wqkv.weight") { EXPECT_EQ(w.rows, (4 + 2 * 2) * 16); }
        if (w.name == "layers.0.feed_forward.w13.weight") { EXPECT_EQ(w.rows, 2 * 128); }
    }
    EXPECT_EQ(p->weights().back().kind, tmc::WeightSpec::Linear);
    EXPECT_EQ(p->rope_inv_freq().size(), 8u);
}

TEST(ModelProgram, ArchitectureOptionsAddTheirWeights) {
    tmc::ModelConfig q2 = small("Qwen2ForCausalLM");
    q2.attn_bias = true;
    tmc::ModelConfig q3 = small("Qwen3ForCausalLM");
    q3.qk_norm = true;
    tmc::ModelConfig m = small("MistralForCausalLM");
    m.tie_word_embeddings = false;
    auto names = [](const tmc::ModelConfig& c) {
        std::vector<std::string> out;
        auto p = tmc::decoder_program(c, 1);
        for (auto& w : p->weights()) out.push_back(w.name);
        return out;
    };
    auto has = [](const std::vector<std::string>& v, const std::string& s) {
        return std::find(v.begin(), v.end(), s) != v.end();
    };
    EXPECT_TRUE(has(names(q2), "layers.1.attention.wqkv.bias"));
    EXPECT_FALSE(has(names(q2), "layers.1.attention.q_norm.weight"));
    EXPECT_TRUE(has(names(q3), "layers.1.attention.q_norm.weight"));
    EXPECT_TRUE(has(names(q3), "layers.1.attention.k_norm.weight"));
    EXPECT_TRUE(has(names(m), "output.weight"));
    auto p = tmc::decoder_program(q3, 1);
    Recorder r(p->weights());
    p->forward(r);
    EXPECT_EQ(r.ops[3], "qkv_rope_cache 0 - layers.0.attention.q_norm.weight layers.0.attention.k_norm.weight");
}

TEST(ModelProgram, TensorParallelShapesAreTheRanks) {
    tmc::ModelConfig c = small("MistralForCausalLM");
    auto p = tmc::decoder_program(c, 2);
    EXPECT_EQ(p->tp(), 2);
    EXPECT_EQ(p->config().num_heads, 2);
    EXPECT_EQ(p->config().num_kv_heads, 1);
    EXPECT_EQ(p->config().intermediate_size, 64);
    for (auto& w : p->weights()) {
        if (w.name == "layers.0.attention.wqkv.weight") { EXPECT_EQ(w.rows, (2 + 2) * 16); }
        if (w.name == "layers.0.attention.wo.weight") { EXPECT_EQ(w.cols, 2 * 16); }
        if (w.name == "layers.0.feed_forward.w2.weight") { EXPECT_EQ(w.cols, 64); }
    }
    EXPECT_THROW(tmc::decoder_program(c, 3), tmc::Error);  // 4 heads over 3 ranks
}

#if TM_WITH_CUDA
#include "backend/cuda/switches.hpp"

TEST(CudaSwitches, ReadOnceFromTheEnvironment) {
    setenv("TM_CUDA_GEMV", "0", 1);
    setenv("TM_CUDA_GEMM_TUNE", "retune", 1);
    setenv("TM_TP_TIMEOUT", "30", 1);
    auto s = tmc::cuda::CudaSwitches::from_env();
    EXPECT_FALSE(s.gemv);
    EXPECT_TRUE(s.gemm_tune && s.retune);
    EXPECT_TRUE(s.graphs && s.ring_decode && s.mma_decode && s.fa_prefill);
    EXPECT_EQ(s.tp_timeout_s, 30);
    setenv("TM_TP_TIMEOUT", "soon", 1);
    EXPECT_THROW(tmc::cuda::CudaSwitches::from_env(), tmc::Error);
    for (const char* k : {"TM_CUDA_GEMV", "TM_CUDA_GEMM_TUNE", "TM_TP_TIMEOUT"}) unsetenv(k);
    auto off = tmc::cuda::CudaSwitches::all_off();
    EXPECT_FALSE(off.graphs || off.ring_decode || off.gemv || off.pdl || off.vector_elementwise);
    EXPECT_NE(off.describe().find("gemv=0"), std::string::npos);
    EXPECT_NE(tmc::cuda::CudaSwitches{}.describe().find("gemv=1"), std::string::npos);
}
#endif
