// RoPE inverse frequencies as transformers computes them ("default",
// "linear" and "llama3" scaling), shared by every backend.
#pragma once

#include <vector>

#include "tm/model_config.hpp"

namespace tmc {

std::vector<float> rope_inv_freq(const ModelConfig& cfg);

}  // namespace tmc
