// Device discovery for the CUDA build. cudart is linked statically, so this
// loads libcuda.so at run time: a machine with no driver gets an error code,
// never a loader failure.
#include <cuda_runtime.h>

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

}  // namespace tmc
