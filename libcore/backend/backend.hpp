// The Backend interface: what the engine asks of a device. The engine
// decides what runs (a BatchPlan); a backend runs the model's forward pass
// over it, keeping K/V in its paged cache, and returns logits. The CPU
// backend (backend/cpu) is the reference; the CUDA backend implements the
// same recipe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <functional>
#include <vector>

#include "backend/cuda/switches.hpp"
#include "tm/model_config.hpp"

namespace tmc {

class Workspace;

// One step's work: flat token rows of several sequences (cu_seqlens style).
struct BatchPlan {
    struct Seq {
        int row_begin = 0;     // first row of this sequence in tokens/positions
        int n_rows = 0;        // rows this step; positions ctx_len - n_rows .. ctx_len - 1
        int ctx_len = 0;       // tokens with K/V in the cache after this step
        const int* blocks = nullptr;  // block table, covering ctx_len tokens
        int n_blocks = 0;
    };
    std::vector<int> tokens;
    std::vector<int> positions;
    std::vector<Seq> seqs;
    std::vector<int> logit_rows;  // rows whose logits are returned, in this order
    // Every logit row will be sampled greedily (no penalties, no log-
    // probabilities): a backend may then return no logits from forward()
    // and give each row's argmax through greedy_ids() instead.
    bool greedy_only = false;
    // One per logit row when the backend samples on its device (see
    // Backend::samples_on_device()): how to draw the row's token, with the
    // uniform number u in [0, 1) already drawn from the request's stream.
    // Temperature <= 0 is greedy; top_k <= 0, top_p >= 1, min_p <= 0 filter
    // nothing. forward() may then return no logits and give the drawn ids
    // through greedy_ids().
    struct SampleSpec {
        float temperature = 0, top_p = 1, min_p = 0, u = 0;
        int top_k = 0;
    };
    std::vector<SampleSpec> sample;

    void clear() {
        tokens.clear();
        positions.clear();
        seqs.clear();
        logit_rows.clear();
        greedy_only = false;
        sample.clear();
    }
};

struct BackendLimits {
    int num_blocks = 0;        // KV cache pool, blocks of block_size tokens
    int block_size = 64;
    int max_batch_tokens = 0;  // rows per step
    int max_logit_rows = 0;
    int max_context = 0;       // longest sequence (positions)
};

class Backend {
public:
    virtual ~Backend() = default;
    virtual std::string name() const = 0;
    virtual const ModelConfig& config() const = 0;
    // Bytes of KV cache one token takes (all layers, K and V).
    virtual size_t kv_bytes_per_token() const = 0;
    // Allocates the KV pool and step buffers. Called once, before forward().
    virtual void init(const BackendLimits& limits) = 0;
    // Runs the plan; returns logits [plan.logit_rows.size()][vocab_size],
    // valid until the next call (the caller may modify them in place).
    virtual float* forward(const BatchPlan& plan) = 0;
    // The same step in two halves: launch() queues it, collect() waits for
    // it and returns what forward() would; the plan must stay as it is in
    // between. An asynchronous backend returns from launch() before the
    // device is done, so the host can work meanwhile (the engine sends the
    // previous step's text then).
    virtual void launch(const BatchPlan& plan) { launched_ = forward(plan); }
    virtual float* collect() { return launched_; }
    virtual bool asynchronous() const { return false; }
    // When forward() returned null (plan.greedy_only): the argmax of each
    // logit row, in plan.logit_rows order.
    virtual const int* greedy_ids() { return nullptr; }
    // With greedy_ids(), each row's largest logit: the ranks of a tensor-
    // parallel group that each hold a slice of the vocabulary combine by it
    // (their ids are then indices into their slice).
    virtual const float* greedy_values() { return nullptr; }
    // True when forward() draws the tokens itself for a plan with `sample`
    // set (temperature, top-k, top-p, min-p; no penalties, no log-probabilities).
    virtual bool samples_on_device() const { return false; }
    // A tensor-parallel rank whose peer failed: make this rank's pending
    // collectives return (Communicator::abort). Callable from any thread.
    virtual void abort_collectives() {}
    // log p(targets[i] | row logits_index[i]) from the last forward's logits.
    virtual void token_logprobs(const int* logit_index, const int* targets, int n, float* out) = 0;
    // The KV pool size to use when the user sets none: `fraction` of the
    // device memory still free (GPU), or a fixed budget (CPU).
    virtual size_t default_kv_bytes(double fraction, int max_batch_tokens) const = 0;

private:
    float* launched_ = nullptr;
};

// Sees the activations of a forward pass (calibration). Called on the
// engine thread, layer by layer, with T rows of `width` floats `ld` apart.
struct ForwardObserver {
    enum Point { AttnIn, K, V, WoIn, FfnIn, W2In };
    virtual ~ForwardObserver() = default;
    virtual void observe(int layer, Point p, const float* rows, int T, size_t ld, int width) = 0;
    // With tensor parallelism each rank sees its own share (its heads, its
    // MLP columns): the observer to give rank `rank` of `tp`.
    virtual ForwardObserver* for_rank(int rank, int tp) {
        (void)tp;
        return rank == 0 ? this : nullptr;
    }
};

class Communicator;
class HostBarrier;
class ModelProgram;  // backend/model_program.hpp

struct CpuBackendOptions {
    // The model recipe to run (model_program(ws), model/decoder.hpp); required.
    std::shared_ptr<const ModelProgram> program;
    int threads = 0;   // 0: all cores
    int kv_quant = 0;  // quant_policy: 0 (fp32 cache), 8 (int8) or 4 (int4)
    // Static scales, [layers][4][kv_heads] (K scale, K offset, V scale, V
    // offset; tm/qparams.hpp); empty: computed per token and head.
    std::vector<float> kv_params;
    ForwardObserver* observer = nullptr;
    // Tensor parallelism: this backend is rank comm->rank() of comm->size()
    // (the workspace's tp) and sums its partial outputs through comm. Null: tp 1.
    Communicator* comm = nullptr;
    // launch() runs the step on a worker thread and returns at once (as the
    // CUDA backend does), so the engine's overlapped path runs on the CPU
    // too (TM_CPU_ASYNC=1; tests).
    bool async = false;
};

std::unique_ptr<Backend> make_cpu_backend(const Workspace& ws, const CpuBackendOptions& opt);
// All the workspace's tp ranks in one process, each on its own thread with
// `threads` / tp cores, summing through a LocalGroup: logits gathered whole.
// (tp 1: make_cpu_backend.)
std::unique_ptr<Backend> make_cpu_tp_backend(const Workspace& ws, const CpuBackendOptions& opt);

// tp ranks built by `make(rank)` on their own threads, run together each step;
// `keep` holds what they share until they are gone (tp_backend.cpp).
using RankFactory = std::function<std::unique_ptr<Backend>(int rank)>;
// vocab_split: each rank's logits are a slice of the vocabulary (an untied
// output layer split by rows), gathered whole.
std::unique_ptr<Backend> make_tp_backend(const ModelConfig& full, int tp, bool vocab_split, RankFactory make,
                                         std::shared_ptr<void> keep);
// Static KV scales of the whole model ([layers][4][kv_heads]) -> rank's heads.
// (program: the ranks' model program, which says where a rank's KV heads begin.)
std::vector<float> rank_kv_params(const std::vector<float>& all, const ModelProgram& program, int model_kv_heads,
                                  int rank);

struct CudaBackendOptions {
    std::shared_ptr<const ModelProgram> program;  // as CpuBackendOptions::program; required
    int device = 0;
    int kv_quant = 0;              // quant_policy: 0 (16-bit cache), 8 or 4
    std::vector<float> kv_params;  // static scales as CpuBackendOptions::kv_params; empty: per token
    // Tensor parallelism: rank `rank` of `tp` (the workspace's); make_comm
    // builds its communicator on the backend's stream (a cudaStream_t).
    int tp = 1, rank = 0;
    std::function<std::unique_ptr<Communicator>(void* stream)> make_comm;
    // The ranks' threads meet here around each collective of a step run
    // kernel by kernel (see CudaBackend::sync_ranks).
    std::shared_ptr<HostBarrier> barrier;
    // The fast paths and profiling switches; empty: CudaSwitches::from_env().
    std::optional<cuda::CudaSwitches> switches;
};

// Throws tmc::Error when this build has no CUDA or the device/cuBLAS is unusable.
std::unique_ptr<Backend> make_cuda_backend(const Workspace& ws, const CudaBackendOptions& opt);
// The workspace's tp ranks on GPUs 0 .. tp-1, summing through NCCL (tp 1:
// make_cuda_backend). Throws when fewer GPUs are visible or NCCL is missing.
std::unique_ptr<Backend> make_cuda_tp_backend(const Workspace& ws, const CudaBackendOptions& opt);

}  // namespace tmc
