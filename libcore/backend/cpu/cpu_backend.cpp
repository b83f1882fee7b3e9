// The CPU backend: the ops of a model program (backend/model_program.hpp)
// over a BatchPlan, multi-threaded (ThreadPool) and vectorized (kernels.inc),
// weights read in place from the workspace's mapped files (bf16 or fp16),
// arithmetic and the KV cache in fp32. Every op computes each row
// independently of the others, so results do not depend on the batch.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <future>

#include "backend/backend.hpp"
#include "backend/comm.hpp"
#include "backend/cpu/kernels.hpp"
#include "backend/model_program.hpp"
#include "base/row_math.hpp"
#include "base/thread_pool.hpp"
#include "tm/error.hpp"
#include "tm/workspace.hpp"

namespace tmc {

namespace {

using cpu::Kernels;

struct Weight {
    const uint16_t* data = nullptr;  // row-major, in the mapped workspace file
    int rows = 0, cols = 0;
    std::shared_ptr<uint16_t[]> packed;  // linear layers: 16-row panels (cpu::pack_weights)
};

class CpuBackend final : public Backend, private ForwardOps {
public:
    CpuBackend(const Workspace& ws, const CpuBackendOptions& opt);
    std::string name() const override {
        return std::string("cpu (") + k_.isa + ", " + std::to_string(pool_.size()) + " threads" +
               (kvq_ ? ", int" + std::to_string(kvq_) + " KV cache" : "") + ")";
    }
    const ModelConfig& config() const override { return cfg_; }
    size_t kv_bytes_per_token() const override {
        const size_t kvs = size_t(cfg_.kv_size()), nkv = size_t(cfg_.num_kv_heads);
        if (kvq_ == 0) return size_t(cfg_.num_layers) * 2 * kvs * 4;
        return size_t(cfg_.num_layers) * (2 * kvs * size_t(kvq_) / 8 + 4 * nkv * 4);
    }
    void init(const BackendLimits& limits) override;
    void abort_collectives() override {
        if (comm_) comm_->abort();
    }
    float* forward(const BatchPlan& plan) override;
    void launch(const BatchPlan& plan) override {
        if (!async_) return Backend::launch(plan);
        step_ = std::async(std::launch::async, [this, &plan] { return forward(plan); });
    }
    float* collect() override { return async_ ? step_.get() : Backend::collect(); }
    bool asynchronous() const override { return async_; }
    void token_logprobs(const int* logit_index, const int* targets, int n, float* out) override;
    size_t default_kv_bytes(double, int) const override { return size_t(1) << 30; }

private:
    // ForwardOps, over the rows of plan_.
    void embed(WeightId table) override;
    void rmsnorm(WeightId w) override;
    void linear(WeightId w, Buf in, Buf out) override;
    void add_linear(WeightId w, Buf in) override;
    void qkv_rope_cache(const QkvEpilogue& e) override;
    void attention(int layer) override;
    void silu_mul() override;
    void logits(WeightId final_norm, WeightId output) override;
    void observe(int layer, ForwardObserver::Point p) override;

    float* buf(Buf b);
    void gemm(const Weight& w, const float* x, size_t ldx, int T, float* y, size_t ldy, bool accumulate);
    template <class F>
    void rows(int T, F&& f);  // f(row) in parallel over rows

    bool async_ = false;
    std::future<float*> step_;  // async_: the step launch() started
    ModelConfig cfg_;
    const Kernels& k_;
    ThreadPool pool_;
    int wtype_ = cpu::kWeightBF16;
    std::shared_ptr<const ModelProgram> program_;
    std::vector<Weight> w_;                     // by WeightId
    std::vector<std::vector<float>> biases_;    // by WeightId: biases in fp32
    const BatchPlan* plan_ = nullptr;           // the step being run
    int T_ = 0;                                 // its rows

    BackendLimits lim_;
    // A block holds, per layer, K as [kv_heads * head_dim][block_size] and
    // then V as [block_size][kv_heads * head_dim].
    size_t block_stride_ = 0;  // floats per block (all layers, K and V)
    std::unique_ptr<uint8_t[]> kv_bytes_;
    float* kv_ = nullptr;  // the fp32 cache (quant_policy 0)
    // Quantized cache (quant_policy 8 or 4), per layer within a block: K
    // transposed [kv_size][block_size] codes, V [block_size][kv_size] codes,
    // then K scale, K min, V scale, V min, each [kv_heads][block_size] floats.
    ForwardObserver* obs_ = nullptr;
    int kvq_ = 0;
    Communicator* comm_ = nullptr;
    int rank_ = 0;
    int out_rows_ = 0;          // rows of the output projection on this rank (vocab, or vocab / tp)
    std::vector<float> part_;   // tp > 1: a rank's partial wo / w2 output, summed across ranks
    std::vector<float> kv_params_;  // static scales, or empty
    struct QLayout {
        size_t k_row = 0, v_row = 0, v_off = 0, ks_off = 0, km_off = 0, vs_off = 0, vm_off = 0, layer_bytes = 0;
    } ql_;
    size_t block_bytes_ = 0;
    void write_quantized(const float* k, const float* v, int block, int slot, int layer);
    std::vector<float> rope_cos_, rope_sin_;  // [max_context][head_dim / 2]
    std::vector<float> x_, h_, qkv_, attn_, gu_, act_, hn_, logits_;
    std::vector<float> scratch_;  // per thread
    std::vector<int> row_seq_;
    int last_logit_rows_ = 0;
};

CpuBackend::CpuBackend(const Workspace& ws, const CpuBackendOptions& opt)
    : k_(cpu::cpu_kernels()),
      pool_(opt.threads > 0 ? opt.threads : std::max(1, int(std::thread::hardware_concurrency()))) {
    if (!opt.program) throw Error("cpu backend: no model program");
    program_ = opt.program;
    async_ = opt.async && !opt.comm;
    const int tp = opt.comm ? opt.comm->size() : 1;
    if (ws.tp() != tp)
        throw Error(ws.dir() + ": converted with --tp " + std::to_string(ws.tp()) + "; this backend runs " +
                    std::to_string(tp) + " rank" + (tp > 1 ? "s" : "") + " (convert again, or run with --tp " +
                    std::to_string(ws.tp()) + ")");
    if (program_->tp() != tp) throw Error("cpu backend: the model program is for another tensor-parallel degree");
    comm_ = opt.comm;
    rank_ = comm_ ? comm_->rank() : 0;
    cfg_ = program_->config();  // this rank's heads, KV heads, MLP columns
    out_rows_ = program_->output_rows();
    if (cfg_.weight_dtype != DType::BF16 && cfg_.weight_dtype != DType::F16)
        throw Error(ws.dir() + ": the CPU backend reads bf16 or fp16 weights");
    if (cfg_.num_heads % cfg_.num_kv_heads != 0 || cfg_.num_heads / cfg_.num_kv_heads > 64)
        throw Error(ws.dir() + ": unsupported head grouping");
    wtype_ = cfg_.weight_dtype == DType::BF16 ? cpu::kWeightBF16 : cpu::kWeightF16;
    kvq_ = opt.kv_quant;
    obs_ = opt.observer;
    if (kvq_ != 0 && kvq_ != 4 && kvq_ != 8) throw Error("quant_policy must be 0, 4 or 8");
    if (kvq_ == 4 && cfg_.head_dim % 2) throw Error(ws.dir() + ": an int4 KV cache needs an even head_dim");
    kv_params_ = opt.kv_params;
    if (!kv_params_.empty() && kv_params_.size() != size_t(cfg_.num_layers) * 4 * cfg_.num_kv_heads)
        throw Error(ws.dir() + ": the static KV scales do not match the model");
    // Weights are read in place; linear layers are repacked once (same
    // 16-bit values, another order) so the GEMM streams each panel
    // contiguously, and biases are kept in fp32.
    const auto& specs = program_->weights();
    w_.resize(specs.size());
    biases_.resize(specs.size());
    for (size_t i = 0; i < specs.size(); ++i) {
        const WeightSpec& sp = specs[i];
        WeightView v = checked_weight(ws, rank_, sp, cfg_.weight_dtype);
        Weight& w = w_[i];
        w = Weight{static_cast<const uint16_t*>(v.data), sp.rows, sp.cols, nullptr};
        if (sp.kind == WeightSpec::Linear) {
            w.packed.reset(new uint16_t[cpu::packed_size(sp.rows, sp.cols)]);
            cpu::pack_weights(w.data, sp.rows, sp.cols, w.packed.get());
        } else if (sp.kind == WeightSpec::Bias) {
            biases_[i].resize(size_t(sp.cols));
            convert_floats(v.dtype, v.data, DType::F32, biases_[i].data(), size_t(sp.cols));
        }
    }
}

void CpuBackend::init(const BackendLimits& limits) {
    lim_ = limits;
    const size_t kvs = size_t(cfg_.kv_size());
    const size_t bs = size_t(lim_.block_size), nkv = size_t(cfg_.num_kv_heads);
    if (kvq_ == 4 && bs % 2) throw Error("an int4 KV cache needs an even block size");
    if (kvq_ == 0) {
        block_stride_ = size_t(cfg_.num_layers) * 2 * bs * kvs;
        block_bytes_ = block_stride_ * 4;
    } else {
        ql_.k_row = bs * size_t(kvq_) / 8;
        ql_.v_row = kvs * size_t(kvq_) / 8;
        ql_.v_off = (kvs * ql_.k_row + 63) / 64 * 64;
        ql_.ks_off = (ql_.v_off + bs * ql_.v_row + 63) / 64 * 64;
        ql_.km_off = ql_.ks_off + nkv * bs * 4;
        ql_.vs_off = ql_.km_off + nkv * bs * 4;
        ql_.vm_off = ql_.vs_off + nkv * bs * 4;
        ql_.layer_bytes = (ql_.vm_off + nkv * bs * 4 + 63) / 64 * 64;
        block_bytes_ = size_t(cfg_.num_layers) * ql_.layer_bytes;
    }
    // Not zeroed: the OS commits pages as blocks are first written.
    kv_bytes_.reset(new uint8_t[size_t(lim_.num_blocks) * block_bytes_ + 64]);
    kv_ = reinterpret_cast<float*>(kv_bytes_.get());
    const std::vector<float>& inv_freq = program_->rope_inv_freq();
    const size_t half = inv_freq.size();
    rope_cos_.resize(size_t(lim_.max_context) * half);
    rope_sin_.resize(size_t(lim_.max_context) * half);
    for (int p = 0; p < lim_.max_context; ++p)
        for (size_t i = 0; i < half; ++i) {
            float a = float(p) * inv_freq[i];
            rope_cos_[size_t(p) * half + i] = std::cos(a);
            rope_sin_[size_t(p) * half + i] = std::sin(a);
        }
    const size_t T = size_t(lim_.max_batch_tokens), H = size_t(cfg_.hidden_size), I = size_t(cfg_.intermediate_size);
    x_.resize(T * H);
    h_.resize(T * H);
    qkv_.resize(T * size_t(cfg_.q_size() + 2 * cfg_.kv_size()));
    attn_.resize(T * size_t(cfg_.q_size()));
    gu_.resize(T * 2 * I);
    act_.resize(T * I);
    hn_.resize(size_t(lim_.max_logit_rows) * H);
    logits_.resize(size_t(lim_.max_logit_rows) * size_t(out_rows_));
    if (comm_) part_.resize(T * H);
    const size_t group = size_t(cfg_.num_heads / cfg_.num_kv_heads);
    scratch_.resize(size_t(pool_.size()) * group * size_t(lim_.max_context));
    row_seq_.resize(T);
}

float* CpuBackend::buf(Buf b) {
    switch (b) {
        case Buf::Normed: return h_.data();
        case Buf::Qkv: return qkv_.data();
        case Buf::Attn: return attn_.data();
        case Buf::GateUp: return gu_.data();
        case Buf::Act: return act_.data();
    }
    throw Error("cpu backend: unknown buffer");
}

void CpuBackend::embed(WeightId table) {
    const size_t H = size_t(cfg_.hidden_size);
    const Weight& e = w_[size_t(table)];
    rows(T_, [&](int r) {
        const int tok = plan_->tokens[size_t(r)];
        convert_floats(cfg_.weight_dtype, e.data + size_t(tok) * H, DType::F32, x_.data() + size_t(r) * H, H);
    });
}

void CpuBackend::rmsnorm(WeightId w) {
    const size_t H = size_t(cfg_.hidden_size);
    const float eps = float(cfg_.rms_norm_eps);
    const uint16_t* g = w_[size_t(w)].data;
    rows(T_, [&](int r) { k_.rmsnorm(x_.data() + size_t(r) * H, g, wtype_, int(H), eps, h_.data() + size_t(r) * H); });
}

void CpuBackend::linear(WeightId w, Buf in, Buf out) {
    const Weight& W = w_[size_t(w)];
    gemm(W, buf(in), size_t(W.cols), T_, buf(out), size_t(W.rows), false);
}

// x += in · wᵀ; with tensor parallelism the ranks' partial products are
// summed first (each rank holds some input columns of w).
void CpuBackend::add_linear(WeightId w, Buf in) {
    const Weight& W = w_[size_t(w)];
    const size_t H = size_t(cfg_.hidden_size);
    if (!comm_) {
        gemm(W, buf(in), size_t(W.cols), T_, x_.data(), H, true);
        return;
    }
    gemm(W, buf(in), size_t(W.cols), T_, part_.data(), H, false);
    comm_->all_reduce_sum(part_.data(), size_t(T_) * H);
    rows(T_, [&](int r) {
        float* x = x_.data() + size_t(r) * H;
        const float* p = part_.data() + size_t(r) * H;
        for (size_t i = 0; i < H; ++i) x[i] += p[i];
    });
}

void CpuBackend::silu_mul() {
    const size_t I = size_t(cfg_.intermediate_size);
    rows(T_, [&](int r) {
        const float* g = gu_.data() + size_t(r) * 2 * I;
        k_.silu_mul(g, g + I, act_.data() + size_t(r) * I, int(I));
    });
}

void CpuBackend::observe(int layer, ForwardObserver::Point p) {
    if (!obs_) return;
    const size_t H = size_t(cfg_.hidden_size), I = size_t(cfg_.intermediate_size);
    const size_t qs = size_t(cfg_.q_size()), kvs = size_t(cfg_.kv_size()), qkv_ld = qs + 2 * kvs;
    using P = ForwardObserver;
    switch (p) {
        case P::AttnIn:
        case P::FfnIn: obs_->observe(layer, p, h_.data(), T_, H, int(H)); break;
        case P::K: obs_->observe(layer, p, qkv_.data() + qs, T_, qkv_ld, int(kvs)); break;
        case P::V: obs_->observe(layer, p, qkv_.data() + qs + kvs, T_, qkv_ld, int(kvs)); break;
        case P::WoIn: obs_->observe(layer, p, attn_.data(), T_, qs, int(qs)); break;
        case P::W2In: obs_->observe(layer, p, act_.data(), T_, I, int(I)); break;
    }
}

void CpuBackend::gemm(const Weight& w, const float* x, size_t ldx, int T, float* y, size_t ldy, bool accumulate) {
    const int N = w.rows, K = w.cols;
    // Chunks of whole 64-row panel groups, about four per thread, taken dynamically.
    const int n_threads = pool_.size();
    int chunk = (N + 4 * n_threads - 1) / (4 * n_threads);
    chunk = std::max(64, (chunk + 63) / 64 * 64);
    const int n_tasks = (N + chunk - 1) / chunk;
    pool_.run(n_tasks, [&](int task, int) {
        const int n0 = task * chunk, n1 = std::min(N, n0 + chunk);
        k_.gemm(wtype_, w.packed.get(), K, x, ldx, T, y, ldy, n0, n1, accumulate);
    });
}

template <class F>
void CpuBackend::rows(int T, F&& f) {
    const int per = std::max(1, (T + 4 * pool_.size() - 1) / (4 * pool_.size()));
    const int n_tasks = (T + per - 1) / per;
    pool_.run(n_tasks, [&](int task, int) {
        for (int r = task * per, e = std::min(T, r + per); r < e; ++r) f(r);
    });
}

// Per (token, KV head) asymmetric quantization: x ~= code * scale + min.
void CpuBackend::write_quantized(const float* k, const float* v, int block, int slot, int layer) {
    const int hd = cfg_.head_dim, nkv = cfg_.num_kv_heads, bs = lim_.block_size;
    const float qmax = kvq_ == 8 ? 255.0f : 15.0f;
    uint8_t* lb = kv_bytes_.get() + size_t(block) * block_bytes_ + size_t(layer) * ql_.layer_bytes;
    float* ks = reinterpret_cast<float*>(lb + ql_.ks_off);
    float* km = reinterpret_cast<float*>(lb + ql_.km_off);
    float* vs = reinterpret_cast<float*>(lb + ql_.vs_off);
    float* vm = reinterpret_cast<float*>(lb + ql_.vm_off);
    auto params = [&](const float* x, float* sc, float* mn) {
        float lo = x[0], hi = x[0];
        for (int i = 1; i < hd; ++i) lo = std::min(lo, x[i]), hi = std::max(hi, x[i]);
        *mn = lo;
        *sc = hi > lo ? (hi - lo) / qmax : 1.0f;
    };
    auto code = [&](float x, float sc, float mn) {
        return uint8_t(std::min(qmax, std::max(0.0f, std::nearbyint((x - mn) / sc))));
    };
    // Static scales: [layer][K scale, K offset, V scale, V offset][head].
    const float* stat = kv_params_.empty() ? nullptr : kv_params_.data() + size_t(layer) * 4 * nkv;
    for (int h = 0; h < nkv; ++h) {
        const float* kh = k + size_t(h) * hd;
        const float* vh = v + size_t(h) * hd;
        float s, m;
        if (stat) s = stat[h], m = stat[nkv + h];
        else params(kh, &s, &m);
        ks[h * bs + slot] = s, km[h * bs + slot] = m;
        for (int i = 0; i < hd; ++i) {
            uint8_t* row = lb + size_t(h * hd + i) * ql_.k_row;
            const uint8_t c = code(kh[i], s, m);
            if (kvq_ == 8) {
                row[slot] = c;
            } else {
                // Two positions share a byte and may be written by two threads.
                const int sh = (slot & 1) * 4;
                __atomic_fetch_and(&row[slot >> 1], uint8_t(~(0xF << sh)), __ATOMIC_RELAXED);
                __atomic_fetch_or(&row[slot >> 1], uint8_t(c << sh), __ATOMIC_RELAXED);
            }
        }
        if (stat) s = stat[2 * nkv + h], m = stat[3 * nkv + h];
        else params(vh, &s, &m);
        vs[h * bs + slot] = s, vm[h * bs + slot] = m;
        uint8_t* vrow = lb + ql_.v_off + size_t(slot) * ql_.v_row;
        for (int i = 0; i < hd; ++i) {
            const uint8_t c = code(vh[i], s, m);
            const size_t ch = size_t(h * hd + i);
            if (kvq_ == 8) {
                vrow[ch] = c;
            } else if (ch % 2 == 0) {
                vrow[ch / 2] = c;
            } else {
                vrow[ch / 2] = uint8_t(vrow[ch / 2] | (c << 4));
            }
        }
    }
}

void CpuBackend::attention(int layer) {
    const BatchPlan& plan = *plan_;
    const int T = T_;
    const int hd = cfg_.head_dim, nkv = cfg_.num_kv_heads, group = cfg_.num_heads / nkv;
    const size_t kvs = size_t(cfg_.kv_size()), qkv_ld = size_t(cfg_.q_size()) + 2 * kvs;
    const size_t layer_off = size_t(layer) * 2 * size_t(lim_.block_size) * kvs;
    const size_t scratch_per = scratch_.size() / size_t(pool_.size());
    const float scale = 1.0f / std::sqrt(float(hd));
    pool_.run(T * nkv, [&](int task, int thread) {
        const int r = task / nkv, kh = task % nkv;
        const BatchPlan::Seq& s = plan.seqs[size_t(row_seq_[size_t(r)])];
        const int pos = plan.positions[size_t(r)];
        // What both cache formats share: this row's heads, its context, buffers.
        auto common = [&](auto& a) {
            a.q = qkv_.data() + size_t(r) * qkv_ld + size_t(kh * group * hd);
            a.group = group;
            a.head_dim = hd;
            a.block_table = s.blocks;
            a.block_size = lim_.block_size;
            a.ctx_end = pos + 1;
            a.ctx_begin = cfg_.sliding_window > 0 ? std::max(0, pos + 1 - cfg_.sliding_window) : 0;
            a.scale = scale;
            a.out = attn_.data() + size_t(r) * size_t(cfg_.q_size()) + size_t(kh * group * hd);
            a.scratch = scratch_.data() + size_t(thread) * scratch_per;
        };
        if (kvq_) {
            const size_t bs = size_t(lim_.block_size);
            const uint8_t* lb = kv_bytes_.get() + size_t(layer) * ql_.layer_bytes;
            cpu::AttnQArgs a;
            common(a);
            a.bits = kvq_;
            a.k_base = lb + size_t(kh * hd) * ql_.k_row;
            a.v_base = lb + ql_.v_off + size_t(kh * hd) * size_t(kvq_) / 8;
            a.block_stride_bytes = block_bytes_;
            a.k_row = ql_.k_row;
            a.v_row = ql_.v_row;
            a.k_scale = reinterpret_cast<const float*>(lb + ql_.ks_off) + size_t(kh) * bs;
            a.k_min = reinterpret_cast<const float*>(lb + ql_.km_off) + size_t(kh) * bs;
            a.v_scale = reinterpret_cast<const float*>(lb + ql_.vs_off) + size_t(kh) * bs;
            a.v_min = reinterpret_cast<const float*>(lb + ql_.vm_off) + size_t(kh) * bs;
            a.param_stride = block_bytes_ / 4;
            k_.attention_q(a);
        } else {
            cpu::AttnArgs a;
            common(a);
            a.k_base = kv_ + layer_off + size_t(kh * hd) * size_t(lim_.block_size);
            a.v_base = kv_ + layer_off + size_t(lim_.block_size) * kvs + size_t(kh * hd);
            a.block_stride = block_stride_;
            a.slot_stride = kvs;
            k_.attention(a);
        }
    });
}

// Bias, q/k norm, RoPE; K and V into the paged cache.
void CpuBackend::qkv_rope_cache(const QkvEpilogue& e) {
    const size_t hd = size_t(cfg_.head_dim), nq = size_t(cfg_.num_heads), nkv = size_t(cfg_.num_kv_heads);
    const size_t qs = nq * hd, kvs = nkv * hd, qkv_ld = qs + 2 * kvs, half = hd / 2;
    const float eps = float(cfg_.rms_norm_eps);
    const size_t bs = size_t(lim_.block_size);
    const size_t layer_off = size_t(e.layer) * 2 * bs * kvs;
    const std::vector<float>* bias = e.bias == kNoWeight ? nullptr : &biases_[size_t(e.bias)];
    const uint16_t* qn = e.q_norm == kNoWeight ? nullptr : w_[size_t(e.q_norm)].data;
    const uint16_t* kn = e.k_norm == kNoWeight ? nullptr : w_[size_t(e.k_norm)].data;
    rows(T_, [&](int r) {
        float* q = qkv_.data() + size_t(r) * qkv_ld;
        float* k = q + qs;
        float* v = k + kvs;
        if (bias)
            for (size_t i = 0; i < qkv_ld; ++i) q[i] += (*bias)[i];
        if (qn)
            for (size_t hh = 0; hh < nq; ++hh) k_.rmsnorm(q + hh * hd, qn, wtype_, int(hd), eps, q + hh * hd);
        if (kn)
            for (size_t hh = 0; hh < nkv; ++hh) k_.rmsnorm(k + hh * hd, kn, wtype_, int(hd), eps, k + hh * hd);
        const int pos = plan_->positions[size_t(r)];
        const float* c = rope_cos_.data() + size_t(pos) * half;
        const float* s = rope_sin_.data() + size_t(pos) * half;
        auto rope = [&](float* x) {
            for (size_t i = 0; i < half; ++i) {
                float x0 = x[i], x1 = x[i + half];
                x[i] = x0 * c[i] - x1 * s[i];
                x[i + half] = x1 * c[i] + x0 * s[i];
            }
        };
        for (size_t hh = 0; hh < nq; ++hh) rope(q + hh * hd);
        for (size_t hh = 0; hh < nkv; ++hh) rope(k + hh * hd);
        const BatchPlan::Seq& sq = plan_->seqs[size_t(row_seq_[size_t(r)])];
        const int block = sq.blocks[size_t(pos) / bs];
        if (kvq_) {
            write_quantized(k, v, block, int(size_t(pos) % bs), e.layer);
            return;
        }
        float* slot = kv_ + size_t(block) * block_stride_ + layer_off + (size_t(pos) % bs) * kvs;
        // K transposed within the block ([channel][slot]), V as rows.
        float* kt = kv_ + size_t(block) * block_stride_ + layer_off + size_t(pos) % bs;
        for (size_t i = 0; i < kvs; ++i) kt[i * bs] = k[i];
        std::memcpy(slot + bs * kvs, v, kvs * 4);
    });
}

void CpuBackend::logits(WeightId final_norm, WeightId output) {
    const int L = int(plan_->logit_rows.size());
    last_logit_rows_ = L;
    if (L == 0) return;
    const size_t H = size_t(cfg_.hidden_size);
    const float eps = float(cfg_.rms_norm_eps);
    const uint16_t* g = w_[size_t(final_norm)].data;
    rows(L, [&](int i) {
        k_.rmsnorm(x_.data() + size_t(plan_->logit_rows[size_t(i)]) * H, g, wtype_, int(H), eps,
                   hn_.data() + size_t(i) * H);
    });
    gemm(w_[size_t(output)], hn_.data(), H, L, logits_.data(), size_t(out_rows_), false);
}

float* CpuBackend::forward(const BatchPlan& plan) {
    const int T = int(plan.tokens.size());
    const int L = int(plan.logit_rows.size());
    if (T == 0 || T > lim_.max_batch_tokens || L > lim_.max_logit_rows)
        throw Error("cpu backend: batch plan outside the limits it was initialized with");
    for (size_t s = 0; s < plan.seqs.size(); ++s)
        for (int r = 0; r < plan.seqs[s].n_rows; ++r) row_seq_[size_t(plan.seqs[s].row_begin + r)] = int(s);
    plan_ = &plan;
    T_ = T;
    program_->forward(*this);
    plan_ = nullptr;
    return logits_.data();
}

void CpuBackend::token_logprobs(const int* logit_index, const int* targets, int n, float* out) {
    const size_t V = size_t(cfg_.vocab_size);
    rows(n, [&](int i) {
        const float* lg = logits_.data() + size_t(logit_index[i]) * V;
        out[i] = lg[targets[i]] - row_math().logsumexp(lg, int(V));
    });
}

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const Workspace& ws, const CpuBackendOptions& opt) {
    return std::make_unique<CpuBackend>(ws, opt);
}

}  // namespace tmc
