// Matrix-vector products for decode steps (at most 8 rows):
// Y[t, n] = beta * Y[t, n] + sum_k W[n, k] X[t, k], W [N, K] and X [T, K]
// 16-bit, Y fp32 or 16-bit, fp32 accumulation. One warp per output row n:
// each lane loads 8 weights at a time (16 bytes, four loads in flight,
// streamed past L1), the T input rows come through the read-only cache, and
// the warp's partial sums meet by shuffles. A decode step reads every weight
// once: the bound is HBM bandwidth on W.
#include "kernels/common.cuh"
#include "kernels/kernels.cuh"

namespace tmc::cuda {

namespace {

constexpr int kWarps = 8;

__device__ __forceinline__ float2 pair_f(const __nv_bfloat162& v) { return __bfloat1622float2(v); }
__device__ __forceinline__ float2 pair_f(const __half2& v) { return __half22float2(v); }

template <class T>
__device__ __forceinline__ float dot8(const uint4& a, const uint4& b) {
    using T2 = typename std::conditional<std::is_same<T, __nv_bfloat16>::value, __nv_bfloat162, __half2>::type;
    const T2* x = reinterpret_cast<const T2*>(&a);
    const T2* y = reinterpret_cast<const T2*>(&b);
    float s = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 p = pair_f(x[i]), q = pair_f(y[i]);
        s = fmaf(p.x, q.x, s);
        s = fmaf(p.y, q.y, s);
    }
    return s;
}

template <class Y>
__device__ __forceinline__ float load_y(const Y* p) {
    if constexpr (std::is_same<Y, float>::value) return *p;
    else return to_f(*p);
}
template <class Y>
__device__ __forceinline__ void store_y(Y* p, float v) {
    if constexpr (std::is_same<Y, float>::value) *p = v;
    else *p = from_f<Y>(v);
}

template <class T, int R, class Y>
__global__ void __launch_bounds__(kWarps * 32) gemv_k(const T* W, int N, int K, const T* X, int ldx, Y* out, int ldy,
                                                     float beta) {
    pdl_begin();
    const int n = blockIdx.x * kWarps + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (n >= N) return;
    const uint4* w = reinterpret_cast<const uint4*>(W + size_t(n) * K);
    const int kv = K / 8;  // 16-byte vectors per row
    float acc[R];
#pragma unroll
    for (int t = 0; t < R; ++t) acc[t] = 0;
    int v = lane;
    for (; v + 96 < kv; v += 128) {
        uint4 wv[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) wv[u] = __ldcs(w + v + 32 * u);
#pragma unroll
        for (int t = 0; t < R; ++t) {
            const uint4* x = reinterpret_cast<const uint4*>(X + size_t(t) * ldx);
#pragma unroll
            for (int u = 0; u < 4; ++u) acc[t] += dot8<T>(wv[u], __ldg(x + v + 32 * u));
        }
    }
    for (; v < kv; v += 32) {
        const uint4 wv = __ldcs(w + v);
#pragma unroll
        for (int t = 0; t < R; ++t) acc[t] += dot8<T>(wv, __ldg(reinterpret_cast<const uint4*>(X + size_t(t) * ldx) + v));
    }
#pragma unroll
    for (int t = 0; t < R; ++t) acc[t] = warp_sum(acc[t]);
    if (lane == 0) {
#pragma unroll
        for (int t = 0; t < R; ++t) {
            Y* y = out + size_t(t) * ldy + n;
            store_y(y, beta != 0.0f ? beta * load_y(y) + acc[t] : acc[t]);
        }
    }
}

template <class T, class Y>
void launch_rows(const void* W, int N, int K, const void* X, int ldx, int R, void* Y_, int ldy, float beta, cudaStream_t s) {
    const dim3 grid((N + kWarps - 1) / kWarps), block(kWarps * 32);
    const T* w = static_cast<const T*>(W);
    const T* x = static_cast<const T*>(X);
    Y* y = static_cast<Y*>(Y_);
    switch (R) {
        case 1: launch(gemv_k<T, 1, Y>, grid, block, 0, s, w, N, K, x, ldx, y, ldy, beta); break;
        case 2: launch(gemv_k<T, 2, Y>, grid, block, 0, s, w, N, K, x, ldx, y, ldy, beta); break;
        case 3: launch(gemv_k<T, 3, Y>, grid, block, 0, s, w, N, K, x, ldx, y, ldy, beta); break;
        case 4: launch(gemv_k<T, 4, Y>, grid, block, 0, s, w, N, K, x, ldx, y, ldy, beta); break;
        case 5: launch(gemv_k<T, 5, Y>, grid, block, 0, s, w, N, K, x, ldx, y, ldy, beta); break;
        case 6: launch(gemv_k<T, 6, Y>, grid, block, 0, s, w, N, K, x, ldx, y, ldy, beta); break;
        case 7: launch(gemv_k<T, 7, Y>, grid, block, 0, s, w, N, K, x, ldx, y, ldy, beta); break;
        default: launch(gemv_k<T, 8, Y>, grid, block, 0, s, w, N, K, x, ldx, y, ldy, beta); break;
    }
}

}  // namespace

bool gemv(Dt dt, const void* W, int N, int K, const void* X, int ldx, int R, void* Y, bool y_f32, int ldy, float beta,
          cudaStream_t s) {
    const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
    if (R < 1 || R > kMaxGemvRows || K % 8 || ldx % 8 || !aligned(W) || !aligned(X)) return false;
    if (y_f32) TM_DISPATCH_DT(dt, T, (launch_rows<T, float>(W, N, K, X, ldx, R, Y, ldy, beta, s)));
    else TM_DISPATCH_DT(dt, T, (launch_rows<T, T>(W, N, K, X, ldx, R, Y, ldy, beta, s)));
    return true;
}

}  // namespace tmc::cuda
