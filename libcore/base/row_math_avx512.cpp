// AVX-512 build of row_math.inc (the Makefile adds -mavx512f -mavx512bw -mavx512vl).
#define TM_KNS avx512
#define TM_ISA_NAME "avx512"
#define TM_ROW_MATH_FN row_math_avx512
#include "base/row_math.inc"
