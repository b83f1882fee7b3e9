// Decode attention on tensor cores (16-bit cache).
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
#pragma once

#include "kernels/attention/common.cuh"

namespace tmc::cuda {

namespace {

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

template <class T, int HD, int RS, int NW>
void launch_mma_decode(dim3 grid, const AttnArgs& a, const BatchDev& b, const KvLayout& kv, const int4* items, cudaStream_t s) {
    constexpr size_t bytes = mma_decode_smem_bytes<HD, RS, NW>();
    allow_smem<paged_decode_mma_k<T, HD, RS, NW>>(bytes);
    launch(paged_decode_mma_k<T, HD, RS, NW>, grid, dim3(32 * NW), bytes, s, a, b, kv, items);
}

}  // namespace

}  // namespace tmc::cuda
