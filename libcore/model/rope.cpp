#include "model/rope.hpp"

#include <cmath>

namespace tmc {

std::vector<float> rope_inv_freq(const ModelConfig& cfg) {
    std::vector<float> out;
    const int d = cfg.head_dim;
    for (int i = 0; i < d / 2; ++i) {
        double f = 1.0 / std::pow(cfg.rope_theta, double(2 * i) / d);
        if (cfg.rope_type == "linear") {
            f /= cfg.rope_factor;
        } else if (cfg.rope_type == "llama3") {
            const double lo_wl = cfg.rope_original_max_position / cfg.rope_low_freq_factor;
            const double hi_wl = cfg.rope_original_max_position / cfg.rope_high_freq_factor;
            const double wl = 2 * M_PI / f;
            if (wl > lo_wl) {
                f /= cfg.rope_factor;
            } else if (wl >= hi_wl) {
                double smooth = (cfg.rope_original_max_position / wl - cfg.rope_low_freq_factor) /
                                (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor);
                f = (1 - smooth) * f / cfg.rope_factor + smooth * f;
            }
        }
        out.push_back(float(f));
    }
    return out;
}

}  // namespace tmc
