// Tensor parallelism on the CPU: the workspace's tp ranks as threads of one
// process. Each rank is a CpuBackend over its own weights/rank<R>/ files and
// its own share of the KV cache (its KV heads); all run the same batch plan
// and sum their partial outputs through a LocalGroup. Rank 0 runs on the
// caller's thread, the others on threads that wait for each step.
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>

#include "backend/backend.hpp"
#include "backend/comm.hpp"
#include "backend/cpu/kernels.hpp"
#include "model/tp_split.hpp"
#include "tm/error.hpp"
#include "tm/workspace.hpp"

namespace tmc {

namespace {

class CpuTpBackend final : public Backend {
public:
    CpuTpBackend(const Workspace& ws, const CpuBackendOptions& opt) : cfg_(ws.model()), group_(ws.tp()) {
        const int tp = ws.tp();
        const TpSplit sp = TpSplit::make(cfg_, tp);
        vocab_split_ = sp.vocab_split && !cfg_.tie_word_embeddings;
        const int cores = opt.threads > 0 ? opt.threads : std::max(1, int(std::thread::hardware_concurrency()));
        for (int r = 0; r < tp; ++r) {
            CpuBackendOptions o = opt;
            o.threads = std::max(1, cores / tp);
            o.comm = &group_.comm(r);
            if (!opt.kv_params.empty()) o.kv_params = rank_params(opt.kv_params, sp, r);
            ranks_.push_back(make_cpu_backend(ws, o));
        }
        for (int r = 1; r < tp; ++r) workers_.emplace_back([this, r] { worker(r); });
    }

    ~CpuTpBackend() override {
        {
            std::lock_guard<std::mutex> lk(mu_);
            stop_ = true;
        }
        cv_.notify_all();
        for (auto& t : workers_) t.join();
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
    size_t default_kv_bytes(double f, int t) const override { return ranks_[0]->default_kv_bytes(f, t); }

    void init(const BackendLimits& limits) override {
        for (auto& r : ranks_) r->init(limits);
        logits_.resize(size_t(limits.max_logit_rows) * size_t(cfg_.vocab_size));
    }

    float* forward(const BatchPlan& plan) override {
        {
            std::lock_guard<std::mutex> lk(mu_);
            plan_ = &plan;
            pending_ = int(workers_.size());
            error_ = nullptr;
            ++step_;
        }
        cv_.notify_all();
        std::exception_ptr mine;
        float* l0 = nullptr;
        try {
            l0 = ranks_[0]->forward(plan);
        } catch (...) {
            mine = std::current_exception();
        }
        std::unique_lock<std::mutex> lk(mu_);
        done_cv_.wait(lk, [&] { return pending_ == 0; });
        if (mine) std::rethrow_exception(mine);
        if (error_) std::rethrow_exception(error_);
        last0_ = l0;
        const size_t L = plan.logit_rows.size(), V = size_t(cfg_.vocab_size);
        if (!vocab_split_) return l0;  // every rank computed the whole vocabulary
        // Gather: rank r holds columns [r V/tp, (r+1) V/tp) of every logit row.
        const size_t n = ranks_.size(), Vr = V / n;
        for (size_t r = 0; r < n; ++r) {
            const float* src = r == 0 ? l0 : outs_[r];
            for (size_t i = 0; i < L; ++i)
                std::copy(src + i * Vr, src + (i + 1) * Vr, logits_.data() + i * V + r * Vr);
        }
        return logits_.data();
    }

    void token_logprobs(const int* logit_index, const int* targets, int n, float* out) override {
        const size_t V = size_t(cfg_.vocab_size);
        const float* logits = vocab_split_ ? logits_.data() : last0_;
        const auto& k = cpu::cpu_kernels();
        for (int i = 0; i < n; ++i) {
            const float* lg = logits + size_t(logit_index[i]) * V;
            out[i] = lg[targets[i]] - k.logsumexp(lg, int(V));
        }
    }

private:
    // The static KV scales of rank r's KV heads, [layers][4][its heads].
    std::vector<float> rank_params(const std::vector<float>& all, const TpSplit& sp, int r) const {
        const int nkv = cfg_.num_kv_heads, h0 = sp.kv_head_begin(r);
        std::vector<float> v(size_t(cfg_.num_layers) * 4 * sp.kv_heads);
        for (int l = 0; l < cfg_.num_layers; ++l)
            for (int row = 0; row < 4; ++row)
                for (int h = 0; h < sp.kv_heads; ++h)
                    v[(size_t(l) * 4 + row) * sp.kv_heads + h] = all[(size_t(l) * 4 + row) * nkv + h0 + h];
        return v;
    }

    void worker(int r) {
        uint64_t seen = 0;
        for (;;) {
            const BatchPlan* plan;
            {
                std::unique_lock<std::mutex> lk(mu_);
                cv_.wait(lk, [&] { return stop_ || step_ != seen; });
                if (stop_) return;
                seen = step_;
                plan = plan_;
            }
            std::exception_ptr err;
            float* out = nullptr;
            try {
                out = ranks_[size_t(r)]->forward(*plan);
            } catch (...) {
                err = std::current_exception();
            }
            std::lock_guard<std::mutex> lk(mu_);
            outs_[size_t(r)] = out;
            if (err && !error_) error_ = err;
            if (--pending_ == 0) done_cv_.notify_all();
        }
    }

    ModelConfig cfg_;
    LocalGroup group_;
    bool vocab_split_ = false;
    std::vector<std::unique_ptr<Backend>> ranks_;
    std::vector<std::thread> workers_;
    std::mutex mu_;
    std::condition_variable cv_, done_cv_;
    const BatchPlan* plan_ = nullptr;
    uint64_t step_ = 0;
    int pending_ = 0;
    bool stop_ = false;
    std::exception_ptr error_;
    std::vector<float*> outs_ = std::vector<float*>(64, nullptr);
    std::vector<float> logits_;
    float* last0_ = nullptr;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_tp_backend(const Workspace& ws, const CpuBackendOptions& opt) {
    if (ws.tp() == 1) return make_cpu_backend(ws, opt);
    if (ws.tp() > 64) throw Error(ws.dir() + ": more than 64 tensor-parallel ranks");
    return std::make_unique<CpuTpBackend>(ws, opt);
}

}  // namespace tmc
