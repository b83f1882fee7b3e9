#include "backend/comm.hpp"

#include <algorithm>
#include <chrono>
#include <string>
#include <thread>

#include "tm/error.hpp"

namespace tmc {

class LocalGroup::Rank final : public Communicator {
public:
    Rank(LocalGroup& g, int r) : g_(g), r_(r) {}
    int rank() const override { return r_; }
    int size() const override { return g_.n_; }

    // Each rank sums its slice of every rank's buffer (rank order) into rank
    // 0's buffer, then copies the whole result back: 3 barriers.
    void all_reduce_sum(float* x, size_t n) override {
        const int N = g_.n_;
        if (N == 1) return;
        g_.ptrs_[size_t(r_)] = x;
        g_.barrier_.arrive_and_wait();
        const size_t lo = n * size_t(r_) / size_t(N), hi = n * size_t(r_ + 1) / size_t(N);
        float* out = g_.ptrs_[0];
        for (size_t i = lo; i < hi; ++i) {
            float s = g_.ptrs_[0][i];
            for (int k = 1; k < N; ++k) s += g_.ptrs_[size_t(k)][i];
            out[i] = s;
        }
        g_.barrier_.arrive_and_wait();
        if (r_ != 0)
            for (size_t i = 0; i < n; ++i) x[i] = out[i];
        g_.barrier_.arrive_and_wait();  // rank 0's buffer is read until here
    }

    void abort() override { g_.abort(); }

private:
    LocalGroup& g_;
    int r_;
};

LocalGroup::LocalGroup(int n) : n_(n), barrier_(n), ptrs_(size_t(n), nullptr) {
    for (int r = 0; r < n; ++r) ranks_.push_back(std::make_unique<Rank>(*this, r));
}

LocalGroup::~LocalGroup() = default;

Communicator& LocalGroup::comm(int rank) { return *ranks_[size_t(rank)]; }

void LocalGroup::abort() { barrier_.abort(); }

void HostBarrier::abort() {
    aborted_.store(true);
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
}

// The last thread to arrive starts the next generation; the others spin a
// little (all-reduces come in quick succession), then sleep on it (or, with
// a timeout, nap until it changes).
void HostBarrier::arrive_and_wait() {
    auto dead = [] { throw Error("the tensor-parallel group was ended after an error on another rank"); };
    if (aborted_.load()) dead();
    const uint32_t g = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
        arrived_.store(0, std::memory_order_relaxed);
        generation_.fetch_add(1, std::memory_order_release);
        generation_.notify_all();
        return;
    }
    const auto t0 = std::chrono::steady_clock::now();
    auto nap = std::chrono::microseconds(5);
    for (int spin = 0; generation_.load(std::memory_order_acquire) == g; ++spin) {
        if (spin < 4000) continue;
        if (timeout_s_ <= 0) {
            generation_.wait(g, std::memory_order_acquire);
            continue;
        }
        std::this_thread::sleep_for(nap);
        nap = std::min(nap * 2, std::chrono::microseconds(500));
        if (std::chrono::steady_clock::now() - t0 > std::chrono::seconds(timeout_s_)) {
            abort();
            throw Error("a tensor-parallel rank did not arrive within " + std::to_string(timeout_s_) +
                        " s (TM_TP_TIMEOUT sets the limit)");
        }
    }
    if (aborted_.load()) dead();
}

}  // namespace tmc
