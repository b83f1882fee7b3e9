#include "backend/cuda/nccl_comm.hpp"

#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "base/dynlib.hpp"
#include "tm/error.hpp"

namespace tmc::cuda {

namespace {

struct Nccl {
    ncclResult_t (*get_unique_id)(ncclUniqueId*);
    ncclResult_t (*comm_init_rank)(ncclComm_t*, int, ncclUniqueId, int);
    ncclResult_t (*comm_destroy)(ncclComm_t);
    ncclResult_t (*comm_abort)(ncclComm_t);
    ncclResult_t (*all_reduce)(const void*, void*, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t);
    const char* (*error_string)(ncclResult_t);
};

const Nccl& nccl() {
    static Nccl n = [] {
        setenv("NCCL_NVLS_ENABLE", "0", 0);  // the device machines need multicast off
        // Connect every channel at ncclCommInitRank, not at a collective's
        // first use: the first all-reduce may be inside a CUDA graph capture,
        // where setting up peer access is not permitted.
        setenv("NCCL_RUNTIME_CONNECT", "0", 0);
        const DynLib lib("NCCL", {"libnccl.so.2", "libnccl.so", "/usr/local/cuda/lib/libnccl.so.2",
                                  "/usr/local/cuda/lib64/libnccl.so.2"});
        Nccl t;
        lib.get(t.get_unique_id, "ncclGetUniqueId");
        lib.get(t.comm_init_rank, "ncclCommInitRank");
        lib.get(t.comm_destroy, "ncclCommDestroy");
        lib.get(t.comm_abort, "ncclCommAbort");
        lib.get(t.all_reduce, "ncclAllReduce");
        lib.get(t.error_string, "ncclGetErrorString");
        return t;
    }();
    return n;
}

void check(ncclResult_t r, const char* what) {
    if (r != ncclSuccess) throw Error(std::string("NCCL ") + what + ": " + nccl().error_string(r));
}

class NcclComm final : public Communicator {
public:
    NcclComm(const NcclId& id, int rank, int n, cudaStream_t s) : rank_(rank), n_(n), stream_(s) {
        ncclUniqueId u;
        static_assert(sizeof(u.internal) == std::tuple_size<NcclId>::value);
        std::memcpy(u.internal, id.data(), id.size());
        check(nccl().comm_init_rank(&comm_, n, u, rank), "ncclCommInitRank");
        // NCCL reports through its result; a CUDA call it made and handled
        // (peer access already enabled, say) would otherwise stay this
        // thread's last error and fail the backend's next launch check.
        (void)cudaGetLastError();
        try {
            warm_up();
        } catch (...) {
            nccl().comm_abort(comm_);
            throw;
        }
    }
    ~NcclComm() override {
        if (!aborted_.exchange(true)) nccl().comm_destroy(comm_);
    }
    void abort() override {
        if (!aborted_.exchange(true)) nccl().comm_abort(comm_);
    }
    int rank() const override { return rank_; }
    int size() const override { return n_; }
    void all_reduce_sum(float* x, size_t n) override {
        if (aborted_) throw Error("NCCL: the tensor-parallel group was ended after an error on another rank");
        check(nccl().all_reduce(x, x, n, ncclFloat, ncclSum, comm_, stream_), "ncclAllReduce");
        (void)cudaGetLastError();
    }

private:
    // One all-reduce outside any capture, so that whatever NCCL still sets up
    // lazily is done before a decode step is captured.
    void warm_up() {
        float* d = nullptr;
        if (cudaMalloc(&d, 256 * sizeof(float)) != cudaSuccess) throw Error("NCCL warm-up: cudaMalloc failed");
        cudaMemsetAsync(d, 0, 256 * sizeof(float), stream_);
        const ncclResult_t r = nccl().all_reduce(d, d, 256, ncclFloat, ncclSum, comm_, stream_);
        const cudaError_t e = cudaStreamSynchronize(stream_);
        cudaFree(d);
        (void)cudaGetLastError();
        check(r, "ncclAllReduce (warm-up)");
        if (e != cudaSuccess) throw Error(std::string("NCCL warm-up: ") + cudaGetErrorString(e));
    }

    int rank_, n_;
    cudaStream_t stream_;
    ncclComm_t comm_ = nullptr;
    std::atomic<bool> aborted_{false};
};

}  // namespace

NcclId nccl_unique_id() {
    ncclUniqueId u;
    check(nccl().get_unique_id(&u), "ncclGetUniqueId");
    NcclId id;
    std::memcpy(id.data(), u.internal, id.size());
    return id;
}

std::unique_ptr<Communicator> nccl_communicator(const NcclId& id, int rank, int n, cudaStream_t stream) {
    return std::make_unique<NcclComm>(id, rank, n, stream);
}

}  // namespace tmc::cuda
