// A small fork-join pool for the step loop: the calling thread and n-1
// workers split `n_tasks` tasks. Tasks are claimed from one atomic ticket
// that carries the job's generation, so the caller never waits for a worker
// that has not shown up: it runs the unclaimed tasks itself and waits only
// for tasks already taken. Workers spin briefly between jobs (a decode step
// launches dozens of jobs a few microseconds apart), then sleep, so an idle
// engine costs no CPU and an oversubscribed machine degrades gracefully.
// run() allocates nothing.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace tmc {

class ThreadPool {
public:
    explicit ThreadPool(int n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return int(workers_.size()) + 1; }

    // Calls f(task, thread) for task in [0, n_tasks); returns when all are done.
    template <class F>
    void run(int n_tasks, F&& f) {
        if (n_tasks <= 0) return;
        if (n_tasks == 1 || workers_.empty()) {
            for (int i = 0; i < n_tasks; ++i) f(i, 0);
            return;
        }
        using G = std::remove_reference_t<F>;
        run_impl(n_tasks, [](void* ctx, int task, int thread) { (*static_cast<G*>(ctx))(task, thread); }, &f);
    }

private:
    using Fn = void (*)(void*, int, int);
    void run_impl(int n_tasks, Fn fn, void* ctx);
    void worker(int index);
    // Claims and runs tasks of job `gen` until none is left.
    void work(uint64_t gen, int thread);

    // ticket: generation (24 bits) | task count (20 bits) | next task (20 bits).
    static constexpr int kIdxBits = 20;
    std::vector<std::thread> workers_;
    alignas(64) std::atomic<uint64_t> ticket_{0};
    alignas(64) std::atomic<int> finished_{0};
    std::atomic<int> sleeping_{0};
    std::atomic<bool> stop_{false};
    std::mutex sleep_mu_;
    std::condition_variable sleep_cv_;
    Fn fn_ = nullptr;
    void* ctx_ = nullptr;
    uint64_t gen_ = 0;
};

}  // namespace tmc
