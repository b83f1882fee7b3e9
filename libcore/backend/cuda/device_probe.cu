// Device discovery for the CUDA build. cudart is linked statically, so this
// loads libcuda.so at run time: a machine with no driver gets an error code,
// never a loader failure.
#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdlib>

#include "tm/device.hpp"

namespace tmc {

int cuda_device_count(std::string* why) {
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
        if (why) *why = cudaGetErrorString(err);
        cudaGetLastError();  // clear the sticky error
        return 0;
    }
    if (n == 0 && why) *why = "no CUDA device";
    return n;
}

bool built_with_cuda() { return true; }

void cuda_prepare_for_ranks(int tp) {
    if (tp > 1) setenv("CUDA_MODULE_LOADING", "EAGER", 0);
}

bool cuda_eager_loading() {
    using Fn = CUresult (*)(CUmoduleLoadingMode*);
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuModuleGetLoadingMode", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess || !f) {
        cudaGetLastError();
        return true;  // an older driver: nothing to ask
    }
    CUmoduleLoadingMode mode;
    return reinterpret_cast<Fn>(f)(&mode) != CUDA_SUCCESS || mode == CU_MODULE_EAGER_LOADING;
}

}  // namespace tmc
