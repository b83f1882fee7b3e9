// TM_CUDA_PROFILE=1: where a step's GPU time goes. CUDA events between the
// parts of the forward pass (embedding, norms, GEMMs, RoPE + cache write,
// attention, all-reduce, activation, logits), summed by kind of step (decode:
// one row per sequence; mixed: with prompt chunks) and rows (rounded up to a
// power of two), and printed on standard error as milliseconds per step when
// the backend is destroyed. Decode steps are not captured as graphs then
// (events are not timed inside graphs), so each part also carries its
// launch gaps.
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <cstdio>
#include <map>
#include <utility>
#include <vector>

namespace tmc::cuda {

class StepProfile {
public:
    enum Part { kEmbed, kNorm, kGemm, kRope, kAttention, kAllReduce, kActivation, kLogits, kParts };

    bool on() const { return on_; }
    void enable(int marks_per_step) {
        on_ = true;
        ev_.resize(size_t(marks_per_step) + 1);
        part_.resize(ev_.size());
        for (auto& e : ev_) cudaEventCreate(&e);
    }
    ~StepProfile() {
        if (!on_) return;
        report();
        for (auto e : ev_) cudaEventDestroy(e);
    }
    // The start of a step's kernels on `s`.
    void begin(cudaStream_t s) {
        if (!on_) return;
        s_ = s;
        n_ = 0;
        cudaEventRecord(ev_[0], s_);
    }
    // The kernels since the previous mark were part `p`.
    void mark(Part p) {
        if (!on_ || n_ + 1 >= int(ev_.size())) return;
        ++n_;
        part_[size_t(n_)] = p;
        cudaEventRecord(ev_[size_t(n_)], s_);
    }
    // After the step's stream has been waited for.
    void end(bool decode, int rows) {
        if (!on_ || n_ == 0) return;
        int b = 1;
        while (b < rows) b *= 2;
        auto& row = sum_[{decode ? 0 : 1, b}];
        for (int i = 1; i <= n_; ++i) {
            float ms = 0;
            cudaEventElapsedTime(&ms, ev_[size_t(i - 1)], ev_[size_t(i)]);
            row.ms[size_t(part_[size_t(i)])] += ms;
        }
        row.steps += 1;
        row.rows += rows;
        n_ = 0;
    }

private:
    struct Row {
        std::array<double, kParts> ms{};
        long steps = 0;
        double rows = 0;
    };
    void report() const {
        if (sum_.empty()) return;
        static const char* names[kParts] = {"embed", "norm", "gemm", "rope", "attn", "allred", "act", "logits"};
        std::fprintf(stderr, "tm cuda profile (TM_CUDA_PROFILE=1, graphs off): ms per step\nkind   rows<=  steps   rows");
        for (auto* n : names) std::fprintf(stderr, " %7s", n);
        std::fprintf(stderr, "   total  gemm%%  attn%%\n");
        for (const auto& [key, r] : sum_) {
            double total = 0;
            for (double v : r.ms) total += v;
            std::fprintf(stderr, "%-6s %6d %6ld %6.1f", key.first == 0 ? "decode" : "mixed", key.second, r.steps,
                         r.rows / double(r.steps));
            for (double v : r.ms) std::fprintf(stderr, " %7.3f", v / double(r.steps));
            std::fprintf(stderr, " %7.3f %5.1f%% %5.1f%%\n", total / double(r.steps), 100 * r.ms[kGemm] / total,
                         100 * r.ms[kAttention] / total);
        }
    }

    bool on_ = false;
    cudaStream_t s_ = nullptr;
    std::vector<cudaEvent_t> ev_;
    std::vector<Part> part_;
    int n_ = 0;
    std::map<std::pair<int, int>, Row> sum_;
};

}  // namespace tmc::cuda
