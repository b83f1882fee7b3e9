// The contract between a model recipe (libcore/model/) and a backend.
//
// The model says WHICH weights exist and WHICH ops run in which order: a
// ModelProgram lists its weights (WeightSpec) and, in forward(), calls the
// ops of a step on a ForwardOps. A backend says HOW each op runs (threads
// and AVX on the CPU, kernels and cuBLAS on the GPU, a per-token loop in the
// reference) and never which ops a model has. A backend loads the weights in
// the order weights() lists them and ops name a weight by that index.
//
// One step: the backend receives a BatchPlan, sets up its buffers for the
// plan's T rows, and calls program.forward(*this). Each op works on all T
// rows; the activations live in named buffers (Buf) the backend owns:
//
//   x        the residual stream, [T][hidden] (fp32 on every backend)
//   Normed   RMSNorm output, [T][hidden]
//   Qkv      the QKV projection, [T][q_size + 2 * kv_size] (this rank's heads)
//   Attn     attention output, [T][q_size]
//   GateUp   the gate and up projections, [T][2 * intermediate]
//   Act      the MLP activation, [T][intermediate]
//
// A linear layer's output width is its weight's rows; with tensor
// parallelism every shape is the rank's share (ModelProgram::config()).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "tm/model_config.hpp"
#include "tm/workspace.hpp"

namespace tmc {

// How a weight is stored in the workspace. Every weight is 16-bit today, in
// the dtype config.ini names (bf16 or fp16); packed 4-bit weights with group
// scales and zero points are the next kind (formats/workspace.md).
enum class WeightStorage { Dense16 };

struct WeightSpec {
    enum Kind {
        Embedding,  // [vocab][hidden], rows gathered by token id
        Norm,       // [1][n] RMSNorm scale
        Bias,       // [1][n] added to a projection's output
        Linear,     // [out][in], multiplied as in · wᵀ
    };
    std::string name;  // the workspace tensor (formats/workspace.md)
    Kind kind = Linear;
    int rows = 0, cols = 0;
    WeightStorage storage = WeightStorage::Dense16;
};

using WeightId = int;  // index into ModelProgram::weights(); kNoWeight: absent
constexpr WeightId kNoWeight = -1;

enum class Buf { Normed, Qkv, Attn, GateUp, Act };

// What happens to the QKV rows between the projection and attention.
struct QkvEpilogue {
    int layer = 0;
    WeightId bias = kNoWeight;    // added to q, k and v
    WeightId q_norm = kNoWeight;  // RMSNorm over each query head (head_dim)
    WeightId k_norm = kNoWeight;  // RMSNorm over each key head
};

class ForwardOps {
public:
    virtual ~ForwardOps() = default;
    // x[r] = table[token of row r]
    virtual void embed(WeightId table) = 0;
    // Normed = RMSNorm(x) · w (eps: config's rms_norm_eps)
    virtual void rmsnorm(WeightId w) = 0;
    // out = in · wᵀ
    virtual void linear(WeightId w, Buf in, Buf out) = 0;
    // x += in · wᵀ, the partial products of tensor-parallel ranks summed.
    virtual void add_linear(WeightId w, Buf in) = 0;
    // The epilogue on Qkv, then RoPE ("rotate half": element i pairs with
    // i + head_dim/2) on q and k at each row's position; k and v written
    // into the paged KV cache of `layer` at that position.
    virtual void qkv_rope_cache(const QkvEpilogue& e) = 0;
    // Attn = softmax(q · kᵀ / sqrt(head_dim)) · v per query head, over the
    // sequence's cached keys up to the row's position (causal; the last
    // sliding_window keys when the config sets one), grouped-query heads
    // sharing their KV head.
    virtual void attention(int layer) = 0;
    // Act = silu(gate) · up, gate the first half of GateUp's columns.
    virtual void silu_mul() = 0;
    // The plan's logit rows: RMSNorm(x[row]) · final_norm, then · outputᵀ.
    virtual void logits(WeightId final_norm, WeightId output) = 0;
    // Calibration (tm-calib): the activations at `point` of `layer`.
    virtual void observe(int layer, ForwardObserver::Point point) {
        (void)layer;
        (void)point;
    }
};

// A model architecture's recipe (model/decoder.cpp builds the decoder-only
// ones) for one tensor-parallel degree: every rank runs the same program.
class ModelProgram {
public:
    virtual ~ModelProgram() = default;
    // One rank's shapes: its query heads, KV heads and MLP columns.
    virtual const ModelConfig& config() const = 0;
    // Rows of the output projection on a rank (the vocabulary, or its tp-th
    // part when an untied output layer is split).
    virtual int output_rows() const = 0;
    virtual int tp() const = 0;
    // The model's KV head where `rank`'s heads begin (heads split over the
    // ranks, or replicated when there are fewer KV heads than ranks).
    virtual int kv_head_begin(int rank) const = 0;
    virtual const std::vector<WeightSpec>& weights() const = 0;
    // RoPE's inverse frequencies, head_dim / 2 of them.
    virtual const std::vector<float>& rope_inv_freq() const = 0;
    virtual void forward(ForwardOps& ops) const = 0;
};

// The rank's tensor named by `spec`, checked against the shape and dtype the
// program expects (throws tmc::Error naming the workspace and tensor).
WeightView checked_weight(const Workspace& ws, int rank, const WeightSpec& spec, DType dtype);

}  // namespace tmc
