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

const CublasLt& cublas_lt() {
    static CublasLt c = [] {
        const DynLib lib("cuBLASLt", {"libcublasLt.so.13", "libcublasLt.so", "/usr/local/cuda/lib64/libcublasLt.so.13"});
        CublasLt t;
        lib.get(t.version, "cublasLtGetVersion");
        lib.get(t.create, "cublasLtCreate");
        lib.get(t.destroy, "cublasLtDestroy");
        lib.get(t.desc_create, "cublasLtMatmulDescCreate");
        lib.get(t.desc_destroy, "cublasLtMatmulDescDestroy");
        lib.get(t.desc_set, "cublasLtMatmulDescSetAttribute");
        lib.get(t.layout_create, "cublasLtMatrixLayoutCreate");
        lib.get(t.layout_destroy, "cublasLtMatrixLayoutDestroy");
        lib.get(t.pref_create, "cublasLtMatmulPreferenceCreate");
        lib.get(t.pref_destroy, "cublasLtMatmulPreferenceDestroy");
        lib.get(t.pref_set, "cublasLtMatmulPreferenceSetAttribute");
        lib.get(t.heuristic, "cublasLtMatmulAlgoGetHeuristic");
        lib.get(t.check, "cublasLtMatmulAlgoCheck");
        lib.get(t.matmul, "cublasLtMatmul");
        return t;
    }();
    return c;
}

}  // namespace tmc::cuda
