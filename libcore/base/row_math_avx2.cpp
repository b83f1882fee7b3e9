// AVX2 + FMA build of row_math.inc (the project's baseline, x86-64-v3).
#define TM_KNS avx2
#define TM_ISA_NAME "avx2"
#define TM_ROW_MATH_FN row_math_avx2
#include "base/row_math.inc"
