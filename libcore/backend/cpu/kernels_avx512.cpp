// AVX-512 build of kernels.inc (the Makefile adds -mavx512f -mavx512bw -mavx512vl).
#define TM_KNS avx512
#define TM_P 4
#define TM_PD 8  // weight panels a decode block (1-2 token rows) streams at once
#define TM_TR 4
#define TM_ISA_NAME "avx512"
#define TM_KERNELS_FN cpu_kernels_avx512
#include "backend/cpu/kernels.inc"
