// The GEMM tuner's picks, kept between runs (formats/gemm-tune.md), so that a
// model's second start uses the algorithms of its first: the same outputs run
// after run, and no tuning time.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace tmc {

// One weight shape on one device and cuBLASLt version, and its picks: for
// each rung (rows), the index of the cuBLASLt heuristic to use, -1 for
// cublasGemmEx's default.
struct GemmTuneEntry {
    std::string device;  // cudaDeviceProp::name
    int cublaslt = 0;    // cublasLtGetVersion()
    std::string ab;      // weights and activations: "bf16" or "f16"
    std::string y;       // output: "f32", "bf16" or "f16"
    int n = 0, k = 0, ldy = 0;
    float beta = 0;
    std::vector<std::pair<int, int>> picks;  // (rows, heuristic), rows ascending
    bool same_shape(const GemmTuneEntry& o) const {
        return device == o.device && cublaslt == o.cublaslt && ab == o.ab && y == o.y && n == o.n && k == o.k &&
               ldy == o.ldy && beta == o.beta;
    }
};

// The file: $TM_CACHE_DIR/gemm-tune.jsonl, else $XDG_CACHE_HOME/tm/..., else
// $HOME/.cache/tm/...; empty when none of them is set.
std::string gemm_tune_cache_path();

// The entries of the file (none if it is missing); lines that do not parse
// or do not follow the format are skipped.
std::vector<GemmTuneEntry> read_gemm_tune_cache(const std::string& path);

// Adds `entries` to the file (replacing those of the same shape), under an
// exclusive lock, by writing a temporary file and renaming it over the old
// one; creates the directory. Returns false (and leaves the file as it was)
// when it cannot.
bool write_gemm_tune_cache(const std::string& path, const std::vector<GemmTuneEntry>& entries);

}  // namespace tmc
