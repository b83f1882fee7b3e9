// A small fork-join pool for the step loop: the calling thread and n-1
// workers split `n_tasks` tasks. Workers spin briefly between jobs (a decode
// step launches dozens of jobs a few microseconds apart) and then sleep, so
// an idle engine costs no CPU. run() allocates nothing.
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace tmc::cpu {

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
        run_impl(n_tasks, [](void* ctx, int task, int thread) { (*static_cast<F*>(ctx))(task, thread); }, &f);
    }

private:
    using Fn = void (*)(void*, int, int);
    void run_impl(int n_tasks, Fn fn, void* ctx);
    void worker(int index);
    void work(int thread);

    std::vector<std::thread> workers_;
    alignas(64) std::atomic<uint32_t> generation_{0};
    alignas(64) std::atomic<int> next_{0};
    alignas(64) std::atomic<int> done_{0};
    std::atomic<int> sleeping_{0};
    std::atomic<bool> stop_{false};
    int n_tasks_ = 0;
    Fn fn_ = nullptr;
    void* ctx_ = nullptr;
};

}  // namespace tmc::cpu
