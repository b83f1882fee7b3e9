#include "base/thread_pool.hpp"

#include <immintrin.h>

#include <chrono>

#include "tm/error.hpp"

namespace tmc {

namespace {
constexpr auto kSpin = std::chrono::microseconds(500);
constexpr uint64_t kMask = (uint64_t(1) << 20) - 1;
}  // namespace

ThreadPool::ThreadPool(int n_threads) {
    for (int i = 1; i < n_threads; ++i) workers_.emplace_back([this, i] { worker(i); });
}

ThreadPool::~ThreadPool() {
    stop_.store(true);
    ticket_.fetch_add(uint64_t(1) << (2 * kIdxBits));  // a new generation wakes everyone
    {
        std::lock_guard<std::mutex> lk(sleep_mu_);
        sleep_cv_.notify_all();
    }
    for (auto& t : workers_) t.join();
}

void ThreadPool::work(uint64_t gen, int thread) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    for (;;) {
        const uint64_t g = t >> (2 * kIdxBits), n = (t >> kIdxBits) & kMask, i = t & kMask;
        if (g != gen || i >= n) return;
        if (ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
            fn_(ctx_, int(i), thread);
            finished_.fetch_add(1, std::memory_order_release);
            t = ticket_.load(std::memory_order_acquire);
        }
    }
}

void ThreadPool::run_impl(int n_tasks, Fn fn, void* ctx) {
    if (uint64_t(n_tasks) > kMask) throw Error("thread pool: too many tasks in one job");
    fn_ = fn;
    ctx_ = ctx;
    finished_.store(0, std::memory_order_relaxed);
    gen_ = (gen_ + 1) & ((uint64_t(1) << 24) - 1);
    // seq_cst: pairs with the sleeping_ check of the workers.
    ticket_.store((gen_ << (2 * kIdxBits)) | (uint64_t(n_tasks) << kIdxBits));
    if (sleeping_.load() > 0) {
        std::lock_guard<std::mutex> lk(sleep_mu_);
        sleep_cv_.notify_all();
    }
    work(gen_, 0);
    // Only tasks already claimed by workers remain: wait for those.
    for (int i = 0; finished_.load(std::memory_order_acquire) < n_tasks; ++i) {
        if (i < 4096) _mm_pause();
        else std::this_thread::yield();
    }
}

void ThreadPool::worker(int index) {
    uint64_t seen = ticket_.load() >> (2 * kIdxBits);
    for (;;) {
        // Spin for a while, then sleep until the next job.
        auto start = std::chrono::steady_clock::now();
        uint64_t g;
        for (int i = 0;; ++i) {
            g = ticket_.load(std::memory_order_acquire) >> (2 * kIdxBits);
            if (g != seen) break;
            _mm_pause();
            if ((i & 255) == 255 && std::chrono::steady_clock::now() - start > kSpin) {
                // The waker publishes the ticket and then reads sleeping_; we
                // raise sleeping_ and then read the ticket (both seq_cst).
                std::unique_lock<std::mutex> lk(sleep_mu_);
                sleeping_.fetch_add(1);
                sleep_cv_.wait(lk, [&] { return (ticket_.load() >> (2 * kIdxBits)) != seen; });
                sleeping_.fetch_sub(1);
                lk.unlock();
                start = std::chrono::steady_clock::now();
            }
        }
        seen = g;
        if (stop_.load()) return;
        work(g, index);
    }
}

}  // namespace tmc
