// tm-serve's metrics: request counters and latency histograms kept by the
// I/O thread, written with the engine's gauges in Prometheus' text format
// (GET /metrics; formats/http-api.md lists them).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "tm/engine.hpp"

namespace tmc::srv {

struct Histogram {
    std::vector<double> bounds;
    std::vector<uint64_t> counts;
    double sum = 0;
    uint64_t n = 0;
    explicit Histogram(std::vector<double> b) : bounds(std::move(b)), counts(bounds.size(), 0) {}
    void observe(double v);
    void write(std::string& o, const std::string& name, const std::string& help) const;
};

struct Metrics {
    std::map<int, uint64_t> responses;  // by status
    uint64_t prompt_tokens = 0, generation_tokens = 0, cached_tokens = 0;
    Histogram ttft{{0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80}};
    Histogram itl{{0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5}};
    Histogram e2e{{0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300, 600}};

    // The Prometheus text: the engine's gauges and counters, then these.
    std::string text(const EngineStats& st) const;
};

}  // namespace tmc::srv
