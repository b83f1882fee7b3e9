#include "backend/cpu/reference_model.hpp"

#include <cmath>

#include "model/rope.hpp"
#include "model/weight_names.hpp"
#include "tm/error.hpp"

namespace tmc {

namespace {

float load(const WeightView& w, size_t i) {
    const uint16_t* p = static_cast<const uint16_t*>(w.data);
    switch (w.dtype) {
        case DType::BF16: return bf16_to_f32(p[i]);
        case DType::F16: return f16_to_f32(p[i]);
        case DType::F32: return static_cast<const float*>(w.data)[i];
        default: throw Error("reference model: unsupported weight dtype");
    }
}

// y[r] = sum_c W[r, c] * x[c] for W of shape [rows, cols].
void matvec(const WeightView& w, const float* x, float* y) {
    const size_t rows = size_t(w.shape[0]), cols = size_t(w.shape[1]);
    for (size_t r = 0; r < rows; ++r) {
        float acc = 0;
        for (size_t c = 0; c < cols; ++c) acc += load(w, r * cols + c) * x[c];
        y[r] = acc;
    }
}

void rmsnorm(const float* x, const WeightView& w, size_t n, double eps, float* out) {
    double ss = 0;
    for (size_t i = 0; i < n; ++i) ss += double(x[i]) * x[i];
    float scale = float(1.0 / std::sqrt(ss / double(n) + eps));
    for (size_t i = 0; i < n; ++i) out[i] = x[i] * scale * load(w, i);
}

// Rotary embedding, "rotate half" layout (Hugging Face's Llama): element i
// pairs with i + d/2.
void rope(float* v, const std::vector<float>& inv_freq, int pos) {
    const size_t half = inv_freq.size();
    for (size_t i = 0; i < half; ++i) {
        float a = float(pos) * inv_freq[i];
        float c = std::cos(a), s = std::sin(a);
        float x0 = v[i], x1 = v[i + half];
        v[i] = x0 * c - x1 * s;
        v[i + half] = x1 * c + x0 * s;
    }
}

}  // namespace

ReferenceModel::ReferenceModel(const Workspace& ws) : cfg_(ws.model()) {
    if (ws.tp() != 1) throw Error(ws.dir() + ": the reference model runs tp=1 workspaces");
    emb_ = ws.tensor(0, wname::kEmbedding);
    final_norm_ = ws.tensor(0, wname::kFinalNorm);
    output_ = cfg_.tie_word_embeddings ? emb_ : ws.tensor(0, wname::kOutput);
    for (int l = 0; l < cfg_.num_layers; ++l) {
        Layer L;
        L.attn_norm = ws.tensor(0, wname::layer(l, wname::kAttnNorm));
        L.wqkv = ws.tensor(0, wname::layer(l, wname::kWqkv));
        if (cfg_.attn_bias) L.bqkv = ws.tensor(0, wname::layer(l, wname::kBqkv));
        if (cfg_.qk_norm) {
            L.q_norm = ws.tensor(0, wname::layer(l, wname::kQNorm));
            L.k_norm = ws.tensor(0, wname::layer(l, wname::kKNorm));
        }
        L.wo = ws.tensor(0, wname::layer(l, wname::kWo));
        L.ffn_norm = ws.tensor(0, wname::layer(l, wname::kFfnNorm));
        L.w13 = ws.tensor(0, wname::layer(l, wname::kW13));
        L.w2 = ws.tensor(0, wname::layer(l, wname::kW2));
        layers_.push_back(L);
    }
    inv_freq_ = rope_inv_freq(cfg_);
}

ReferenceModel::Cache ReferenceModel::new_cache() const {
    Cache c;
    c.k.resize(size_t(cfg_.num_layers));
    c.v.resize(size_t(cfg_.num_layers));
    return c;
}

std::vector<float> ReferenceModel::forward(const std::vector<int>& tokens, Cache& cache) const {
    const size_t H = size_t(cfg_.hidden_size), hd = size_t(cfg_.head_dim);
    const size_t nq = size_t(cfg_.num_heads), nkv = size_t(cfg_.num_kv_heads), group = nq / nkv;
    const size_t qs = nq * hd, kvs = nkv * hd, I = size_t(cfg_.intermediate_size);
    std::vector<float> x(H), h(H), qkv(qs + 2 * kvs), attn(qs), tmp(H), gu(2 * I), act(I), scores;
    std::vector<float> logits;
    for (size_t t = 0; t < tokens.size(); ++t) {
        const int tok = tokens[t];
        if (tok < 0 || tok >= cfg_.vocab_size) throw Error("token id " + std::to_string(tok) + " out of range");
        const int pos = cache.len;
        for (size_t i = 0; i < H; ++i) x[i] = load(emb_, size_t(tok) * H + i);
        for (size_t l = 0; l < layers_.size(); ++l) {
            const Layer& L = layers_[l];
            rmsnorm(x.data(), L.attn_norm, H, cfg_.rms_norm_eps, h.data());
            matvec(L.wqkv, h.data(), qkv.data());
            if (cfg_.attn_bias)
                for (size_t i = 0; i < qkv.size(); ++i) qkv[i] += load(L.bqkv, i);
            float* q = qkv.data();
            float* k = q + qs;
            float* v = k + kvs;
            if (cfg_.qk_norm) {
                for (size_t hh = 0; hh < nq; ++hh) rmsnorm(q + hh * hd, L.q_norm, hd, cfg_.rms_norm_eps, q + hh * hd);
                for (size_t hh = 0; hh < nkv; ++hh) rmsnorm(k + hh * hd, L.k_norm, hd, cfg_.rms_norm_eps, k + hh * hd);
            }
            for (size_t hh = 0; hh < nq; ++hh) rope(q + hh * hd, inv_freq_, pos);
            for (size_t hh = 0; hh < nkv; ++hh) rope(k + hh * hd, inv_freq_, pos);
            auto& K = cache.k[l];
            auto& V = cache.v[l];
            K.insert(K.end(), k, k + kvs);
            V.insert(V.end(), v, v + kvs);
            const size_t n = size_t(pos) + 1;
            scores.resize(n);
            const float scale = 1.0f / std::sqrt(float(hd));
            for (size_t hh = 0; hh < nq; ++hh) {
                const size_t kh = hh / group;
                float mx = -INFINITY;
                for (size_t j = 0; j < n; ++j) {
                    const float* kj = &K[j * kvs + kh * hd];
                    float s = 0;
                    for (size_t i = 0; i < hd; ++i) s += q[hh * hd + i] * kj[i];
                    scores[j] = s * scale;
                    mx = std::max(mx, scores[j]);
                }
                float sum = 0;
                for (size_t j = 0; j < n; ++j) sum += scores[j] = std::exp(scores[j] - mx);
                float* o = &attn[hh * hd];
                std::fill(o, o + hd, 0.0f);
                for (size_t j = 0; j < n; ++j) {
                    const float* vj = &V[j * kvs + kh * hd];
                    const float p = scores[j] / sum;
                    for (size_t i = 0; i < hd; ++i) o[i] += p * vj[i];
                }
            }
            matvec(L.wo, attn.data(), tmp.data());
            for (size_t i = 0; i < H; ++i) x[i] += tmp[i];
            rmsnorm(x.data(), L.ffn_norm, H, cfg_.rms_norm_eps, h.data());
            matvec(L.w13, h.data(), gu.data());
            for (size_t i = 0; i < I; ++i) {
                float g = gu[i];
                act[i] = g / (1.0f + std::exp(-g)) * gu[I + i];
            }
            matvec(L.w2, act.data(), tmp.data());
            for (size_t i = 0; i < H; ++i) x[i] += tmp[i];
        }
        ++cache.len;
        if (t + 1 == tokens.size()) {
            rmsnorm(x.data(), final_norm_, H, cfg_.rms_norm_eps, h.data());
            logits.resize(size_t(cfg_.vocab_size));
            matvec(output_, h.data(), logits.data());
        }
    }
    return logits;
}

}  // namespace tmc
