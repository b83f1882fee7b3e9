// The all-reduce of tensor parallelism across every visible GPU (ranks as
// threads): the latency of one decode step's all-reduce (hidden floats per
// row, 16 rows) launched one by one ("us") and replayed from a CUDA graph of
// 64 ("us_graph", how decode steps run), and the bus bandwidth of large
// messages (NCCL's busBw: bytes x 2 (n-1)/n / time). TM_CUDA_P2P_ALLREDUCE=1:
// messages up to 256 K floats take the peer-memory path instead of NCCL.
// One JSON line per size. A build without CUDA prints nothing and exits 0.
//   allreduce_bench [HIDDEN]
#include <cstdio>
#include <cstdlib>

#if TM_WITH_CUDA
#include <chrono>
#include <thread>
#include <vector>

#include "backend/comm.hpp"
#include "backend/cuda/nccl_comm.hpp"

int main(int argc, char** argv) {
    const size_t hidden = argc > 1 ? size_t(std::atol(argv[1])) : 4096;
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n < 1) {
        std::fprintf(stderr, "allreduce_bench: no GPU\n");
        return 1;
    }
    const auto id = tmc::cuda::nccl_unique_id();
    auto peers = tmc::cuda::make_peer_group(n);
    tmc::HostBarrier meet(n, 120);
    const std::vector<size_t> sizes = {hidden, 16 * hidden, 256 * hidden, size_t(64) << 20};  // floats
    std::vector<std::vector<double>> secs(size_t(n), std::vector<double>(sizes.size())),
        gsecs(size_t(n), std::vector<double>(sizes.size(), 0.0));
    std::vector<std::thread> th;
    for (int r = 0; r < n; ++r)
        th.emplace_back([&, r] {
            cudaSetDevice(r);
            cudaStream_t s;
            cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
            auto comm = tmc::cuda::nccl_communicator(id, r, n, s, peers);
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
                if (sizes[k] > 16 * hidden) continue;
                constexpr int kInGraph = 64;
                cudaGraph_t g;
                cudaGraphExec_t e;
                cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal);
                for (int i = 0; i < kInGraph; ++i) comm->all_reduce_sum(d, sizes[k]);
                cudaStreamEndCapture(s, &g);
                cudaGraphInstantiate(&e, g, 0);
                meet.arrive_and_wait();  // every rank's graph ready before any runs
                for (int i = 0; i < 3; ++i) cudaGraphLaunch(e, s);
                cudaStreamSynchronize(s);
                const auto g0 = std::chrono::steady_clock::now();
                for (int i = 0; i < 10; ++i) cudaGraphLaunch(e, s);
                cudaStreamSynchronize(s);
                gsecs[size_t(r)][k] =
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - g0).count() / (10 * kInGraph);
                meet.arrive_and_wait();
                cudaGraphExecDestroy(e), cudaGraphDestroy(g);
            }
            cudaFree(d);
            cudaStreamDestroy(s);
        });
    for (auto& t : th) t.join();
    for (size_t k = 0; k < sizes.size(); ++k) {
        const double t = secs[0][k], bytes = double(sizes[k]) * 4;
        const double bus = n > 1 ? bytes * 2 * (n - 1) / n / t / 1e9 : 0;
        std::printf("{\"bench\": \"allreduce\", \"gpus\": %d, \"floats\": %zu, \"us\": %.2f, ", n, sizes[k], t * 1e6);
        if (gsecs[0][k] > 0) std::printf("\"us_graph\": %.2f, ", gsecs[0][k] * 1e6);
        std::printf("\"bus_GBps\": %.1f}\n", bus);
    }
    return 0;
}
#else
int main() { return 0; }
#endif
