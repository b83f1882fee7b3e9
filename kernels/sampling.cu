// Sampling on the GPU: one block of 1024 threads per logits row draws a token
// from the row's temperature-scaled distribution, filtered by top-k, then
// top-p (of what top-k kept), then min-p, with the uniform number the host
// drew from the request's own random stream. Only token ids leave the GPU.
//
// The filters keep the tokens whose probability is at least a threshold:
// top-k's is the largest t with count(p >= t) >= k, top-p's the largest
// t with mass(p >= t) >= top_p x (the mass top-k kept), min-p's min_p x the
// largest probability (1: p = exp((l - max) / T)). Each threshold is found by
// a binary search over the bits of positive floats (ordered as integers),
// each probe a block reduction over the row. Ties at a threshold are all
// kept (the host sampler keeps them up to the cut, by token id). The draw
// then walks the kept tokens in vocabulary order.
#include <cfloat>

#include "kernels/common.cuh"
#include "kernels/kernels.cuh"

namespace tmc::cuda {

namespace {

constexpr int kThreads = 1024;

__device__ __forceinline__ int block_sum_int(int v) {
    __shared__ int part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < (kThreads >> 5) ? part[lane] : 0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Mass (or count) of this thread's tokens with p >= t.
__device__ __forceinline__ float mass_from(const float* p, int V, float t) {
    float s = 0;
    for (int i = threadIdx.x; i < V; i += kThreads) s += p[i] >= t ? p[i] : 0.0f;
    return block_sum(s);
}
__device__ __forceinline__ int count_from(const float* p, int V, float t) {
    int c = 0;
    for (int i = threadIdx.x; i < V; i += kThreads) c += p[i] >= t;
    return block_sum_int(c);
}

// The largest positive float t >= lo with pred(t) (pred holds at lo and is
// monotone: true up to some t, false after).
template <class P>
__device__ float largest_threshold(float lo, P pred) {
    int a = __float_as_int(lo), b = __float_as_int(1.0f) + 1;  // pred(a) holds; b is past every p
    while (b - a > 1) {
        const int mid = a + (b - a) / 2;
        if (pred(__int_as_float(mid))) a = mid;
        else b = mid;
    }
    return __int_as_float(a);
}

__global__ void __launch_bounds__(kThreads) sample_rows_k(float* logits, int V, const SampleRow* rows, int* ids) {
    float* x = logits + size_t(blockIdx.x) * V;
    const SampleRow sr = rows[blockIdx.x];
    __shared__ int chosen;
    if (sr.temperature <= 0.0f || sr.top_k == 1) {
        // Greedy: the first of equal maxima.
        float best = -INFINITY;
        int idx = V;
        for (int i = threadIdx.x; i < V; i += kThreads) {
            const float v = x[i];
            if (v > best || (idx == V && v == v)) best = v, idx = i;
        }
        const float m = block_max(best);
        int cand = best == m ? idx : V;
        for (int o = 16; o > 0; o >>= 1) cand = min(cand, __shfl_xor_sync(0xffffffffu, cand, o));
        if (threadIdx.x == 0) chosen = V;
        __syncthreads();
        if ((threadIdx.x & 31) == 0) atomicMin(&chosen, cand);
        __syncthreads();
        if (threadIdx.x == 0) ids[blockIdx.x] = chosen < V ? chosen : 0;
        return;
    }
    // p = exp((l - max) / T), in place; the largest is 1.
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < V; i += kThreads) mx = fmaxf(mx, x[i]);
    mx = block_max(mx);
    const float inv_t = 1.0f / sr.temperature;
    for (int i = threadIdx.x; i < V; i += kThreads) {
        const float v = x[i];
        x[i] = v == v ? __expf((v - mx) * inv_t) : 0.0f;  // NaN never drawn
    }
    __syncthreads();
    float t = FLT_MIN;  // keep p >= t (underflowed tokens are out)
    if (sr.top_k > 0 && sr.top_k < V) {
        const int k = sr.top_k;
        if (count_from(x, V, t) > k) t = largest_threshold(t, [&](float c) { return count_from(x, V, c) >= k; });
    }
    if (sr.top_p < 1.0f) {
        const float need = sr.top_p * mass_from(x, V, t);
        t = largest_threshold(t, [&](float c) { return mass_from(x, V, c) >= need; });
    }
    if (sr.min_p > 0.0f) t = fmaxf(t, sr.min_p);
    // The draw: u x (kept mass), walked in vocabulary order. Each thread
    // owns a contiguous slice; a block scan of the slices' masses finds the
    // slice, whose thread walks it.
    const int per = (V + kThreads - 1) / kThreads;
    const int lo = threadIdx.x * per, hi = min(V, lo + per);
    float s = 0;
    int last = -1;
    for (int i = lo; i < hi; ++i)
        if (x[i] >= t) s += x[i], last = i;
    // Inclusive scan over the block.
    __shared__ float warp_tot[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float inc = s;
    for (int o = 1; o < 32; o <<= 1) {
        const float y = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += y;
    }
    if (lane == 31) warp_tot[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        float w = warp_tot[lane];
        for (int o = 1; o < 32; o <<= 1) {
            const float y = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += y;
        }
        warp_tot[lane] = w;
    }
    __syncthreads();
    float excl = __shfl_up_sync(0xffffffffu, inc, 1);
    if (lane == 0) excl = 0;
    const float before = (warp > 0 ? warp_tot[warp - 1] : 0.0f) + excl;
    const float total = warp_tot[31];
    const float target = sr.u * total;
    if (threadIdx.x == 0) chosen = -1;
    __syncthreads();
    if (s > 0 && target >= before && target < before + s) {
        float acc = before;
        int pick = last;
        for (int i = lo; i < hi; ++i)
            if (x[i] >= t) {
                acc += x[i];
                if (target < acc) {
                    pick = i;
                    break;
                }
            }
        atomicMax(&chosen, pick);  // one thread at most, barring rounding at a slice's edge
    }
    __syncthreads();
    if (chosen < 0) {
        // Rounding put the target past the end: the last kept token.
        int l = last;
        for (int o = 16; o > 0; o >>= 1) l = max(l, __shfl_xor_sync(0xffffffffu, l, o));
        if (lane == 0) atomicMax(&chosen, l);
        __syncthreads();
    }
    if (threadIdx.x == 0) ids[blockIdx.x] = max(chosen, 0);
}

}  // namespace

void sample_rows(float* logits, int R, int V, const SampleRow* rows, int* ids, cudaStream_t s) {
    if (R == 0) return;
    sample_rows_k<<<R, kThreads, 0, s>>>(logits, V, rows, ids);
}

}  // namespace tmc::cuda
