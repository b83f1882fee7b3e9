// Tensor-parallel communication between the ranks of one model: the sum of
// every rank's partial output (after wo and w2). LocalGroup runs the ranks as
// threads of one process over shared memory (the CPU backend, and tests on
// any machine); the NCCL communicator (one GPU per rank) has the same shape.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace tmc {

class Communicator {
public:
    virtual ~Communicator() = default;
    virtual int rank() const = 0;
    virtual int size() const = 0;
    // x[0, n) = the sum over ranks of x[0, n), in rank order (every rank
    // gets the same bits). Every rank calls it with the same n.
    virtual void all_reduce_sum(float* x, size_t n) = 0;
    // Ends the group after an error on some rank: collectives pending on this
    // rank return instead of waiting for a rank that will never come (the
    // group is unusable afterwards). Callable from any thread.
    virtual void abort() {}
};

// A barrier of n threads (the ranks of one process), reusable: the last to
// arrive releases the others. The wait spins a little (ranks arrive within
// microseconds of each other), then sleeps (in short naps when there is a
// timeout, to notice it). abort() breaks it:
// every thread waiting (or arriving later) throws tmc::Error; so does one
// that waits longer than the timeout (0: none).
class HostBarrier {
public:
    explicit HostBarrier(int n, long timeout_s = 0) : n_(n), timeout_s_(timeout_s) {}
    void arrive_and_wait();
    void abort();

private:
    const int n_;
    const long timeout_s_;
    std::atomic<int> arrived_{0};
    std::atomic<uint32_t> generation_{0};
    std::atomic<bool> aborted_{false};
};

// N ranks as threads sharing memory. Each rank's thread uses comm(rank).
class LocalGroup {
public:
    explicit LocalGroup(int n);
    ~LocalGroup();
    int size() const { return n_; }
    Communicator& comm(int rank);
    // Every rank waiting in (or later entering) an all-reduce throws tmc::Error.
    void abort();

private:
    class Rank;
    friend class Rank;
    int n_;
    HostBarrier barrier_;
    std::vector<float*> ptrs_;
    std::vector<std::unique_ptr<Rank>> ranks_;
};

}  // namespace tmc
