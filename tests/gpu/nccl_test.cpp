// The NCCL communicator with one rank per visible GPU (ranks as threads):
// an in-place all-reduce, and the same all-reduce captured in a CUDA graph
// and replayed (how decode steps use it).
#include <gtest/gtest.h>

#include <thread>

#include "backend/cuda/nccl_comm.hpp"

namespace {

TEST(Nccl, AllReduceAcrossEveryGpuAndInAGraph) {
    int n = 0;
    ASSERT_EQ(cudaSuccess, cudaGetDeviceCount(&n));
    ASSERT_GT(n, 0);
    const auto id = tmc::cuda::nccl_unique_id();
    const size_t count = 4099;
    std::vector<std::vector<float>> got(static_cast<size_t>(n));
    std::vector<std::string> errors(static_cast<size_t>(n));
    std::vector<std::thread> th;
    for (int r = 0; r < n; ++r)
        th.emplace_back([&, r] {
            try {
                cudaSetDevice(r);
                cudaStream_t s;
                cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
                auto comm = tmc::cuda::nccl_communicator(id, r, n, s);
                std::vector<float> h(count, float(r + 1));
                float* d = nullptr;
                cudaMalloc(&d, count * 4);
                cudaMemcpy(d, h.data(), count * 4, cudaMemcpyHostToDevice);
                // The first collective of the group is captured (as when a
                // server's first step is a decode step), then run plainly.
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
                if (cudaGetLastError() != cudaSuccess) errors[size_t(r)] = "a CUDA call failed";
                cudaGraphExecDestroy(e), cudaGraphDestroy(g), cudaFree(d), cudaStreamDestroy(s);
            } catch (const std::exception& ex) {
                errors[size_t(r)] = ex.what();
            }
        });
    for (auto& t : th) t.join();
    // Three all-reduces of 1 .. n: (n (n + 1) / 2) n^2.
    const float want = float(n * (n + 1) / 2) * float(n) * float(n);
    for (int r = 0; r < n; ++r) {
        ASSERT_EQ(errors[size_t(r)], "") << "rank " << r;
        for (float x : got[size_t(r)]) ASSERT_EQ(x, want) << "rank " << r << " of " << n;
    }
}

}  // namespace
