#include "engine/sampler.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "base/row_math.hpp"

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
        return row_math().argmax(logits, vocab_);
    }
    const float inv_t = 1.0f / p.temperature;
    const RowMath& k = row_math();
    const float mx = logits[k.argmax(logits, vocab_)];
    // Unnormalized probabilities exp((l - max) / t) in (0, 1], in place (vectorized).
    const float* pr = logits;
    const double all = k.exp_sum_scaled(logits, vocab_, mx, inv_t);
    const bool filtered = (p.top_k > 0 && p.top_k < vocab_) || p.top_p < 1.0f || p.min_p > 0.0f;
    if (!filtered) {
        // Every token, in vocabulary order: the block of 1024 tokens where
        // the draw lands, then the token in it.
        constexpr int kBlock = 1024;
        blocks_.assign(size_t((vocab_ + kBlock - 1) / kBlock), 0.0);
        double total = 0;
        for (size_t b = 0; b < blocks_.size(); ++b) {
            const int lo = int(b) * kBlock, hi = std::min(vocab_, lo + kBlock);
            float acc[8] = {};
            int i = lo;
            for (; i + 8 <= hi; i += 8)
                for (int j = 0; j < 8; ++j) acc[j] += pr[i + j];
            double s = 0;
            for (; i < hi; ++i) s += pr[i];
            for (float a : acc) s += a;
            blocks_[b] = s;
            total += s;
        }
        double u = rng.uniform() * total;
        size_t b = 0;
        while (b + 1 < blocks_.size() && u >= blocks_[b]) u -= blocks_[b++];
        const int lo = int(b) * kBlock, hi = std::min(vocab_, lo + kBlock);
        int last = lo;
        for (int i = lo; i < hi; ++i) {
            if (!(pr[i] > 0)) continue;
            last = i;
            u -= pr[i];
            if (u < 0) return i;
        }
        return last;
    }
    // The filters keep a prefix of the tokens ordered by probability (then
    // id). Only the tokens that can be in it are sorted: a histogram of the
    // probabilities' binary exponents finds the lowest exponent the prefix
    // can reach (the k most probable; or the mass top_p needs, the mass below
    // each exponent counted at the top of its range so what is above is never
    // overestimated; or min_p of the most probable), whichever filter comes
    // first. Four interleaved counters keep consecutive tokens from waiting
    // on one another.
    // Biased exponents: 127 for 1.0, 0 for 0 (p is in [0, 1]).
    auto expo = [&](int i) {
        uint32_t bits;
        std::memcpy(&bits, pr + i, 4);
        return bits >> 23;
    };
    uint32_t hcount[4][256] = {};
    int i4 = 0;
    for (; i4 + 4 <= vocab_; i4 += 4) {
        ++hcount[0][expo(i4)];
        ++hcount[1][expo(i4 + 1)];
        ++hcount[2][expo(i4 + 2)];
        ++hcount[3][expo(i4 + 3)];
    }
    for (; i4 < vocab_; ++i4) ++hcount[0][expo(i4)];
    long count[256];
    for (int b = 0; b < 256; ++b) count[b] = long(hcount[0][b]) + hcount[1][b] + hcount[2][b] + hcount[3][b];
    count[0] = 0;  // zeros and denormals are never candidates
    int floor_b = 1;
    if (p.top_k > 0 && p.top_k < vocab_) {
        long cnt = 0;
        for (int b = 255; b >= 1; --b)
            if ((cnt += count[b]) >= p.top_k) {
                floor_b = b;
                break;
            }
    } else if (p.top_p < 1.0f) {
        // The highest b with all - (most the tokens below b can hold) >= need.
        const double need = double(p.top_p) * all;
        double below = 0;
        for (int b = 1; b <= 255; ++b) {
            if (all - below < need) break;
            floor_b = b;
            below += double(count[b]) * std::ldexp(1.0, b - 126);
        }
    } else {
        // min_p alone: probabilities >= min_p (the most probable is 1).
        float f = p.min_p;
        uint32_t fb;
        std::memcpy(&fb, &f, 4);
        floor_b = std::max(1, int(fb >> 23) - 1);
    }
    auto collect = [&](int lowest) {
        cand_.clear();
        for (int i = 0; i < vocab_; ++i)
            if (int(expo(i)) >= lowest) cand_.emplace_back(pr[i], i);
    };
    collect(floor_b);
    if (!(p.top_k > 0 && p.top_k < vocab_) && p.top_p < 1.0f && floor_b > 0) {
        // Rounding aside the candidates hold the mass top_p needs; make sure.
        double m = 0;
        for (auto& c : cand_) m += c.first;
        if (m < double(p.top_p) * all) collect(1);
    }
    std::sort(cand_.begin(), cand_.end(), [](const std::pair<float, int>& a, const std::pair<float, int>& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
    size_t n = cand_.size();
    if (p.top_k > 0 && size_t(p.top_k) < n) n = size_t(p.top_k);
    double total = 0;
    if (p.top_k > 0 && p.top_k < vocab_) {
        for (size_t i = 0; i < n; ++i) total += cand_[i].first;
    } else {
        total = all;
    }
    // top_p: the smallest prefix whose mass reaches top_p (at least one).
    if (p.top_p < 1.0f) {
        double m = 0;
        size_t keep = 0;
        while (keep < n) {
            m += cand_[keep].first;
            ++keep;
            if (m >= double(p.top_p) * total) break;
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
    double u = rng.uniform() * total;
    for (size_t i = 0; i < n; ++i) {
        u -= cand_[i].first;
        if (u < 0) return cand_[i].second;
    }
    return cand_[n - 1].second;
}

}  // namespace tmc
