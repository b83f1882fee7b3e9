// Attention over the paged KV cache, online softmax in fp32, GQA-aware
// (each block computes all `group` query heads of its KV head, so each K/V
// vector is read once per group):
//   - row by row (decode, and prompt chunks of under 4 rows), optionally split
//     along the sequence with a merge kernel: paged_decode_k for 16-bit
//     caches of head_dim 64 or 128 (double-buffered asynchronous copies),
//     paged_attention_k for the rest (quantized caches, other head sizes);
//   - in tiles of up to 64 query vectors of one sequence (prompt chunks):
//     paged_attention_mma_k on tensor cores, or paged_attention_tiled_k on
//     CUDA cores (TM_CUDA_MMA_ATTENTION=0).
#include <algorithm>
#include <atomic>
#include <cfloat>

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
constexpr int kMaxSplits = 32;  // at most one warp's worth: merge_splits_k weighs them in one warp

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

template <class T, int B>
__global__ void paged_attention_k(AttnArgs a, BatchDev b, KvLayout kv, const int* rows) {
    __shared__ float q[kMaxGroup][kMaxHd];
    __shared__ float p[kMaxGroup][kChunk];
    __shared__ float alpha[kMaxGroup];
    __shared__ float inv_l[kMaxGroup];
    const int r = rows ? rows[blockIdx.x] : blockIdx.x, kh = blockIdx.y;
    const int hd = a.hd, group = a.nq / a.nkv;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = kThreads / 32;
    const int pos = b.positions[r];
    const int seq = b.row_seq[r];
    const int* table = b.blocks + b.block_offset[seq];
    const int vis_begin = a.window > 0 ? max(0, pos + 1 - a.window) : 0, vis_end = pos + 1;
    // This block's share of the visible positions (all of them without splits).
    const int nsplit = gridDim.z, span = (vis_end - vis_begin + nsplit - 1) / nsplit;
    const int begin = min(vis_end, vis_begin + int(blockIdx.z) * span), end = min(vis_end, begin + span);
    const float* qr = a.q + size_t(r) * a.ld + size_t(kh) * group * hd;
    for (int i = threadIdx.x; i < group * hd; i += kThreads) q[i / hd][i % hd] = qr[i];
    // Running max and sum per head, kept by warp (g % nwarps), lane 0.
    float m_run[kMaxGroup / 4 + 1], l_run[kMaxGroup / 4 + 1];
    for (int k = 0; k < kMaxGroup / 4 + 1; ++k) m_run[k] = -FLT_MAX, l_run[k] = 0;
    // Thread t accumulates channels t and t + 128 of every head.
    float acc[kMaxGroup][2];
    for (int g = 0; g < kMaxGroup; ++g) acc[g][0] = acc[g][1] = 0;
    __syncthreads();
    for (int c0 = begin; c0 < end; c0 += kChunk) {
        const int n = min(kChunk, end - c0);
        // Scores: a warp per key.
        for (int j = warp; j < n; j += nwarps) {
            const int ps = c0 + j;
            const KvRow<T, B> kr(kv, table[ps / kv.block_size], a.layer, 0, kh, ps % kv.block_size);
            float kv_reg[kMaxHd / 32];
            for (int i = lane, k = 0; i < hd; i += 32, ++k) kv_reg[k] = kr[i];
            for (int g = 0; g < group; ++g) {
                float d = 0;
                for (int i = lane, k = 0; i < hd; i += 32, ++k) d += q[g][i] * kv_reg[k];
                d = warp_sum(d);
                if (lane == 0) p[g][j] = d * a.scale;
            }
        }
        __syncthreads();
        // Softmax bookkeeping: warp w handles heads w, w + 4, ...
        for (int g = warp, k = 0; g < group; g += nwarps, ++k) {
            const float al = softmax_chunk(p[g], n, m_run[k], l_run[k], lane);
            if (lane == 0) alpha[g] = al;
        }
        __syncthreads();
        // Weighted V.
        for (int c = 0; c < 2; ++c) {
            const int i = threadIdx.x + c * kThreads;
            if (i >= hd) break;
            for (int g = 0; g < group; ++g) acc[g][c] *= alpha[g];
            for (int j = 0; j < n; ++j) {
                const int ps = c0 + j;
                const float v = KvRow<T, B>(kv, table[ps / kv.block_size], a.layer, 1, kh, ps % kv.block_size)[i];
                for (int g = 0; g < group; ++g) acc[g][c] += p[g][j] * v;
            }
        }
        __syncthreads();
    }
    if (nsplit > 1) {
        // Unnormalized partial results: acc, then (max, sum) per query head.
        float* part = a.split_scratch;
        const size_t ml0 = size_t(gridDim.x) * a.nq * nsplit * hd;
        for (int g = warp, k = 0; g < group; g += nwarps, ++k)
            if (lane == 0) {
                const size_t e = (size_t(blockIdx.x) * a.nq + kh * group + g) * nsplit + blockIdx.z;
                part[ml0 + 2 * e] = m_run[k];
                part[ml0 + 2 * e + 1] = l_run[k];
            }
        for (int c = 0; c < 2; ++c) {
            const int i = threadIdx.x + c * kThreads;
            if (i >= hd) break;
            for (int g = 0; g < group; ++g)
                part[((size_t(blockIdx.x) * a.nq + kh * group + g) * nsplit + blockIdx.z) * hd + i] = acc[g][c];
        }
        return;
    }
    for (int g = warp, k = 0; g < group; g += nwarps, ++k)
        if (lane == 0) inv_l[g] = 1.0f / l_run[k];
    __syncthreads();
    T* out = static_cast<T*>(a.out) + size_t(r) * a.nq * hd + size_t(kh) * group * hd;
    for (int c = 0; c < 2; ++c) {
        const int i = threadIdx.x + c * kThreads;
        if (i >= hd) break;
        for (int g = 0; g < group; ++g) out[size_t(g) * hd + i] = from_f<T>(acc[g][c] * inv_l[g]);
    }
}

// ---------------------------------------------------------------- decode (16-bit cache)
//
// The same work as paged_attention_k (one block per row, KV head and split)
// shaped for HBM bandwidth: chunks of 64 keys are copied into shared memory
// by 16-byte asynchronous copies, double-buffered (the next chunk's copies
// are in flight while this one is computed); the scores take one key per
// thread (no shuffles) and the weighted sum of V one channel per thread.
// Used for 16-bit caches with head_dim 64 or 128.

constexpr int kDecChunk = 64;

template <int HD>
constexpr size_t decode_smem_bytes() { return 2 * 2 * size_t(kDecChunk) * (HD + 8) * 2; }  // [K, V][2 buffers]

template <class T, int HD>
__global__ void __launch_bounds__(kThreads, 3) paged_decode_k(AttnArgs a, BatchDev b, KvLayout kv, const int* rows) {
    constexpr int KL = HD + 8;                 // staged row stride (elements): 16-byte aligned, banks shifted
    constexpr int V8 = HD / 8;                 // 16-byte vectors per row
    constexpr int PER = kDecChunk * V8 / kThreads;  // vectors per thread per chunk, each of K and V
    constexpr int KP = kThreads / HD;          // key phases of the weighted sum (2 when HD is 64)
    constexpr int SP = kThreads / kDecChunk;   // head phases of the scores
    static_assert(PER >= 1 && KP >= 1 && SP >= 1);
    extern __shared__ __align__(16) unsigned char dsm[];
    T* const Kb = reinterpret_cast<T*>(dsm);   // [2][kDecChunk][KL]
    T* const Vb = Kb + 2 * kDecChunk * KL;     // [2][kDecChunk][KL]
    __shared__ __align__(16) float q[kMaxGroup][HD];
    __shared__ float p[kMaxGroup][kDecChunk];
    __shared__ float alpha[kMaxGroup];
    __shared__ float inv_l[kMaxGroup];
    const int r = rows ? rows[blockIdx.x] : blockIdx.x, kh = blockIdx.y;
    const int group = a.nq / a.nkv;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = kThreads / 32;
    const int pos = b.positions[r];
    const int* table = b.blocks + b.block_offset[b.row_seq[r]];
    const int vis_begin = a.window > 0 ? max(0, pos + 1 - a.window) : 0, vis_end = pos + 1;
    const int nsplit = gridDim.z, span = (vis_end - vis_begin + nsplit - 1) / nsplit;
    const int begin = min(vis_end, vis_begin + int(blockIdx.z) * span), end = min(vis_end, begin + span);
    const float* qr = a.q + size_t(r) * a.ld + size_t(kh) * group * HD;
    for (int i = tid; i < group * HD; i += kThreads) q[i / HD][i % HD] = qr[i];
    const T* cache = static_cast<const T*>(kv.base);
    const size_t vdelta = size_t(kv.kv_heads) * kv.block_size * HD;  // V row - K row
    float m_run[kMaxGroup / 4 + 1], l_run[kMaxGroup / 4 + 1];
    for (int k = 0; k < kMaxGroup / 4 + 1; ++k) m_run[k] = -FLT_MAX, l_run[k] = 0;
    const int c_own = tid % HD, k_phase = tid / HD;  // the weighted sum: channel, first key
    float acc[kMaxGroup];
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) acc[g] = 0;
    // Copies chunk c0's K and V into buffer `buf` (one commit group).
    const auto stage = [&](int c0, int buf) {
        const int n = min(kDecChunk, end - c0);
        T* Ks = Kb + buf * kDecChunk * KL;
        T* Vs = Vb + buf * kDecChunk * KL;
#pragma unroll
        for (int u = 0; u < PER; ++u) {
            const int i = tid + u * kThreads, kk = i / V8, c = (i % V8) * 8;
            if (kk < n) {
                const int ps = c0 + kk;
                const T* kp = cache + kv.offset(table[ps / kv.block_size], a.layer, 0, kh, ps % kv.block_size) + c;
                __pipeline_memcpy_async(Ks + kk * KL + c, kp, 16);
                __pipeline_memcpy_async(Vs + kk * KL + c, kp + vdelta, 16);
            }
        }
        __pipeline_commit();
    };
    if (begin < end) stage(begin, 0);
    for (int c0 = begin, buf = 0; c0 < end; c0 += kDecChunk, buf ^= 1) {
        const int n = min(kDecChunk, end - c0);
        if (c0 + kDecChunk < end) {
            stage(c0 + kDecChunk, buf ^ 1);  // the previous iteration is done with that buffer
            __pipeline_wait_prior(1);
        } else {
            __pipeline_wait_prior(0);
        }
        __syncthreads();  // this chunk has landed for every thread (and q is written)
        const T* Ks = Kb + buf * kDecChunk * KL;
        const T* Vs = Vb + buf * kDecChunk * KL;
        // Scores: key tid % 64, heads tid / 64, tid / 64 + SP, ...
        {
            const int kk = tid % kDecChunk;
            if (kk < n)
                for (int g = tid / kDecChunk; g < group; g += SP) {
                    float d = 0;
#pragma unroll
                    for (int c = 0; c < HD; c += 8) {
                        const uint4 kv8 = *reinterpret_cast<const uint4*>(Ks + kk * KL + c);
                        const T* k8 = reinterpret_cast<const T*>(&kv8);
                        const float4 qa = *reinterpret_cast<const float4*>(&q[g][c]);
                        const float4 qb = *reinterpret_cast<const float4*>(&q[g][c + 4]);
                        d += qa.x * to_f(k8[0]) + qa.y * to_f(k8[1]) + qa.z * to_f(k8[2]) + qa.w * to_f(k8[3]) +
                             qb.x * to_f(k8[4]) + qb.y * to_f(k8[5]) + qb.z * to_f(k8[6]) + qb.w * to_f(k8[7]);
                    }
                    p[g][kk] = d * a.scale;
                }
        }
        __syncthreads();
        // Softmax bookkeeping: warp w handles heads w, w + 4, ...
#pragma unroll
        for (int k = 0; k < kMaxGroup / 4 + 1; ++k) {
            const int g = warp + k * nwarps;
            if (g >= group) break;
            const float al = softmax_chunk(p[g], n, m_run[k], l_run[k], lane);
            if (lane == 0) alpha[g] = al;
        }
        __syncthreads();
        // Weighted V: channel c_own, keys k_phase, k_phase + KP, ...
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g)
            if (g < group) acc[g] *= alpha[g];
#pragma unroll 4
        for (int kk = k_phase; kk < n; kk += KP) {
            const float v = to_f(Vs[kk * KL + c_own]);
            for (int g = 0; g < kMaxGroup; ++g)
                if (g < group) acc[g] += p[g][kk] * v;
        }
        __syncthreads();  // done with this buffer and p before the next chunk's copies and scores
    }
    if constexpr (KP > 1) {
        // Fold the key phases into phase 0 (q is free now).
        __syncthreads();
        for (int ph = 1; ph < KP; ++ph) {
#pragma unroll
            for (int g = 0; g < kMaxGroup; ++g)
                if (g < group && k_phase == ph) q[g][c_own] = acc[g];
            __syncthreads();
#pragma unroll
            for (int g = 0; g < kMaxGroup; ++g)
                if (g < group && k_phase == 0) acc[g] += q[g][c_own];
            __syncthreads();
        }
    }
    if (nsplit > 1) {
        // Unnormalized partial results: acc, then (max, sum) per query head.
        float* part = a.split_scratch;
        const size_t ml0 = size_t(gridDim.x) * a.nq * nsplit * HD;
#pragma unroll
        for (int k = 0; k < kMaxGroup / 4 + 1; ++k) {
            const int g = warp + k * nwarps;
            if (g < group && lane == 0) {
                const size_t e = (size_t(blockIdx.x) * a.nq + kh * group + g) * nsplit + blockIdx.z;
                part[ml0 + 2 * e] = m_run[k];
                part[ml0 + 2 * e + 1] = l_run[k];
            }
        }
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g)
            if (g < group && k_phase == 0)
                part[((size_t(blockIdx.x) * a.nq + kh * group + g) * nsplit + blockIdx.z) * HD + c_own] = acc[g];
        return;
    }
#pragma unroll
    for (int k = 0; k < kMaxGroup / 4 + 1; ++k)
        if (warp + k * nwarps < group && lane == 0) inv_l[warp + k * nwarps] = 1.0f / l_run[k];
    __syncthreads();
    T* out = static_cast<T*>(a.out) + size_t(r) * a.nq * HD + size_t(kh) * group * HD;
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g)
        if (g < group && k_phase == 0) out[size_t(g) * HD + c_own] = from_f<T>(acc[g] * inv_l[g]);
}

// Merges the splits of paged_attention_k: one block per (row, query head);
// the splits' weights are computed once, in shared memory.
template <class T>
__global__ void merge_splits_k(AttnArgs a, const int* rows, int nsplit) {
    __shared__ float w[kMaxSplits];
    __shared__ float inv_l;
    const int r = rows ? rows[blockIdx.x] : blockIdx.x, h = blockIdx.y, hd = a.hd;
    const float* part = a.split_scratch;
    const size_t e0 = (size_t(blockIdx.x) * a.nq + h) * nsplit;
    const float* ml = part + size_t(gridDim.x) * a.nq * nsplit * hd + 2 * e0;
    if (threadIdx.x < 32) {
        const int z = threadIdx.x;
        const float mz = z < nsplit ? ml[2 * z] : -FLT_MAX, lz = z < nsplit ? ml[2 * z + 1] : 0.0f;
        const float m = warp_max(mz);
        const float wz = z < nsplit ? __expf(mz - m) : 0.0f;
        const float l = warp_sum(lz * wz);
        if (z < nsplit) w[z] = wz;
        if (z == 0) inv_l = 1.0f / l;
    }
    __syncthreads();
    T* out = static_cast<T*>(a.out) + size_t(r) * a.nq * hd + size_t(h) * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float v = 0;
        for (int z = 0; z < nsplit; ++z) v += part[(e0 + z) * hd + i] * w[z];
        out[i] = from_f<T>(v * inv_l);
    }
}

// ---------------------------------------------------------------- tiled (prefill)
//
// Up to 64 query vectors (tile rows x group heads) against chunks of 64 keys
// held in shared memory: 4 threads per query vector, each computing 16 of
// the chunk's scores and head_dim / 4 output channels. K/V are read from
// global memory once per tile instead of once per row. fp32 on CUDA cores.

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

template <class T, int HD, int B>
__global__ void __launch_bounds__(kTileThreads) paged_attention_tiled_k(AttnArgs a, BatchDev b, KvLayout kv,
                                                                         const int2* tiles) {
    extern __shared__ float smem[];
    constexpr int QS = HD + 1, SS = kTileK + 1, KS = k_stride<HD>(), CPT = HD / 4;
    float* qs = smem;               // [kTileQ][QS]
    float* S = qs + kTileQ * QS;    // [kTileQ][SS]
    T* Ks = reinterpret_cast<T*>(S + kTileQ * SS);  // [kTileK][KS]
    T* Vs = Ks + kTileK * KS;                       // [kTileK][KS]
    const int group = a.nq / a.nkv;
    const int2 tile = tiles[blockIdx.x];
    const int kh = blockIdx.y;
    const int nqv = tile.y * group;
    const int tid = threadIdx.x, my = tid >> 2, sub = tid & 3;
    for (int i = tid; i < nqv * HD; i += kTileThreads) {
        const int qv = i / HD, c = i % HD, r = qv / group, g = qv % group;
        qs[qv * QS + c] = a.q[size_t(tile.x + r) * a.ld + size_t(kh * group + g) * HD + c];
    }
    const auto [active, my_row, my_pos, my_lo, lo, hi, table] = tile_view(a, b, tile, my, nqv, group);
    const T* cache = static_cast<const T*>(kv.base);
    float m = -FLT_MAX, l = 0;
    float acc[CPT];
    for (int j = 0; j < CPT; ++j) acc[j] = 0;
    for (int c0 = lo; c0 < hi; c0 += kTileK) {
        const int n = min(kTileK, hi - c0);
        __syncthreads();  // the previous chunk is done with Ks, Vs, S (and qs is written)
        for (int i = tid; i < n * HD; i += kTileThreads) {
            const int kk = i / HD, c = i % HD, pos = c0 + kk;
            const int blk = table[pos / kv.block_size], slot = pos % kv.block_size;
            if constexpr (B == 16) {
                Ks[kk * KS + c] = cache[kv.offset(blk, a.layer, 0, kh, slot) + c];
                Vs[kk * KS + c] = cache[kv.offset(blk, a.layer, 1, kh, slot) + c];
            } else {  // dequantized into the tile as 16-bit
                Ks[kk * KS + c] = from_f<T>(KvRow<T, B>(kv, blk, a.layer, 0, kh, slot)[c]);
                Vs[kk * KS + c] = from_f<T>(KvRow<T, B>(kv, blk, a.layer, 1, kh, slot)[c]);
            }
        }
        __syncthreads();
        float mloc = -INFINITY;
        if (active) {
            for (int j = 0; j < kTileK / 4; ++j) {
                const int kk = sub + 4 * j;
                float sc = -INFINITY;
                const int kpos = c0 + kk;
                if (kk < n && kpos <= my_pos && kpos >= my_lo) {
                    float d = 0;
                    const float* q = qs + my * QS;
                    const T* k = Ks + kk * KS;
#pragma unroll 16
                    for (int c = 0; c < HD; ++c) d += q[c] * to_f(k[c]);
                    sc = d * a.scale;
                }
                S[my * SS + kk] = sc;
                mloc = fmaxf(mloc, sc);
            }
        }
        mloc = fmaxf(mloc, __shfl_xor_sync(0xffffffffu, mloc, 1));
        mloc = fmaxf(mloc, __shfl_xor_sync(0xffffffffu, mloc, 2));
        const float m_new = fmaxf(m, mloc);
        const float alpha = __expf(m - m_new);
        float psum = 0;
        if (active)
            for (int j = 0; j < kTileK / 4; ++j) {
                const int kk = sub + 4 * j;
                const float p = __expf(S[my * SS + kk] - m_new);
                S[my * SS + kk] = p;
                psum += p;
            }
        psum += __shfl_xor_sync(0xffffffffu, psum, 1);
        psum += __shfl_xor_sync(0xffffffffu, psum, 2);
        l = l * alpha + psum;
        m = m_new;
        __syncwarp();
        if (active) {
            for (int j = 0; j < CPT; ++j) acc[j] *= alpha;
            for (int kk = 0; kk < n; ++kk) {
                const float p = S[my * SS + kk];
                const T* v = Vs + kk * KS;
#pragma unroll
                for (int j = 0; j < CPT; ++j) acc[j] += p * to_f(v[sub + 4 * j]);
            }
        }
    }
    if (active) {
        const int g = my % group;
        T* out = static_cast<T*>(a.out) + size_t(my_row) * a.nq * HD + size_t(kh * group + g) * HD;
        const float inv = 1.0f / l;
        for (int j = 0; j < CPT; ++j) out[sub + 4 * j] = from_f<T>(acc[j] * inv);
    }
}

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

template <class T, int HD, int B>
void launch_tiled(const AttnArgs& a, const BatchDev& b, const KvLayout& kv, const int2* tiles, int n, cudaStream_t s) {
    const size_t bytes = size_t(kTileQ) * (HD + 1) * 4 + size_t(kTileQ) * (kTileK + 1) * 4 +
                         2 * size_t(kTileK) * k_stride<HD>() * sizeof(T);
    allow_smem<paged_attention_tiled_k<T, HD, B>>(bytes);
    paged_attention_tiled_k<T, HD, B><<<dim3(n, a.nkv), kTileThreads, bytes, s>>>(a, b, kv, tiles);
}

// ---------------------------------------------------------------- tiled, tensor cores
//
// The same tiles (up to 64 query vectors against chunks of 64 keys) with
// both products on tensor cores (WMMA 16x16x16, 16-bit inputs, fp32
// accumulation), as FlashAttention-2 does: S = Q K^T into shared memory, the
// online softmax by 4 threads per query vector (P rounded to 16 bits), then
// O += P V with O kept in shared memory in fp32 (rescaled by the softmax's
// correction before each chunk's product). Q is rounded to 16 bits.

template <int HD>
constexpr size_t mma_tile_bytes(size_t elem) {
    return size_t(kTileQ) * (HD + 4) * 4 + size_t(kTileQ) * (kTileK + 4) * 4 +
           (size_t(kTileQ) * (HD + 8) + 2 * size_t(kTileK) * (HD + 8) + size_t(kTileQ) * (kTileK + 8)) * elem;
}

template <class T, int HD, int B>
__global__ void __launch_bounds__(kTileThreads) paged_attention_mma_k(AttnArgs a, BatchDev b, KvLayout kv,
                                                                       const int2* tiles) {
    using namespace nvcuda;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    // Leading dimensions: multiples of 8 (16-bit) or 4 (fp32) elements, and
    // every 16-row block starts on 32 bytes, as WMMA needs.
    constexpr int QL = HD + 8, SL = kTileK + 4, PL = kTileK + 8, OL = HD + 4;
    float* Os = reinterpret_cast<float*>(smem_raw);  // [kTileQ][OL]
    float* S = Os + kTileQ * OL;                      // [kTileQ][SL]
    T* Qs = reinterpret_cast<T*>(S + kTileQ * SL);    // [kTileQ][QL]
    T* Ks = Qs + kTileQ * QL;                         // [kTileK][QL]
    T* Vs = Ks + kTileK * QL;                         // [kTileK][QL]
    T* Ps = Vs + kTileK * QL;                         // [kTileQ][PL]
    const int group = a.nq / a.nkv;
    const int2 tile = tiles[blockIdx.x];
    const int kh = blockIdx.y;
    const int nqv = tile.y * group, qblocks = (nqv + 15) / 16;
    const int tid = threadIdx.x, my = tid >> 2, sub = tid & 3, warp = tid >> 5;
    for (int i = tid; i < kTileQ * HD; i += kTileThreads) {
        const int qv = i / HD, c = i % HD;
        float v = 0;
        if (qv < nqv) v = a.q[size_t(tile.x + qv / group) * a.ld + size_t(kh * group + qv % group) * HD + c];
        Qs[qv * QL + c] = from_f<T>(v);
        Os[qv * OL + c] = 0;
    }
    const auto [active, my_row, my_pos, my_lo, lo, hi, table] = tile_view(a, b, tile, my, nqv, group);
    const T* cache = static_cast<const T*>(kv.base);
    float m = -FLT_MAX, l = 0;
    for (int c0 = lo; c0 < hi; c0 += kTileK) {
        const int n = min(kTileK, hi - c0);
        __syncthreads();  // the previous chunk is done with Ks, Vs, Ps, Os (and Qs, Os are written)
        // K/V of the chunk; rows past its end are zero (P is 0 there, and 0 x garbage may be NaN).
        if constexpr (B == 16) {
            constexpr int V8 = HD / 8;  // 16-byte vectors per row
            for (int i = tid; i < kTileK * V8; i += kTileThreads) {
                const int kk = i / V8, c = (i % V8) * 8;
                uint4 kq = make_uint4(0, 0, 0, 0), vq = kq;
                if (kk < n) {
                    const int pos = c0 + kk, blk = table[pos / kv.block_size], slot = pos % kv.block_size;
                    kq = *reinterpret_cast<const uint4*>(cache + kv.offset(blk, a.layer, 0, kh, slot) + c);
                    vq = *reinterpret_cast<const uint4*>(cache + kv.offset(blk, a.layer, 1, kh, slot) + c);
                }
                *reinterpret_cast<uint4*>(Ks + kk * QL + c) = kq;
                *reinterpret_cast<uint4*>(Vs + kk * QL + c) = vq;
            }
        } else {  // dequantized into the tile as 16-bit
            for (int i = tid; i < kTileK * HD; i += kTileThreads) {
                const int kk = i / HD, c = i % HD;
                float kx = 0, vx = 0;
                if (kk < n) {
                    const int pos = c0 + kk, blk = table[pos / kv.block_size], slot = pos % kv.block_size;
                    kx = KvRow<T, B>(kv, blk, a.layer, 0, kh, slot)[c];
                    vx = KvRow<T, B>(kv, blk, a.layer, 1, kh, slot)[c];
                }
                Ks[kk * QL + c] = from_f<T>(kx);
                Vs[kk * QL + c] = from_f<T>(vx);
            }
        }
        __syncthreads();
        // S = Q K^T: 4 x 4 blocks of 16 x 16, two per warp (empty ones skipped).
        for (int f = warp; f < 16; f += kTileThreads / 32) {
            const int rb = f & 3, cb = f >> 2;
            if (rb >= qblocks || cb * 16 >= n) continue;
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.0f);
#pragma unroll
            for (int k = 0; k < HD; k += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
                wmma::load_matrix_sync(fa, Qs + rb * 16 * QL + k, QL);
                wmma::load_matrix_sync(fb, Ks + cb * 16 * QL + k, QL);
                wmma::mma_sync(acc, fa, fb, acc);
            }
            wmma::store_matrix_sync(S + rb * 16 * SL + cb * 16, acc, SL, wmma::mem_row_major);
        }
        __syncthreads();
        // Online softmax: query vector `my`, keys sub, sub + 4, ...
        float sc[kTileK / 4];
        float mloc = -INFINITY;
#pragma unroll
        for (int j = 0; j < kTileK / 4; ++j) {
            const int kk = sub + 4 * j, kpos = c0 + kk;
            sc[j] = active && kk < n && kpos <= my_pos && kpos >= my_lo ? S[my * SL + kk] * a.scale : -INFINITY;
            mloc = fmaxf(mloc, sc[j]);
        }
        mloc = fmaxf(mloc, __shfl_xor_sync(0xffffffffu, mloc, 1));
        mloc = fmaxf(mloc, __shfl_xor_sync(0xffffffffu, mloc, 2));
        const float m_new = fmaxf(m, mloc);
        const float alpha = __expf(m - m_new);
        float psum = 0;
#pragma unroll
        for (int j = 0; j < kTileK / 4; ++j) {
            const float p = __expf(sc[j] - m_new);
            Ps[my * PL + sub + 4 * j] = from_f<T>(p);
            psum += p;
        }
        psum += __shfl_xor_sync(0xffffffffu, psum, 1);
        psum += __shfl_xor_sync(0xffffffffu, psum, 2);
        l = l * alpha + psum;
        m = m_new;
        if (active)
            for (int c = sub; c < HD; c += 4) Os[my * OL + c] *= alpha;
        __syncthreads();
        // O += P V: 4 x (HD / 16) blocks.
        for (int f = warp; f < 4 * (HD / 16); f += kTileThreads / 32) {
            const int rb = f & 3, cb = f >> 2;
            if (rb >= qblocks) continue;
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::load_matrix_sync(acc, Os + rb * 16 * OL + cb * 16, OL, wmma::mem_row_major);
            for (int k = 0; k < n; k += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
                wmma::load_matrix_sync(fa, Ps + rb * 16 * PL + k, PL);
                wmma::load_matrix_sync(fb, Vs + k * QL + cb * 16, QL);
                wmma::mma_sync(acc, fa, fb, acc);
            }
            wmma::store_matrix_sync(Os + rb * 16 * OL + cb * 16, acc, OL, wmma::mem_row_major);
        }
    }
    __syncthreads();
    if (active) {
        const int g = my % group;
        T* out = static_cast<T*>(a.out) + size_t(my_row) * a.nq * HD + size_t(kh * group + g) * HD;
        const float inv = 1.0f / l;
        for (int c = sub; c < HD; c += 4) out[c] = from_f<T>(Os[my * OL + c] * inv);
    }
}

template <class T, int HD, int B>
void launch_mma(const AttnArgs& a, const BatchDev& b, const KvLayout& kv, const int2* tiles, int n, cudaStream_t s) {
    const size_t bytes = mma_tile_bytes<HD>(sizeof(T));
    allow_smem<paged_attention_mma_k<T, HD, B>>(bytes);
    paged_attention_mma_k<T, HD, B><<<dim3(n, a.nkv), kTileThreads, bytes, s>>>(a, b, kv, tiles);
}

template <class T, int HD>
void launch_decode(dim3 grid, const AttnArgs& a, const BatchDev& b, const KvLayout& kv, const int* rows, cudaStream_t s) {
    constexpr size_t bytes = decode_smem_bytes<HD>();
    allow_smem<paged_decode_k<T, HD>>(bytes);
    paged_decode_k<T, HD><<<grid, kThreads, bytes, s>>>(a, b, kv, rows);
}

template <class T, int HD, int B>
void launch_tiles(const AttnArgs& a, const BatchDev& b, const KvLayout& kv, const int2* tiles, int n, cudaStream_t s) {
    if (a.tensor_cores) launch_mma<T, HD, B>(a, b, kv, tiles, n, s);
    else launch_tiled<T, HD, B>(a, b, kv, tiles, n, s);
}

}  // namespace

// Enough (row, KV head, split) blocks for two waves on 132 SMs, at most 32
// splits; none once rows x KV heads fill the GPU.
constexpr int kTargetBlocks = 264;

int attention_splits(int n, int nkv) {
    if (n * nkv >= kTargetBlocks) return 1;
    return std::min(kMaxSplits, (kTargetBlocks + n * nkv - 1) / (n * nkv));
}

size_t attention_split_floats(int nq, int nkv, int hd) {
    size_t most = 0;
    for (int n = 1; n * nkv < kTargetBlocks; ++n) most = std::max(most, size_t(n) * attention_splits(n, nkv));
    return most * size_t(nq) * (size_t(hd) + 2);
}

void paged_attention(Dt dt, const AttnArgs& a, const BatchDev& b, const KvLayout& kv, const int* rows, int n,
                     cudaStream_t s) {
    if (n == 0) return;
    const int nsplit = a.split_scratch ? attention_splits(n, a.nkv) : 1;
    dim3 grid(n, a.nkv, nsplit);
    if (kv.bits == 16 && a.hd == 128 && a.nq / a.nkv <= kMaxGroup)
        TM_DISPATCH_DT(dt, W, (launch_decode<W, 128>(grid, a, b, kv, rows, s)));
    else if (kv.bits == 16 && a.hd == 64 && a.nq / a.nkv <= kMaxGroup)
        TM_DISPATCH_DT(dt, W, (launch_decode<W, 64>(grid, a, b, kv, rows, s)));
    else
        TM_DISPATCH_DT(dt, W, TM_DISPATCH_BITS(kv.bits, B, (paged_attention_k<W, B><<<grid, kThreads, 0, s>>>(a, b, kv, rows))));
    if (nsplit > 1) TM_DISPATCH_DT(dt, W, (merge_splits_k<W><<<dim3(n, a.nq), 128, 0, s>>>(a, rows, nsplit)));
}

int attention_tile_rows(int group) { return std::max(1, kTileQ / group); }

bool paged_attention_tiled(Dt dt, const AttnArgs& a, const BatchDev& b, const KvLayout& kv, const int2* tiles,
                           int n_tiles, cudaStream_t s) {
    if (n_tiles == 0) return true;
    switch (a.hd) {
        case 16: TM_DISPATCH_DT(dt, W, TM_DISPATCH_BITS(kv.bits, B, (launch_tiles<W, 16, B>(a, b, kv, tiles, n_tiles, s)))); return true;
        case 32: TM_DISPATCH_DT(dt, W, TM_DISPATCH_BITS(kv.bits, B, (launch_tiles<W, 32, B>(a, b, kv, tiles, n_tiles, s)))); return true;
        case 64: TM_DISPATCH_DT(dt, W, TM_DISPATCH_BITS(kv.bits, B, (launch_tiles<W, 64, B>(a, b, kv, tiles, n_tiles, s)))); return true;
        case 128: TM_DISPATCH_DT(dt, W, TM_DISPATCH_BITS(kv.bits, B, (launch_tiles<W, 128, B>(a, b, kv, tiles, n_tiles, s)))); return true;
        default: return false;
    }
}

}  // namespace tmc::cuda
