// What the attention kernels share: their limits, the online-softmax step,
// a decode work item's keys, a prefill tile's view, the shared-memory
// attribute, and the tensor-core fragment helpers (ldmatrix, mma.sync).
// The kernel families, one file each (kernels/README has their figures):
//   decode_rows.cuh    paged_attention_k: any cache (16-bit, int8, int4), any head size
//   decode_ring.cuh    paged_decode_k: 16-bit cache, ring of async copies, CUDA cores
//   decode_mma.cuh     paged_decode_mma_k: the same on tensor cores
//   split_merge.cuh    merge_items_k: rows split along the sequence, merged
//   prefill_tiled.cuh  paged_attention_tiled_k: prompt tiles on CUDA cores
//   prefill_mma.cuh    paged_attention_mma_k: prompt tiles on tensor cores (WMMA)
//   prefill_fa.cuh     paged_attention_fa_k: prompt tiles in registers (FlashAttention-2)
//   attention.cu       work planning and the dispatch between them
// All are compiled in one translation unit (attention.cu).
#pragma once

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cstring>
#include <type_traits>

#include <cuda_pipeline.h>
#include <mma.h>

#include "kernels/common.cuh"
#include "kernels/kernels.cuh"

namespace tmc::cuda {

namespace {

constexpr int kThreads = 128;
constexpr int kChunk = 64;
constexpr int kMaxGroup = 8;
constexpr int kMaxHd = 256;
constexpr int kMaxSplits = 32;  // pieces of a row at most: merge_items_k weighs them in one warp

// One warp's online-softmax step over a chunk of one head's scores p[0, n):
// p becomes exp(p - new max), the running max and sum move on; returns the
// factor that rescales what was accumulated before.
__device__ inline float softmax_chunk(float* p, int n, float& m_run, float& l_run, int lane) {
    float mx = -FLT_MAX;
    for (int j = lane; j < n; j += 32) mx = fmaxf(mx, p[j]);
    mx = warp_max(mx);
    const float m_new = fmaxf(m_run, mx);
    float sum = 0;
    for (int j = lane; j < n; j += 32) {
        const float e = __expf(p[j] - m_new);
        p[j] = e;
        sum += e;
    }
    sum = warp_sum(sum);
    const float al = __expf(m_run - m_new);
    l_run = l_run * al + sum;
    m_run = m_new;
    return al;
}

// A work item's keys: {row, piece, pieces of the row} takes its piece
// [begin, end) of the row's visible positions (all of them in one piece).
struct ItemKeys {
    int begin, end;
    const int* table;  // the row's block table
};
__device__ __forceinline__ ItemKeys item_keys(const AttnArgs& a, const BatchDev& b, int4 it) {
    ItemKeys k;
    const int pos = b.positions[it.x];
    k.table = b.blocks + b.block_offset[b.row_seq[it.x]];
    const int vis_begin = a.window > 0 ? max(0, pos + 1 - a.window) : 0, vis_end = pos + 1;
    const int span = (vis_end - vis_begin + it.z - 1) / it.z;
    k.begin = min(vis_end, vis_begin + it.y * span);
    k.end = min(vis_end, k.begin + span);
    return k;
}


// What a tile's thread needs: its query vector's row and visible range
// (`my` < nqv: active), and the tile's block table and key range.
struct TileView {
    bool active;
    int my_row, my_pos, my_lo, lo, hi;
    const int* table;
};
__device__ inline TileView tile_view(const AttnArgs& a, const BatchDev& b, int2 tile, int my, int nqv, int group) {
    const bool active = my < nqv;
    const int my_row = tile.x + (active ? my / group : 0), my_pos = b.positions[my_row];
    const int first = b.positions[tile.x], last = b.positions[tile.x + tile.y - 1];
    return {active,
            my_row,
            my_pos,
            a.window > 0 ? max(0, my_pos + 1 - a.window) : 0,
            a.window > 0 ? max(0, first + 1 - a.window) : 0,
            last + 1,
            b.blocks + b.block_offset[b.row_seq[tile.x]]};
}

constexpr int kTileQ = 64;   // query vectors per block
constexpr int kTileK = 64;   // keys per chunk
constexpr int kTileThreads = 256;

template <int HD>
__host__ __device__ constexpr int k_stride() { return HD + 8; }  // bf16 elements; shifts banks between keys


// The shared-memory limit is an attribute of a function on each device
// (tensor-parallel ranks launch kernels on several): set once per device.
template <auto K>
void allow_smem(size_t bytes) {
    static std::atomic<unsigned long long> done{0};
    int dev = 0;
    cudaGetDevice(&dev);
    const unsigned long long bit = 1ull << (dev & 63);
    if (!(done.load(std::memory_order_acquire) & bit)) {
        cudaFuncSetAttribute(K, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
        done.fetch_or(bit, std::memory_order_release);
    }
}

// 2^x (MUFU.EX2; what __expf uses after scaling by log2(e)).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
    const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
    const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

// d += a b (m16n8k16, 16-bit inputs, fp32 accumulation).
template <class T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                     "{%8, %9}, {%0, %1, %2, %3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                     "{%8, %9}, {%0, %1, %2, %3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two values as one 32-bit pair of T (lo in the low half).
template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    T t[2] = {from_f<T>(lo), from_f<T>(hi)};
    uint32_t u;
    memcpy(&u, t, 4);
    return u;
}


}  // namespace

}  // namespace tmc::cuda
