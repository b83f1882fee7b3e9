// The distribution a sampler must draw from, computed the plain way for the
// tests (the host sampler's, tests/unit, and the GPU kernel's, tests/gpu):
// probabilities exp((l - max) / t) sorted (most likely first, then by id),
// top-k, then top-p of the mass top-k kept, then min-p of the most likely.
#pragma once

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

namespace tmtest {

// want[i] = the probability of token i after the filters (0: filtered out).
inline std::vector<double> filtered_distribution(const std::vector<float>& logits, float t, int k, float top_p,
                                                 float min_p) {
    const size_t V = logits.size();
    std::vector<std::pair<double, int>> c;
    const float mx = *std::max_element(logits.begin(), logits.end());
    for (size_t i = 0; i < V; ++i) c.emplace_back(std::exp(double(logits[i] - mx) / t), int(i));
    std::sort(c.begin(), c.end(), [](auto& a, auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
    size_t n = k > 0 ? std::min(V, size_t(k)) : V;
    double tot = 0;
    for (size_t i = 0; i < n; ++i) tot += c[i].first;
    if (top_p < 1) {
        double m = 0;
        size_t keep = 0;
        while (keep < n) {
            m += c[keep].first;
            ++keep;
            if (m >= top_p * tot) break;
        }
        n = keep;
    }
    if (min_p > 0) {
        size_t keep = 1;
        while (keep < n && c[keep].first >= min_p * c[0].first) ++keep;
        n = keep;
    }
    std::vector<double> want(V, 0.0);
    tot = 0;
    for (size_t i = 0; i < n; ++i) tot += c[i].first;
    for (size_t i = 0; i < n; ++i) want[size_t(c[i].second)] = c[i].first / tot;
    return want;
}

}  // namespace tmtest
