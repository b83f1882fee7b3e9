// Prompt tiles in registers on tensor cores (16-bit cache).
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
#pragma once

#include "kernels/attention/common.cuh"

namespace tmc::cuda {

namespace {

constexpr int kFaThreads = 128;

// Shared memory: K and V, 2 buffers each; Q passes through K's second buffer
// on its way to registers. 69.6 KB for head_dim 128 and at most 168
// registers a thread: 3 blocks an SM.
template <int HD>
constexpr size_t fa_smem_bytes() { return 4 * size_t(kTileK) * (HD + 8) * 2; }
constexpr int kFaBlocksPerSm = 3;

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

template <class T, int HD>
void launch_fa(const AttnArgs& a, const BatchDev& b, const KvLayout& kv, const int2* tiles, int n, cudaStream_t s) {
    constexpr size_t bytes = fa_smem_bytes<HD>();
    allow_smem<paged_attention_fa_k<T, HD>>(bytes);
    launch(paged_attention_fa_k<T, HD>, dim3(n, a.nkv), dim3(kFaThreads), bytes, s, a, b, kv, tiles);
}

}  // namespace

}  // namespace tmc::cuda
