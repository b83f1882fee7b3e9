// Prompt tiles on tensor cores (WMMA).
//
// The same tiles (up to 64 query vectors against chunks of 64 keys) with
// both products on tensor cores (WMMA 16x16x16, 16-bit inputs, fp32
// accumulation), as FlashAttention-2 does: S = Q K^T into shared memory, the
// online softmax by 4 threads per query vector (P rounded to 16 bits), then
// O += P V with O kept in shared memory in fp32 (rescaled by the softmax's
// correction before each chunk's product). Q is rounded to 16 bits.
#pragma once

#include "kernels/attention/common.cuh"

namespace tmc::cuda {

namespace {

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

template <class T, int HD, int B>
void launch_mma(const AttnArgs& a, const BatchDev& b, const KvLayout& kv, const int2* tiles, int n, cudaStream_t s) {
    const size_t bytes = mma_tile_bytes<HD>(sizeof(T));
    allow_smem<paged_attention_mma_k<T, HD, B>>(bytes);
    launch(paged_attention_mma_k<T, HD, B>, dim3(n, a.nkv), dim3(kTileThreads), bytes, s, a, b, kv, tiles);
}

}  // namespace

}  // namespace tmc::cuda
