#include "backend/cuda/gemm_tuner.hpp"

#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "backend/cuda/cublas_dyn.hpp"
#include "tm/error.hpp"

namespace tmc::cuda {

namespace {

void lt_check(cublasStatus_t s, const char* what) {
    if (s != CUBLAS_STATUS_SUCCESS) throw Error(std::string("cuBLASLt: ") + what + ": status " + std::to_string(int(s)));
}

void rt_check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) throw Error(std::string("CUDA: ") + what + ": " + cudaGetErrorString(e));
}

constexpr int kHeuristics = 8;  // cuBLASLt's first heuristics timed at each rung
constexpr int kCalls = 3;       // timed calls per candidate and round (after one to warm up)

}  // namespace

void fill_random(cudaDataType type, void* p, size_t n, float scale, cudaStream_t s) {
    std::vector<uint16_t> r(size_t(1) << 22);
    uint64_t st = 0x9e3779b97f4a7c15ull;  // xorshift64
    for (auto& v : r) {
        st ^= st << 13, st ^= st >> 7, st ^= st << 17;
        const float u = (float(st >> 40) / float(1 << 24) - 0.5f) * 3.46f * scale;  // uniform, variance scale^2
        if (type == CUDA_R_16BF) {
            uint32_t b;
            std::memcpy(&b, &u, 4);
            v = uint16_t(b >> 16);
        } else {
            const __half h = __float2half_rn(u);
            std::memcpy(&v, &h, 2);
        }
    }
    for (size_t off = 0; off < n; off += r.size())
        rt_check(cudaMemcpyAsync(static_cast<uint16_t*>(p) + off, r.data(), std::min(r.size(), n - off) * 2,
                                 cudaMemcpyHostToDevice, s),
                 "random data");
    rt_check(cudaStreamSynchronize(s), "random data");
}

const std::vector<int>& gemm_tuner_rungs() {
    static const std::vector<int> r = {4,   8,   16,  24,  32,  48,  64,  80,   96,   112,  128,  160,  192, 224,
                                       256, 320, 384, 448, 512, 640, 768, 1024, 1536, 2048, 3072, 4096, 8192};
    return r;
}

GemmTuner::GemmTuner(cudaDataType ab, cudaStream_t stream, void* workspace, size_t workspace_bytes, bool log)
    : ab_(ab), log_(log), stream_(stream), ws_(workspace), ws_bytes_(workspace_bytes) {
    const CublasLt& lt = cublas_lt();
    lt_check(lt.create(&lt_), "create");
    lt_check(lt.desc_create(&desc_, CUBLAS_COMPUTE_32F, CUDA_R_32F), "matmul descriptor");
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    lt_check(lt.desc_set(desc_, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta), "transa");
    lt_check(lt.desc_set(desc_, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb), "transb");
    lt_check(lt.pref_create(&pref_), "preference");
    const uint64_t wsb = ws_bytes_;
    lt_check(lt.pref_set(pref_, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof wsb), "workspace preference");
    for (auto& e : ev_) rt_check(cudaEventCreate(&e), "cudaEventCreate");
}

GemmTuner::~GemmTuner() {
    const CublasLt& lt = cublas_lt();
    for (auto& e : shapes_) {
        for (auto& r : e.rows) {
            if (r.lx) lt.layout_destroy(r.lx);
            if (r.ly) lt.layout_destroy(r.ly);
        }
        if (e.lw) lt.layout_destroy(e.lw);
    }
    for (auto& e : ev_)
        if (e) cudaEventDestroy(e);
    if (pref_) lt.pref_destroy(pref_);
    if (desc_) lt.desc_destroy(desc_);
    if (lt_) lt.destroy(lt_);
}

// Column-major views: X^T is k x T (ld k), Y^T is n x T (ld ldy).
void GemmTuner::layouts(const Shape& s, int T, cublasLtMatrixLayout_t& lx, cublasLtMatrixLayout_t& ly) const {
    const CublasLt& lt = cublas_lt();
    lt_check(lt.layout_create(&lx, ab_, uint64_t(s.k), uint64_t(T), s.k), "layout");
    lt_check(lt.layout_create(&ly, s.ytype, uint64_t(s.n), uint64_t(T), s.ldy), "layout");
}

int GemmTuner::add(const Shape& s, const std::vector<const void*>& weights, const void* x, void* y, int max_rows,
                   int tune_rows, const std::function<void(int, const void*)>& gemm_ex,
                   const std::vector<std::pair<int, int>>* cached) {
    const CublasLt& lt = cublas_lt();
    Entry e;
    e.s = s;
    lt_check(lt.layout_create(&e.lw, ab_, uint64_t(s.k), uint64_t(s.n), s.k), "layout");
    size_t turn = 0;
    const auto next_w = [&] { return weights[turn++ % weights.size()]; };
    const float alpha = 1.0f;
    // Microseconds per call of `f` (one call to warm up, then kCalls).
    const auto time = [&](auto&& f) {
        f(next_w());
        rt_check(cudaEventRecord(ev_[0], stream_), "event");
        for (int i = 0; i < kCalls; ++i) f(next_w());
        rt_check(cudaEventRecord(ev_[1], stream_), "event");
        rt_check(cudaEventSynchronize(ev_[1]), "tuning");
        float ms = 0;
        rt_check(cudaEventElapsedTime(&ms, ev_[0], ev_[1]), "event");
        return 1e3 * double(ms) / kCalls;
    };
    tune_rows = std::clamp(tune_rows, 1, max_rows);
    std::vector<int> rungs;
    for (int T : gemm_tuner_rungs()) {
        if (T > tune_rows && !rungs.empty()) break;
        rungs.push_back(std::min(T, tune_rows));
        if (rungs.back() == tune_rows) break;
    }
    // The cache serves when it has every rung (it may have more).
    std::vector<int> from_cache(rungs.size(), -2);
    bool use_cache = cached != nullptr;
    for (size_t i = 0; use_cache && i < rungs.size(); ++i) {
        for (const auto& [rows, h] : *cached)
            if (rows == rungs[i]) from_cache[i] = h;
        use_cache = from_cache[i] != -2;
    }
    e.timed = !use_cache;
    for (size_t ri = 0; ri < rungs.size(); ++ri) {
        const int T = rungs[ri];
        cublasLtMatrixLayout_t lx, ly;
        layouts(s, T, lx, ly);
        cublasLtMatmulHeuristicResult_t res[kHeuristics];
        int got = 0;
        if (lt.heuristic(lt_, desc_, e.lw, lx, ly, ly, pref_, kHeuristics, res, &got) != CUBLAS_STATUS_SUCCESS) got = 0;
        if (use_cache) {
            Pick p;
            p.rows = T;
            const int h = from_cache[ri];
            cublasLtMatmulAlgo_t algo{};
            if (h >= 0 && h < got) p.heuristic = h, algo = res[h].algo;
            e.picks.push_back(p);
            e.algos.push_back(algo);
            lt.layout_destroy(lx);
            lt.layout_destroy(ly);
            continue;
        }
        // Round 1 times every candidate; round 2 the default and the two
        // fastest again; a candidate's time is its best round.
        std::vector<double> best(size_t(got) + 1, 1e30);
        const auto measure = [&](int c) {
            double us;
            if (c == 0) {
                us = time([&](const void* w) { gemm_ex(T, w); });
            } else {
                bool ok = true;
                us = time([&](const void* w) {
                    ok &= lt.matmul(lt_, desc_, &alpha, w, e.lw, x, lx, &s.beta, y, ly, y, ly, &res[c - 1].algo, ws_,
                                    ws_bytes_, stream_) == CUBLAS_STATUS_SUCCESS;
                });
                if (cudaGetLastError() != cudaSuccess || !ok) us = 1e30;
            }
            best[size_t(c)] = std::min(best[size_t(c)], us);
        };
        for (int c = 0; c <= got; ++c) measure(c);
        std::vector<int> order(static_cast<size_t>(got));
        for (int i = 0; i < got; ++i) order[size_t(i)] = i + 1;
        std::sort(order.begin(), order.end(), [&](int a, int b) { return best[size_t(a)] < best[size_t(b)]; });
        measure(0);
        for (size_t i = 0; i < std::min<size_t>(2, order.size()); ++i) measure(order[i]);
        Pick p;
        p.rows = T;
        p.us_default = p.us_pick = best[0];
        cublasLtMatmulAlgo_t algo{};
        for (int i = 0; i < got; ++i)
            if (best[size_t(i) + 1] * kMinGain < best[0] && best[size_t(i) + 1] < p.us_pick)
                p.heuristic = i, p.us_pick = best[size_t(i) + 1], algo = res[i].algo;
        e.picks.push_back(p);
        e.algos.push_back(algo);
        lt.layout_destroy(lx);
        lt.layout_destroy(ly);
    }
    e.rows.resize(size_t(max_rows) + 1);
    shapes_.push_back(std::move(e));
    return int(shapes_.size()) - 1;
}

bool GemmTuner::run(int shape, int T, const void* w, const void* x, void* y, cudaDataType ytype, int ldy, float beta) {
    Entry& e = shapes_[size_t(shape)];
    if (T <= 0 || size_t(T) >= e.rows.size() || ytype != e.s.ytype || ldy != e.s.ldy || beta != e.s.beta) return false;
    Rows& r = e.rows[size_t(T)];
    if (r.state == 0) {
        r.state = 2;
        size_t i = 0;
        while (i + 1 < e.picks.size() && e.picks[i].rows < T) ++i;
        if (e.picks[i].heuristic >= 0) {
            const CublasLt& lt = cublas_lt();
            layouts(e.s, T, r.lx, r.ly);
            cublasLtMatmulHeuristicResult_t chk{};
            const cublasStatus_t st = lt.check(lt_, desc_, e.lw, r.lx, r.ly, r.ly, &e.algos[i], &chk);
            if (st == CUBLAS_STATUS_SUCCESS && chk.workspaceSize <= ws_bytes_) {
                r.algo = e.algos[i];
                r.state = 1;
            } else if (log_) {
                std::fprintf(stderr, "tm cuda gemm %dx%d rows %d: the pick of %d rows does not apply (status %d)\n",
                             e.s.n, e.s.k, T, e.picks[i].rows, int(st));
            }
        }
    }
    if (r.state != 1) return false;
    const float alpha = 1.0f;
    lt_check(cublas_lt().matmul(lt_, desc_, &alpha, w, e.lw, x, r.lx, &e.s.beta, y, r.ly, y, r.ly, &r.algo, ws_,
                                ws_bytes_, stream_),
             "matmul");
    return true;
}

}  // namespace tmc::cuda
