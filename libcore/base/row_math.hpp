// Vectorized maths over one row of floats (a row of logits): what the
// engine's host sampler, the backends' log-probabilities and the
// tensor-parallel logit gather need. Compiled per instruction set
// (row_math.inc) and picked at run time, as the CPU backend's kernels are;
// each result is computed in a fixed order, whatever the machine's batch.
#pragma once

namespace tmc {

struct RowMath {
    const char* isa;
    // The first index of the maximum (torch.argmax's choice on ties).
    int (*argmax)(const float* x, int n);
    // log(sum(exp(x))).
    float (*logsumexp)(const float* x, int n);
    // x[i] = exp(x[i] - m) in place; returns the sum.
    float (*exp_sum)(float* x, int n, float m);
    // x[i] = exp((x[i] - m) * t) in place; returns the sum.
    float (*exp_sum_scaled)(float* x, int n, float m, float t);
};

// AVX-512 when the CPU has it (F, BW, VL), unless TM_CPU_ISA=avx2 asks for
// the baseline; read once.
bool use_avx512();
const RowMath& row_math();
const RowMath& row_math_avx512();
const RowMath& row_math_avx2();

}  // namespace tmc
