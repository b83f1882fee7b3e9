// Split decode rows: the pieces of a long row, merged.
//
// Merges the items of rows split along the sequence. A block of 8 warps
// takes one row and 8 query heads, a warp each; or (few rows: one_head) one
// row and head, its 8 warps each summing every 8th piece, the sums meeting
// in shared memory. Lane z weighs piece z; a lane sums 4 channels. Rows of
// one item return at once. (A block per row and head for many rows made 32
// a row, most of which return at once: 211 against 199 us in
// attention_bench's 372-row batch of unsplit rows.) Item i's partial
// results: its unnormalized output at part[(i nq + h) hd], its (max, sum)
// at part[capacity nq hd + 2 (i nq + h)].
#pragma once

#include "kernels/attention/common.cuh"

namespace tmc::cuda {

namespace {

constexpr int kMergeWarps = 8;
constexpr int kMergeFewRows = 64;  // up to this many rows, a head a block

template <class T>
__global__ void __launch_bounds__(32 * kMergeWarps) merge_items_k(AttnArgs a, const int4* items, const int2* row_items,
                                                                  int capacity, bool one_head) {
    pdl_begin();
    __shared__ float4 red[kMergeWarps][32];
    const int2 ri = row_items[blockIdx.x];  // {first item, items}
    const int nsplit = ri.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    // This warp's head, and its first piece and stride over the pieces.
    const int h = one_head ? blockIdx.y : blockIdx.y * kMergeWarps + warp;
    const int j = one_head ? warp : 0, wph = one_head ? kMergeWarps : 1;
    if (nsplit <= 1 || h >= a.nq) return;  // (uniform in a block when one_head)
    const int r = items[ri.x].x, hd = a.hd;
    const float* part = a.split_scratch + (size_t(ri.x) * a.nq + h) * hd;  // piece z: + z nq hd
    const float* ml = a.split_scratch + size_t(capacity) * a.nq * hd + 2 * (size_t(ri.x) * a.nq + h);
    const float mz = lane < nsplit ? ml[2 * size_t(lane) * a.nq] : -FLT_MAX;
    const float lz = lane < nsplit ? ml[2 * size_t(lane) * a.nq + 1] : 0.0f;
    const float m = warp_max(mz);
    const float wz = lane < nsplit ? __expf(mz - m) : 0.0f;
    const float inv_l = 1.0f / warp_sum(lz * wz);
    T* out = static_cast<T*>(a.out) + size_t(r) * a.nq * hd + size_t(h) * hd;
    const size_t zstride = size_t(a.nq) * hd;
    for (int i0 = 0; i0 < hd; i0 += 128) {  // (every lane runs the loops: the shuffles)
        const int i = i0 + 4 * lane;
        const bool on = i < hd;
        float4 v = make_float4(0, 0, 0, 0);
#pragma unroll 4
        for (int z = j; z < nsplit; z += wph) {
            const float wgt = __shfl_sync(0xffffffffu, wz, z);
            if (on) {
                const float4 p = *reinterpret_cast<const float4*>(part + z * zstride + i);
                v.x += p.x * wgt, v.y += p.y * wgt, v.z += p.z * wgt, v.w += p.w * wgt;
            }
        }
        if (one_head) {
            red[warp][lane] = v;
            __syncthreads();
            if (warp == 0)
                for (int k = 1; k < kMergeWarps; ++k) {
                    const float4 u = red[k][lane];
                    v.x += u.x, v.y += u.y, v.z += u.z, v.w += u.w;
                }
            __syncthreads();  // red is free for the next 128 channels
        }
        if (on && j == 0) {
            out[i] = from_f<T>(v.x * inv_l), out[i + 1] = from_f<T>(v.y * inv_l);
            out[i + 2] = from_f<T>(v.z * inv_l), out[i + 3] = from_f<T>(v.w * inv_l);
        }
    }
}

}  // namespace

}  // namespace tmc::cuda
