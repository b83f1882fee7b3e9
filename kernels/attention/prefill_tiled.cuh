// Prompt tiles on CUDA cores.
//
// Up to 64 query vectors (tile rows x group heads) against chunks of 64 keys
// held in shared memory: 4 threads per query vector, each computing 16 of
// the chunk's scores and head_dim / 4 output channels. K/V are read from
// global memory once per tile instead of once per row. fp32 on CUDA cores.
#pragma once

#include "kernels/attention/common.cuh"

namespace tmc::cuda {

namespace {

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

template <class T, int HD, int B>
void launch_tiled(const AttnArgs& a, const BatchDev& b, const KvLayout& kv, const int2* tiles, int n, cudaStream_t s) {
    const size_t bytes = size_t(kTileQ) * (HD + 1) * 4 + size_t(kTileQ) * (kTileK + 1) * 4 +
                         2 * size_t(kTileK) * k_stride<HD>() * sizeof(T);
    allow_smem<paged_attention_tiled_k<T, HD, B>>(bytes);
    launch(paged_attention_tiled_k<T, HD, B>, dim3(n, a.nkv), dim3(kTileThreads), bytes, s, a, b, kv, tiles);
}

}  // namespace

}  // namespace tmc::cuda
