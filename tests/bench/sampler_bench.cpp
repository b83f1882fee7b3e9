// Host sampling speed: microseconds per row of a Llama-3-sized vocabulary
// (128256 logits, normal with sd 3) for plain temperature, top-p, top-k, and
// top-p with a repetition penalty; next to the time of one pass that only
// reads the row (a lower bound on any sampler that looks at every logit).
// One JSON line per figure.
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "engine/sampler.hpp"

namespace {
using Clock = std::chrono::steady_clock;
}

int main() {
    const int V = 128256, reps = 200;
    std::mt19937 g(1);
    std::normal_distribution<float> d(0, 3);
    std::vector<float> base(V), row(V);
    for (auto& x : base) x = d(g);
    // The copy of the row each sample needs (sampling modifies it) is timed
    // alone and subtracted.
    auto t = Clock::now();
    float sink = 0;
    for (int i = 0; i < reps; ++i) {
        std::copy(base.begin(), base.end(), row.begin());
        sink += row[size_t(i)];
    }
    const double copy_us = std::chrono::duration<double, std::micro>(Clock::now() - t).count() / reps;
    t = Clock::now();
    for (int i = 0; i < reps; ++i) {
        float m = row[0];
        for (int k = 1; k < V; ++k) m = m > row[size_t(k)] ? m : row[size_t(k)];
        sink += m;
    }
    const double read_us = std::chrono::duration<double, std::micro>(Clock::now() - t).count() / reps;
    std::printf("{\"bench\": \"sampler_read_pass\", \"value\": %.1f, \"unit\": \"us/row\"}\n", read_us);
    tmc::Sampler s(V);
    tmc::Rng rng(1);
    const std::vector<int> prompt(500, 7), out(100, 9);
    struct Mode { const char* name; float top_p; int top_k; float rep; };
    for (Mode m : {Mode{"temperature", 1.0f, 0, 1.0f}, Mode{"top_p_0.9", 0.9f, 0, 1.0f}, Mode{"top_k_40", 1.0f, 40, 1.0f},
                   Mode{"top_p_0.9_repetition_1.1", 0.9f, 0, 1.1f}}) {
        tmc::SamplingParams p;
        p.temperature = 0.8f, p.top_p = m.top_p, p.top_k = m.top_k, p.repetition_penalty = m.rep;
        t = Clock::now();
        for (int i = 0; i < reps; ++i) {
            std::copy(base.begin(), base.end(), row.begin());
            sink += float(s.sample(row.data(), p, prompt, out, rng));
        }
        const double us = std::chrono::duration<double, std::micro>(Clock::now() - t).count() / reps - copy_us;
        std::printf("{\"bench\": \"sampler_%s\", \"value\": %.1f, \"unit\": \"us/row\", \"x_read_pass\": %.2f}\n", m.name, us,
                    us / read_us);
    }
    return sink == 12345.0f ? 1 : 0;
}
