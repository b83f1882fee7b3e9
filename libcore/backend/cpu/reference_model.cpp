#include "backend/cpu/reference_model.hpp"

#include <algorithm>
#include <cmath>

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

// The ops for one token at position `pos`, each a plain loop.
struct TokenOps final : ForwardOps {
    const ModelConfig& cfg;
    const std::vector<WeightView>& w;
    const std::vector<float>& inv_freq;
    ReferenceModel::Cache& cache;
    int token = 0, pos = 0;
    bool want_logits = false;
    size_t H, hd, nq, nkv, qs, kvs, I;
    std::vector<float> x, h, qkv, attn, gu, act, tmp, scores, logits_out;

    TokenOps(const ModelConfig& c, const std::vector<WeightView>& weights, const std::vector<float>& inv,
             ReferenceModel::Cache& kv)
        : cfg(c), w(weights), inv_freq(inv), cache(kv) {
        H = size_t(cfg.hidden_size), hd = size_t(cfg.head_dim), nq = size_t(cfg.num_heads);
        nkv = size_t(cfg.num_kv_heads), qs = nq * hd, kvs = nkv * hd, I = size_t(cfg.intermediate_size);
        x.resize(H), h.resize(H), qkv.resize(qs + 2 * kvs), attn.resize(qs), gu.resize(2 * I), act.resize(I);
        tmp.resize(H);
    }
    float* buf(Buf b) {
        switch (b) {
            case Buf::Normed: return h.data();
            case Buf::Qkv: return qkv.data();
            case Buf::Attn: return attn.data();
            case Buf::GateUp: return gu.data();
            case Buf::Act: return act.data();
        }
        return nullptr;
    }
    void embed(WeightId table) override {
        for (size_t i = 0; i < H; ++i) x[i] = load(w[size_t(table)], size_t(token) * H + i);
    }
    void rmsnorm(WeightId g) override { tmc::rmsnorm(x.data(), w[size_t(g)], H, cfg.rms_norm_eps, h.data()); }
    void linear(WeightId m, Buf in, Buf out) override { matvec(w[size_t(m)], buf(in), buf(out)); }
    void add_linear(WeightId m, Buf in) override {
        matvec(w[size_t(m)], buf(in), tmp.data());
        for (size_t i = 0; i < H; ++i) x[i] += tmp[i];
    }
    void qkv_rope_cache(const QkvEpilogue& e) override {
        if (e.bias != kNoWeight)
            for (size_t i = 0; i < qkv.size(); ++i) qkv[i] += load(w[size_t(e.bias)], i);
        float* q = qkv.data();
        float* k = q + qs;
        float* v = k + kvs;
        if (e.q_norm != kNoWeight)
            for (size_t hh = 0; hh < nq; ++hh) tmc::rmsnorm(q + hh * hd, w[size_t(e.q_norm)], hd, cfg.rms_norm_eps, q + hh * hd);
        if (e.k_norm != kNoWeight)
            for (size_t hh = 0; hh < nkv; ++hh) tmc::rmsnorm(k + hh * hd, w[size_t(e.k_norm)], hd, cfg.rms_norm_eps, k + hh * hd);
        for (size_t hh = 0; hh < nq; ++hh) rope(q + hh * hd, inv_freq, pos);
        for (size_t hh = 0; hh < nkv; ++hh) rope(k + hh * hd, inv_freq, pos);
        auto& K = cache.k[size_t(e.layer)];
        auto& V = cache.v[size_t(e.layer)];
        K.insert(K.end(), k, k + kvs);
        V.insert(V.end(), v, v + kvs);
    }
    void attention(int layer) override {
        const auto& K = cache.k[size_t(layer)];
        const auto& V = cache.v[size_t(layer)];
        const float* q = qkv.data();
        const size_t n = size_t(pos) + 1, group = nq / nkv;
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
    }
    void silu_mul() override {
        for (size_t i = 0; i < I; ++i) {
            float g = gu[i];
            act[i] = g / (1.0f + std::exp(-g)) * gu[I + i];
        }
    }
    void logits(WeightId final_norm, WeightId output) override {
        if (!want_logits) return;
        tmc::rmsnorm(x.data(), w[size_t(final_norm)], H, cfg.rms_norm_eps, h.data());
        logits_out.resize(size_t(cfg.vocab_size));
        matvec(w[size_t(output)], h.data(), logits_out.data());
    }
};

}  // namespace

ReferenceModel::ReferenceModel(const Workspace& ws, std::shared_ptr<const ModelProgram> program)
    : program_(std::move(program)) {
    if (ws.tp() != 1 || program_->tp() != 1) throw Error(ws.dir() + ": the reference model runs tp=1 workspaces");
    for (const WeightSpec& sp : program_->weights()) w_.push_back(checked_weight(ws, 0, sp, ws.model().weight_dtype));
}

ReferenceModel::Cache ReferenceModel::new_cache() const {
    Cache c;
    c.k.resize(size_t(config().num_layers));
    c.v.resize(size_t(config().num_layers));
    return c;
}

std::vector<float> ReferenceModel::forward(const std::vector<int>& tokens, Cache& cache) const {
    const ModelConfig& cfg = config();
    TokenOps ops(cfg, w_, program_->rope_inv_freq(), cache);
    for (size_t t = 0; t < tokens.size(); ++t) {
        const int tok = tokens[t];
        if (tok < 0 || tok >= cfg.vocab_size) throw Error("token id " + std::to_string(tok) + " out of range");
        ops.token = tok;
        ops.pos = cache.len;
        ops.want_logits = t + 1 == tokens.size();
        program_->forward(ops);
        ++cache.len;
    }
    return std::move(ops.logits_out);
}

}  // namespace tmc
