// The NCCL communicator with one rank per visible GPU (ranks as threads):
// an in-place all-reduce, and the same all-reduce captured in a CUDA graph
// and replayed (how decode steps use it).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
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

int gpu_count() {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

// A copy from pageable host memory may return before its DMA has landed, and
// the tests' streams do not wait for the legacy stream: wait for it here.
void to_device(void* dst, const void* src, size_t bytes) {
    cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice);
    cudaDeviceSynchronize();
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
        to_device(d, h.data(), count * 4);
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
    const int n = gpu_count();
    if (n < 2) GTEST_SKIP() << "one GPU";
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
            to_device(d, h.data(), h.size() * 4);
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
        to_device(d1, ones.data(), 4096 * 4);
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

float bf16_to_float(uint16_t b) {
    const uint32_t u = uint32_t(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// The all-reduce with the RMSNorm fused in (p2p_all_reduce_rmsnorm): row
// counts and widths it takes and ones it leaves to the caller, an input word
// equal to the kernel's empty mark (it must not hang), then a graph mixing
// the fused and plain forms replayed many times (the buffers alternate by
// launch). x must be the host's sum in rank order bit for bit; the norm
// within bf16 rounding of the host's.
TEST(Nccl, PeerAllReduceWithRmsNormMatchesTheHost) {
    const int n = gpu_count();
    if (n < 2) GTEST_SKIP() << "one GPU";
    const auto id = tmc::cuda::nccl_unique_id();
    auto peers = tmc::cuda::make_peer_group(n);
    tmc::HostBarrier meet(n, 60);
    struct Case {
        int rows, H;
    };
    const std::vector<Case> cases = {{1, 4096}, {3, 4096}, {64, 4096}, {65, 4096}, {7, 896}, {2, 8192}, {1, 8196}};
    const float eps = 1e-5f;
    std::vector<std::vector<std::vector<float>>> in(static_cast<size_t>(n)), got(static_cast<size_t>(n));
    std::vector<std::vector<std::vector<uint16_t>>> normed(static_cast<size_t>(n));
    std::vector<std::vector<char>> took(static_cast<size_t>(n));
    std::vector<std::vector<uint16_t>> weights;
    for (const auto& c : cases) {
        std::mt19937 g(unsigned(c.H + c.rows));
        std::uniform_real_distribution<float> u(0.5f, 1.5f);
        std::vector<uint16_t> w(size_t(c.H));
        for (auto& x : w) {
            const float f = u(g);
            uint32_t b;
            std::memcpy(&b, &f, 4);
            x = uint16_t(b >> 16);
        }
        weights.push_back(w);
    }
    std::vector<std::vector<float>> graph_out(static_cast<size_t>(n));
    const auto errors = on_every_gpu(n, [&](int r, cudaStream_t s) {
        auto comm = tmc::cuda::nccl_communicator(id, r, n, s, peers);
        std::mt19937 g(unsigned(99 + r));
        std::uniform_real_distribution<float> u(-2, 2);
        float* d = nullptr;
        void *w = nullptr, *o = nullptr;
        cudaMalloc(&d, size_t(65) * 8196 * 4);
        cudaMalloc(&w, 8196 * 2);
        cudaMalloc(&o, size_t(65) * 8196 * 2);
        for (size_t k = 0; k < cases.size(); ++k) {
            const size_t count = size_t(cases[k].rows) * size_t(cases[k].H);
            std::vector<float> h(count);
            for (auto& x : h) x = u(g);
            if (k == 0 && r == 0) {
                const uint32_t empty = 0xFFFFFFFFu;
                std::memcpy(&h[5], &empty, 4);
            }
            in[size_t(r)].push_back(h);
            to_device(d, h.data(), count * 4);
            to_device(w, weights[k].data(), size_t(cases[k].H) * 2);
            meet.arrive_and_wait();
            const bool f = comm->all_reduce_sum_rmsnorm(d, cases[k].rows, cases[k].H, w, eps, o, 0);
            if (!f) comm->all_reduce_sum(d, count);
            meet.arrive_and_wait();
            cudaStreamSynchronize(s);
            took[size_t(r)].push_back(f);
            cudaMemcpy(h.data(), d, count * 4, cudaMemcpyDeviceToHost);
            got[size_t(r)].push_back(h);
            std::vector<uint16_t> hn(f ? count : 0);
            if (f) cudaMemcpy(hn.data(), o, count * 2, cudaMemcpyDeviceToHost);
            normed[size_t(r)].push_back(hn);
        }
        // A graph: ones in, fused (2 rows), plain (2 rows), fused (1 row);
        // replayed: each replay starts from ones again, so both rows end at
        // n^2, every replay.
        std::vector<float> ones(2 * 4096, 1.0f);
        float* d1 = nullptr;
        cudaMalloc(&d1, 2 * 4096 * 4);
        to_device(d1, ones.data(), 2 * 4096 * 4);
        to_device(w, weights[0].data(), 4096 * 2);
        cudaGraph_t gr;
        cudaGraphExec_t ex;
        cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal);
        cudaMemcpyAsync(d, d1, 2 * 4096 * 4, cudaMemcpyDeviceToDevice, s);
        comm->all_reduce_sum_rmsnorm(d, 1, 4096, w, eps, o, 0);
        comm->all_reduce_sum(d, 2 * 4096);
        comm->all_reduce_sum_rmsnorm(d + 4096, 1, 4096, w, eps, o, 0);
        cudaStreamEndCapture(s, &gr);
        cudaGraphInstantiate(&ex, gr, 0);
        meet.arrive_and_wait();
        for (int i = 0; i < 101; ++i) cudaGraphLaunch(ex, s);
        cudaStreamSynchronize(s);
        graph_out[size_t(r)].resize(2 * 4096);
        cudaMemcpy(graph_out[size_t(r)].data(), d, 2 * 4096 * 4, cudaMemcpyDeviceToHost);
        cudaGraphExecDestroy(ex), cudaGraphDestroy(gr);
        cudaFree(d), cudaFree(d1), cudaFree(w), cudaFree(o);
    });
    for (int r = 0; r < n; ++r) ASSERT_EQ(errors[size_t(r)], "") << "rank " << r;
    for (size_t k = 0; k < cases.size(); ++k) {
        const int rows = cases[k].rows, H = cases[k].H;
        const bool fits = H % 4 == 0 && H <= 8192 && size_t(rows) * size_t(H) <= 262144;
        for (int r = 0; r < n; ++r) ASSERT_EQ(bool(took[size_t(r)][k]), fits) << "rows " << rows << " H " << H;
        for (int t = 0; t < rows; ++t) {
            std::vector<float> sum(static_cast<size_t>(H));
            double ss = 0;
            for (int i = 0; i < H; ++i) {
                const size_t e = size_t(t) * size_t(H) + size_t(i);
                float v = in[0][k][e];
                for (int r = 1; r < n; ++r) v += in[size_t(r)][k][e];
                sum[size_t(i)] = v;
                if (!std::isnan(v)) ss += double(v) * v;
                for (int r = 0; r < n; ++r) {
                    const float x = got[size_t(r)][k][e];
                    if (std::isnan(v)) {
                        ASSERT_TRUE(std::isnan(x)) << "the empty mark as input, rank " << r;
                    } else if (fits) {
                        ASSERT_EQ(x, v) << "rows " << rows << " H " << H << " row " << t << " i " << i;
                    } else {
                        ASSERT_NEAR(x, v, 1e-5f) << "(NCCL) rows " << rows << " H " << H;
                    }
                }
            }
            if (!fits || (k == 0 && t == 0)) continue;  // the NaN row has no norm to check
            const double scale = 1.0 / std::sqrt(ss / H + eps);
            for (int i = 0; i < H; ++i) {
                const double want = sum[size_t(i)] * scale * bf16_to_float(weights[k][size_t(i)]);
                for (int r = 0; r < n; ++r) {
                    const float x = bf16_to_float(normed[size_t(r)][k][size_t(t) * size_t(H) + size_t(i)]);
                    ASSERT_NEAR(x, want, std::abs(want) * 0.0079 + 1e-6)
                        << "norm, rows " << rows << " H " << H << " row " << t << " i " << i << " rank " << r;
                }
            }
        }
    }
    for (int r = 0; r < n; ++r)
        for (int i = 0; i < 2 * 4096; ++i)
            ASSERT_EQ(graph_out[size_t(r)][size_t(i)], float(n * n))
                << "graph, rank " << r << " i " << i;
}

}  // namespace
