// Decode attention over a 16-bit cache through a ring of asynchronous copies.
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
#pragma once

#include "kernels/attention/common.cuh"

namespace tmc::cuda {

namespace {

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

template <class T, int HD, int G>
void launch_ring(dim3 grid, const AttnArgs& a, const BatchDev& b, const KvLayout& kv, const int4* rows, cudaStream_t s) {
    constexpr int RS = kDecodeRingStages;
    constexpr size_t bytes = ring_smem_bytes<HD, G, RS>();
    allow_smem<paged_decode_k<T, HD, G, RS>>(bytes);
    launch(paged_decode_k<T, HD, G, RS>, grid, dim3(kThreads), bytes, s, a, b, kv, rows);
}

}  // namespace

}  // namespace tmc::cuda
