// After the fused QKV projection, per row: bias, q/k RMSNorm (Qwen3), RoPE on
// q and k, and K/V written into the paged cache as 16-bit. A block per row
// (a few per row when rows are few, each taking every few-th head), one warp
// per head at a time; the row's rotation angles, the same for every head,
// are taken once per block. Reads the row once, writes q back and K/V (2
// bytes an element each): memory-bound, a small share of a step.
#include <algorithm>

#include "kernels/common.cuh"
#include "kernels/kernels.cuh"

namespace tmc::cuda {

namespace {

constexpr int kWarps = 8;
constexpr int kMaxHd = 256;

// A warp quantizes one head's vector sm[0, hd) into its cache row: with the
// static scales when the layout has them, else with the vector's own min and
// range (as the CPU backend: code = clamp(rint((x - min) / scale), 0, qmax)).
template <int B>
__device__ void quantize_row(const KvLayout& kv, const float* sm, int block, int layer, int which, int head,
                             int slot, int lane) {
    const int hd = kv.head_dim;
    constexpr float qmax = B == 8 ? 255.0f : 15.0f;
    float sc, mn;
    if (kv.qparams) {
        const float* qp = kv.qparams + size_t(layer) * 4 * kv.kv_heads;
        sc = qp[(2 * which) * kv.kv_heads + head];
        mn = qp[(2 * which + 1) * kv.kv_heads + head];
    } else {
        float lo = sm[0], hi = sm[0];
        for (int i = lane; i < hd; i += 32) lo = fminf(lo, sm[i]), hi = fmaxf(hi, sm[i]);
        lo = -warp_max(-lo);
        hi = warp_max(hi);
        mn = lo;
        sc = hi > lo ? (hi - lo) / qmax : 1.0f;
    }
    auto code = [&](float x) { return unsigned(fminf(qmax, fmaxf(0.0f, rintf((x - mn) / sc)))); };
    uint8_t* dst = kv.codes(block, layer, which, head, slot);
    if constexpr (B == 8) {
        for (int i = lane; i < hd; i += 32) dst[i] = uint8_t(code(sm[i]));
    } else {
        for (int i = lane; i < hd / 2; i += 32) dst[i] = uint8_t(code(sm[2 * i]) | (code(sm[2 * i + 1]) << 4));
    }
    if (lane == 0) *kv.params(block, layer, which, head, slot) = make_float2(sc, mn);
}

template <class T, int B>
__global__ void qkv_rope_cache_k(QkvArgs a, BatchDev b, KvLayout kv) {
    pdl_begin();
    __shared__ float buf[kWarps][kMaxHd];
    __shared__ float2 rot[kMaxHd / 2];  // (cos, sin) of pos * inv_freq[i]
    // blockIdx.y picks a group of kWarps heads: several blocks per row.
    const int r = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int hd = a.hd, half = hd / 2;
    const int pos = b.positions[r];
    const int seq = b.row_seq[r];
    const int block = b.blocks[b.block_offset[seq] + pos / kv.block_size];
    const int slot = pos % kv.block_size;
    T* row = static_cast<T*>(a.qkv) + size_t(r) * a.ld;
    const T* bias = static_cast<const T*>(a.bias);
    float* sm = buf[warp];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float sn, cs;
        sincosf(float(pos) * a.inv_freq[i], &sn, &cs);
        rot[i] = make_float2(cs, sn);
    }
    __syncthreads();
    for (int h = blockIdx.y * kWarps + warp; h < a.nq + 2 * a.nkv; h += kWarps * gridDim.y) {
        T* x = row + size_t(h) * hd;
        const bool is_q = h < a.nq, is_k = !is_q && h < a.nq + a.nkv;
        for (int i = lane; i < hd; i += 32) sm[i] = to_f(x[i]) + (bias ? to_f(bias[size_t(h) * hd + i]) : 0.0f);
        __syncwarp();
        if (!is_q && !is_k) {  // V: straight into the cache
            if constexpr (B == 16) {
                T* dst = static_cast<T*>(kv.base) + kv.offset(block, a.layer, 1, h - a.nq - a.nkv, slot);
                for (int i = lane; i < hd; i += 32) dst[i] = from_f<T>(sm[i]);
            } else {
                quantize_row<B>(kv, sm, block, a.layer, 1, h - a.nq - a.nkv, slot, lane);
            }
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
        T* dst = is_k && B == 16 ? static_cast<T*>(kv.base) + kv.offset(block, a.layer, 0, h - a.nq, slot) : nullptr;
        for (int i = lane; i < half; i += 32) {
            const float c = rot[i].x, s = rot[i].y;
            const float x0 = sm[i], x1 = sm[i + half];
            const float y0 = x0 * c - x1 * s, y1 = x1 * c + x0 * s;
            if (is_q) {
                x[i] = from_f<T>(y0);
                x[i + half] = from_f<T>(y1);
            } else if (B == 16) {
                dst[i] = from_f<T>(y0);
                dst[i + half] = from_f<T>(y1);
            } else {
                sm[i] = y0;
                sm[i + half] = y1;
            }
        }
        __syncwarp();
        if (B != 16 && is_k) {
            quantize_row<B>(kv, sm, block, a.layer, 0, h - a.nq, slot, lane);
            __syncwarp();
        }
    }
}

}  // namespace

void qkv_rope_cache(Dt dt, const QkvArgs& a, const BatchDev& b, const KvLayout& kv, cudaStream_t s) {
    if (a.T == 0) return;
    // Blocks of one row split its heads only while rows are too few to keep
    // every SM busy (a block per row and 48 heads: 4076 blocks, not 24,456,
    // for a 4096-token step of the 8B model).
    const int groups = (a.nq + 2 * a.nkv + kWarps - 1) / kWarps;
    dim3 grid(a.T, std::clamp((528 + a.T - 1) / a.T, 1, groups));
    TM_DISPATCH_DT(dt, W, TM_DISPATCH_BITS(kv.bits, B, (launch(qkv_rope_cache_k<W, B>, grid, dim3(kWarps * 32), 0, s, a, b, kv))));
}

}  // namespace tmc::cuda
