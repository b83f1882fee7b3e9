#include <cstring>

#include "backend/cpu/kernels.hpp"
#include "base/row_math.hpp"

namespace tmc::cpu {

size_t packed_size(int N, int K) { return size_t((N + 15) / 16) * 16 * size_t(K); }

void pack_weights(const uint16_t* W, int N, int K, uint16_t* out) {
    std::memset(out, 0, packed_size(N, K) * 2);
    for (int n = 0; n < N; ++n) {
        uint16_t* panel = out + size_t(n / 16) * 16 * size_t(K) + size_t(n % 16);
        const uint16_t* row = W + size_t(n) * size_t(K);
        for (int k = 0; k < K; ++k) panel[size_t(k) * 16] = row[k];
    }
}

// AVX-512 when the CPU has it, unless TM_CPU_ISA=avx2 asks for the baseline
// (base/row_math.cpp decides for both).
const Kernels& cpu_kernels() {
    static const Kernels& k = use_avx512() ? cpu_kernels_avx512() : cpu_kernels_avx2();
    return k;
}

}  // namespace tmc::cpu
