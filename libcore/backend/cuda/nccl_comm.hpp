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

// What the ranks of one process share to sum small messages through peer
// memory (kernels/p2p_allreduce.cu) instead of NCCL: made once, passed to
// every rank's nccl_communicator.
struct PeerGroup;
std::shared_ptr<PeerGroup> make_peer_group(int n);

// The communicator of the CUDA backend: a Communicator that can also fuse
// the RMSNorm that follows a layer's all-reduce into the all-reduce.
class CudaCommunicator : public Communicator {
public:
    // all_reduce_sum(x, rows * H) and, in the same kernel, out[r, :] =
    // RMSNorm(x[r, :]) * w (16-bit `dt`: 0 bf16, 1 fp16; as cuda::rmsnorm).
    // Returns false, enqueuing nothing, where there is no such path (NCCL,
    // or too many rows): the caller then sums and normalizes itself.
    virtual bool all_reduce_sum_rmsnorm(float* x, int rows, int H, const void* w, float eps, void* out,
                                        int dt) = 0;
};

// Rank `rank` of `n`: call on the rank's thread with its device current.
// all_reduce_sum(x, n) sums device memory in place, enqueued on `stream`
// (capturable in a CUDA graph); it does not synchronize. With `peers` (every
// rank the same group, all ranks' threads calling together), peer access
// between every pair of GPUs (null when CudaSwitches::p2p_allreduce is off), messages up to
// 256 K floats go through peer memory (kernels/p2p_allreduce.cu), the rest
// to NCCL.
std::unique_ptr<CudaCommunicator> nccl_communicator(const NcclId& id, int rank, int n, cudaStream_t stream,
                                                    std::shared_ptr<PeerGroup> peers = nullptr);

}  // namespace tmc::cuda
