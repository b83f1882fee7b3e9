// Timing shared by the GPU benchmarks (builds with CUDA only).
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

namespace tmc::bench {

// Seconds per call of f (work on the default stream), over `reps` calls
// after 3 warm-up calls.
template <class F>
double time_it(F&& f, int reps) {
    cudaEvent_t a, b;
    cudaEventCreate(&a), cudaEventCreate(&b);
    for (int i = 0; i < 3; ++i) f();
    cudaEventRecord(a);
    for (int i = 0; i < reps; ++i) f();
    cudaEventRecord(b);
    if (const cudaError_t e = cudaEventSynchronize(b); e != cudaSuccess) {
        std::fprintf(stderr, "bench: timing: %s\n", cudaGetErrorString(e));
        std::exit(1);
    }
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    cudaEventDestroy(a), cudaEventDestroy(b);
    return ms / 1e3 / reps;
}

// The roofline of memory-bound kernels: a device-to-device copy of 1 GiB,
// bytes read + written per second, in GB/s (also printed as a JSON line).
inline double copy_bandwidth_gbs() {
    const size_t bytes = size_t(1) << 30;
    void *src = nullptr, *dst = nullptr;
    if (cudaMalloc(&src, bytes) != cudaSuccess || cudaMalloc(&dst, bytes) != cudaSuccess) {
        std::fprintf(stderr, "bench: cudaMalloc of the copy buffers failed\n");
        std::exit(1);
    }
    const double s = time_it([&] { cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice); }, 10);
    cudaFree(src), cudaFree(dst);
    const double gbs = 2.0 * double(bytes) / s / 1e9;
    std::printf("{\"bench\": \"copy_bandwidth\", \"value\": %.1f, \"unit\": \"GB/s\"}\n", gbs);
    return gbs;
}

}  // namespace tmc::bench
