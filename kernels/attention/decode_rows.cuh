// Attention of decode rows (and prompt chunks of under 4 rows) over the paged
// KV cache, one block per work item (a row, or a piece of one) and KV head,
// online softmax in fp32, GQA-aware (each block computes all `group` query
// heads of its KV head, so each K/V vector is read once per group). The
// general kernel: any cache (16-bit, int8, int4) and head size; the ring and
// tensor-core kernels take the 16-bit caches of head_dim 64 and 128.
#pragma once

#include "kernels/attention/common.cuh"

namespace tmc::cuda {

namespace {

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

}  // namespace

}  // namespace tmc::cuda
