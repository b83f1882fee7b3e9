// After the fused QKV projection, per row: bias, q/k RMSNorm (Qwen3), RoPE on
// q and k, and K/V written into the paged cache as 16-bit. One block per row,
// one warp per head; reads the row once (4 bytes per element), writes q back
// (4 bytes) and K/V (2 bytes): memory-bound, a small share of a step.
#include "kernels/common.cuh"
#include "kernels/kernels.cuh"

namespace tmc::cuda {

namespace {

constexpr int kWarps = 8;
constexpr int kMaxHd = 256;

template <class T>
__global__ void qkv_rope_cache_k(QkvArgs a, BatchDev b, KvLayout kv) {
    __shared__ float buf[kWarps][kMaxHd];
    // blockIdx.y picks a group of kWarps heads: several blocks per row.
    const int r = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int hd = a.hd, half = hd / 2;
    const int pos = b.positions[r];
    const int seq = b.row_seq[r];
    const int block = b.blocks[b.block_offset[seq] + pos / kv.block_size];
    const int slot = pos % kv.block_size;
    float* row = a.qkv + size_t(r) * a.ld;
    const T* bias = static_cast<const T*>(a.bias);
    float* sm = buf[warp];
    for (int h = blockIdx.y * kWarps + warp; h < a.nq + 2 * a.nkv; h += kWarps * gridDim.y) {
        float* x = row + size_t(h) * hd;
        const bool is_q = h < a.nq, is_k = !is_q && h < a.nq + a.nkv;
        for (int i = lane; i < hd; i += 32) sm[i] = x[i] + (bias ? to_f(bias[size_t(h) * hd + i]) : 0.0f);
        __syncwarp();
        if (!is_q && !is_k) {  // V: straight into the cache
            T* dst = static_cast<T*>(kv.base) + kv.offset(block, a.layer, 1, h - a.nq - a.nkv, slot);
            for (int i = lane; i < hd; i += 32) dst[i] = from_f<T>(sm[i]);
            __syncwarp();
            continue;
        }
        const T* nw = static_cast<const T*>(is_q ? a.q_norm : a.k_norm);
        if (nw) {
            float ss = 0;
            for (int i = lane; i < hd; i += 32) ss += sm[i] * sm[i];
            ss = warp_sum(ss);
            const float scale = rsqrtf(ss / float(hd) + a.eps);
            __syncwarp();
            for (int i = lane; i < hd; i += 32) sm[i] = sm[i] * scale * to_f(nw[i]);
            __syncwarp();
        }
        T* dst = is_k ? static_cast<T*>(kv.base) + kv.offset(block, a.layer, 0, h - a.nq, slot) : nullptr;
        for (int i = lane; i < half; i += 32) {
            const float ang = float(pos) * a.inv_freq[i];
            const float c = cosf(ang), s = sinf(ang);
            const float x0 = sm[i], x1 = sm[i + half];
            const float y0 = x0 * c - x1 * s, y1 = x1 * c + x0 * s;
            if (is_q) {
                x[i] = y0;
                x[i + half] = y1;
            } else {
                dst[i] = from_f<T>(y0);
                dst[i + half] = from_f<T>(y1);
            }
        }
        __syncwarp();
    }
}

}  // namespace

void qkv_rope_cache(Dt dt, const QkvArgs& a, const BatchDev& b, const KvLayout& kv, cudaStream_t s) {
    if (a.T == 0) return;
    dim3 grid(a.T, (a.nq + 2 * a.nkv + kWarps - 1) / kWarps);
    TM_DISPATCH_DT(dt, W, qkv_rope_cache_k<W><<<grid, kWarps * 32, 0, s>>>(a, b, kv));
}

}  // namespace tmc::cuda
