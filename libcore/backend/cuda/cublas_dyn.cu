#include "backend/cuda/cublas_dyn.hpp"
#include "base/dynlib.hpp"
#include "tm/error.hpp"

namespace tmc::cuda {

const Cublas& cublas() {
    static Cublas c = [] {
        const DynLib lib("cuBLAS", {"libcublas.so.13", "libcublas.so", "/usr/local/cuda/lib64/libcublas.so.13"});
        Cublas t;
        lib.get(t.create, "cublasCreate_v2");
        lib.get(t.destroy, "cublasDestroy_v2");
        lib.get(t.set_stream, "cublasSetStream_v2");
        lib.get(t.set_workspace, "cublasSetWorkspace_v2");
        lib.get(t.set_math_mode, "cublasSetMathMode");
        lib.get(t.gemm_ex, "cublasGemmEx");
        return t;
    }();
    return c;
}

}  // namespace tmc::cuda
