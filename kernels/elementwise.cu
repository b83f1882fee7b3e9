// Embedding lookup, RMSNorm and SiLU-and-multiply. Each is one pass over
// its rows, memory-bound: embedding reads 2 bytes and writes 4 per element,
// RMSNorm reads 4 and writes 2 (plus the weight, cached), SiLU-mul reads 4
// and writes 2. RMSNorm takes a block per row; the others' grids cover
// elements (SiLU-mul with 16-byte vectors when I allows).
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>

#include "kernels/common.cuh"
#include "kernels/kernels.cuh"

namespace tmc::cuda {

namespace {

// Grids cover elements, not rows: decode steps have a single row.
template <class T>
__global__ void embedding_k(const T* emb, const int* tokens, int H, float* x) {
    const int t = blockIdx.y;
    const T* row = emb + size_t(tokens[t]) * H;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < H; i += gridDim.x * blockDim.x)
        x[size_t(t) * H + i] = to_f(row[i]);
}

// The same with H a multiple of 4 and at most kNormVec float4 a thread: the
// row read once into registers (16-byte loads), 8-byte stores.
constexpr int kNormVec = 4;
template <class T>
__global__ void rmsnorm4_k(const float* x, const int* rows, int H, const T* w, float eps, T* out) {
    pdl_begin();
    const int r = blockIdx.x, H4 = H / 4;
    const float4* xr = reinterpret_cast<const float4*>(x + size_t(rows ? rows[r] : r) * H);
    float4 v[kNormVec];
    float ss = 0;
#pragma unroll
    for (int j = 0; j < kNormVec; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        v[j] = i < H4 ? xr[i] : make_float4(0, 0, 0, 0);
        ss += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
    }
    ss = block_sum(ss);
    const float scale = rsqrtf(ss / float(H) + eps);
    const Four<T>* w4 = reinterpret_cast<const Four<T>*>(w);
    Four<T>* o4 = reinterpret_cast<Four<T>*>(out + size_t(r) * H);
#pragma unroll
    for (int j = 0; j < kNormVec; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i >= H4) break;
        o4[i] = scaled4(v[j], scale, w4[i]);
    }
}

template <class T>
__global__ void rmsnorm_k(const float* x, const int* rows, int H, const T* w, float eps, T* out) {
    pdl_begin();
    const int r = blockIdx.x;
    const float* xr = x + size_t(rows ? rows[r] : r) * H;
    float ss = 0;
    for (int i = threadIdx.x; i < H; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss);
    const float scale = rsqrtf(ss / float(H) + eps);
    for (int i = threadIdx.x; i < H; i += blockDim.x)
        out[size_t(r) * H + i] = from_f<T>(xr[i] * scale * to_f(w[i]));
}

template <class T>
__global__ void silu_mul_k(const T* gu, int I, T* out) {
    pdl_begin();
    const int t = blockIdx.y;
    const T* g = gu + size_t(t) * 2 * I;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < I; i += gridDim.x * blockDim.x) {
        float a = to_f(g[i]);
        out[size_t(t) * I + i] = from_f<T>(a / (1.0f + __expf(-a)) * to_f(g[I + i]));
    }
}

// The same with 16-byte loads and stores (8 elements a thread), when I is a
// multiple of 8: the whole [rows, I] output is one flat range of vectors.
template <class T>
__global__ void silu_mul8_k(const uint4* gu, int I8, size_t n8, uint4* out) {
    pdl_begin();
    for (size_t v = size_t(blockIdx.x) * blockDim.x + threadIdx.x; v < n8;
         v += size_t(gridDim.x) * blockDim.x) {
        const size_t t = v / size_t(I8), i = v - t * size_t(I8);
        const uint4 a = __ldcs(gu + t * 2 * size_t(I8) + i),
                    b = __ldcs(gu + (t * 2 + 1) * size_t(I8) + i);
        const T* ga = reinterpret_cast<const T*>(&a);
        const T* ub = reinterpret_cast<const T*>(&b);
        uint4 o;
        T* op = reinterpret_cast<T*>(&o);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const float x = to_f(ga[k]);
            op[k] = from_f<T>(x / (1.0f + __expf(-x)) * to_f(ub[k]));
        }
        out[v] = o;
    }
}

// One block per row: each thread scans a strided share, then the block
// reduces; the first of equal maxima wins (as torch.argmax and the CPU).
__global__ void argmax_rows_k(const float* x, int V, int* out, float* vals) {
    pdl_begin();
    __shared__ float bv[32];
    __shared__ int bi[32];
    const float* r = x + size_t(blockIdx.x) * V;
    float best = -INFINITY;
    int idx = V;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float v = r[i];
        if (v > best || (v == best && i < idx) || (idx == V && v == v))
            best = v, idx = i;  // NaN never wins
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (ov > best || (ov == best && oi < idx)) best = ov, idx = oi;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) bv[warp] = best, bi[warp] = idx;
    __syncthreads();
    if (warp == 0) {
        const int nw = (blockDim.x + 31) >> 5;
        best = lane < nw ? bv[lane] : -INFINITY;
        idx = lane < nw ? bi[lane] : V;
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, best, o);
            const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
            if (ov > best || (ov == best && oi < idx)) best = ov, idx = oi;
        }
        if (lane == 0) {
            out[blockIdx.x] = idx < V ? idx : 0;
            if (vals) vals[blockIdx.x] = idx < V ? best : -INFINITY;
        }
    }
}

std::atomic<bool> g_programmatic{true};  // set_programmatic_launch

}  // namespace

bool programmatic_launch() { return g_programmatic.load(std::memory_order_relaxed); }
void set_programmatic_launch(bool on) { g_programmatic.store(on); }

void argmax_rows(const float* x, int R, int V, int* out, cudaStream_t s, float* vals) {
    if (R == 0) return;
    launch(argmax_rows_k, dim3(R), dim3(1024), 0, s, x, V, out, vals);
}

void embedding(Dt dt, const void* emb, const int* tokens, int T, int H, float* x, cudaStream_t s) {
    if (T == 0) return;
    dim3 grid((H + 255) / 256, T);
    TM_DISPATCH_DT(dt, W,
                   embedding_k<W><<<grid, 256, 0, s>>>(static_cast<const W*>(emb), tokens, H, x));
}

void rmsnorm(Dt dt, const float* x, const int* rows, int R, int H, const void* w, float eps,
             void* out, cudaStream_t s, bool vectorized) {
    if (R == 0) return;
    // One block per row, wide enough that a single row is not latency-bound.
    const int threads = H >= 4096 ? 1024 : H >= 1024 ? 512 : 256;
    const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(w) % 8 == 0 &&
                         reinterpret_cast<uintptr_t>(out) % 8 == 0;
    if (vectorized && aligned && H % 4 == 0) {
        // kNormVec float4 a thread (H = 4096: 256 threads), in whole warps.
        const int per = (H / 4 + kNormVec - 1) / kNormVec;
        const int t = std::max(32, (per + 31) / 32 * 32);
        if (t <= 1024) {
            TM_DISPATCH_DT(dt, W,
                           launch(rmsnorm4_k<W>, dim3(R), dim3(t), 0, s, x, rows, H, static_cast<const W*>(w), eps,
                                  static_cast<W*>(out)));
            return;
        }
    }
    TM_DISPATCH_DT(dt, W,
                   launch(rmsnorm_k<W>, dim3(R), dim3(threads), 0, s, x, rows, H, static_cast<const W*>(w), eps,
                          static_cast<W*>(out)));
}

void silu_mul(Dt dt, const void* gu, int T, int I, void* out, cudaStream_t s, bool vectorized) {
    if (T == 0) return;
    if (vectorized && I % 8 == 0 && reinterpret_cast<uintptr_t>(gu) % 16 == 0 &&
        reinterpret_cast<uintptr_t>(out) % 16 == 0) {
        const size_t n8 = size_t(T) * size_t(I / 8);
        const int blocks = int(std::min<size_t>((n8 + 255) / 256, size_t(132) * 16));
        TM_DISPATCH_DT(dt, W,
                       launch(silu_mul8_k<W>, dim3(blocks), dim3(256), 0, s, static_cast<const uint4*>(gu), I / 8, n8,
                              static_cast<uint4*>(out)));
        return;
    }
    dim3 grid((I + 255) / 256, T);
    TM_DISPATCH_DT(dt, W,
                   launch(silu_mul_k<W>, grid, dim3(256), 0, s, static_cast<const W*>(gu), I, static_cast<W*>(out)));
}

}  // namespace tmc::cuda
