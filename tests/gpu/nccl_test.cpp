// The NCCL communicator with one rank per visible GPU (ranks as threads):
// an in-place all-reduce, and the same all-reduce captured in a CUDA graph
// and replayed (how decode steps use it).
#include <gtest/gtest.h>

#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "backend/comm.hpp"
#include "backend/cuda/nccl_comm.hpp"

namespace {

// Runs body(rank, stream) on one thread per GPU, the rank's device current
// and a fresh non-blocking stream; returns each rank's error ("" for none,
// "a CUDA call failed" when the body left a CUDA error behind).
std::vector<std::string> on_every_gpu(int n, const std::function<void(int, cudaStream_t)>& body) {
    std::vector<std::string> errors(static_cast<size_t>(n));
    std::vector<std::thread> th;
    for (int r = 0; r < n; ++r)
        th.emplace_back([&, r] {
            try {
                cudaSetDevice(r);
                cudaStream_t s;
                cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
                body(r, s);
                if (cudaGetLastError() != cudaSuccess) errors[size_t(r)] = "a CUDA call failed";
                cudaStreamDestroy(s);
            } catch (const std::exception& ex) {
                errors[size_t(r)] = ex.what();
            }
        });
    for (auto& t : th) t.join();
    return errors;
}

TEST(Nccl, AllReduceAcrossEveryGpuAndInAGraph) {
    int n = 0;
    ASSERT_EQ(cudaSuccess, cudaGetDeviceCount(&n));
    ASSERT_GT(n, 0);
    const auto id = tmc::cuda::nccl_unique_id();
    const size_t count = 4099;
    std::vector<std::vector<float>> got(static_cast<size_t>(n));
    const auto errors = on_every_gpu(n, [&](int r, cudaStream_t s) {
        auto comm = tmc::cuda::nccl_communicator(id, r, n, s);
        std::vector<float> h(count, float(r + 1));
        float* d = nullptr;
        cudaMalloc(&d, count * 4);
        cudaMemcpy(d, h.data(), count * 4, cudaMemcpyHostToDevice);
        // The first collective of the group is captured (as when a server's
        // first step is a decode step), then run plainly.
        cudaGraph_t g;
        cudaGraphExec_t e;
        cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal);
        comm->all_reduce_sum(d, count);
        cudaStreamEndCapture(s, &g);
        cudaGraphInstantiate(&e, g, 0);
        cudaGraphLaunch(e, s);
        cudaGraphLaunch(e, s);
        comm->all_reduce_sum(d, count);
        cudaStreamSynchronize(s);
        got[size_t(r)].resize(count);
        cudaMemcpy(got[size_t(r)].data(), d, count * 4, cudaMemcpyDeviceToHost);
        cudaGraphExecDestroy(e), cudaGraphDestroy(g), cudaFree(d);
    });
    // Three all-reduces of 1 .. n: (n (n + 1) / 2) n^2.
    const float want = float(n * (n + 1) / 2) * float(n) * float(n);
    for (int r = 0; r < n; ++r) {
        ASSERT_EQ(errors[size_t(r)], "") << "rank " << r;
        for (float x : got[size_t(r)]) ASSERT_EQ(x, want) << "rank " << r << " of " << n;
    }
}

// The peer-memory path (a PeerGroup; the kernel of kernels/p2p_allreduce.cu)
// on random inputs: sizes it takes and sizes it leaves to NCCL (not a
// multiple of 4, over its capacity), eager and replayed in a graph, every
// rank's result the host's sum in rank order, bit for bit.
TEST(Nccl, PeerAllReduceMatchesTheSumInRankOrder) {
    int n = 0;
    ASSERT_EQ(cudaSuccess, cudaGetDeviceCount(&n));
    if (n < 2) GTEST_SKIP() << "one GPU";
    setenv("TM_CUDA_P2P_ALLREDUCE", "1", 1);  // the path under test (off by default)
    const auto id = tmc::cuda::nccl_unique_id();
    auto peers = tmc::cuda::make_peer_group(n);
    tmc::HostBarrier meet(n, 60);
    const std::vector<size_t> sizes = {4096, 8, 4099, 65536, 262144, 262148, 4096 * 3};
    std::vector<std::vector<std::vector<float>>> in(static_cast<size_t>(n)),
        got(static_cast<size_t>(n));
    const int graph_reps = 5;
    const auto errors = on_every_gpu(n, [&](int r, cudaStream_t s) {
        auto comm = tmc::cuda::nccl_communicator(id, r, n, s, peers);
        std::mt19937 g(unsigned(1234 + r));
        std::uniform_real_distribution<float> u(-1, 1);
        float* d = nullptr;
        cudaMalloc(&d, 262148 * 4);
        for (size_t k = 0; k < sizes.size(); ++k) {
            std::vector<float> h(sizes[k]);
            for (auto& x : h) x = u(g);
            in[size_t(r)].push_back(h);
            cudaMemcpy(d, h.data(), h.size() * 4, cudaMemcpyHostToDevice);
            meet.arrive_and_wait();  // as the backend does: no rank in a copy while a peer waits
            comm->all_reduce_sum(d, h.size());
            meet.arrive_and_wait();
            cudaStreamSynchronize(s);
            cudaMemcpy(h.data(), d, h.size() * 4, cudaMemcpyDeviceToHost);
            got[size_t(r)].push_back(h);
        }
        // In a graph, replayed: ones copied in, summed twice (n * n).
        std::vector<float> ones(4096, 1.0f), back(4096);
        float* d1 = nullptr;
        cudaMalloc(&d1, 4096 * 4);
        cudaMemcpy(d1, ones.data(), 4096 * 4, cudaMemcpyHostToDevice);
        cudaGraph_t gr;
        cudaGraphExec_t ex;
        cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal);
        cudaMemcpyAsync(d, d1, 4096 * 4, cudaMemcpyDeviceToDevice, s);
        comm->all_reduce_sum(d, 4096);
        comm->all_reduce_sum(d, 4096);
        cudaStreamEndCapture(s, &gr);
        cudaGraphInstantiate(&ex, gr, 0);
        meet.arrive_and_wait();
        for (int i = 0; i < graph_reps; ++i) cudaGraphLaunch(ex, s);
        cudaStreamSynchronize(s);
        cudaMemcpy(back.data(), d, 4096 * 4, cudaMemcpyDeviceToHost);
        got[size_t(r)].push_back(back);
        cudaGraphExecDestroy(ex), cudaGraphDestroy(gr), cudaFree(d), cudaFree(d1);
    });
    unsetenv("TM_CUDA_P2P_ALLREDUCE");
    for (int r = 0; r < n; ++r) ASSERT_EQ(errors[size_t(r)], "") << "rank " << r;
    for (size_t k = 0; k < sizes.size(); ++k)
        for (size_t i = 0; i < sizes[k]; ++i) {
            float want = in[0][k][i];
            for (int r = 1; r < n; ++r) want += in[size_t(r)][k][i];
            for (int r = 0; r < n; ++r)
                if (sizes[k] % 4 == 0 && sizes[k] <= 262144) {
                    ASSERT_EQ(got[size_t(r)][k][i], want)
                        << "size " << sizes[k] << " index " << i << " rank " << r;
                } else {
                    ASSERT_NEAR(got[size_t(r)][k][i], want, 1e-5f)
                        << "size " << sizes[k] << " (NCCL) rank " << r;
                }
        }
    for (int r = 0; r < n; ++r)
        for (float x : got[size_t(r)].back()) ASSERT_EQ(x, float(n * n)) << "graph, rank " << r;
}

}  // namespace
