#include <cstdlib>
#include <cstring>

#include "backend/cpu/kernels.hpp"

namespace tmc::cpu {

// AVX-512 when the CPU has it, unless TM_CPU_ISA=avx2 asks for the baseline.
const Kernels& cpu_kernels() {
    static const Kernels& k = [&]() -> const Kernels& {
        const char* want = std::getenv("TM_CPU_ISA");
        bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
        if (avx512 && !(want && std::strcmp(want, "avx2") == 0)) return cpu_kernels_avx512();
        return cpu_kernels_avx2();
    }();
    return k;
}

}  // namespace tmc::cpu
