// cuBLAS, loaded when the CUDA backend starts (dlopen of libcublas.so.13),
// so that tm's binaries start on machines without the CUDA libraries.
#pragma once

#include <cublas_api.h>

#include <string>

namespace tmc::cuda {

struct Cublas {
    cublasStatus_t (*create)(cublasHandle_t*);
    cublasStatus_t (*destroy)(cublasHandle_t);
    cublasStatus_t (*set_stream)(cublasHandle_t, cudaStream_t);
    cublasStatus_t (*set_workspace)(cublasHandle_t, void*, size_t);
    cublasStatus_t (*set_math_mode)(cublasHandle_t, cublasMath_t);
    cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*,
                              const void*, cudaDataType, int, const void*, cudaDataType, int, const void*, void*,
                              cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
};

// Throws tmc::Error naming the library and what is missing.
const Cublas& cublas();

}  // namespace tmc::cuda
