#include "model/decoder.hpp"

#include "model/rope.hpp"
#include "model/tp_split.hpp"
#include "model/weight_names.hpp"
#include "tm/error.hpp"

namespace tmc {

namespace {

// One pre-norm decoder layer:
//   h = RMSNorm(x); qkv = h · Wqkvᵀ (+ bias); per-head q/k RMSNorm; RoPE;
//   x += Attention(q, k, v) · Woᵀ;
//   h = RMSNorm(x); x += (silu(h · Wgateᵀ) ⊙ h · Wupᵀ) · Wdownᵀ
class Decoder final : public ModelProgram {
public:
    Decoder(const ModelConfig& full, int tp) : tp_(tp) {
        const RankShape shape = rank_shape(full, tp);  // this rank's heads, KV heads, MLP columns, vocab rows
        split_ = TpSplit::make(full, tp);
        cfg_ = shape.cfg;
        out_rows_ = shape.out_rows;
        const int H = cfg_.hidden_size, I = cfg_.intermediate_size, V = cfg_.vocab_size, hd = cfg_.head_dim;
        const int qkv = cfg_.q_size() + 2 * cfg_.kv_size();
        emb_ = add(wname::kEmbedding, WeightSpec::Embedding, V, H);
        final_norm_ = add(wname::kFinalNorm, WeightSpec::Norm, 1, H);
        // A tied output layer is the embedding table, multiplied as a linear layer.
        output_ = add(cfg_.tie_word_embeddings ? wname::kEmbedding : wname::kOutput, WeightSpec::Linear, out_rows_, H);
        for (int l = 0; l < cfg_.num_layers; ++l) {
            Layer L;
            L.attn_norm = add(wname::layer(l, wname::kAttnNorm), WeightSpec::Norm, 1, H);
            L.wqkv = add(wname::layer(l, wname::kWqkv), WeightSpec::Linear, qkv, H);
            if (cfg_.attn_bias) L.qkv.bias = add(wname::layer(l, wname::kBqkv), WeightSpec::Bias, 1, qkv);
            if (cfg_.qk_norm) {
                L.qkv.q_norm = add(wname::layer(l, wname::kQNorm), WeightSpec::Norm, 1, hd);
                L.qkv.k_norm = add(wname::layer(l, wname::kKNorm), WeightSpec::Norm, 1, hd);
            }
            L.qkv.layer = l;
            L.wo = add(wname::layer(l, wname::kWo), WeightSpec::Linear, H, cfg_.q_size());
            L.ffn_norm = add(wname::layer(l, wname::kFfnNorm), WeightSpec::Norm, 1, H);
            L.w13 = add(wname::layer(l, wname::kW13), WeightSpec::Linear, 2 * I, H);
            L.w2 = add(wname::layer(l, wname::kW2), WeightSpec::Linear, H, I);
            layers_.push_back(L);
        }
        inv_freq_ = tmc::rope_inv_freq(cfg_);
    }

    const ModelConfig& config() const override { return cfg_; }
    int output_rows() const override { return out_rows_; }
    int tp() const override { return tp_; }
    int kv_head_begin(int rank) const override { return split_.kv_head_begin(rank); }
    const std::vector<WeightSpec>& weights() const override { return specs_; }
    const std::vector<float>& rope_inv_freq() const override { return inv_freq_; }

    void forward(ForwardOps& ops) const override {
        using P = ForwardObserver;
        ops.embed(emb_);
        for (int l = 0; l < cfg_.num_layers; ++l) {
            const Layer& L = layers_[size_t(l)];
            ops.rmsnorm(L.attn_norm);
            ops.observe(l, P::AttnIn);
            ops.linear(L.wqkv, Buf::Normed, Buf::Qkv);
            ops.qkv_rope_cache(L.qkv);
            ops.observe(l, P::K);
            ops.observe(l, P::V);
            ops.attention(l);
            ops.observe(l, P::WoIn);
            ops.add_linear(L.wo, Buf::Attn);
            ops.rmsnorm(L.ffn_norm);
            ops.observe(l, P::FfnIn);
            ops.linear(L.w13, Buf::Normed, Buf::GateUp);
            ops.silu_mul();
            ops.observe(l, P::W2In);
            ops.add_linear(L.w2, Buf::Act);
        }
        ops.logits(final_norm_, output_);
    }

private:
    struct Layer {
        WeightId attn_norm = kNoWeight, wqkv = kNoWeight, wo = kNoWeight, ffn_norm = kNoWeight, w13 = kNoWeight,
                 w2 = kNoWeight;
        QkvEpilogue qkv;
    };
    WeightId add(std::string name, WeightSpec::Kind kind, int rows, int cols) {
        specs_.push_back(WeightSpec{std::move(name), kind, rows, cols, WeightStorage::Dense16});
        return WeightId(specs_.size() - 1);
    }

    ModelConfig cfg_;
    TpSplit split_;
    int tp_ = 1, out_rows_ = 0;
    std::vector<WeightSpec> specs_;
    WeightId emb_ = kNoWeight, final_norm_ = kNoWeight, output_ = kNoWeight;
    std::vector<Layer> layers_;
    std::vector<float> inv_freq_;
};

}  // namespace

std::shared_ptr<const ModelProgram> decoder_program(const ModelConfig& full, int tp) {
    return std::make_shared<Decoder>(full, tp);
}

std::shared_ptr<const ModelProgram> model_program(const Workspace& ws) { return decoder_program(ws.model(), ws.tp()); }

}  // namespace tmc
