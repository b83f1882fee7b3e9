#include "backend/cuda/nccl_comm.hpp"

#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "base/dynlib.hpp"
#include "kernels/kernels.cuh"
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

constexpr size_t kP2pCapacity = size_t(256) << 10;  // floats: 64 rows of 4096

}  // namespace

struct PeerGroup {
    explicit PeerGroup(int n) : meet(n, 120), data(size_t(n)), flags(size_t(n)), dev(size_t(n)), ok(size_t(n)) {}
    HostBarrier meet;
    std::vector<float*> data;
    std::vector<uint32_t*> flags;
    std::vector<int> dev;
    std::vector<char> ok;
};

std::shared_ptr<PeerGroup> make_peer_group(int n) { return std::make_shared<PeerGroup>(n); }

namespace {

void check(ncclResult_t r, const char* what) {
    if (r != ncclSuccess) throw Error(std::string("NCCL ") + what + ": " + nccl().error_string(r));
}

class NcclComm final : public CudaCommunicator {
public:
    NcclComm(const NcclId& id, int rank, int n, cudaStream_t s, std::shared_ptr<PeerGroup> peers)
        : rank_(rank), n_(n), stream_(s) {
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
            if (peers && n > 1 && n <= kP2pMaxRanks) join(*peers);
        } catch (...) {
            nccl().comm_abort(comm_);
            release_p2p();
            throw;
        }
    }
    ~NcclComm() override {
        if (!aborted_.exchange(true)) nccl().comm_destroy(comm_);
        release_p2p();
    }
    void abort() override {
        if (h_abort_) *h_abort_ = 1;  // the peer-memory kernel's waits end
        if (!aborted_.exchange(true)) nccl().comm_abort(comm_);
    }
    int rank() const override { return rank_; }
    int size() const override { return n_; }
    void all_reduce_sum(float* x, size_t n) override {
        if (aborted_) throw Error("NCCL: the tensor-parallel group was ended after an error on another rank");
        if (p2p_ && cuda::p2p_all_reduce(x, n, peers_, rank_, n_, kP2pCapacity, stream_)) {
            const cudaError_t e = cudaGetLastError();
            if (e != cudaSuccess) throw Error(std::string("CUDA: peer all-reduce: ") + cudaGetErrorString(e));
            return;
        }
        check(nccl().all_reduce(x, x, n, ncclFloat, ncclSum, comm_, stream_), "ncclAllReduce");
        (void)cudaGetLastError();
    }
    bool all_reduce_sum_rmsnorm(float* x, int rows, int H, const void* w, float eps, void* out, int dt) override {
        if (aborted_) throw Error("NCCL: the tensor-parallel group was ended after an error on another rank");
        if (!p2p_ || !cuda::p2p_all_reduce_rmsnorm(Dt(dt), x, rows, H, w, eps, out, peers_, rank_, n_,
                                                   kP2pCapacity, stream_))
            return false;
        const cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) throw Error(std::string("CUDA: peer all-reduce: ") + cudaGetErrorString(e));
        return true;
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

    // Every rank's thread together: each publishes its device, buffer and
    // flags; peer access is enabled towards every other GPU; the peer path
    // is used only if every rank managed all of it (the ranks agree).
    void join(PeerGroup& g) {
        int dev = 0;
        bool ok = cudaGetDevice(&dev) == cudaSuccess;
        g.dev[size_t(rank_)] = dev;
        g.meet.arrive_and_wait();
        for (int p = 0; p < n_ && ok; ++p) {
            if (p == rank_) continue;
            int can = 0;
            ok = cudaDeviceCanAccessPeer(&can, dev, g.dev[size_t(p)]) == cudaSuccess && can;
            if (!ok) break;
            const cudaError_t e = cudaDeviceEnablePeerAccess(g.dev[size_t(p)], 0);
            ok = e == cudaSuccess || e == cudaErrorPeerAccessAlreadyEnabled;
        }
        const size_t fw = cuda::p2p_flag_words();
        const size_t bytes = cuda::p2p_buffer_floats(n_, kP2pCapacity) * sizeof(float);
        ok = ok && cudaMalloc(&data_, bytes) == cudaSuccess && cudaMemset(data_, 0xFF, bytes) == cudaSuccess &&
             cudaMalloc(&flags_, fw * sizeof(uint32_t)) == cudaSuccess &&
             cudaMemset(flags_, 0, fw * sizeof(uint32_t)) == cudaSuccess &&
             cudaHostAlloc(reinterpret_cast<void**>(&h_abort_), sizeof(uint32_t), cudaHostAllocMapped) == cudaSuccess;
        if (ok) *h_abort_ = 0;
        void* d_abort = nullptr;
        ok = ok && cudaHostGetDevicePointer(&d_abort, h_abort_, 0) == cudaSuccess &&
             cudaDeviceSynchronize() == cudaSuccess;
        (void)cudaGetLastError();
        g.data[size_t(rank_)] = data_;
        g.flags[size_t(rank_)] = flags_;
        g.ok[size_t(rank_)] = ok;
        g.meet.arrive_and_wait();
        bool all = true;
        for (int p = 0; p < n_; ++p) all = all && g.ok[size_t(p)];
        if (all) {  // every step that can fail is behind: the ranks agree
            for (int p = 0; p < n_; ++p) peers_.data[p] = g.data[size_t(p)], peers_.flags[p] = g.flags[size_t(p)];
            peers_.abort = static_cast<const uint32_t*>(d_abort);
        }
        g.meet.arrive_and_wait();  // every rank read the table
        p2p_ = all;
        (void)cudaGetLastError();
    }
    void release_p2p() {
        if (data_) cudaFree(data_);
        if (flags_) cudaFree(flags_);
        if (h_abort_) cudaFreeHost(h_abort_);
        data_ = nullptr, flags_ = nullptr, h_abort_ = nullptr;
    }

    int rank_, n_;
    cudaStream_t stream_;
    ncclComm_t comm_ = nullptr;
    bool p2p_ = false;  // small messages through peer memory
    cuda::P2pPeers peers_{};
    float* data_ = nullptr;
    uint32_t* flags_ = nullptr;
    uint32_t* h_abort_ = nullptr;
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

std::unique_ptr<CudaCommunicator> nccl_communicator(const NcclId& id, int rank, int n, cudaStream_t stream,
                                                std::shared_ptr<PeerGroup> peers) {
    return std::make_unique<NcclComm>(id, rank, n, stream, std::move(peers));
}

}  // namespace tmc::cuda
