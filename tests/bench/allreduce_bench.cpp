// The all-reduce of tensor parallelism across every visible GPU (ranks as
// threads): the latency of one decode step's all-reduce (hidden floats per
// row, 16 rows) launched one by one ("us") and replayed from a CUDA graph of
// 64 ("us_graph", how decode steps run; "us_graph_with_norm" with the
// RMSNorm fused in, where the communicator can), and the bus bandwidth of
// large messages (NCCL's busBw: bytes x 2 (n-1)/n / time). Messages up to
// 256 K floats take the peer-memory path; TM_CUDA_P2P_ALLREDUCE=0: NCCL only.
// One JSON line per size. A build without CUDA prints nothing and exits 0.
//   allreduce_bench [HIDDEN]
#include <cstdio>
#include <cstdlib>

#if TM_WITH_CUDA
#include <chrono>
#include <cstdint>
#include <functional>
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
        gsecs(size_t(n), std::vector<double>(sizes.size(), 0.0)), nsecs = gsecs;
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
            void *ones = nullptr, *out = nullptr;
            cudaMalloc(&ones, hidden * 2);
            cudaMalloc(&out, 16 * hidden * 2);
            {
                const std::vector<uint16_t> one(hidden, 0x3f80);  // bf16 1.0
                cudaMemcpy(ones, one.data(), hidden * 2, cudaMemcpyHostToDevice);
            }
            for (size_t k = 0; k < sizes.size(); ++k) {
                const int reps = sizes[k] > (size_t(1) << 24) ? 20 : 200;
                for (int i = 0; i < 5; ++i) comm->all_reduce_sum(d, sizes[k]);
                cudaStreamSynchronize(s);
                const auto t0 = std::chrono::steady_clock::now();
                for (int i = 0; i < reps; ++i) comm->all_reduce_sum(d, sizes[k]);
                cudaStreamSynchronize(s);
                secs[size_t(r)][k] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
                if (sizes[k] > 16 * hidden) continue;
                // 64 calls captured in a graph, replayed: seconds per call.
                const auto in_graph = [&](const std::function<void()>& call) {
                    constexpr int kInGraph = 64;
                    cudaGraph_t g;
                    cudaGraphExec_t e;
                    cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal);
                    for (int i = 0; i < kInGraph; ++i) call();
                    cudaStreamEndCapture(s, &g);
                    cudaGraphInstantiate(&e, g, 0);
                    meet.arrive_and_wait();  // every rank's graph ready before any runs
                    for (int i = 0; i < 3; ++i) cudaGraphLaunch(e, s);
                    cudaStreamSynchronize(s);
                    const auto g0 = std::chrono::steady_clock::now();
                    for (int i = 0; i < 10; ++i) cudaGraphLaunch(e, s);
                    cudaStreamSynchronize(s);
                    const double t =
                        std::chrono::duration<double>(std::chrono::steady_clock::now() - g0).count() / (10 * kInGraph);
                    meet.arrive_and_wait();
                    cudaGraphExecDestroy(e), cudaGraphDestroy(g);
                    return t;
                };
                gsecs[size_t(r)][k] = in_graph([&] { comm->all_reduce_sum(d, sizes[k]); });
                // The all-reduce with the RMSNorm that follows it (bf16 out).
                const int rows = int(sizes[k] / hidden);
                bool fused = true;
                nsecs[size_t(r)][k] = in_graph([&] {
                    fused = comm->all_reduce_sum_rmsnorm(d, rows, int(hidden), ones, 1e-5f, out, 0) && fused;
                    if (!fused) comm->all_reduce_sum(d, sizes[k]);
                });
                if (!fused) nsecs[size_t(r)][k] = 0;
            }
            cudaFree(d), cudaFree(ones), cudaFree(out);
            cudaStreamDestroy(s);
        });
    for (auto& t : th) t.join();
    for (size_t k = 0; k < sizes.size(); ++k) {
        const double t = secs[0][k], bytes = double(sizes[k]) * 4;
        const double bus = n > 1 ? bytes * 2 * (n - 1) / n / t / 1e9 : 0;
        std::printf("{\"bench\": \"allreduce\", \"gpus\": %d, \"floats\": %zu, \"us\": %.2f, ", n, sizes[k], t * 1e6);
        if (gsecs[0][k] > 0) std::printf("\"us_graph\": %.2f, ", gsecs[0][k] * 1e6);
        if (nsecs[0][k] > 0) std::printf("\"us_graph_with_norm\": %.2f, ", nsecs[0][k] * 1e6);
        std::printf("\"bus_GBps\": %.1f}\n", bus);
    }
    return 0;
}
#else
int main() { return 0; }
#endif
