#include "backend/cpu/thread_pool.hpp"

#include <immintrin.h>

#include <chrono>

namespace tmc::cpu {

namespace {
constexpr auto kSpin = std::chrono::microseconds(500);
}

ThreadPool::ThreadPool(int n_threads) {
    for (int i = 1; i < n_threads; ++i) workers_.emplace_back([this, i] { worker(i); });
}

ThreadPool::~ThreadPool() {
    stop_.store(true);
    generation_.fetch_add(1);
    generation_.notify_all();
    for (auto& t : workers_) t.join();
}

void ThreadPool::work(int thread) {
    for (int i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < n_tasks_;) fn_(ctx_, i, thread);
}

void ThreadPool::run_impl(int n_tasks, Fn fn, void* ctx) {
    n_tasks_ = n_tasks;
    fn_ = fn;
    ctx_ = ctx;
    next_.store(0, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    generation_.fetch_add(1);  // seq_cst: pairs with the sleeping_ check
    if (sleeping_.load() > 0) generation_.notify_all();
    work(0);
    const int n = int(workers_.size());
    while (done_.load(std::memory_order_acquire) < n) _mm_pause();
}

void ThreadPool::worker(int index) {
    uint32_t seen = generation_.load();
    for (;;) {
        // Spin for a while, then sleep until the next job.
        auto start = std::chrono::steady_clock::now();
        uint32_t g;
        for (int i = 0;; ++i) {
            g = generation_.load(std::memory_order_acquire);
            if (g != seen) break;
            _mm_pause();
            if ((i & 255) == 255 && std::chrono::steady_clock::now() - start > kSpin) {
                sleeping_.fetch_add(1);
                g = generation_.load(std::memory_order_acquire);
                if (g == seen) generation_.wait(seen);
                sleeping_.fetch_sub(1);
                g = generation_.load(std::memory_order_acquire);
                if (g != seen) break;
                start = std::chrono::steady_clock::now();
            }
        }
        seen = g;
        if (stop_.load()) return;
        work(index);
        done_.fetch_add(1, std::memory_order_release);
    }
}

}  // namespace tmc::cpu
