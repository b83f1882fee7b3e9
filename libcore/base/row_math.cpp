#include "base/row_math.hpp"

#include <cstdlib>
#include <cstring>

namespace tmc {

bool use_avx512() {
    static const bool on = [] {
        const char* want = std::getenv("TM_CPU_ISA");
        const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vl");
        return avx512 && !(want && std::strcmp(want, "avx2") == 0);
    }();
    return on;
}

const RowMath& row_math() {
    static const RowMath& m = use_avx512() ? row_math_avx512() : row_math_avx2();
    return m;
}

}  // namespace tmc
