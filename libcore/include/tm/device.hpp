// Which compute devices this process can use. A build with CUDA links the
// CUDA runtime statically and never the driver: on a machine without a GPU
// or driver, cuda_device_count() returns 0 and says why.
#pragma once

#include <string>

namespace tmc {

// Number of usable CUDA devices; 0 with a reason in *why when there are none
// (no driver, no device, or a build without CUDA).
int cuda_device_count(std::string* why = nullptr);
// True when this binary was built with CUDA support.
bool built_with_cuda();

}  // namespace tmc
