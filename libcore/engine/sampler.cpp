#include "engine/sampler.hpp"

#include <algorithm>
#include <cmath>

#include "backend/cpu/kernels.hpp"

namespace tmc {

namespace {
uint64_t splitmix64(uint64_t& x) {
    uint64_t z = (x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
}  // namespace

Rng::Rng(uint64_t seed) {
    for (auto& s : s_) s = splitmix64(seed);
}

uint64_t Rng::next() {
    const uint64_t result = rotl(s_[1] * 5, 7) * 9;
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
}

double Rng::uniform() { return double(next() >> 11) * 0x1.0p-53; }

Sampler::Sampler(int vocab_size) : vocab_(vocab_size), stamp_(size_t(vocab_size), 0), count_(size_t(vocab_size), 0) {}

void Sampler::apply_penalties(float* logits, const SamplingParams& p, std::span<const int> prompt,
                              std::span<const int> output) {
    if (p.repetition_penalty != 1.0f) {
        // Hugging Face's rule: divide positive logits, multiply negative ones,
        // once per distinct token of the prompt and the output.
        ++call_;
        auto pen = [&](int t) {
            if (t < 0 || t >= vocab_ || stamp_[size_t(t)] == call_) return;
            stamp_[size_t(t)] = call_;
            float& l = logits[t];
            l = l > 0 ? l / p.repetition_penalty : l * p.repetition_penalty;
        };
        for (int t : prompt) pen(t);
        for (int t : output) pen(t);
    }
    if (p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f) {
        for (int t : output)
            if (t >= 0 && t < vocab_) ++count_[size_t(t)];
        for (int t : output) {
            if (t < 0 || t >= vocab_ || count_[size_t(t)] == 0) continue;
            logits[t] -= p.presence_penalty + p.frequency_penalty * float(count_[size_t(t)]);
            count_[size_t(t)] = 0;  // each distinct token once
        }
    }
}

int Sampler::sample(float* logits, const SamplingParams& p, std::span<const int> prompt,
                    std::span<const int> output, Rng& rng) {
    apply_penalties(logits, p, prompt, output);
    if (p.temperature <= 0.0f || p.top_k == 1) {
        // Greedy: the first of equal maxima, as torch.argmax.
        return cpu::cpu_kernels().argmax(logits, vocab_);
    }
    const float inv_t = 1.0f / p.temperature;
    const float mx = *std::max_element(logits, logits + vocab_);
    // Candidates with their unnormalized probabilities.
    cand_.clear();
    for (int i = 0; i < vocab_; ++i) {
        float e = std::exp((logits[i] - mx) * inv_t);
        if (e > 0) cand_.emplace_back(e, i);
    }
    auto by_prob = [](const std::pair<float, int>& a, const std::pair<float, int>& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    size_t n = cand_.size();
    if (p.top_k > 0 && size_t(p.top_k) < n) {
        std::nth_element(cand_.begin(), cand_.begin() + p.top_k, cand_.end(), by_prob);
        n = size_t(p.top_k);
        cand_.resize(n);
    }
    double total = 0;
    for (size_t i = 0; i < n; ++i) total += cand_[i].first;
    const bool need_order = p.top_p < 1.0f || p.min_p > 0.0f;
    if (need_order) {
        // Sort only as many of the most probable candidates as top_p needs:
        // the top 64, then 4x more, until their mass reaches top_p.
        size_t k = std::min<size_t>(n, 64);
        for (;;) {
            std::partial_sort(cand_.begin(), cand_.begin() + long(k), cand_.begin() + long(n), by_prob);
            double mass = 0;
            for (size_t i = 0; i < k; ++i) mass += cand_[i].first;
            if (k == n || mass >= double(p.top_p) * total) break;
            k = std::min(n, k * 4);
        }
        // top_p: the smallest prefix whose mass reaches top_p (at least one).
        if (p.top_p < 1.0f) {
            double mass = 0;
            size_t keep = 0;
            while (keep < n) {
                mass += cand_[keep].first;
                ++keep;
                if (mass >= double(p.top_p) * total) break;
            }
            n = keep;
        }
        // min_p: drop candidates below min_p times the most probable.
        if (p.min_p > 0.0f) {
            const float floor_p = p.min_p * cand_[0].first;
            size_t keep = 1;
            while (keep < n && cand_[keep].first >= floor_p) ++keep;
            n = keep;
        }
        total = 0;
        for (size_t i = 0; i < n; ++i) total += cand_[i].first;
    }
    double u = rng.uniform() * total;
    for (size_t i = 0; i < n; ++i) {
        u -= cand_[i].first;
        if (u < 0) return cand_[i].second;
    }
    return cand_[n - 1].second;
}

}  // namespace tmc
