// Shared device helpers: 16-bit <-> fp32 and reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <utility>

#include "kernels/kernels.cuh"

namespace tmc::cuda {

// Programmatic dependent launch (sm_90). Kernels started by launch() may be
// scheduled while the previous kernel of the stream finishes; each such
// kernel calls pdl_wait() before anything else, which returns once that
// kernel has completed and its writes are visible, and pdl_trigger(), which
// lets the next one be scheduled as this one's blocks drain. Launched
// without the attribute (set_programmatic_launch(false)), both are no-ops.
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void pdl_begin() {
    pdl_wait();
    pdl_trigger();
}

bool programmatic_launch();

template <class... P, class... A>
inline void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, A&&... args) {
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t c{};
    c.gridDim = grid;
    c.blockDim = block;
    c.dynamicSmemBytes = smem;
    c.stream = s;
    c.attrs = &attr;
    c.numAttrs = programmatic_launch() ? 1 : 0;
    cudaLaunchKernelEx(&c, kernel, std::forward<A>(args)...);  // errors: the caller's cudaGetLastError
}

template <class T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }

template <class T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum (or maximum) over the block (blockDim.x a multiple of 32, at most
// 1024); every thread gets it.
template <bool Max>
__device__ __forceinline__ float block_reduce(float v) {
    __shared__ float part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = Max ? warp_max(v) : warp_sum(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    const int nw = (blockDim.x + 31) >> 5;
    v = lane < nw ? part[lane] : (Max ? -INFINITY : 0.0f);
    return Max ? warp_max(v) : warp_sum(v);
}
__device__ __forceinline__ float block_sum(float v) { return block_reduce<false>(v); }
__device__ __forceinline__ float block_max(float v) { return block_reduce<true>(v); }

// Four 16-bit values (one 8-byte load or store).
template <class T>
struct alignas(8) Four {
    T e[4];
};
// o = v * scale * w, elementwise: a row's RMSNorm output from its float4.
template <class T>
__device__ __forceinline__ Four<T> scaled4(float4 v, float scale, Four<T> w) {
    Four<T> o;
    o.e[0] = from_f<T>(v.x * scale * to_f(w.e[0]));
    o.e[1] = from_f<T>(v.y * scale * to_f(w.e[1]));
    o.e[2] = from_f<T>(v.z * scale * to_f(w.e[2]));
    o.e[3] = from_f<T>(v.w * scale * to_f(w.e[3]));
    return o;
}

// Dispatch on the 16-bit type.
#define TM_DISPATCH_DT(dt, T, ...)                      \
    do {                                                \
        if ((dt) == Dt::BF16) {                         \
            using T = __nv_bfloat16;                    \
            __VA_ARGS__;                                \
        } else {                                        \
            using T = __half;                           \
            __VA_ARGS__;                                \
        }                                               \
    } while (0)

// Dispatch on the KV cache's bits per element (16, 8 or 4).
#define TM_DISPATCH_BITS(bits, B, ...)                  \
    do {                                                \
        if ((bits) == 8) {                              \
            constexpr int B = 8;                        \
            __VA_ARGS__;                                \
        } else if ((bits) == 4) {                       \
            constexpr int B = 4;                        \
            __VA_ARGS__;                                \
        } else {                                        \
            constexpr int B = 16;                       \
            __VA_ARGS__;                                \
        }                                               \
    } while (0)

// One cached K or V vector (a token's head), as floats, whatever the format.
template <class T, int B>
struct KvRow {
    const void* p;
    float scale = 1, offset = 0;
    __device__ KvRow(const KvLayout& kv, int block, int layer, int which, int head, int slot) {
        if constexpr (B == 16) {
            p = static_cast<const T*>(kv.base) + kv.offset(block, layer, which, head, slot);
        } else {
            p = kv.codes(block, layer, which, head, slot);
            const float2 q = *kv.params(block, layer, which, head, slot);
            scale = q.x, offset = q.y;
        }
    }
    __device__ float operator[](int i) const {
        if constexpr (B == 16) {
            return to_f(static_cast<const T*>(p)[i]);
        } else if constexpr (B == 8) {
            return float(static_cast<const uint8_t*>(p)[i]) * scale + offset;
        } else {
            return float((static_cast<const uint8_t*>(p)[i >> 1] >> ((i & 1) * 4)) & 15) * scale + offset;
        }
    }
};

}  // namespace tmc::cuda
