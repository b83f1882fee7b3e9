#include "backend/model_program.hpp"

#include "tm/error.hpp"

namespace tmc {

WeightView checked_weight(const Workspace& ws, int rank, const WeightSpec& spec, DType dtype) {
    WeightView v = ws.tensor(rank, spec.name);
    if (v.numel() != int64_t(spec.rows) * spec.cols || v.dtype != dtype)
        throw Error(ws.dir() + ": tensor " + spec.name + " does not have the shape or dtype config.ini implies");
    return v;
}

}  // namespace tmc
