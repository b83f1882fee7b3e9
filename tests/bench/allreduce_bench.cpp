// NCCL all-reduce across every visible GPU (ranks as threads), as tensor
// parallelism uses it: the latency of one decode step's all-reduce (hidden
// floats per row) and the bus bandwidth of large messages (NCCL's busBw:
// bytes x 2 (n-1)/n / time). One JSON line per size. A build without CUDA
// prints nothing and exits 0.
//   allreduce_bench [HIDDEN]
#include <cstdio>
#include <cstdlib>

#if TM_WITH_CUDA
#include <chrono>
#include <thread>
#include <vector>

#include "backend/cuda/nccl_comm.hpp"

int main(int argc, char** argv) {
    const size_t hidden = argc > 1 ? size_t(std::atol(argv[1])) : 4096;
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n < 1) {
        std::fprintf(stderr, "allreduce_bench: no GPU\n");
        return 1;
    }
    const auto id = tmc::cuda::nccl_unique_id();
    const std::vector<size_t> sizes = {hidden, 16 * hidden, 256 * hidden, size_t(64) << 20};  // floats
    std::vector<std::vector<double>> secs(size_t(n), std::vector<double>(sizes.size()));
    std::vector<std::thread> th;
    for (int r = 0; r < n; ++r)
        th.emplace_back([&, r] {
            cudaSetDevice(r);
            cudaStream_t s;
            cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
            auto comm = tmc::cuda::nccl_communicator(id, r, n, s);
            float* d = nullptr;
            cudaMalloc(&d, sizes.back() * 4);
            cudaMemset(d, 0, sizes.back() * 4);
            for (size_t k = 0; k < sizes.size(); ++k) {
                const int reps = sizes[k] > (size_t(1) << 24) ? 20 : 200;
                for (int i = 0; i < 5; ++i) comm->all_reduce_sum(d, sizes[k]);
                cudaStreamSynchronize(s);
                const auto t0 = std::chrono::steady_clock::now();
                for (int i = 0; i < reps; ++i) comm->all_reduce_sum(d, sizes[k]);
                cudaStreamSynchronize(s);
                secs[size_t(r)][k] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
            }
            cudaFree(d);
            cudaStreamDestroy(s);
        });
    for (auto& t : th) t.join();
    for (size_t k = 0; k < sizes.size(); ++k) {
        const double t = secs[0][k], bytes = double(sizes[k]) * 4;
        const double bus = n > 1 ? bytes * 2 * (n - 1) / n / t / 1e9 : 0;
        std::printf("{\"bench\": \"allreduce\", \"gpus\": %d, \"floats\": %zu, \"us\": %.2f, \"bus_GBps\": %.1f}\n", n,
                    sizes[k], t * 1e6, bus);
    }
    return 0;
}
#else
int main() { return 0; }
#endif
