// KV-cache quantization parameters (tm-qparams): from calibration statistics
// (tm/calib.hpp) to per-layer, per-KV-head scales and offsets written into a
// workspace (formats/workspace.md, "Quantization parameters").
#pragma once

#include <string>
#include <vector>

#include "tm/calib.hpp"

namespace tmc {

class Workspace;

struct KvQuantOptions {
    int bits = 8;            // 8 or 4
    bool symmetric = false;  // asymmetric (min/max) by default
    // Narrow each head's range to the least expected squared error over its
    // channels (see kv_qparams_from_stats); false: the full min/max (absmax).
    bool clip_mse = true;
};

// Parameters for the whole model, [layers][4][kv_heads] floats: K scale,
// K offset, V scale, V offset. A cached value is code * scale + offset, with
// code in [0, 2^bits - 1].
//   asymmetric: scale = (max - min) / (2^bits - 1), offset = min
//   symmetric:  scale = absmax / (2^(bits-1) - 1), offset = -2^(bits-1) * scale
// where min, max, absmax are over all channels of the head, or, with
// clip_mse, the range of least expected squared error: each channel taken as
// uniform on its own [min, max], the ends moved up to 80% of the way to the
// middle (the absmax down to 20% of itself), on a grid of 5% steps.
std::vector<float> kv_qparams_from_stats(const CalibStats& s, const KvQuantOptions& opt);

// Throws tmc::Error unless `s` was recorded on this workspace's weights with
// its layer/head/channel counts.
void check_stats_for(const Workspace& ws, const CalibStats& s);

// The file holding rank R's parameters for `bits`: quant/rank<R>/kv_int<bits>.bin,
// fp32 [layers][4][kv heads of the rank].
std::string kv_qparams_path(int rank, int bits);

// Static: computes the parameters from `stats`, writes one file per rank,
// lists them in the manifest, sets quant_policy and kv_scales = static.
// Online (stats == nullptr): sets quant_policy and kv_scales = online only
// (bits 0: quant_policy 0, an unquantized cache).
// The workspace is rebuilt beside itself (files hard-linked) and swapped in
// with one rename; on any error it is left byte-for-byte as it was.
void set_kv_quant(const std::string& workspace, const KvQuantOptions& opt, const CalibStats* stats);

}  // namespace tmc
