// The projections of the 8B model (bf16 weights, fp32 or bf16 outputs, as
// the CUDA backend calls them) at the row counts of decode and mixed steps:
// microseconds of cublasGemmEx's default algorithm, of cuBLASLt's first
// heuristic, and of the fastest of its first 16 heuristics, each timed;
// TFLOP/s of the default; and
// the time the weights' bytes take at the copy bandwidth measured in the
// same run. Successive calls read different copies of the weights (as the
// layers of a step do), so that none is served from L2. One JSON line per
// (shape, rows). A build without CUDA prints nothing and exits 0.
//   gemm_bench
#include <cstdio>

#if TM_WITH_CUDA
#include <cublasLt.h>
#include <cublas_api.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "backend/cuda/cublas_dyn.hpp"
#include "backend/cuda/gemm_tuner.hpp"
#include "tests/bench/gpu_timing.hpp"

int main() {
    const tmc::cuda::CublasLt& lt = tmc::cuda::cublas_lt();
    const auto& cb = tmc::cuda::cublas();
    cublasHandle_t h;
    cb.create(&h);
    cublasLtHandle_t lh;
    lt.create(&lh);
    const size_t ws_bytes = size_t(32) << 20;
    void* ws = nullptr;
    cudaMalloc(&ws, ws_bytes);
    cb.set_workspace(h, ws, ws_bytes);
    struct Shape {
        const char* name;
        int n, k;
        bool f32_out;
    };
    const std::vector<Shape> shapes = {
        {"qkv", 6144, 4096, true}, {"o", 4096, 4096, true}, {"gate_up", 28672, 4096, false}, {"down", 4096, 14336, true}};
    const std::vector<int> rows = {3, 8, 16, 23, 32, 49, 64, 92, 128, 176, 381, 736, 1412, 3577};
    const int max_rows = 3577;
    void *wbuf = nullptr, *x = nullptr, *y = nullptr;
    const size_t wbuf_bytes = size_t(28672) * 14336 * 2;
    cudaMalloc(&wbuf, wbuf_bytes);
    const double copy_gbs = tmc::bench::copy_bandwidth_gbs();  // the roofline

    cudaMalloc(&x, size_t(max_rows) * 14336 * 2);
    cudaMalloc(&y, size_t(max_rows) * 28672 * 4);
    // Random values (weights about N(0, 0.02), activations about N(0, 1)):
    // tensor cores draw more power on them than on a constant, and the clock
    // falls accordingly.
    tmc::cuda::fill_random(CUDA_R_16BF, wbuf, wbuf_bytes / 2, 0.02f, nullptr);
    tmc::cuda::fill_random(CUDA_R_16BF, x, size_t(max_rows) * 14336, 1.0f, nullptr);
    const float alpha = 1.0f, beta = 0.0f;
    for (const Shape& s : shapes)
        for (int m : rows) {
            const cudaDataType yt = s.f32_out ? CUDA_R_32F : CUDA_R_16BF;
            // Copies of W in turn (at least 3 fit), as a step's layers.
            const size_t wbytes = size_t(s.n) * s.k * 2, copies = wbuf_bytes / wbytes;
            size_t turn = 0;
            const auto next_w = [&] { return static_cast<char*>(wbuf) + (turn++ % copies) * wbytes; };
            // Row-major Y[m, n] = X[m, k] W[n, k]^T as column-major Y^T = W^T' X^T.
            const double us_default = 1e6 * tmc::bench::time_it(
                [&] {
                    cb.gemm_ex(h, CUBLAS_OP_T, CUBLAS_OP_N, s.n, m, s.k, &alpha, next_w(), CUDA_R_16BF, s.k, x, CUDA_R_16BF,
                               s.k, &beta, y, yt, s.n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
                },
                20);
            cublasLtMatmulDesc_t d;
            lt.desc_create(&d, CUBLAS_COMPUTE_32F, CUDA_R_32F);
            const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
            lt.desc_set(d, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
            lt.desc_set(d, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
            cublasLtMatrixLayout_t la, lb, lc;
            lt.layout_create(&la, CUDA_R_16BF, uint64_t(s.k), uint64_t(s.n), s.k);
            lt.layout_create(&lb, CUDA_R_16BF, uint64_t(s.k), uint64_t(m), s.k);
            lt.layout_create(&lc, yt, uint64_t(s.n), uint64_t(m), s.n);
            cublasLtMatmulPreference_t pref;
            lt.pref_create(&pref);
            const uint64_t wsb = ws_bytes;
            lt.pref_set(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof wsb);
            cublasLtMatmulHeuristicResult_t res[16];
            int got = 0;
            lt.heuristic(lh, d, la, lb, lc, lc, pref, 16, res, &got);
            double first = 0, best = 1e30;
            int best_i = -1;
            for (int i = 0; i < got; ++i) {
                const double us = 1e6 * tmc::bench::time_it(
                    [&] {
                        lt.matmul(lh, d, &alpha, next_w(), la, x, lb, &beta, y, lc, y, lc, &res[i].algo, ws, ws_bytes, nullptr);
                    },
                    20);
                if (cudaGetLastError() != cudaSuccess) continue;
                if (i == 0) first = us;
                if (us < best) best = us, best_i = i;
            }
            const double tf = 2.0 * m * s.n * double(s.k) / (us_default * 1e-6) / 1e12;
            const double us_bytes = double(s.n) * s.k * 2 / (copy_gbs * 1e9) * 1e6;
            std::printf("{\"bench\": \"gemm\", \"shape\": \"%s\", \"rows\": %d, \"us_default\": %.1f, \"us_lt_first\": "
                        "%.1f, \"us_lt_best\": %.1f, \"best_index\": %d, \"of\": %d, \"x_best\": %.3f, \"TFLOPs\": "
                        "%.1f, \"us_weight_bytes\": %.1f}\n",
                        s.name, m, us_default, first, best, best_i, got, us_default / best, tf, us_bytes);
            lt.pref_destroy(pref);
            lt.layout_destroy(la), lt.layout_destroy(lb), lt.layout_destroy(lc);
            lt.desc_destroy(d);
        }
    lt.destroy(lh);
    return 0;
}
#else
int main() { return 0; }
#endif
