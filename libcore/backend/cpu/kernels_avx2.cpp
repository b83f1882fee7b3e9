// AVX2 + FMA build of kernels.inc (the project's baseline, x86-64-v3).
#define TM_KNS avx2
#define TM_P 1
#define TM_PD 4  // weight panels a decode block (1-2 token rows) streams at once
#define TM_TR 6  // token rows a GEMM block: 6 x 2 halves accumulators + 2 weight halves + 1 broadcast = 15 of 16 ymm
#define TM_ISA_NAME "avx2"
#define TM_KERNELS_FN cpu_kernels_avx2
#include "backend/cpu/kernels.inc"
