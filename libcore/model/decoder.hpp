// The decoder-only transformer recipe every backend runs (Llama and the
// families converted to its layout: Mistral, Qwen2, Qwen3). The one place
// that says which weights a layer has and in which order its ops run;
// "How to add a model architecture" in the README starts here.
#pragma once

#include <memory>

#include "backend/model_program.hpp"

namespace tmc {

// The program of `full` (the whole model's config) split over `tp` ranks.
std::shared_ptr<const ModelProgram> decoder_program(const ModelConfig& full, int tp);
// The program of a workspace: its model at its tp.
std::shared_ptr<const ModelProgram> model_program(const Workspace& ws);

}  // namespace tmc
