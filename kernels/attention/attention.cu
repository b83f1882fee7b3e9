// Attention over the paged KV cache: the planning of decode work items and
// the dispatch to the kernel families (kernels/attention/common.cuh lists
// them):
//   - row by row (decode, and prompt chunks of under 4 rows), optionally split
//     along the sequence with a merge kernel: for 16-bit caches of head_dim
//     64 or 128 and groups of up to 8 heads, paged_decode_mma_k on tensor
//     cores (or paged_decode_k on CUDA cores, AttnArgs::mma_decode off), both
//     fed by a ring of asynchronous copies; paged_attention_k for the rest
//     (quantized caches, other head sizes; and all of them with
//     AttnArgs::ring_decode off);
//   - in tiles of up to 64 query vectors of one sequence (prompt chunks):
//     paged_attention_fa_k in registers on tensor cores,
//     paged_attention_mma_k through shared memory (register_tiles off), or
//     paged_attention_tiled_k on CUDA cores (tensor_cores off).
#include "kernels/attention/decode_mma.cuh"
#include "kernels/attention/decode_ring.cuh"
#include "kernels/attention/decode_rows.cuh"
#include "kernels/attention/prefill_fa.cuh"
#include "kernels/attention/prefill_mma.cuh"
#include "kernels/attention/prefill_tiled.cuh"
#include "kernels/attention/split_merge.cuh"

namespace tmc::cuda {

namespace {

template <class T, int HD>
void launch_decode(dim3 grid, const AttnArgs& a, const BatchDev& b, const KvLayout& kv, const int4* rows, cudaStream_t s) {
    if (a.mma_decode) {
        return launch_mma_decode<T, HD, kMmaDecodeStages, kMmaDecodeWarps>(grid, a, b, kv, rows, s);
    }
    const int group = a.nq / a.nkv;
    if (group <= 1) return launch_ring<T, HD, 1>(grid, a, b, kv, rows, s);
    if (group <= 2) return launch_ring<T, HD, 2>(grid, a, b, kv, rows, s);
    if (group <= 4) return launch_ring<T, HD, 4>(grid, a, b, kv, rows, s);
    launch_ring<T, HD, 8>(grid, a, b, kv, rows, s);
}

template <class T, int HD, int B>
void launch_tiles(const AttnArgs& a, const BatchDev& b, const KvLayout& kv, const int2* tiles, int n, cudaStream_t s) {
    if (a.tensor_cores && B == 16 && a.register_tiles) launch_fa<T, HD>(a, b, kv, tiles, n, s);
    else if (a.tensor_cores) launch_mma<T, HD, B>(a, b, kv, tiles, n, s);
    else launch_tiled<T, HD, B>(a, b, kv, tiles, n, s);
}

}  // namespace

// Work items of decode rows: 1,056 (item, KV head) blocks (two waves of the
// CUDA-core kernel at 4 blocks an SM on 132 SMs; 1.3 of the tensor-core
// kernel at 6, and twice that measured no faster) when rows are few, and as
// many items again as rows when they are many, so that a context longer than
// the mean is cut into pieces of about that (in a batch of skewed contexts
// the longest row alone would otherwise set the kernel's time;
// attention_bench, tensor-core kernel, rows drawn from sharegpt-like-1000:
// 30-74% of the copy bandwidth with whole rows, 70-87% in pieces). Pieces
// cost a little where contexts are even (512 rows of 200-600: 90% -> 84%).
constexpr int kTargetBlocks = 1056;
constexpr int kMinItemKeys = 32;  // no item shorter than a chunk of 32 keys (unless its row is)

int decode_item_capacity(int n, int nkv) {
    // (No row makes more than kMaxSplits pieces: a batch of one row needs 32
    // items, not 133 mostly empty ones.)
    return n + std::min(std::max(n, (kTargetBlocks + nkv - 1) / nkv), (kMaxSplits - 1) * n);
}

size_t attention_item_floats(int capacity, int nq, int hd) { return size_t(capacity) * size_t(nq) * (size_t(hd) + 2); }

void plan_decode_items(const int* rows, const int* lens, int n, int nkv, bool split, int4* items, int2* row_items) {
    if (n <= 0) return;  // (no items: a step of prompt tiles alone)
    const int cap = decode_item_capacity(n, nkv), extra = cap - n;
    long long total = 0;
    int longest = 0;
    for (int i = 0; i < n; ++i) total += lens[i], longest = std::max(longest, lens[i]);
    // At most `extra` pieces beyond one a row: sum of ceil(len / S) <= n + total / S.
    const long long S = std::max<long long>({kMinItemKeys, (total + extra - 1) / extra,
                                             (longest + kMaxSplits - 1) / kMaxSplits});
    int k = 0;
    for (int i = 0; i < n; ++i) {
        const int nz = split ? int(std::max<long long>(1, (lens[i] + S - 1) / S)) : 1;
        row_items[i] = make_int2(k, nz);
        for (int z = 0; z < nz; ++z) items[k++] = make_int4(rows[i], z, nz, 0);
    }
    for (; k < cap; ++k) items[k] = make_int4(-1, 0, 0, 0);
}

void paged_attention(Dt dt, const AttnArgs& a, const BatchDev& b, const KvLayout& kv, const int4* items,
                     int capacity, const int2* row_items, int n_rows, cudaStream_t s) {
    if (n_rows == 0) return;
    dim3 grid(capacity, a.nkv);
    const bool ring = a.ring_decode && kv.bits == 16 && a.nq / a.nkv <= kMaxGroup;
    if (ring && a.hd == 128)
        TM_DISPATCH_DT(dt, W, (launch_decode<W, 128>(grid, a, b, kv, items, s)));
    else if (ring && a.hd == 64)
        TM_DISPATCH_DT(dt, W, (launch_decode<W, 64>(grid, a, b, kv, items, s)));
    else
        TM_DISPATCH_DT(dt, W, TM_DISPATCH_BITS(kv.bits, B, (launch(paged_attention_k<W, B>, grid, dim3(kThreads), 0, s, a, b, kv, items))));
    if (a.split_scratch) {
        const bool one_head = n_rows <= kMergeFewRows;
        TM_DISPATCH_DT(dt, W, (launch(merge_items_k<W>, dim3(n_rows, one_head ? a.nq : (a.nq + kMergeWarps - 1) / kMergeWarps),
                                      dim3(32 * kMergeWarps), 0, s, a, items, row_items, capacity, one_head)));
    }
}

int attention_tile_rows(int group) { return std::max(1, kTileQ / group); }

bool attention_tiles_supported(int hd) { return hd == 16 || hd == 32 || hd == 64 || hd == 128; }

bool paged_attention_tiled(Dt dt, const AttnArgs& a, const BatchDev& b, const KvLayout& kv, const int2* tiles,
                           int n_tiles, cudaStream_t s) {
    if (n_tiles == 0) return true;
    switch (a.hd) {
        case 16: TM_DISPATCH_DT(dt, W, TM_DISPATCH_BITS(kv.bits, B, (launch_tiles<W, 16, B>(a, b, kv, tiles, n_tiles, s)))); return true;
        case 32: TM_DISPATCH_DT(dt, W, TM_DISPATCH_BITS(kv.bits, B, (launch_tiles<W, 32, B>(a, b, kv, tiles, n_tiles, s)))); return true;
        case 64: TM_DISPATCH_DT(dt, W, TM_DISPATCH_BITS(kv.bits, B, (launch_tiles<W, 64, B>(a, b, kv, tiles, n_tiles, s)))); return true;
        case 128: TM_DISPATCH_DT(dt, W, TM_DISPATCH_BITS(kv.bits, B, (launch_tiles<W, 128, B>(a, b, kv, tiles, n_tiles, s)))); return true;
        default: return false;
    }
}

}  // namespace tmc::cuda
