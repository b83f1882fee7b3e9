// Calibration: run text through a model and record activation statistics
// (formats/calib-stats.md), for tm-qparams to turn into quantization
// parameters. Runs on the CPU backend (the reference), deterministically.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace tmc {

struct Manifest;

struct CalibOptions {
    int samples = 128;    // windows of text
    int seqlen = 2048;    // tokens per window (BOS included)
    int threads = 0;      // 0: all cores
    std::function<void(int done, int total)> progress;
};

struct CalibArray {
    std::string name;            // e.g. "layers.3.k.absmax"
    std::vector<int64_t> shape;  // e.g. {kv_heads, head_dim}
    std::vector<float> data;
};

struct CalibStats {
    int version = 1;
    std::string workspace_id;  // workspace_id() of the workspace, 16 hex digits
    std::string model;
    int layers = 0, kv_heads = 0, head_dim = 0, hidden = 0, q_size = 0, intermediate = 0;
    int samples = 0, seqlen = 0;
    int64_t tokens = 0;
    std::string dataset;
    std::vector<CalibArray> arrays;

    const CalibArray* find(const std::string& name) const;
};

// `dataset`: plain text, or JSON lines with a "text" field per line.
CalibStats calibrate(const std::string& workspace, const std::string& dataset, const CalibOptions& opt);

// The file: zstd-compressed; inside, one JSON header line, then the arrays'
// float32 values (little-endian) in header order.
std::string calib_stats_bytes(const CalibStats& s);
// Throws tmc::Error "<what>: ..." for anything truncated, corrupt or of another version.
CalibStats parse_calib_stats(const std::string& bytes, const std::string& what);

// The identity calibrate() records for a workspace: XXH64 of the manifest's
// "path xxh64" lines, files under quant/ left out (formats/calib-stats.md).
std::string workspace_id(const std::string& workspace);
std::string workspace_id(const Manifest& m);

}  // namespace tmc
