// One-shot all-reduce over peer memory (NVLink) for the small sums of
// tensor parallelism: a decode step's partial outputs, a few rows of the
// hidden size. NCCL spends ~6.6 us on 16 KB between two H100s replayed from
// a graph; most of that is its flags and fences. Here nothing waits on a
// flag: each rank pushes its input straight into every peer's receive
// buffer, and a receiver polls the data itself until no word holds the
// empty mark (a NaN pattern that inputs never carry: an input word equal to
// it is sent as the canonical NaN). Every rank then sums the ranks' rows in
// rank order (so every rank gets the same bits) and marks what it read
// empty again.
//
// Two buffers alternate by launch (an epoch counter in device memory, moved
// on by the launch's last block, so the kernel replays in CUDA graphs): a
// peer can run at most one launch ahead (it cannot finish launch e + 1
// without this rank's data of e + 1, which this rank sends only after its
// launch e has ended), so it never writes into the buffer this rank is
// still reading.
//
// The fused form gives each block one row of H floats and writes, in the
// same pass, RMSNorm(sum) * w in 16 bits: the residual norm that follows
// every all-reduce of a layer.
#include <algorithm>

#include "kernels/common.cuh"
#include "kernels/kernels.cuh"

namespace tmc::cuda {

namespace {

constexpr int kThreads = 512;
constexpr int kVec = 4;          // float4 a thread at most: rows up to 8,192 floats
constexpr int kFlatVec = 2;      // float4 a thread for the unfused form
constexpr uint32_t kEmpty = 0xFFFFFFFFu;
constexpr uint32_t kCanonicalNan = 0x7FFFFFFFu;

__device__ __forceinline__ uint32_t clean(float f) {
    const uint32_t u = __float_as_uint(f);
    return u == kEmpty ? kCanonicalNan : u;
}

__device__ __forceinline__ void st_volatile(float4* p, uint4 v) {
    asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z),
                 "r"(v.w)
                 : "memory");
}

__device__ __forceinline__ uint4 ld_volatile(const float4* p) {
    uint4 v;
    asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p)
                 : "memory");
    return v;
}

__device__ __forceinline__ bool full(uint4 v) {
    return v.x != kEmpty && v.y != kEmpty && v.z != kEmpty && v.w != kEmpty;
}

__device__ __forceinline__ float4 as_f4(uint4 v) {
    return make_float4(__uint_as_float(v.x), __uint_as_float(v.y), __uint_as_float(v.z), __uint_as_float(v.w));
}

// Block b covers float4 [b * per, (b + 1) * per) of x (clipped to n4), V
// float4 a thread. With w, per is one row (H / 4) and out[b] gets the norm.
template <class T, int V>
__global__ void __launch_bounds__(kThreads)
    p2p_allreduce_k(float4* x, int n4, int per, P2pPeers P, int rank, int R, size_t cap, const T* w, float eps,
                    T* out) {
    uint32_t* ctl = P.flags[rank];  // [0] epoch, [1] blocks done with it
    const uint32_t epoch = *reinterpret_cast<volatile uint32_t*>(ctl);
    const size_t slot = epoch & 1;
    const int begin = blockIdx.x * per, end = min(n4, begin + per);
    uint4 mine[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
        const int i = begin + threadIdx.x + j * kThreads;
        if (i < end) {
            const float4 v = x[i];
            mine[j] = make_uint4(clean(v.x), clean(v.y), clean(v.z), clean(v.w));
        }
    }
    // Push: rank `rank`'s part of every peer's buffer.
    for (int p = 0; p < R; ++p) {
        if (p == rank) continue;
        float4* dst = reinterpret_cast<float4*>(P.data[p] + (slot * R + size_t(rank)) * cap);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            const int i = begin + threadIdx.x + j * kThreads;
            if (i < end) st_volatile(dst + i, mine[j]);
        }
    }
    // Receive and sum in rank order; an abort ends the waits (the results
    // are then garbage, and the group is being torn down).
    float4 s[V];
#pragma unroll
    for (int j = 0; j < V; ++j) s[j] = make_float4(0, 0, 0, 0);
    bool gone = false;
    for (int p = 0; p < R; ++p) {
        float4* src = reinterpret_cast<float4*>(P.data[rank] + (slot * R + size_t(p)) * cap);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            const int i = begin + threadIdx.x + j * kThreads;
            if (i >= end) continue;
            uint4 v = mine[j];
            if (p != rank) {
                v = ld_volatile(src + i);
                for (unsigned spin = 1; !full(v) && !gone; ++spin) {
                    if ((spin & 1023) == 0 && *reinterpret_cast<volatile const uint32_t*>(P.abort)) gone = true;
                    v = ld_volatile(src + i);
                }
                st_volatile(src + i, make_uint4(kEmpty, kEmpty, kEmpty, kEmpty));
            }
            const float4 f = as_f4(v);
            s[j].x += f.x, s[j].y += f.y, s[j].z += f.z, s[j].w += f.w;
        }
    }
    float ss = 0;
#pragma unroll
    for (int j = 0; j < V; ++j) {
        const int i = begin + threadIdx.x + j * kThreads;
        if (i < end) {
            x[i] = s[j];
            ss += s[j].x * s[j].x + s[j].y * s[j].y + s[j].z * s[j].z + s[j].w * s[j].w;
        }
    }
    if (w) {
        ss = block_sum(ss);
        const float scale = rsqrtf(ss / float(4 * per) + eps);
        const Four<T>* w4 = reinterpret_cast<const Four<T>*>(w);
        Four<T>* o4 = reinterpret_cast<Four<T>*>(out) + size_t(blockIdx.x) * per;
#pragma unroll
        for (int j = 0; j < V; ++j) {
            const int c = threadIdx.x + j * kThreads;
            if (begin + c >= end) break;
            o4[c] = scaled4(s[j], scale, w4[c]);
        }
    }
    // The last block to finish moves the epoch on (every block has read it).
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        if (atomicAdd(ctl + 1, 1u) == gridDim.x - 1) {
            ctl[1] = 0;
            *reinterpret_cast<volatile uint32_t*>(ctl) = epoch + 1;
        }
    }
}

bool fits(size_t n, int nranks, size_t capacity, const void* x) {
    return nranks >= 2 && nranks <= kP2pMaxRanks && n > 0 && n <= capacity && n % 4 == 0 &&
           reinterpret_cast<uintptr_t>(x) % 16 == 0;
}

}  // namespace

size_t p2p_flag_words() { return 2; }

size_t p2p_buffer_floats(int nranks, size_t capacity) { return size_t(2) * size_t(nranks) * capacity; }

bool p2p_all_reduce(float* x, size_t n, const P2pPeers& peers, int rank, int nranks, size_t capacity,
                    cudaStream_t s) {
    if (!fits(n, nranks, capacity, x)) return false;
    const int n4 = int(n / 4), per = kThreads * kFlatVec;
    p2p_allreduce_k<__nv_bfloat16, kFlatVec><<<(n4 + per - 1) / per, kThreads, 0, s>>>(
        reinterpret_cast<float4*>(x), n4, per, peers, rank, nranks, capacity, nullptr, 0.0f, nullptr);
    return true;
}

bool p2p_all_reduce_rmsnorm(Dt dt, float* x, int rows, int H, const void* w, float eps, void* out,
                            const P2pPeers& peers, int rank, int nranks, size_t capacity, cudaStream_t s) {
    const size_t n = size_t(rows) * size_t(H);
    if (rows < 1 || H % 4 || H / 4 > kThreads * kVec || !fits(n, nranks, capacity, x) ||
        reinterpret_cast<uintptr_t>(w) % 8 || reinterpret_cast<uintptr_t>(out) % 8)
        return false;
    TM_DISPATCH_DT(dt, W,
                   (p2p_allreduce_k<W, kVec><<<rows, kThreads, 0, s>>>(
                       reinterpret_cast<float4*>(x), int(n / 4), H / 4, peers, rank, nranks, capacity,
                       static_cast<const W*>(w), eps, static_cast<W*>(out))));
    return true;
}

}  // namespace tmc::cuda
