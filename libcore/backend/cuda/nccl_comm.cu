#include "backend/cuda/nccl_comm.hpp"

#include <nccl.h>

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
    ncclResult_t (*all_reduce)(const void*, void*, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t);
    const char* (*error_string)(ncclResult_t);
};

const Nccl& nccl() {
    static Nccl n = [] {
        setenv("NCCL_NVLS_ENABLE", "0", 0);  // the device machines need multicast off
        const DynLib lib("NCCL", {"libnccl.so.2", "libnccl.so", "/usr/local/cuda/lib/libnccl.so.2",
                                  "/usr/local/cuda/lib64/libnccl.so.2"});
        Nccl t;
        lib.get(t.get_unique_id, "ncclGetUniqueId");
        lib.get(t.comm_init_rank, "ncclCommInitRank");
        lib.get(t.comm_destroy, "ncclCommDestroy");
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
    }
    ~NcclComm() override {
        if (comm_) nccl().comm_destroy(comm_);
    }
    int rank() const override { return rank_; }
    int size() const override { return n_; }
    void all_reduce_sum(float* x, size_t n) override {
        check(nccl().all_reduce(x, x, n, ncclFloat, ncclSum, comm_, stream_), "ncclAllReduce");
    }

private:
    int rank_, n_;
    cudaStream_t stream_;
    ncclComm_t comm_ = nullptr;
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
