// The NCCL communicator: one rank per GPU, ranks as threads of one process
// (the unique id is shared in memory). NCCL is loaded at run time (dlopen of
// libnccl.so.2), like cuBLAS, so tm's binaries start without it. Every
// program that starts NCCL here sets NCCL_NVLS_ENABLE=0 (NVLink multicast
// off) unless the environment says otherwise.
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <memory>

#include "backend/comm.hpp"

namespace tmc::cuda {

using NcclId = std::array<char, 128>;

// A fresh id for one group (call once, share with every rank's thread).
NcclId nccl_unique_id();

// Rank `rank` of `n`: call on the rank's thread with its device current.
// all_reduce_sum(x, n) sums device memory in place, enqueued on `stream`
// (capturable in a CUDA graph); it does not synchronize.
std::unique_ptr<Communicator> nccl_communicator(const NcclId& id, int rank, int n, cudaStream_t stream);

}  // namespace tmc::cuda
