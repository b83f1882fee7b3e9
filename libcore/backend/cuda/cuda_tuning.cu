// GEMM dispatch of the CUDA backend (cuda_backend.hpp): the matrix-vector
// kernel for one or two rows, else cuBLAS with the algorithm the start-up
// tuning picked for the shape and row count.
#include "backend/cuda/cuda_backend.hpp"

namespace tmc::gpu {

// The linear layers a program multiplies, in the order it calls them: which
// weight, from which buffer, into what (tune_gemms groups them by shape).
class LinearRecorder final : public ForwardOps {
public:
    enum Into { Buffer, Residual, Logits };
    struct Use {
        WeightId w;
        Buf in, out;
        Into into;
    };
    std::vector<Use> uses;
    void embed(WeightId) override {}
    void rmsnorm(WeightId) override {}
    void linear(WeightId w, Buf in, Buf out) override { uses.push_back({w, in, out, Buffer}); }
    void add_linear(WeightId w, Buf in) override { uses.push_back({w, in, in, Residual}); }
    void qkv_rope_cache(const QkvEpilogue&) override {}
    void attention(int) override {}
    void silu_mul() override {}
    void logits(WeightId, WeightId output) override { uses.push_back({output, Buf::Normed, Buf::Normed, Logits}); }
};

// Each projection's matmul algorithm by number of rows (gemm_tuner.hpp),
// timed on this model's weights at start-up: one shape for each kind of
// linear layer the program multiplies (its calls of the same weight shape,
// input and output), timed over all of its weights in turn.
void CudaBackend::tune_gemms() {
    const auto t0 = std::chrono::steady_clock::now();
    const bool log = sw_.gemm_tune_log;
    tuner_ = std::make_unique<cuda::GemmTuner>(cdt_, stream_, blas_ws_.p, blas_ws_.n, log);
    const int T = lim_.max_batch_tokens, H = cfg_.hidden_size;
    const float residual_beta = !comm_ || rank_ == 0 ? 1.0f : 0.0f;  // add_linear's
    // Picks of earlier runs on this device and cuBLASLt (formats/gemm-tune.md).
    const std::string cache_path = gemm_tune_cache_path();
    const std::vector<GemmTuneEntry> cache = sw_.retune ? std::vector<GemmTuneEntry>{} : read_gemm_tune_cache(cache_path);
    std::vector<GemmTuneEntry> fresh;
    const char* ab = dt_ == cuda::Dt::BF16 ? "bf16" : "f16";
    const auto type_name = [&](cudaDataType t) { return t == CUDA_R_32F ? "f32" : ab; };
    const int lt_version = int(cuda::cublas_lt().version());
    LinearRecorder rec;
    program_->forward(rec);
    std::vector<void*> filled;  // input buffers holding random activations
    std::vector<bool> grouped(rec.uses.size(), false);
    int n_shapes = 0;
    for (size_t u = 0; u < rec.uses.size(); ++u) {
        if (grouped[u]) continue;
        const LinearRecorder::Use& use = rec.uses[u];
        const DevWeight& w0 = w_[size_t(use.w)];
        // The calls of this kind: same shape, input and output.
        std::vector<WeightId> ids;
        for (size_t v = u; v < rec.uses.size(); ++v) {
            const auto& o = rec.uses[v];
            const DevWeight& wv = w_[size_t(o.w)];
            if (grouped[v] || o.into != use.into || o.in != use.in || o.out != use.out || wv.rows != w0.rows ||
                wv.cols != w0.cols)
                continue;
            grouped[v] = true;
            if (std::find(ids.begin(), ids.end(), o.w) == ids.end()) ids.push_back(o.w);
        }
        const bool logit_rows = use.into == LinearRecorder::Logits;
        void* x = logit_rows ? static_cast<void*>(hn_.p) : buf(use.in);
        void* y = use.into == LinearRecorder::Buffer ? buf(use.out) : logit_rows ? static_cast<void*>(logits_.p) : x_.p;
        const cudaDataType yt = use.into == LinearRecorder::Buffer ? cdt_ : CUDA_R_32F;
        const float beta = use.into == LinearRecorder::Residual ? residual_beta : 0.0f;
        const int max_rows = logit_rows ? lim_.max_logit_rows : T;
        const int ldy = w0.rows;
        std::vector<const void*> ptrs;
        for (WeightId id : ids) ptrs.push_back(w_[size_t(id)].ptr);
        const cuda::GemmTuner::Shape sh{w0.rows, w0.cols, yt, ldy, beta};
        GemmTuneEntry key;
        key.device = device_name_, key.cublaslt = lt_version, key.ab = ab, key.y = type_name(yt);
        key.n = w0.rows, key.k = w0.cols, key.ldy = ldy, key.beta = beta;
        const std::vector<std::pair<int, int>>* cached = nullptr;
        for (auto& c : cache)
            if (c.same_shape(key)) cached = &c.picks;
        // Random activations for the timing.
        if (!cached && std::find(filled.begin(), filled.end(), x) == filled.end()) {
            cuda::fill_random(cdt_, x, size_t(max_rows) * size_t(w0.cols), 1.0f, stream_);
            filled.push_back(x);
        }
        // The output layer only to 1,024 rows (a batch's sampled rows; more
        // only with prompt log-probabilities): its tuning is the longest.
        const int tune_rows = logit_rows ? std::min(max_rows, 1024) : max_rows;
        const int id = tuner_->add(
            sh, ptrs, x, y, max_rows, tune_rows,
            [&](int rows, const void* w) {
                const float alpha = 1.0f;
                check(cuda::cublas().gemm_ex(blas_, CUBLAS_OP_T, CUBLAS_OP_N, w0.rows, rows, w0.cols, &alpha, w, cdt_,
                                             w0.cols, x, cdt_, w0.cols, &beta, y, yt, ldy, CUBLAS_COMPUTE_32F,
                                             CUBLAS_GEMM_DEFAULT),
                      "gemm");
            },
            cached);
        ++n_shapes;
        for (WeightId wid : ids) w_[size_t(wid)].tuned = id;
        if (tuner_->timed(id)) {
            // Saved with the rungs of earlier runs beyond this one's largest.
            for (auto& p : tuner_->picks(id)) key.picks.emplace_back(p.rows, p.heuristic);
            if (cached)
                for (auto& c : *cached)
                    if (c.first > key.picks.back().first) key.picks.push_back(c);
            fresh.push_back(std::move(key));
        }
        if (log)
            for (auto& p : tuner_->picks(id))
                std::fprintf(stderr, "tm cuda gemm %dx%d rows %d: %s, pick %d %.1f us (default %.1f us)\n", w0.rows,
                             w0.cols, p.rows, tuner_->timed(id) ? "timed" : "cached", p.heuristic, p.us_pick,
                             p.us_default);
    }
    check(cudaMemsetAsync(x_.p, 0, size_t(T) * H * 4, stream_), "tuning");
    check(cudaStreamSynchronize(stream_), "tuning");
    const bool saved = !fresh.empty() && write_gemm_tune_cache(cache_path, fresh);
    if (log)
        std::fprintf(stderr, "tm cuda gemm: %zu of %d shapes timed in %.2f s%s%s\n", fresh.size(), n_shapes,
                     std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
                     saved ? ", saved to " : "", saved ? cache_path.c_str() : "");
}

void CudaBackend::gemm(const DevWeight& w, const void* x, int T, void* y, cudaDataType ytype, int ldy, float beta) {
    // One or two decode rows: our matrix-vector kernel (streams W once at
    // HBM speed). From 3 rows on cuBLAS is faster on an H100 (offline step
    // logs of the 8B model: 4 rows 11.4 vs 12.8 ms a step, 8 rows 17.4 vs 22.1).
    constexpr int kGemvRows = 2;
    if (sw_.gemv && T <= kGemvRows &&
        cuda::gemv(dt_, w.ptr, w.rows, w.cols, x, w.cols, T, y, ytype == CUDA_R_32F, ldy, beta, stream_)) {
        launched("gemv");
        return;
    }
    if (tuner_ && w.tuned >= 0 && tuner_->run(w.tuned, T, w.ptr, x, y, ytype, ldy, beta)) return;
    const float alpha = 1.0f;
    // Row-major Y[T, N] = X[T, K] W[N, K]^T is column-major Y^T = W X^T.
    check(cuda::cublas().gemm_ex(blas_, CUBLAS_OP_T, CUBLAS_OP_N, w.rows, T, w.cols, &alpha, w.ptr, cdt_, w.cols, x,
                                 cdt_, w.cols, &beta, y, ytype, ldy, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          "gemm");
}

}  // namespace tmc::gpu
