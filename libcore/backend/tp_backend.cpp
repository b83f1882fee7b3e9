// Tensor parallelism: the workspace's tp ranks of one model in one process,
// each rank a backend (CPU, or CUDA on its own GPU) over its own
// weights/rank<R>/ files and its own share of the KV cache (its KV heads),
// summing its partial outputs through a Communicator. Every rank runs the
// same batch plan on its own thread (the thread that built it: a CUDA rank's
// device stays current there); the logits of the ranks are gathered by
// vocabulary slice.
#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

#include "backend/backend.hpp"
#include "backend/comm.hpp"
#include "base/row_math.hpp"
#include "backend/model_program.hpp"
#include "tm/error.hpp"
#include "tm/workspace.hpp"

namespace tmc {

std::vector<float> rank_kv_params(const std::vector<float>& all, const ModelProgram& program, int model_kv_heads,
                                  int rank) {
    const ModelConfig& m = program.config();
    const int nkv = model_kv_heads, hk = m.num_kv_heads, h0 = program.kv_head_begin(rank);
    std::vector<float> v(size_t(m.num_layers) * 4 * hk);
    for (int l = 0; l < m.num_layers; ++l)
        for (int row = 0; row < 4; ++row)
            for (int h = 0; h < hk; ++h) v[(size_t(l) * 4 + row) * hk + h] = all[(size_t(l) * 4 + row) * nkv + h0 + h];
    return v;
}

namespace {

class TpBackend final : public Backend {
public:
    TpBackend(const ModelConfig& full, int tp, bool vocab_split, RankFactory make, std::shared_ptr<void> keep)
        : cfg_(full), keep_(std::move(keep)), ranks_(size_t(tp)), outs_(size_t(tp), nullptr) {
        vocab_split_ = vocab_split;  // each rank a slice of the logits
        for (int r = 0; r < tp; ++r) workers_.emplace_back([this, r] { worker(r); });
        // Built on the ranks' threads, together (NCCL ranks wait for each other).
        try {
            run_all([&](int r) { ranks_[size_t(r)] = make(r); });
        } catch (...) {
            stop_workers();  // a rank that failed to build: no thread left behind
            throw;
        }
    }

    ~TpBackend() override {
        // Each rank is taken down on its own thread, the ranks together:
        // its device is current there, and NCCL's communicator destruction
        // (or abort, after an error) waits for the peers'.
        try {
            run_all([&](int r) { ranks_[size_t(r)].reset(); });
        } catch (...) {
        }
        stop_workers();
    }

    std::string name() const override {
        return ranks_[0]->name() + " x " + std::to_string(ranks_.size()) + " tensor-parallel ranks";
    }
    const ModelConfig& config() const override { return cfg_; }
    size_t kv_bytes_per_token() const override {
        size_t b = 0;
        for (auto& r : ranks_) b += r->kv_bytes_per_token();
        return b;
    }
    size_t default_kv_bytes(double f, int t) const override {
        // Each rank asks about its own device, on its own thread (where that
        // device is current); every rank holds the same share of the pool, so
        // the rank with the least free memory sets it.
        std::vector<size_t> b(ranks_.size());
        const_cast<TpBackend*>(this)->run_all([&](int r) { b[size_t(r)] = ranks_[size_t(r)]->default_kv_bytes(f, t); });
        return *std::min_element(b.begin(), b.end()) * ranks_.size();
    }

    void init(const BackendLimits& limits) override {
        run_all([&](int r) { ranks_[size_t(r)]->init(limits); });
        logits_.resize(size_t(limits.max_logit_rows) * size_t(cfg_.vocab_size));
    }

    float* forward(const BatchPlan& plan) override {
        // Rank r holds columns [r V/tp, (r+1) V/tp) of every logit row when
        // the vocabulary is split: each rank's thread copies its slice into
        // the gathered rows as soon as its forward pass is done.
        const size_t L = plan.logit_rows.size(), V = size_t(cfg_.vocab_size), Vr = V / ranks_.size();
        run_all([&](int r) {
            float* o = outs_[size_t(r)] = ranks_[size_t(r)]->forward(plan);
            if (o && vocab_split_)
                for (size_t i = 0; i < L; ++i)
                    std::copy(o + i * Vr, o + (i + 1) * Vr, logits_.data() + i * V + size_t(r) * Vr);
        });
        last0_ = outs_[0];
        if (!outs_[0]) {
            // Greedy ids. Ranks holding vocabulary slices each found their
            // slice's best: the row's token is the best of those (the lowest
            // rank on ties, i.e. the lowest id, as one rank would pick).
            if (!vocab_split_) return nullptr;
            ids_.resize(L);
            for (size_t i = 0; i < L; ++i) {
                size_t best = 0;
                float bv = ranks_[0]->greedy_values()[i];
                for (size_t r = 1; r < ranks_.size(); ++r) {
                    const float v = ranks_[r]->greedy_values()[i];
                    if (v > bv) bv = v, best = r;
                }
                ids_[i] = int(best * Vr) + ranks_[best]->greedy_ids()[i];
            }
            return nullptr;
        }
        return vocab_split_ ? logits_.data() : outs_[0];
    }

    const int* greedy_ids() override { return vocab_split_ ? ids_.data() : ranks_[0]->greedy_ids(); }

    void token_logprobs(const int* logit_index, const int* targets, int n, float* out) override {
        const size_t V = size_t(cfg_.vocab_size);
        const float* logits = vocab_split_ ? logits_.data() : last0_;
        const RowMath& k = row_math();
        for (int i = 0; i < n; ++i) {
            const float* lg = logits + size_t(logit_index[i]) * V;
            out[i] = lg[targets[i]] - k.logsumexp(lg, int(V));
        }
    }

private:
    void stop_workers() {
        {
            std::lock_guard<std::mutex> lk(mu_);
            stop_ = true;
        }
        cv_.notify_all();
        for (auto& t : workers_)
            if (t.joinable()) t.join();
    }

    // Runs task(rank) on every rank's thread and waits; rethrows the first error.
    void run_all(const std::function<void(int)>& task) {
        {
            std::lock_guard<std::mutex> lk(mu_);
            task_ = &task;
            pending_ = int(workers_.size());
            error_ = nullptr;
            ++gen_;
        }
        cv_.notify_all();
        std::unique_lock<std::mutex> lk(mu_);
        done_cv_.wait(lk, [&] { return pending_ == 0; });
        if (error_) std::rethrow_exception(error_);
    }

    void worker(int r) {
        uint64_t seen = 0;
        for (;;) {
            const std::function<void(int)>* task;
            {
                std::unique_lock<std::mutex> lk(mu_);
                cv_.wait(lk, [&] { return stop_ || gen_ != seen; });
                if (stop_) return;
                seen = gen_;
                task = task_;
            }
            std::exception_ptr err;
            try {
                (*task)(r);
            } catch (...) {
                err = std::current_exception();
            }
            // A rank that failed would leave the others waiting in a
            // collective for ever: end the group so they return too.
            if (err && trace_) {
                try {
                    std::rethrow_exception(err);
                } catch (const std::exception& e) {
                    std::fprintf(stderr, "[rank %d] failed: %s\n", r, e.what());
                } catch (...) {
                    std::fprintf(stderr, "[rank %d] failed\n", r);
                }
            }
            if (err)
                for (auto& b : ranks_)
                    if (b) b->abort_collectives();
            std::lock_guard<std::mutex> lk(mu_);
            if (err && !error_) error_ = err;
            if (--pending_ == 0) done_cv_.notify_all();
        }
    }

    ModelConfig cfg_;
    const bool trace_ = [] {
        const char* t = std::getenv("TM_TP_TRACE");
        return t && std::string(t) == "1";
    }();  // TM_TP_TRACE=1: a failing rank's error on standard error as it happens
    std::shared_ptr<void> keep_;  // what the ranks share (a LocalGroup)
    bool vocab_split_ = false;
    std::vector<std::unique_ptr<Backend>> ranks_;
    std::vector<float*> outs_;
    std::vector<std::thread> workers_;
    std::mutex mu_;
    std::condition_variable cv_, done_cv_;
    const std::function<void(int)>* task_ = nullptr;
    uint64_t gen_ = 0;
    int pending_ = 0;
    bool stop_ = false;
    std::exception_ptr error_;
    std::vector<float> logits_;
    std::vector<int> ids_;  // greedy ids gathered from vocabulary slices
    float* last0_ = nullptr;
};

}  // namespace

std::unique_ptr<Backend> make_tp_backend(const ModelConfig& full, int tp, bool vocab_split, RankFactory make,
                                         std::shared_ptr<void> keep) {
    if (tp > 64) throw Error("more than 64 tensor-parallel ranks");
    return std::make_unique<TpBackend>(full, tp, vocab_split, std::move(make), std::move(keep));
}

std::unique_ptr<Backend> make_cpu_tp_backend(const Workspace& ws, const CpuBackendOptions& opt) {
    const int tp = ws.tp();
    if (tp == 1) return make_cpu_backend(ws, opt);
    auto group = std::make_shared<LocalGroup>(tp);
    const int cores = opt.threads > 0 ? opt.threads : std::max(1, int(std::thread::hardware_concurrency()));
    const Workspace* w = &ws;
    if (!opt.program) throw Error("cpu backend: no model program");
    const bool vocab_split = opt.program->output_rows() != ws.model().vocab_size;
    return make_tp_backend(ws.model(), tp, vocab_split, [=](int r) {
        CpuBackendOptions o = opt;
        o.threads = std::max(1, cores / tp);
        o.comm = &group->comm(r);
        o.observer = opt.observer ? opt.observer->for_rank(r, tp) : nullptr;
        if (!opt.kv_params.empty())
            o.kv_params = rank_kv_params(opt.kv_params, *opt.program, w->model().num_kv_heads, r);
        return make_cpu_backend(*w, o);
    }, group);
}

}  // namespace tmc
