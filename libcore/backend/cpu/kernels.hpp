// The CPU backend's inner loops, compiled once per instruction set
// (kernels_avx512.cpp, kernels_avx2.cpp) and picked at run time by
// cpu_kernels(). Every function computes each output element with a fixed
// order of operations that does not depend on how many rows are in the
// batch, so a request gives the same bits alone or batched with others.
//
// This header is included by the per-ISA translation units: keep it free of
// standard library types (inline functions compiled for AVX-512 must not
// be shared with the rest of the program).
#pragma once

#include <cstddef>
#include <cstdint>

namespace tmc::cpu {

enum WeightType : int { kWeightBF16 = 0, kWeightF16 = 1 };

struct AttnArgs {
    const float* q;  // `group` query heads of one token, head_dim floats each
    int group;
    int head_dim;
    // In block b = block_table[j / block_size], slot s = j % block_size:
    // channel i of K of position j is k_base[b * block_stride + i * block_size + s]
    // (K is stored transposed per block), V of position j starts at
    // v_base + b * block_stride + s * slot_stride.
    const float* k_base;
    const float* v_base;
    size_t block_stride;
    size_t slot_stride;
    const int* block_table;
    int block_size;
    int ctx_begin, ctx_end;  // attends to positions [ctx_begin, ctx_end)
    float scale;
    float* out;      // group * head_dim floats
    float* scratch;  // at least group * (ctx_end - ctx_begin) floats
};

// Attention over a quantized cache (quant_policy 8 or 4): per (token, KV
// head) asymmetric quantization, x ~= q * scale + min. In block b, slot s:
//   K: channel i at k_base[b * block_stride_bytes + i * k_row + s * bits / 8]
//      (int4: slot pairs share a byte, the even slot in the low nibble);
//   V: position j's channels at v_base[b * block_stride_bytes + s * v_row],
//      (int4: channel pairs share a byte);
//   scale/min of K and V: k_scale[b * param_stride + s] etc. (floats).
struct AttnQArgs {
    const float* q;
    int group;
    int head_dim;
    int bits;  // 8 or 4
    const uint8_t* k_base;
    const uint8_t* v_base;
    size_t block_stride_bytes;
    size_t k_row, v_row;  // bytes
    const float* k_scale;
    const float* k_min;
    const float* v_scale;
    const float* v_min;
    size_t param_stride;  // floats between blocks
    const int* block_table;
    int block_size;
    int ctx_begin, ctx_end;
    float scale;
    float* out;
    float* scratch;  // at least group * (ctx_end - ctx_begin) + 64 floats
};

struct Kernels {
    const char* isa;
    // Y[t, n] (+)= sum_k W[n, k] * X[t, k] for t < T, n in [n0, n1), the sum
    // taken in order k = 0, 1, ...; W packed by pack_weights(); n0 a
    // multiple of 16.
    void (*gemm)(int wtype, const uint16_t* Wp, int K, const float* X, size_t ldx, int T, float* Y,
                 size_t ldy, int n0, int n1, bool accumulate);
    // out = x / rms(x) * w (w: 16-bit weights; may alias x).
    void (*rmsnorm)(const float* x, const uint16_t* w, int wtype, int n, float eps, float* out);
    // out[i] = silu(g[i]) * u[i].
    void (*silu_mul)(const float* g, const float* u, float* out, int n);
    void (*attention)(const AttnArgs& a);
    void (*attention_q)(const AttnQArgs& a);
};
// (Row maths for sampling and log-probabilities: base/row_math.hpp.)

// Row-major 16-bit W [N, K] into panels of 16 rows: out[(n / 16) * 16 * K +
// k * 16 + n % 16] = W[n, k], rows past N zero. out holds packed_size(N, K).
size_t packed_size(int N, int K);
void pack_weights(const uint16_t* W, int N, int K, uint16_t* out);

const Kernels& cpu_kernels();
const Kernels& cpu_kernels_avx512();
const Kernels& cpu_kernels_avx2();

}  // namespace tmc::cpu
