// AVX2 + FMA build of kernels.inc (the project's baseline, x86-64-v3).
#define TM_KNS avx2
#define TM_P 1
#define TM_TR 2
#define TM_ISA_NAME "avx2"
#define TM_KERNELS_FN cpu_kernels_avx2
#include "backend/cpu/kernels.inc"
