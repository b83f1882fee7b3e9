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

// Tensor parallelism on CUDA runs the ranks as threads of one process, and
// CUDA's lazy module loading can deadlock them: the first launch of a kernel
// loads its module under a driver lock and waits for the device to drain,
// which never happens while an NCCL kernel there waits for a rank blocked on
// that lock. Call before the process's first CUDA call (before
// cuda_device_count) when the workspace has several ranks: sets
// CUDA_MODULE_LOADING=EAGER unless the environment already says.
void cuda_prepare_for_ranks(int tp);
// False when CUDA is loading modules lazily in this process.
bool cuda_eager_loading();

}  // namespace tmc
