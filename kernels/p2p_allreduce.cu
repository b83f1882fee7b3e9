// One-shot all-reduce over peer memory (NVLink) for the small sums of
// tensor parallelism: a decode step's partial outputs, a few rows of the
// hidden size. NCCL's latency there (~13-15 us for 16 KB on 2 x H100, the
// measure of allreduce_bench) is a kernel made for bandwidth; here each rank
// copies its input into its own buffer, the ranks' blocks meet at flags in
// peer memory, and each rank reads every buffer and sums in rank order (so
// every rank gets the same bits). A second meeting keeps a rank from
// overwriting its buffer while a peer still reads it. The epoch of each
// meeting is a per-block counter in device memory, so the kernel replays
// inside CUDA graphs.
#include "kernels/common.cuh"
#include "kernels/kernels.cuh"

namespace tmc::cuda {

namespace {

__device__ __forceinline__ void st_release_sys(uint32_t* p, uint32_t v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
    uint32_t v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

constexpr int kThreads = 512;

// Flags of a rank: [meeting 0/1][block][rank] then a counter per block.
__device__ __forceinline__ uint32_t* flag(uint32_t* base, int meeting, int block, int rank) {
    return base + (size_t(meeting) * kP2pMaxBlocks + size_t(block)) * kP2pMaxRanks + size_t(rank);
}

// Thread t < R of the block tells rank t that this rank's block arrived,
// then waits for rank t's block. A set abort flag (host memory) ends the
// wait: the group is being torn down after an error.
__device__ __forceinline__ bool meet(const P2pPeers& P, int meeting, int rank, int R, uint32_t e) {
    __shared__ int gone;
    if (threadIdx.x == 0) gone = 0;
    __syncthreads();
    const int t = threadIdx.x;
    if (t < R) {
        __threadfence_system();
        st_release_sys(flag(P.flags[t], meeting, blockIdx.x, rank), e);
        const uint32_t* mine = flag(P.flags[rank], meeting, blockIdx.x, t);
        for (unsigned spin = 1; ld_acquire_sys(mine) != e; ++spin)
            if ((spin & 1023) == 0 && *reinterpret_cast<volatile const uint32_t*>(P.abort)) {
                gone = 1;
                break;
            }
    }
    __syncthreads();
    return !gone;
}

__global__ void __launch_bounds__(kThreads)
    p2p_allreduce_k(float4* x, int n4, P2pPeers P, int rank, int R) {
    __shared__ uint32_t epoch;
    uint32_t* ctr = P.flags[rank] + size_t(2) * kP2pMaxBlocks * kP2pMaxRanks + blockIdx.x;
    if (threadIdx.x == 0) epoch = *ctr + 1;
    __syncthreads();
    const uint32_t e = epoch;
    const int stride = gridDim.x * kThreads;
    float4* own = reinterpret_cast<float4*>(P.data[rank]);
    for (int i = blockIdx.x * kThreads + threadIdx.x; i < n4; i += stride) own[i] = x[i];
    if (!meet(P, 0, rank, R, e)) return;
    for (int i = blockIdx.x * kThreads + threadIdx.x; i < n4; i += stride) {
        float4 s = __ldcg(reinterpret_cast<const float4*>(P.data[0]) + i);
        for (int r = 1; r < R; ++r) {
            const float4 v = __ldcg(reinterpret_cast<const float4*>(P.data[r]) + i);
            s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w;
        }
        x[i] = s;
    }
    if (!meet(P, 1, rank, R, e)) return;
    if (threadIdx.x == 0) *ctr = e;
}

}  // namespace

size_t p2p_flag_words() {
    return size_t(2) * kP2pMaxBlocks * kP2pMaxRanks + kP2pMaxBlocks;
}

bool p2p_all_reduce(float* x, size_t n, const P2pPeers& peers, int rank, int nranks,
                    size_t capacity, cudaStream_t s) {
    if (nranks < 2 || nranks > kP2pMaxRanks || n == 0 || n > capacity || n % 4 ||
        reinterpret_cast<uintptr_t>(x) % 16)
        return false;
    const int n4 = int(n / 4);
    // The same blocks on every rank (block b meets block b): about two
    // float4 per thread, at most kP2pMaxBlocks blocks.
    const int blocks = std::min(kP2pMaxBlocks, (n4 + 2 * kThreads - 1) / (2 * kThreads));
    p2p_allreduce_k<<<blocks, kThreads, 0, s>>>(reinterpret_cast<float4*>(x), n4, peers, rank,
                                                nranks);
    return true;
}

}  // namespace tmc::cuda
