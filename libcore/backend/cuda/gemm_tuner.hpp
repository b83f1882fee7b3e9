// The algorithm of each linear layer's matmul, by number of rows, picked by
// timing at start-up.
//
// cublasGemmEx's default algorithm is a heuristic; between about 100 and 500
// rows it is often not cuBLAS's fastest on an H100 (gemm_bench, random
// data: the down projection of the 8B model at 381 rows 89 us by default,
// 66 us by the second of cuBLASLt's heuristics). For each weight shape the
// tuner times cublasGemmEx's default and cuBLASLt's first heuristics at a
// ladder of row counts, reading the model's own weight copies in turn (so
// none is served from L2) and random activations, and keeps a cuBLASLt
// algorithm only where it is clearly faster (kMinGain). A step of T rows uses
// the pick of the smallest rung >= T, when cuBLASLt accepts it for T.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <functional>
#include <utility>
#include <vector>

namespace tmc::cuda {

class GemmTuner {
public:
    // Y[T, n] (ldy) = X[T, k] W[n, k]^T + beta Y; W and X of type `ab`,
    // fp32 accumulation.
    struct Shape {
        int n = 0, k = 0;
        cudaDataType ytype = CUDA_R_32F;
        int ldy = 0;
        float beta = 0;
    };
    // What one rung's timing found (tm-run --verbose prints them).
    struct Pick {
        int rows = 0;
        int heuristic = -1;  // -1: cublasGemmEx's default
        double us_default = 0, us_pick = 0;
    };
    static constexpr double kMinGain = 1.04;  // a cuBLASLt pick must be this much faster

    // log: a pick that does not apply to a row count is said on standard error.
    GemmTuner(cudaDataType ab, cudaStream_t stream, void* workspace, size_t workspace_bytes, bool log = false);
    ~GemmTuner();
    GemmTuner(const GemmTuner&) = delete;
    GemmTuner& operator=(const GemmTuner&) = delete;

    // Tunes a shape at the rungs up to tune_rows (<= max_rows; larger calls
    // take the last rung's pick), for calls of up to max_rows rows; returns
    // its id for run(). `weights`: the shape's matrices (one per layer); x:
    // at least tune_rows x k activations; y: room for tune_rows rows;
    // gemm_ex(T, w) runs the default algorithm on the same stream.
    // With `cached` (rows, heuristic) pairs for every rung this call would
    // time (a previous run's picks(), gemm_tune_cache.hpp), nothing is
    // timed: the picks are taken as they are.
    int add(const Shape& s, const std::vector<const void*>& weights, const void* x, void* y, int max_rows,
            int tune_rows, const std::function<void(int, const void*)>& gemm_ex,
            const std::vector<std::pair<int, int>>* cached = nullptr);
    bool timed(int shape) const { return shapes_[size_t(shape)].timed; }
    // Runs Y = X W^T (+ beta Y) for T rows with the shape's pick on the
    // stream (graph capture allowed); false: the pick is the default, or the
    // call is not the shape's (output type, ldy, beta), and the caller runs it.
    bool run(int shape, int T, const void* w, const void* x, void* y, cudaDataType ytype, int ldy, float beta);
    const std::vector<Pick>& picks(int shape) const { return shapes_[size_t(shape)].picks; }

private:
    struct Rows {  // a row count seen by run(): 0 unknown, 1 cuBLASLt, 2 default
        int state = 0;
        cublasLtMatrixLayout_t lx = nullptr, ly = nullptr;
        cublasLtMatmulAlgo_t algo{};
    };
    struct Entry {
        Shape s;
        cublasLtMatrixLayout_t lw = nullptr;
        std::vector<Pick> picks;
        std::vector<cublasLtMatmulAlgo_t> algos;  // per rung (valid where picks[i].heuristic >= 0)
        std::vector<Rows> rows;                   // by T
        bool timed = false;                       // false: picks from a cache
    };
    void layouts(const Shape& s, int T, cublasLtMatrixLayout_t& lx, cublasLtMatrixLayout_t& ly) const;
    cudaDataType ab_;
    bool log_ = false;
    cudaStream_t stream_;
    void* ws_;
    size_t ws_bytes_;
    cublasLtHandle_t lt_ = nullptr;
    cublasLtMatmulDesc_t desc_ = nullptr;
    cublasLtMatmulPreference_t pref_ = nullptr;
    cudaEvent_t ev_[2] = {};
    std::vector<Entry> shapes_;
};

// n random 16-bit values of `type` (CUDA_R_16BF or CUDA_R_16F) at p, about
// N(0, scale^2), then a stream synchronization: timing data (tensor cores
// draw more power, and run slower, on random data than on a constant).
void fill_random(cudaDataType type, void* p, size_t n, float scale, cudaStream_t s);

// The rungs: row counts at which shapes are timed.
const std::vector<int>& gemm_tuner_rungs();

}  // namespace tmc::cuda
