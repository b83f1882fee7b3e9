// Attention over the paged KV cache, for prefill chunks and decode alike:
// one block per (row, KV head) computes all `group` query heads that share
// the KV head (GQA: each K/V vector is read once per group), over the row's
// visible positions, in chunks of 64 keys with an online softmax (fp32).
// Reads 2 x head_dim x 2 bytes per visible position per (row, KV head).
// This is the straightforward version: no tensor cores, no split along the
// sequence; the bound it should reach is HBM bandwidth on those reads.
#include <cfloat>

#include "kernels/common.cuh"
#include "kernels/kernels.cuh"

namespace tmc::cuda {

namespace {

constexpr int kThreads = 128;
constexpr int kChunk = 64;
constexpr int kMaxGroup = 8;
constexpr int kMaxHd = 256;

template <class T>
__global__ void paged_attention_k(AttnArgs a, BatchDev b, KvLayout kv) {
    __shared__ float q[kMaxGroup][kMaxHd];
    __shared__ float p[kMaxGroup][kChunk];
    __shared__ float alpha[kMaxGroup];
    __shared__ float inv_l[kMaxGroup];
    const int r = blockIdx.x, kh = blockIdx.y;
    const int hd = a.hd, group = a.nq / a.nkv;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = kThreads / 32;
    const int pos = b.positions[r];
    const int seq = b.row_seq[r];
    const int* table = b.blocks + b.block_offset[seq];
    const int begin = a.window > 0 ? max(0, pos + 1 - a.window) : 0, end = pos + 1;
    const float* qr = a.q + size_t(r) * a.ld + size_t(kh) * group * hd;
    for (int i = threadIdx.x; i < group * hd; i += kThreads) q[i / hd][i % hd] = qr[i];
    // Running max and sum per head, kept by warp (g % nwarps), lane 0.
    float m_run[kMaxGroup / 4 + 1], l_run[kMaxGroup / 4 + 1];
    for (int k = 0; k < kMaxGroup / 4 + 1; ++k) m_run[k] = -FLT_MAX, l_run[k] = 0;
    // Thread t accumulates channels t and t + 128 of every head.
    float acc[kMaxGroup][2];
    for (int g = 0; g < kMaxGroup; ++g) acc[g][0] = acc[g][1] = 0;
    __syncthreads();
    const T* kbase = static_cast<const T*>(kv.base);
    for (int c0 = begin; c0 < end; c0 += kChunk) {
        const int n = min(kChunk, end - c0);
        // Scores: a warp per key.
        for (int j = warp; j < n; j += nwarps) {
            const int ps = c0 + j;
            const T* kr = kbase + kv.offset(table[ps / kv.block_size], a.layer, 0, kh, ps % kv.block_size);
            float kv_reg[kMaxHd / 32];
            for (int i = lane, k = 0; i < hd; i += 32, ++k) kv_reg[k] = to_f(kr[i]);
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
            float mx = -FLT_MAX;
            for (int j = lane; j < n; j += 32) mx = fmaxf(mx, p[g][j]);
            mx = warp_max(mx);
            const float m_new = fmaxf(m_run[k], mx);
            float sum = 0;
            for (int j = lane; j < n; j += 32) {
                float e = __expf(p[g][j] - m_new);
                p[g][j] = e;
                sum += e;
            }
            sum = warp_sum(sum);
            const float al = __expf(m_run[k] - m_new);
            l_run[k] = l_run[k] * al + sum;
            m_run[k] = m_new;
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
                const float v = to_f(kbase[kv.offset(table[ps / kv.block_size], a.layer, 1, kh, ps % kv.block_size) + i]);
                for (int g = 0; g < group; ++g) acc[g][c] += p[g][j] * v;
            }
        }
        __syncthreads();
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

void paged_attention(Dt dt, const AttnArgs& a, const BatchDev& b, const KvLayout& kv, cudaStream_t s) {
    if (a.T == 0) return;
    dim3 grid(a.T, a.nkv);
    TM_DISPATCH_DT(dt, W, paged_attention_k<W><<<grid, kThreads, 0, s>>>(a, b, kv));
}

}  // namespace tmc::cuda
