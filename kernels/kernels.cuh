// Launchers of tm's CUDA kernels (kernels/*.cu). Activations and the KV
// cache are 16-bit (the model's dtype: bf16 or fp16), the residual stream,
// q and logits fp32; every kernel accumulates in fp32. All launches go on the
// given stream; none synchronizes.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#ifdef __CUDACC__
#define TM_HD __host__ __device__
#else
#define TM_HD
#endif

namespace tmc::cuda {

enum class Dt : int { BF16 = 0, F16 = 1 };

// Whether the kernels that follow another kernel are launched with
// programmatic dependent launch (common.cuh; on by default, process-wide).
void set_programmatic_launch(bool on);

// x[t, :] = emb[tokens[t], :] (as fp32).
void embedding(Dt dt, const void* emb, const int* tokens, int T, int H, float* x, cudaStream_t s);

// out[r, :] = x[rows ? rows[r] : r, :] / rms * w, for r < R (out 16-bit).
// vectorized = false: the scalar kernel (TM_CUDA_VECTOR_ELEMENTWISE=0).
void rmsnorm(Dt dt, const float* x, const int* rows, int R, int H, const void* w, float eps, void* out,
             cudaStream_t s, bool vectorized = true);

// out[r] = the index of the largest of x[r, 0..V) (the first of equal
// maxima), and vals[r] that largest value when vals is not null.
void argmax_rows(const float* x, int R, int V, int* out, cudaStream_t s, float* vals = nullptr);

// How to draw row r's token (kernels/sampling.cu): temperature <= 0 or
// top_k == 1 is greedy; top_k <= 0, top_p >= 1, min_p <= 0 filter nothing;
// u is uniform in [0, 1), drawn by the host from the request's stream.
struct SampleRow {
    float temperature, top_p, min_p, u;
    int top_k;
};
// ids[r] = a token drawn from row r of logits [R, V] (the rows are
// overwritten with unnormalized probabilities).
void sample_rows(float* logits, int R, int V, const SampleRow* rows, int* ids, cudaStream_t s);

// Y[t, n] = beta * Y[t, n] + sum_k W[n, k] X[t, k] for t < R <= kMaxGemvRows
// (decode steps; kernels/gemv.cu): W [N, K] and X (rows ldx apart) 16-bit,
// Y fp32 (y_f32) or 16-bit, rows ldy apart. Returns false, launching
// nothing, for shapes it does not take (K or ldx not a multiple of 8,
// unaligned W or X): use cuBLAS then.
constexpr int kMaxGemvRows = 8;
bool gemv(Dt dt, const void* W, int N, int K, const void* X, int ldx, int R, void* Y, bool y_f32, int ldy, float beta,
          cudaStream_t s);

// out[t, i] = silu(gu[t, i]) * gu[t, I + i] (16-bit in and out).
void silu_mul(Dt dt, const void* gu, int T, int I, void* out, cudaStream_t s, bool vectorized = true);

// The paged KV cache. 16-bit (bits = 16): block b holds, for each layer, K
// then V, each [kv_heads][block_size][head_dim] in the model's dtype.
// Quantized (bits = 8 or 4, quant_policy): the same order of unsigned codes
// (two 4-bit codes per byte, the even channel in the low nibble), then, per
// (layer, K/V, head, slot), a float2 {scale, offset}: value = code * scale +
// offset. Scales are the token's own (min and range per head), or, with
// `qparams` ([layers][4][kv_heads]: K scale, K offset, V scale, V offset;
// tm-qparams), static.
struct KvLayout {
    void* base = nullptr;
    int layers = 0, kv_heads = 0, head_dim = 0, block_size = 0;
    int bits = 16;
    const float* qparams = nullptr;  // device; static scales, or null
    TM_HD size_t block_elems() const { return size_t(layers) * 2 * kv_heads * block_size * head_dim; }
    TM_HD size_t offset(int block, int layer, int kv, int head, int slot) const {
        return size_t(block) * block_elems() +
               ((size_t(layer) * 2 + kv) * kv_heads + head) * size_t(block_size) * head_dim + size_t(slot) * head_dim;
    }
    TM_HD size_t row_bytes() const { return size_t(head_dim) * bits / 8; }
    TM_HD size_t rows_per_block() const { return size_t(layers) * 2 * kv_heads * block_size; }
    TM_HD size_t block_bytes() const {
        return bits == 16 ? block_elems() * 2 : rows_per_block() * (row_bytes() + 8);
    }
    TM_HD size_t row_index(int layer, int kv, int head, int slot) const {
        return ((size_t(layer) * 2 + kv) * kv_heads + head) * size_t(block_size) + size_t(slot);
    }
    // Quantized caches: the codes of one (token, head) and its {scale, offset}.
    TM_HD uint8_t* codes(int block, int layer, int kv, int head, int slot) const {
        return static_cast<uint8_t*>(base) + size_t(block) * block_bytes() + row_index(layer, kv, head, slot) * row_bytes();
    }
    TM_HD float2* params(int block, int layer, int kv, int head, int slot) const {
        return reinterpret_cast<float2*>(static_cast<uint8_t*>(base) + size_t(block) * block_bytes() +
                                         rows_per_block() * row_bytes()) +
               row_index(layer, kv, head, slot);
    }
};

// Per-step batch description on the device.
struct BatchDev {
    const int* positions;     // [T]
    const int* row_seq;       // [T] sequence of each row
    const int* block_offset;  // [S] first entry of each sequence's block table in `blocks`
    const int* blocks;        // concatenated block tables
};

// For each row of qkv (16-bit, [T, (nq + 2 nkv) * hd], leading dimension
// ld): adds the bias, applies q/k RMSNorm (Qwen3), rotates q and k (RoPE,
// rotate half, inv_freq [hd/2]) in fp32, writes K and V into the cache at the
// row's position; q is left rotated in place (rounded to 16 bits, as the
// attention kernels use it).
struct QkvArgs {
    void* qkv;
    int ld;
    int T, nq, nkv, hd;
    const void* bias;    // [(nq + 2 nkv) * hd] or null
    const void* q_norm;  // [hd] or null
    const void* k_norm;
    float eps;
    const float* inv_freq;
    int layer;
};
void qkv_rope_cache(Dt dt, const QkvArgs& a, const BatchDev& b, const KvLayout& kv, cudaStream_t s);

// Attention of each row's q heads over its sequence's cached positions
// [max(0, pos + 1 - window), pos] (window 0: all). q: 16-bit rows of ld
// elements (heads first); out: 16-bit [T, nq * hd].
struct AttnArgs {
    const void* q;
    int ld;
    int T, nq, nkv, hd;
    int window;
    float scale;
    int layer;
    void* out;
    // Rows split along the sequence (flash-decoding): scratch of
    // attention_item_floats(capacity) floats; null when no row is split.
    float* split_scratch = nullptr;
    // Prefill tiles on tensor cores (paged_attention_tiled); 16-bit caches
    // with register_tiles by the FlashAttention-2-shaped kernel, otherwise
    // through shared memory (WMMA).
    bool tensor_cores = false;
    bool register_tiles = true;
    // Decode rows (16-bit caches, head_dim 64 or 128) by the ring-of-chunks
    // kernel; false: by the generic row kernel (as quantized caches).
    bool ring_decode = true;
    // Decode rows taken by the ring kernels: on tensor cores (mma.sync);
    // false: on CUDA cores.
    bool mma_decode = true;
};
// Decode rows (and prompt chunks of under 4 rows) as a list of work items,
// each a row's whole visible range or a piece of it: one block per (item,
// KV head); a second kernel merges the pieces of split rows. The host plans
// the items each step (plan_decode_items); the grid is the capacity for n
// rows, fixed by n alone, so a captured graph stays valid as sequences grow.
// Items {row, piece, pieces of the row, 0}, unused ones {-1, ...};
// row_items[i] = {first item, items} of the i-th row.
int decode_item_capacity(int n, int nkv);
size_t attention_item_floats(int capacity, int nq, int hd);
// Items for rows[0, n) with lens[i] visible keys each, longest rows' pieces
// first as the rows are ordered; split = false: one item a row (no scratch
// needed). Fills items[decode_item_capacity(n, nkv)] and row_items[n].
void plan_decode_items(const int* rows, const int* lens, int n, int nkv, bool split, int4* items, int2* row_items);
void paged_attention(Dt dt, const AttnArgs& a, const BatchDev& b, const KvLayout& kv, const int4* items,
                     int capacity, const int2* row_items, int n_rows, cudaStream_t s);
// Prefill chunks: each tile is {first row, row count} of consecutive rows of
// one sequence (count <= attention_tile_rows(group)); one block per (tile,
// KV head) loads each chunk of K/V into shared memory once for all the
// tile's query rows. Returns false (launching nothing) for a head_dim it
// has no instance for; use paged_attention() then.
int attention_tile_rows(int group);
bool attention_tiles_supported(int hd);  // head sizes paged_attention_tiled has instances for
bool paged_attention_tiled(Dt dt, const AttnArgs& a, const BatchDev& b, const KvLayout& kv, const int2* tiles,
                           int n_tiles, cudaStream_t s);

// One-shot all-reduce through peer memory (kernels/p2p_allreduce.cu) for the
// ranks of one process, one GPU each, peer access enabled both ways. data[r]
// is rank r's receive buffer, p2p_buffer_floats(nranks, capacity) floats
// (16-byte aligned) filled with 0xFF bytes once; flags[r] its
// p2p_flag_words() words, zeroed once; abort a host-mapped word that ends
// the kernel's waits when set. Returns false (nothing enqueued) when n does
// not fit (over capacity, not a multiple of 4, x unaligned).
constexpr int kP2pMaxRanks = 8;
struct P2pPeers {
    float* data[kP2pMaxRanks];
    uint32_t* flags[kP2pMaxRanks];
    const uint32_t* abort;
};
size_t p2p_flag_words();
size_t p2p_buffer_floats(int nranks, size_t capacity);
bool p2p_all_reduce(float* x, size_t n, const P2pPeers& peers, int rank, int nranks, size_t capacity, cudaStream_t s);
// The same sum over rows x H floats, and in the same kernel out[r, :] =
// RMSNorm(x[r, :]) * w (as rmsnorm()). False (nothing enqueued) where it
// does not fit (H over 8,192 or not a multiple of 4, or as above).
bool p2p_all_reduce_rmsnorm(Dt dt, float* x, int rows, int H, const void* w, float eps, void* out,
                            const P2pPeers& peers, int rank, int nranks, size_t capacity, cudaStream_t s);

}  // namespace tmc::cuda
