// Attention over the paged KV cache, online softmax in fp32, GQA-aware
// (each block computes all `group` query heads of its KV head, so each K/V
// vector is read once per group):
//   - row by row (decode, and prompt chunks of under 4 rows), optionally split
//     along the sequence with a merge kernel: for 16-bit caches of head_dim
//     64 or 128 and groups of up to 8 heads, paged_decode_mma_k on tensor
//     cores (or paged_decode_k on CUDA cores, TM_CUDA_MMA_DECODE=0), both
//     fed by a ring of asynchronous copies; paged_attention_k for the rest
//     (quantized caches, other head sizes; and all of them with
//     TM_CUDA_RING_DECODE=0);
//   - in tiles of up to 64 query vectors of one sequence (prompt chunks):
//     paged_attention_mma_k on tensor cores, or paged_attention_tiled_k on
//     CUDA cores (TM_CUDA_MMA_ATTENTION=0).
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

template <class T, int B>
__global__ void paged_attention_k(AttnArgs a, BatchDev b, KvLayout kv, const int4* items) {
    pdl_begin();
    __shared__ float q[kMaxGroup][kMaxHd];
    __shared__ float p[kMaxGroup][kChunk];
    __shared__ float alpha[kMaxGroup];
    __shared__ float inv_l[kMaxGroup];
    const int4 it = items[blockIdx.x];  // {row, split, splits of the row}; row -1: no work
    if (it.x < 0) return;
    const int r = it.x, kh = blockIdx.y;
    const int hd = a.hd, group = a.nq / a.nkv;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = kThreads / 32;
    const ItemKeys ik = item_keys(a, b, it);
    const int* table = ik.table;
    const int nsplit = it.z, begin = ik.begin, end = ik.end;
    const T* qr = static_cast<const T*>(a.q) + size_t(r) * a.ld + size_t(kh) * group * hd;
    for (int i = threadIdx.x; i < group * hd; i += kThreads) q[i / hd][i % hd] = to_f(qr[i]);
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
        const size_t ml0 = size_t(gridDim.x) * a.nq * hd;
        for (int g = warp, k = 0; g < group; g += nwarps, ++k)
            if (lane == 0) {
                const size_t e = size_t(blockIdx.x) * a.nq + kh * group + g;
                part[ml0 + 2 * e] = m_run[k];
                part[ml0 + 2 * e + 1] = l_run[k];
            }
        for (int c = 0; c < 2; ++c) {
            const int i = threadIdx.x + c * kThreads;
            if (i >= hd) break;
            for (int g = 0; g < group; ++g)
                part[(size_t(blockIdx.x) * a.nq + kh * group + g) * hd + i] = acc[g][c];
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
// shaped for HBM bandwidth: chunks of 32 keys are copied into shared memory
// by 16-byte asynchronous copies into a ring of RS stages (RS - 1 chunks in
// flight while one is computed), 4 blocks an SM; G query heads (the group,
// padded to a power of two) per block. Few instructions a key (an earlier
// double-buffered kernel with 64-key chunks issued ~1,300 a thread per
// chunk, ran 3 blocks an SM and read the cache at 48-60% of the copy
// bandwidth in large decode batches; this one reads it at 69-91%):
//   - scores: HD / 8 threads per key, each holding its 8 channels of the G
//     query vectors in registers; the G partial dot products are reduced
//     across those threads by halving exchanges (G - 1 + log2(HD / 8) - log2 G
//     shuffles instead of G log2(HD / 8));
//   - softmax: a warp per head, a lane per key;
//   - weighted V: each thread 8 channels (one 16-byte load a key) for all G
//     heads, over every (128 / (HD / 8))-th key; the key phases are folded
//     once at the end.
constexpr int kRingChunk = 32;
constexpr int kDecodeRingStages = 3;

template <int HD, int G, int RS>
constexpr size_t ring_smem_bytes() {
    constexpr size_t stages = size_t(2) * RS * kRingChunk * (HD + 8) * 2;      // [K, V][RS][chunk][HD + 8]
    constexpr size_t fold = size_t(kThreads / (HD / 8)) * G * HD * 4;          // [key phases][G][HD] floats
    return stages > fold ? stages : fold;
}

// Sums v[0, G) over the TPK lanes of a key (lanes xor < TPK): returns the
// sum of head `head` (set here), which every lane of that head holds.
template <int G, int TPK>
__device__ __forceinline__ float reduce_heads(float (&v)[G], int lane, int& head) {
    head = 0;
    int cnt = G;
#pragma unroll
    for (int o = TPK / 2; o >= 1; o >>= 1) {
        if (cnt > 1) {
            const int half = cnt / 2;
            const bool up = lane & o;
#pragma unroll
            for (int i = 0; i < G / 2; ++i) {
                if (i >= half) break;
                const float keep = up ? v[i + half] : v[i], send = up ? v[i] : v[i + half];
                v[i] = keep + __shfl_xor_sync(0xffffffffu, send, o);
            }
            head = head * 2 + (up ? 1 : 0);
            cnt = half;
        } else {
            v[0] += __shfl_xor_sync(0xffffffffu, v[0], o);
        }
    }
    return v[0];
}

template <class T, int HD, int G, int RS>
__global__ void __launch_bounds__(kThreads, 1) paged_decode_k(AttnArgs a, BatchDev b, KvLayout kv, const int4* items) {
    pdl_begin();
    constexpr int C = kRingChunk, KL = HD + 8, V8 = HD / 8;
    constexpr int TPK = V8;                  // threads per key in the scores
    constexpr int KPP = kThreads / TPK;      // keys per pass of the scores
    constexpr int KPH = kThreads / V8;       // key phases of the weighted sum
    constexpr int PER = C * V8 / kThreads;   // 16-byte copies a thread per chunk, each of K and V
    static_assert(PER >= 1 && C % KPP == 0 && G <= TPK && G <= 8);
    extern __shared__ __align__(16) unsigned char dsm[];
    T* const Kb = reinterpret_cast<T*>(dsm);  // [RS][C][KL]
    T* const Vb = Kb + RS * C * KL;           // [RS][C][KL]
    __shared__ __align__(16) float p[C][G];
    __shared__ float alpha[G], inv_l[G];
    const int4 it = items[blockIdx.x];  // {row, split, splits of the row}; row -1: no work
    if (it.x < 0) return;
    const int r = it.x, kh = blockIdx.y;
    const int group = a.nq / a.nkv;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const ItemKeys ik = item_keys(a, b, it);
    const int* table = ik.table;
    const int nsplit = it.z, begin = ik.begin, end = ik.end;
    const T* cache = static_cast<const T*>(kv.base);
    const size_t vdelta = size_t(kv.kv_heads) * kv.block_size * HD;  // V row - K row
    // This thread's 8 channels of the G query vectors (scaled), for the scores.
    const int part = tid % TPK, kq = tid / TPK;
    float q[G][8];
    {
        const T* qr = static_cast<const T*>(a.q) + size_t(r) * a.ld + size_t(kh) * group * HD + part * 8;
#pragma unroll
        for (int g = 0; g < G; ++g) {
            const uint4 x = g < group ? *reinterpret_cast<const uint4*>(qr + g * HD) : make_uint4(0, 0, 0, 0);
            const T* e = reinterpret_cast<const T*>(&x);
#pragma unroll
            for (int i = 0; i < 8; ++i) q[g][i] = to_f(e[i]) * a.scale;
        }
    }
    // Softmax state: warp w keeps heads w and w + 4.
    float m_run[2] = {-FLT_MAX, -FLT_MAX}, l_run[2] = {0, 0};
    // Weighted sum: channels vc * 8 .. + 8, keys kp, kp + KPH, ...
    const int vc = tid % V8, kp = tid / V8;
    float acc[G][8];
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] = 0;
    // Copies chunk c0's K and V into ring stage `st` (one commit group, empty past the end).
    const auto stage = [&](int c0, int st) {
        if (c0 < end) {
            const int n = min(C, end - c0);
            T* Ks = Kb + st * C * KL;
            T* Vs = Vb + st * C * KL;
#pragma unroll
            for (int u = 0; u < PER; ++u) {
                const int i = tid + u * kThreads, kk = i / V8, c = (i % V8) * 8;
                if (kk < n) {
                    const int ps = c0 + kk;
                    const T* kp_ = cache + kv.offset(table[ps / kv.block_size], a.layer, 0, kh, ps % kv.block_size) + c;
                    __pipeline_memcpy_async(Ks + kk * KL + c, kp_, 16);
                    __pipeline_memcpy_async(Vs + kk * KL + c, kp_ + vdelta, 16);
                }
            }
        }
        __pipeline_commit();
    };
#pragma unroll
    for (int i = 0; i < RS - 1; ++i) stage(begin + i * C, i);
    int st = 0;
    for (int c0 = begin; c0 < end; c0 += C, st = st + 1 == RS ? 0 : st + 1) {
        const int n = min(C, end - c0);
        __pipeline_wait_prior(RS - 2);
        __syncthreads();  // chunk c0 has landed for every thread; the previous chunk's V and p are done
        stage(c0 + (RS - 1) * C, st == 0 ? RS - 1 : st - 1);  // the stage the previous chunk used
        const T* Ks = Kb + st * C * KL;
        const T* Vs = Vb + st * C * KL;
        // Scores: key kq + j * KPP, channels part * 8 .. + 8.
#pragma unroll
        for (int j = 0; j < C / KPP; ++j) {
            const int kk = kq + j * KPP;
            const uint4 k8 = *reinterpret_cast<const uint4*>(Ks + kk * KL + part * 8);
            const T* kt = reinterpret_cast<const T*>(&k8);
            float kf[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) kf[e] = to_f(kt[e]);
            float d[G];
#pragma unroll
            for (int g = 0; g < G; ++g) {
                float x = 0;
#pragma unroll
                for (int e = 0; e < 8; ++e) x += q[g][e] * kf[e];
                d[g] = x;
            }
            int head;
            const float sum = reduce_heads<G, TPK>(d, lane, head);
            if ((part & (TPK / G - 1)) == 0) p[kk][head] = kk < n ? sum : -INFINITY;
        }
        __syncthreads();
        // Softmax: warp w, heads w and w + 4; lane = key.
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            const int g = warp + 4 * k;
            if (g >= G) break;
            const float sc = p[lane][g];
            const float m_new = fmaxf(m_run[k], warp_max(sc));
            const float e = __expf(sc - m_new);
            p[lane][g] = e;
            const float al = __expf(m_run[k] - m_new);
            l_run[k] = l_run[k] * al + warp_sum(e);
            m_run[k] = m_new;
            if (lane == 0) alpha[g] = al;
        }
        __syncthreads();
#pragma unroll
        for (int g = 0; g < G; ++g) {
            const float al = alpha[g];
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[g][e] *= al;
        }
#pragma unroll 2
        for (int kk = kp; kk < n; kk += KPH) {
            const uint4 v8 = *reinterpret_cast<const uint4*>(Vs + kk * KL + vc * 8);
            const T* vt = reinterpret_cast<const T*>(&v8);
            float vf[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) vf[e] = to_f(vt[e]);
            float pg[G];
            if constexpr (G >= 4) {
#pragma unroll
                for (int g = 0; g < G; g += 4) {
                    const float4 p4 = *reinterpret_cast<const float4*>(&p[kk][g]);
                    pg[g] = p4.x, pg[g + 1] = p4.y, pg[g + 2] = p4.z, pg[g + 3] = p4.w;
                }
            } else {
#pragma unroll
                for (int g = 0; g < G; ++g) pg[g] = p[kk][g];
            }
#pragma unroll
            for (int g = 0; g < G; ++g)
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[g][e] += pg[g] * vf[e];
        }
    }
    // Fold the key phases (the stages are free once every copy has landed
    // and every thread is past its last chunk).
    __pipeline_wait_prior(0);
    __syncthreads();
    float* fold = reinterpret_cast<float*>(dsm);  // [KPH][G][HD]
#pragma unroll
    for (int g = 0; g < G; ++g) {
        float* f = fold + (size_t(kp) * G + g) * HD + vc * 8;
        *reinterpret_cast<float4*>(f) = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
        *reinterpret_cast<float4*>(f + 4) = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
    }
#pragma unroll
    for (int k = 0; k < 2; ++k) {
        const int g = warp + 4 * k;
        if (g < G && lane == 0) inv_l[g] = 1.0f / l_run[k];
    }
    if (nsplit > 1) {
        // Unnormalized partial results, then (max, sum) per query head.
        float* part_ = a.split_scratch;
        const size_t ml0 = size_t(gridDim.x) * a.nq * HD;
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            const int g = warp + 4 * k;
            if (g < G && g < group && lane == 0) {
                const size_t e = size_t(blockIdx.x) * a.nq + kh * group + g;
                part_[ml0 + 2 * e] = m_run[k];
                part_[ml0 + 2 * e + 1] = l_run[k];
            }
        }
    }
    __syncthreads();
    for (int o = tid; o < group * HD; o += kThreads) {
        const int g = o / HD, c = o % HD;
        float v = 0;
#pragma unroll
        for (int ph = 0; ph < KPH; ++ph) v += fold[(size_t(ph) * G + g) * HD + c];
        if (nsplit > 1)
            a.split_scratch[(size_t(blockIdx.x) * a.nq + kh * group + g) * HD + c] = v;
        else
            static_cast<T*>(a.out)[size_t(r) * a.nq * HD + size_t(kh * group + g) * HD + c] = from_f<T>(v * inv_l[g]);
    }
}

// Merges the items of rows split along the sequence. A block of 8 warps
// takes one row and 8 query heads, a warp each; or (few rows: one_head) one
// row and head, its 8 warps each summing every 8th piece, the sums meeting
// in shared memory. Lane z weighs piece z; a lane sums 4 channels. Rows of
// one item return at once. (A block per row and head for many rows made 32
// a row, most of which return at once: 211 against 199 us in
// attention_bench's 372-row batch of unsplit rows.) Item i's partial
// results: its unnormalized output at part[(i nq + h) hd], its (max, sum)
// at part[capacity nq hd + 2 (i nq + h)].
constexpr int kMergeWarps = 8;
constexpr int kMergeFewRows = 64;  // up to this many rows, a head a block

template <class T>
__global__ void __launch_bounds__(32 * kMergeWarps) merge_items_k(AttnArgs a, const int4* items, const int2* row_items,
                                                                  int capacity, bool one_head) {
    pdl_begin();
    __shared__ float4 red[kMergeWarps][32];
    const int2 ri = row_items[blockIdx.x];  // {first item, items}
    const int nsplit = ri.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    // This warp's head, and its first piece and stride over the pieces.
    const int h = one_head ? blockIdx.y : blockIdx.y * kMergeWarps + warp;
    const int j = one_head ? warp : 0, wph = one_head ? kMergeWarps : 1;
    if (nsplit <= 1 || h >= a.nq) return;  // (uniform in a block when one_head)
    const int r = items[ri.x].x, hd = a.hd;
    const float* part = a.split_scratch + (size_t(ri.x) * a.nq + h) * hd;  // piece z: + z nq hd
    const float* ml = a.split_scratch + size_t(capacity) * a.nq * hd + 2 * (size_t(ri.x) * a.nq + h);
    const float mz = lane < nsplit ? ml[2 * size_t(lane) * a.nq] : -FLT_MAX;
    const float lz = lane < nsplit ? ml[2 * size_t(lane) * a.nq + 1] : 0.0f;
    const float m = warp_max(mz);
    const float wz = lane < nsplit ? __expf(mz - m) : 0.0f;
    const float inv_l = 1.0f / warp_sum(lz * wz);
    T* out = static_cast<T*>(a.out) + size_t(r) * a.nq * hd + size_t(h) * hd;
    const size_t zstride = size_t(a.nq) * hd;
    for (int i0 = 0; i0 < hd; i0 += 128) {  // (every lane runs the loops: the shuffles)
        const int i = i0 + 4 * lane;
        const bool on = i < hd;
        float4 v = make_float4(0, 0, 0, 0);
#pragma unroll 4
        for (int z = j; z < nsplit; z += wph) {
            const float wgt = __shfl_sync(0xffffffffu, wz, z);
            if (on) {
                const float4 p = *reinterpret_cast<const float4*>(part + z * zstride + i);
                v.x += p.x * wgt, v.y += p.y * wgt, v.z += p.z * wgt, v.w += p.w * wgt;
            }
        }
        if (one_head) {
            red[warp][lane] = v;
            __syncthreads();
            if (warp == 0)
                for (int k = 1; k < kMergeWarps; ++k) {
                    const float4 u = red[k][lane];
                    v.x += u.x, v.y += u.y, v.z += u.z, v.w += u.w;
                }
            __syncthreads();  // red is free for the next 128 channels
        }
        if (on && j == 0) {
            out[i] = from_f<T>(v.x * inv_l), out[i + 1] = from_f<T>(v.y * inv_l);
            out[i + 2] = from_f<T>(v.z * inv_l), out[i + 3] = from_f<T>(v.w * inv_l);
        }
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
    pdl_begin();
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
        qs[qv * QS + c] = to_f(static_cast<const T*>(a.q)[size_t(tile.x + r) * a.ld + size_t(kh * group + g) * HD + c]);
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
    launch(paged_attention_tiled_k<T, HD, B>, dim3(n, a.nkv), dim3(kTileThreads), bytes, s, a, b, kv, tiles);
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
    pdl_begin();
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
        T v = from_f<T>(0.0f);
        if (qv < nqv) v = static_cast<const T*>(a.q)[size_t(tile.x + qv / group) * a.ld + size_t(kh * group + qv % group) * HD + c];
        Qs[qv * QL + c] = v;
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

// ---------------------------------------------------------------- tiled, tensor cores, registers (16-bit cache)
//
// The same tiles computed as FlashAttention-2 does, every product in
// registers (paged_attention_mma_k goes through shared memory for S, P and
// O and copies K/V synchronously: ~20 TFLOP/s in the 8B model's prefill):
// 4 warps, each owning 16 of the tile's 64 query vectors. Per chunk of 64
// keys, S = Q K^T by mma.sync m16n8k16 (fp32 accumulation) into registers,
// the online softmax on them (the 4 lanes of a quad share two query
// vectors), P rounded to 16 bits in place as the A operand of O += P V, O in
// registers. Fragments come from shared memory by ldmatrix; K/V chunks are
// double-buffered by asynchronous copies. Q is rounded to 16 bits.
constexpr int kFaThreads = 128;

// Shared memory: K and V, 2 buffers each; Q passes through K's second buffer
// on its way to registers. 69.6 KB for head_dim 128 and at most 168
// registers a thread: 3 blocks an SM.
template <int HD>
constexpr size_t fa_smem_bytes() { return 4 * size_t(kTileK) * (HD + 8) * 2; }
constexpr int kFaBlocksPerSm = 3;

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

template <class T, int HD>
__global__ void __launch_bounds__(kFaThreads, kFaBlocksPerSm) paged_attention_fa_k(AttnArgs a, BatchDev b, KvLayout kv,
                                                                                     const int2* tiles) {
    pdl_begin();
    constexpr int L = HD + 8;     // row stride (elements): 16-byte rows, banks shifted by 4 words a row
    constexpr int KS = HD / 16;   // k-steps of Q K^T
    constexpr int NO = HD / 8;    // n-tiles of O
    constexpr int V8 = HD / 8;    // 16-byte vectors a row
    static_assert(HD % 16 == 0 && kTileQ == 64 && kTileK == 64);
    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* const Kb = reinterpret_cast<T*>(smem_raw);  // [2][64][L]
    T* const Vb = Kb + 2 * kTileK * L;             // [2][64][L]
    T* const Qs = Kb + kTileK * L;                 // [64][L]: K's buffer 1, free until the first chunk's barrier
    const int group = a.nq / a.nkv;
    const int2 tile = tiles[blockIdx.x];
    const int kh = blockIdx.y;
    const int nqv = tile.y * group;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    for (int i = tid; i < kTileQ * V8; i += kFaThreads) {
        const int qv = i / V8, c = (i % V8) * 8;
        uint4 w = make_uint4(0, 0, 0, 0);
        if (qv < nqv)
            w = *reinterpret_cast<const uint4*>(static_cast<const T*>(a.q) + size_t(tile.x + qv / group) * a.ld +
                                                size_t(kh * group + qv % group) * HD + c);
        *reinterpret_cast<uint4*>(Qs + qv * L + c) = w;
    }
    // This thread's two query vectors: rows lane / 4 and lane / 4 + 8 of its warp's 16.
    const int q0 = warp * 16 + (lane >> 2);
    const TileView v0 = tile_view(a, b, tile, q0, nqv, group), v1 = tile_view(a, b, tile, q0 + 8, nqv, group);
    const int lo = v0.lo, hi = v0.hi;
    // Keys [lo_last, first] are visible to every query of the tile.
    const int first = b.positions[tile.x], lo_last = a.window > 0 ? max(0, hi - a.window) : 0;
    const float scale2 = a.scale * 1.4426950408889634f;
    const int* table = v0.table;
    const T* cache = static_cast<const T*>(kv.base);
    const size_t vdelta = size_t(kv.kv_heads) * kv.block_size * HD;  // V row - K row
    // Copies chunk c0's K and V into buffer `buf` (one commit group); rows
    // past the end are zero (P is 0 there, and 0 x garbage may be NaN). A
    // thread copies the same 16 bytes of RPT rows RSTEP apart: one division
    // a chunk gives the first row's block and slot, then the slot steps.
    constexpr int RPT = kTileK * V8 / kFaThreads, RSTEP = kFaThreads / V8;
    static_assert(RPT * kFaThreads == kTileK * V8 && RSTEP * V8 == kFaThreads);
    const int kk0 = tid / V8, c = (tid % V8) * 8, bs = kv.block_size;
    const size_t head_k = (size_t(a.layer) * 2 * kv.kv_heads + kh) * size_t(bs) * HD + c, belems = kv.block_elems();
    const auto stage = [&](int c0, int buf) {
        T* Ks = Kb + buf * kTileK * L;
        T* Vs = Vb + buf * kTileK * L;
        int ps = c0 + kk0, blk = ps / bs, slot = ps - blk * bs;
#pragma unroll
        for (int j = 0; j < RPT; ++j, ps += RSTEP, slot += RSTEP) {
            while (slot >= bs) slot -= bs, ++blk;
            const int kk = kk0 + j * RSTEP;
            if (ps < hi) {
                const T* kp = cache + size_t(table[blk]) * belems + head_k + size_t(slot) * HD;
                __pipeline_memcpy_async(Ks + kk * L + c, kp, 16);
                __pipeline_memcpy_async(Vs + kk * L + c, kp + vdelta, 16);
            } else {
                *reinterpret_cast<uint4*>(Ks + kk * L + c) = make_uint4(0, 0, 0, 0);
                *reinterpret_cast<uint4*>(Vs + kk * L + c) = make_uint4(0, 0, 0, 0);
            }
        }
        __pipeline_commit();
    };
    if (lo < hi) stage(lo, 0);
    __syncthreads();  // Q is in shared memory
    uint32_t qf[KS][4];
#pragma unroll
    for (int k = 0; k < KS; ++k)
        ldsm_x4(qf[k], Qs + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * L + k * 16 + (lane >> 4) * 8);
    float o[NO][4];
#pragma unroll
    for (int n = 0; n < NO; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0, l1 = 0;
    for (int c0 = lo, buf = 0; c0 < hi; c0 += kTileK, buf ^= 1) {
        __pipeline_wait_prior(0);
        __syncthreads();  // chunk c0 has landed for every thread; every warp is done with the other buffer
        if (c0 + kTileK < hi) stage(c0 + kTileK, buf ^ 1);
        const T* Ks = Kb + buf * kTileK * L;
        const T* Vs = Vb + buf * kTileK * L;
        float s[8][4];
#pragma unroll
        for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0;
#pragma unroll
        for (int k = 0; k < KS; ++k)
#pragma unroll
            for (int np = 0; np < 4; ++np) {
                uint32_t kf[4];
                ldsm_x4(kf, Ks + (np * 16 + (lane & 7) + (lane >> 4) * 8) * L + k * 16 + ((lane >> 3) & 1) * 8);
                mma16816<T>(s[2 * np], qf[k], kf[0], kf[1]);
                mma16816<T>(s[2 * np + 1], qf[k], kf[2], kf[3]);
            }
        // Mask (causal, window, inactive) unless every key of the chunk is
        // visible to every query of the tile, then the online softmax of rows
        // q0 and q0 + 8, in base 2 (the scale includes log2(e)). Inactive
        // rows (zero queries) are not written.
        float mx0 = -INFINITY, mx1 = -INFINITY;
        if (c0 + kTileK <= first + 1 && c0 >= lo_last) {
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    s[n][e] *= scale2;
                    s[n][2 + e] *= scale2;
                    mx0 = fmaxf(mx0, s[n][e]);
                    mx1 = fmaxf(mx1, s[n][2 + e]);
                }
        } else {
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int key = c0 + n * 8 + (lane & 3) * 2 + e;
                    s[n][e] = v0.active && key <= v0.my_pos && key >= v0.my_lo ? s[n][e] * scale2 : -INFINITY;
                    s[n][2 + e] = v1.active && key <= v1.my_pos && key >= v1.my_lo ? s[n][2 + e] * scale2 : -INFINITY;
                    mx0 = fmaxf(mx0, s[n][e]);
                    mx1 = fmaxf(mx1, s[n][2 + e]);
                }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        // Rows with no visible key yet keep a base of 0 (exp(-inf) = 0, no NaN).
        const float b0 = mn0 == -INFINITY ? 0.0f : mn0, b1 = mn1 == -INFINITY ? 0.0f : mn1;
        const float al0 = fast_exp2(m0 - b0), al1 = fast_exp2(m1 - b1);
        m0 = mn0, m1 = mn1;
        float ps0 = 0, ps1 = 0;
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                s[n][e] = fast_exp2(s[n][e] - b0);
                s[n][2 + e] = fast_exp2(s[n][2 + e] - b1);
                ps0 += s[n][e];
                ps1 += s[n][2 + e];
            }
        l0 = l0 * al0 + ps0;  // this lane's share; the quad's shares are summed at the end
        l1 = l1 * al1 + ps1;
#pragma unroll
        for (int n = 0; n < NO; ++n) o[n][0] *= al0, o[n][1] *= al0, o[n][2] *= al1, o[n][3] *= al1;
        // O += P V: P's accumulator layout is the A operand of 16 keys.
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const uint32_t pa[4] = {pack2<T>(s[2 * j][0], s[2 * j][1]), pack2<T>(s[2 * j][2], s[2 * j][3]),
                                    pack2<T>(s[2 * j + 1][0], s[2 * j + 1][1]),
                                    pack2<T>(s[2 * j + 1][2], s[2 * j + 1][3])};
#pragma unroll
            for (int np = 0; np < NO / 2; ++np) {
                uint32_t vf[4];
                ldsm_x4_trans(vf, Vs + (j * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * L + np * 16 + (lane >> 4) * 8);
                mma16816<T>(o[2 * np], pa, vf[0], vf[1]);
                mma16816<T>(o[2 * np + 1], pa, vf[2], vf[3]);
            }
        }
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    T* out = static_cast<T*>(a.out);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const TileView& v = h ? v1 : v0;
        if (!v.active) continue;
        const float inv = 1.0f / (h ? l1 : l0);
        T* dst = out + size_t(v.my_row) * a.nq * HD + size_t(kh * group + (q0 + 8 * h) % group) * HD + (lane & 3) * 2;
#pragma unroll
        for (int n = 0; n < NO; ++n)
            *reinterpret_cast<uint32_t*>(dst + n * 8) = pack2<T>(o[n][2 * h] * inv, o[n][2 * h + 1] * inv);
    }
}

// ---------------------------------------------------------------- decode on tensor cores (16-bit cache)
//
// The work of paged_decode_k (one block per item and KV head, the G query
// heads of the group at once) with both products on tensor cores, so that a
// key costs a few instructions and the block waits only on memory: the
// group's query vectors are rows 0..G-1 of an m16n8k16 A operand (rows G..15
// zero); chunks of 16 NW keys are copied into shared memory by 16-byte
// asynchronous copies into a ring of RS stages; each of the NW warps takes
// 16 of a chunk's keys: S = Q K^T (8 mma for head_dim 128), its own online
// softmax, O += P V (16 mma), K and V fragments by ldmatrix. The warps'
// states (max, sum, O) meet in shared memory at the end. Q and P are
// rounded to 16 bits (as in the prefill kernel); sums and softmax in fp32.
// Small blocks win: with 2 warps and 2 stages (35 KB of shared memory, 6
// blocks an SM) attention_bench reads the cache of decode batches drawn
// from sharegpt-like-1000 at 69-88% of the copy bandwidth, against 60-83%
// for paged_decode_k; 4 warps or 3 stages are slower (fewer blocks an SM).
constexpr int kMmaDecodeWarps = 2, kMmaDecodeStages = 2;

template <int HD, int RS, int NW>
constexpr size_t mma_decode_smem_bytes() {
    constexpr size_t stages = size_t(2) * RS * 16 * NW * (HD + 8) * 2;  // [K, V][RS][chunk][HD + 8]
    constexpr size_t fold = size_t(NW) * kMaxGroup * HD * 4;            // [warps][heads][HD] floats
    return stages > fold ? stages : fold;
}

template <class T, int HD, int RS, int NW>
__global__ void __launch_bounds__(32 * NW) paged_decode_mma_k(AttnArgs a, BatchDev b, KvLayout kv, const int4* items) {
    // The step's metadata and the keys cached by earlier steps are no
    // output of the kernels before this one: they are read, and the first
    // chunk's copies issued, before waiting for those kernels (programmatic
    // launch), unless the chunk holds a key of this step (written by the
    // previous kernel, as Q).
    constexpr int W = NW, NT = 32 * NW, C = 16 * NW;  // warps, threads, keys a chunk (16 a warp)
    constexpr int L = HD + 8, V8 = HD / 8, KS = HD / 16, NO = HD / 8;
    constexpr int PER = C * V8 / NT;  // 16-byte copies a thread per chunk, each of K and V
    static_assert(PER >= 1 && HD % 16 == 0);
    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* const Kb = reinterpret_cast<T*>(smem_raw);  // [RS][C][L]
    T* const Vb = Kb + RS * C * L;            // [RS][C][L]
    __shared__ float wm[W][kMaxGroup], wl[W][kMaxGroup];
    const int4 it = items[blockIdx.x];  // {row, piece, pieces of the row}; row -1: no work
    if (it.x < 0) {
        pdl_begin();  // (every block waits: this grid's end implies the previous kernel's)
        return;
    }
    const int r = it.x, kh = blockIdx.y;
    const int group = a.nq / a.nkv;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gq = lane >> 2, tq = lane & 3;  // this lane's head (A/C row) and pair of columns
    const ItemKeys ik = item_keys(a, b, it);
    const int* table = ik.table;
    const int nsplit = it.z, begin = ik.begin, end = ik.end;
    const T* cache = static_cast<const T*>(kv.base);
    const size_t vdelta = size_t(kv.kv_heads) * kv.block_size * HD;  // V row - K row
    // This thread copies channels c0_ .. + 8 of keys k0_, k0_ + KSTEP, ...
    // of each chunk: one division a chunk, then the slot steps by KSTEP.
    constexpr int KSTEP = NT / V8;
    static_assert(NT % V8 == 0);
    const int k0_ = tid / V8, c0_ = (tid % V8) * 8;
    const T* head0 = cache + kv.offset(0, a.layer, 0, kh, 0) + c0_;  // block 0, slot 0
    const size_t bstride = kv.block_elems();
    // Copies chunk c0's K and V into ring stage `st` (one commit group);
    // rows past the end are zero (P is 0 there, and 0 x garbage may be NaN).
    const auto stage = [&](int c0, int st) {
        if (c0 < end) {
            T* Ks = Kb + st * C * L + c0_;
            T* Vs = Vb + st * C * L + c0_;
            int bi = (c0 + k0_) / kv.block_size, slot = (c0 + k0_) % kv.block_size;
#pragma unroll
            for (int u = 0; u < PER; ++u) {
                const int kk = k0_ + u * KSTEP, ps = c0 + kk;
                if (u > 0) {
                    slot += KSTEP;
                    while (slot >= kv.block_size) slot -= kv.block_size, ++bi;
                }
                if (ps < end) {
                    const T* kp = head0 + size_t(table[bi]) * bstride + size_t(slot) * HD;
                    __pipeline_memcpy_async(Ks + kk * L, kp, 16);
                    __pipeline_memcpy_async(Vs + kk * L, kp + vdelta, 16);
                } else {
                    *reinterpret_cast<uint4*>(Ks + kk * L) = make_uint4(0, 0, 0, 0);
                    *reinterpret_cast<uint4*>(Vs + kk * L) = make_uint4(0, 0, 0, 0);
                }
            }
        }
        __pipeline_commit();
    };
    // The first key this step writes for the row's sequence: the row's own,
    // or that of the first of its rows (a prompt chunk of a few rows comes
    // as rows of one sequence in a run).
    int first_new = b.positions[r], j = r - 1;
    const int seq = b.row_seq[r];
    for (int n = 0; n < 4 && j >= 0 && b.row_seq[j] == seq; ++n, --j) first_new = b.positions[j];
    const bool early = (j < 0 || b.row_seq[j] != seq) && begin + (RS - 1) * C <= first_new;
    const auto stage_first = [&] {
#pragma unroll
        for (int i = 0; i < RS - 1; ++i) stage(begin + i * C, i);
    };
    if (early) stage_first();
    pdl_begin();
    if (!early) stage_first();
    // Q as the A operand: row gq (head gq of the group), columns 2 tq, 2 tq + 1 and + 8.
    uint32_t qf[KS][4];
    {
        const T* qr = static_cast<const T*>(a.q) + size_t(r) * a.ld + size_t(kh * group + gq) * HD + 2 * tq;
#pragma unroll
        for (int k = 0; k < KS; ++k) {
            uint32_t x0 = 0, x1 = 0;
            if (gq < group) {
                x0 = *reinterpret_cast<const uint32_t*>(qr + 16 * k);
                x1 = *reinterpret_cast<const uint32_t*>(qr + 16 * k + 8);
            }
            qf[k][0] = x0, qf[k][1] = 0, qf[k][2] = x1, qf[k][3] = 0;
        }
    }
    float o[NO][4];
#pragma unroll
    for (int n = 0; n < NO; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0;
    float m_run = -FLT_MAX, l_run = 0;  // head gq; l_run is this lane's share (the quad's are summed at the end)
    int st = 0;
    for (int c0 = begin; c0 < end; c0 += C, st = st + 1 == RS ? 0 : st + 1) {
        __pipeline_wait_prior(RS - 2);
        __syncthreads();  // chunk c0 has landed for every thread; every warp is done with the previous one
        stage(c0 + (RS - 1) * C, st == 0 ? RS - 1 : st - 1);  // the stage the previous chunk used
        const int kw = c0 + warp * 16;  // this warp's first key
        if (kw >= end) continue;
        const T* Ks = Kb + (st * C + warp * 16) * L;
        const T* Vs = Vb + (st * C + warp * 16) * L;
        float s[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
#pragma unroll
        for (int k = 0; k < KS; ++k) {
            uint32_t kf[4];
            ldsm_x4(kf, Ks + ((lane & 7) + (lane >> 4) * 8) * L + k * 16 + ((lane >> 3) & 1) * 8);
            mma16816<T>(s[0], qf[k], kf[0], kf[1]);
            mma16816<T>(s[1], qf[k], kf[2], kf[3]);
        }
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                s[n][e] = kw + n * 8 + 2 * tq + e < end ? s[n][e] * a.scale : -INFINITY;
                mx = fmaxf(mx, s[n][e]);
            }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run, mx), al = __expf(m_run - m_new);
        m_run = m_new;
        float ps = 0;
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e) s[n][e] = __expf(s[n][e] - m_new), ps += s[n][e];
        l_run = l_run * al + ps;
#pragma unroll
        for (int n = 0; n < NO; ++n) o[n][0] *= al, o[n][1] *= al;
        // O += P V: P (row gq, this warp's 16 keys) is the A operand.
        const uint32_t pa[4] = {pack2<T>(s[0][0], s[0][1]), 0u, pack2<T>(s[1][0], s[1][1]), 0u};
#pragma unroll
        for (int np = 0; np < NO / 2; ++np) {
            uint32_t vf[4];
            ldsm_x4_trans(vf, Vs + ((lane & 7) + ((lane >> 3) & 1) * 8) * L + np * 16 + (lane >> 4) * 8);
            mma16816<T>(o[2 * np], pa, vf[0], vf[1]);
            mma16816<T>(o[2 * np + 1], pa, vf[2], vf[3]);
        }
    }
    l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
    l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);
    if (tq == 0 && gq < group) wm[warp][gq] = m_run, wl[warp][gq] = l_run;
    __pipeline_wait_prior(0);
    __syncthreads();  // every copy has landed, every warp is past its last chunk: the stages are free
    // The warps' results on the common max of each head.
    float* fold = reinterpret_cast<float*>(smem_raw);  // [W][kMaxGroup][HD]
    if (gq < group) {
        float mh = wm[0][gq];
#pragma unroll
        for (int w = 1; w < W; ++w) mh = fmaxf(mh, wm[w][gq]);
        const float f = __expf(m_run - mh);
        float* dst = fold + (size_t(warp) * kMaxGroup + gq) * HD + 2 * tq;
#pragma unroll
        for (int n = 0; n < NO; ++n) *reinterpret_cast<float2*>(dst + n * 8) = make_float2(o[n][0] * f, o[n][1] * f);
    }
    __syncthreads();
    for (int e = tid; e < group * HD; e += NT) {
        const int g = e / HD, c = e % HD;
        float mh = wm[0][g];
#pragma unroll
        for (int w = 1; w < W; ++w) mh = fmaxf(mh, wm[w][g]);
        float v = 0, lh = 0;
#pragma unroll
        for (int w = 0; w < W; ++w) v += fold[(size_t(w) * kMaxGroup + g) * HD + c], lh += wl[w][g] * __expf(wm[w][g] - mh);
        const size_t qh = size_t(kh * group + g);
        if (nsplit > 1) {
            // Unnormalized partial results, then (max, sum) per query head.
            a.split_scratch[(size_t(blockIdx.x) * a.nq + qh) * HD + c] = v;
            if (c == 0) {
                const size_t ml0 = size_t(gridDim.x) * a.nq * HD, i = size_t(blockIdx.x) * a.nq + qh;
                a.split_scratch[ml0 + 2 * i] = mh;
                a.split_scratch[ml0 + 2 * i + 1] = lh;
            }
        } else {
            static_cast<T*>(a.out)[size_t(r) * a.nq * HD + qh * HD + c] = from_f<T>(v / lh);
        }
    }
}

template <class T, int HD>
void launch_fa(const AttnArgs& a, const BatchDev& b, const KvLayout& kv, const int2* tiles, int n, cudaStream_t s) {
    constexpr size_t bytes = fa_smem_bytes<HD>();
    allow_smem<paged_attention_fa_k<T, HD>>(bytes);
    launch(paged_attention_fa_k<T, HD>, dim3(n, a.nkv), dim3(kFaThreads), bytes, s, a, b, kv, tiles);
}

template <class T, int HD, int B>
void launch_mma(const AttnArgs& a, const BatchDev& b, const KvLayout& kv, const int2* tiles, int n, cudaStream_t s) {
    const size_t bytes = mma_tile_bytes<HD>(sizeof(T));
    allow_smem<paged_attention_mma_k<T, HD, B>>(bytes);
    launch(paged_attention_mma_k<T, HD, B>, dim3(n, a.nkv), dim3(kTileThreads), bytes, s, a, b, kv, tiles);
}

template <class T, int HD, int G>
void launch_ring(dim3 grid, const AttnArgs& a, const BatchDev& b, const KvLayout& kv, const int4* rows, cudaStream_t s) {
    constexpr int RS = kDecodeRingStages;
    constexpr size_t bytes = ring_smem_bytes<HD, G, RS>();
    allow_smem<paged_decode_k<T, HD, G, RS>>(bytes);
    launch(paged_decode_k<T, HD, G, RS>, grid, dim3(kThreads), bytes, s, a, b, kv, rows);
}

template <class T, int HD, int RS, int NW>
void launch_mma_decode(dim3 grid, const AttnArgs& a, const BatchDev& b, const KvLayout& kv, const int4* items, cudaStream_t s) {
    constexpr size_t bytes = mma_decode_smem_bytes<HD, RS, NW>();
    allow_smem<paged_decode_mma_k<T, HD, RS, NW>>(bytes);
    launch(paged_decode_mma_k<T, HD, RS, NW>, grid, dim3(32 * NW), bytes, s, a, b, kv, items);
}

template <class T, int HD>
void launch_decode(dim3 grid, const AttnArgs& a, const BatchDev& b, const KvLayout& kv, const int4* rows, cudaStream_t s) {
    if (a.mma_decode) {
        return launch_mma_decode<T, HD, kMmaDecodeStages, kMmaDecodeWarps>(grid, a, b, kv, rows, s);
    }
    const int group = a.nq / a.nkv;
    if (group <= 1) return launch_ring<T, HD, 1>(grid, a, b, kv, rows, s);
    if (group <= 2) return launch_ring<T, HD, 2>(grid, a, b, kv, rows, s);
    if (group <= 4) return launch_ring<T, HD, 4>(grid, a, b, kv, rows, s);
    launch_ring<T, HD, 8>(grid, a, b, kv, rows, s);
}

template <class T, int HD, int B>
void launch_tiles(const AttnArgs& a, const BatchDev& b, const KvLayout& kv, const int2* tiles, int n, cudaStream_t s) {
    if (a.tensor_cores && B == 16 && a.register_tiles) launch_fa<T, HD>(a, b, kv, tiles, n, s);
    else if (a.tensor_cores) launch_mma<T, HD, B>(a, b, kv, tiles, n, s);
    else launch_tiled<T, HD, B>(a, b, kv, tiles, n, s);
}

}  // namespace

// Work items of decode rows: 1,056 (item, KV head) blocks (two waves of the
// CUDA-core kernel at 4 blocks an SM on 132 SMs; 1.3 of the tensor-core
// kernel at 6, and twice that measured no faster) when rows are few, and as
// many items again as rows when they are many, so that a context longer than
// the mean is cut into pieces of about that (in a batch of skewed contexts
// the longest row alone would otherwise set the kernel's time;
// attention_bench, tensor-core kernel, rows drawn from sharegpt-like-1000:
// 30-74% of the copy bandwidth with whole rows, 70-87% in pieces). Pieces
// cost a little where contexts are even (512 rows of 200-600: 90% -> 84%).
constexpr int kTargetBlocks = 1056;
constexpr int kMinItemKeys = 32;  // no item shorter than a chunk of 32 keys (unless its row is)

int decode_item_capacity(int n, int nkv) {
    // (No row makes more than kMaxSplits pieces: a batch of one row needs 32
    // items, not 133 mostly empty ones.)
    return n + std::min(std::max(n, (kTargetBlocks + nkv - 1) / nkv), (kMaxSplits - 1) * n);
}

size_t attention_item_floats(int capacity, int nq, int hd) { return size_t(capacity) * size_t(nq) * (size_t(hd) + 2); }

void plan_decode_items(const int* rows, const int* lens, int n, int nkv, bool split, int4* items, int2* row_items) {
    if (n <= 0) return;  // (no items: a step of prompt tiles alone)
    const int cap = decode_item_capacity(n, nkv), extra = cap - n;
    long long total = 0;
    int longest = 0;
    for (int i = 0; i < n; ++i) total += lens[i], longest = std::max(longest, lens[i]);
    // At most `extra` pieces beyond one a row: sum of ceil(len / S) <= n + total / S.
    const long long S = std::max<long long>({kMinItemKeys, (total + extra - 1) / extra,
                                             (longest + kMaxSplits - 1) / kMaxSplits});
    int k = 0;
    for (int i = 0; i < n; ++i) {
        const int nz = split ? int(std::max<long long>(1, (lens[i] + S - 1) / S)) : 1;
        row_items[i] = make_int2(k, nz);
        for (int z = 0; z < nz; ++z) items[k++] = make_int4(rows[i], z, nz, 0);
    }
    for (; k < cap; ++k) items[k] = make_int4(-1, 0, 0, 0);
}

void paged_attention(Dt dt, const AttnArgs& a, const BatchDev& b, const KvLayout& kv, const int4* items,
                     int capacity, const int2* row_items, int n_rows, cudaStream_t s) {
    if (n_rows == 0) return;
    dim3 grid(capacity, a.nkv);
    const bool ring = a.ring_decode && kv.bits == 16 && a.nq / a.nkv <= kMaxGroup;
    if (ring && a.hd == 128)
        TM_DISPATCH_DT(dt, W, (launch_decode<W, 128>(grid, a, b, kv, items, s)));
    else if (ring && a.hd == 64)
        TM_DISPATCH_DT(dt, W, (launch_decode<W, 64>(grid, a, b, kv, items, s)));
    else
        TM_DISPATCH_DT(dt, W, TM_DISPATCH_BITS(kv.bits, B, (launch(paged_attention_k<W, B>, grid, dim3(kThreads), 0, s, a, b, kv, items))));
    if (a.split_scratch) {
        const bool one_head = n_rows <= kMergeFewRows;
        TM_DISPATCH_DT(dt, W, (launch(merge_items_k<W>, dim3(n_rows, one_head ? a.nq : (a.nq + kMergeWarps - 1) / kMergeWarps),
                                      dim3(32 * kMergeWarps), 0, s, a, items, row_items, capacity, one_head)));
    }
}

int attention_tile_rows(int group) { return std::max(1, kTileQ / group); }

bool attention_tiles_supported(int hd) { return hd == 16 || hd == 32 || hd == 64 || hd == 128; }

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
