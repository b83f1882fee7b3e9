// The CUDA backend's class, shared by its files:
//   cuda_backend.cu  construction, weights, buffers, the ops of a model
//                    program (ForwardOps: the kernels of a step), factories
//   cuda_step.cu     a step: its metadata, decode graphs, launch and
//                    collect, the tensor-parallel waits
//   cuda_tuning.cu   GEMM dispatch and the start-up tuning of each shape
// The ops of a model program (backend/model_program.hpp) run with weights in
// device memory (16-bit, as the workspace holds them), linear layers through
// cuBLAS (fp32 accumulation; the residual add fused as beta = 1), our own
// kernels for the rest (kernels/). Activations and the KV cache are 16-bit,
// the residual stream and logits fp32. Switches are read once, into
// CudaSwitches (switches.hpp).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "backend/backend.hpp"
#include "base/row_math.hpp"
#include "backend/comm.hpp"
#include "backend/cuda/cublas_dyn.hpp"
#include "backend/cuda/gemm_tuner.hpp"
#include "backend/gemm_tune_cache.hpp"
#include "backend/cuda/nccl_comm.hpp"
#include "backend/cuda/step_profile.hpp"
#include "backend/model_program.hpp"
#include "kernels/kernels.cuh"
#include "tm/device.hpp"
#include "tm/error.hpp"
#include "tm/workspace.hpp"


namespace tmc::gpu {

inline void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) throw Error(std::string("CUDA: ") + what + ": " + cudaGetErrorString(e));
}
inline void check(cublasStatus_t s, const char* what) {
    if (s != CUBLAS_STATUS_SUCCESS) throw Error(std::string("cuBLAS: ") + what + ": status " + std::to_string(int(s)));
}

struct DevWeight {
    void* ptr = nullptr;
    int rows = 0, cols = 0;
    int tuned = -1;  // the GemmTuner shape of its matmuls
};

template <class T>
struct DevBuf {
    T* p = nullptr;
    size_t n = 0;
    void alloc(size_t count) {
        if (p) cudaFree(p);
        n = count;
        check(cudaMalloc(&p, std::max<size_t>(1, count) * sizeof(T)), "cudaMalloc");
    }
    ~DevBuf() {
        if (p) cudaFree(p);
    }
};

// Step metadata, one upload per step. Fixed-size sections first and the
// block tables last, so that in a decode step every section's offset depends
// on the number of rows only (what a captured graph needs).
struct MetaLayout {
    size_t tokens, positions, row_seq, lrows, boff, items, row_items, tiles, blocks, total;
};


class CudaBackend final : public Backend, private ForwardOps {
public:
    CudaBackend(const Workspace& ws, const CudaBackendOptions& opt);
    ~CudaBackend() override;
    std::string name() const override { return "cuda (" + device_name_ + ")"; }
    const ModelConfig& config() const override { return cfg_; }
    size_t kv_bytes_per_token() const override {
        const size_t rows = size_t(cfg_.num_layers) * 2 * size_t(cfg_.num_kv_heads);
        return kv_bits_ == 16 ? rows * size_t(cfg_.head_dim) * 2 : rows * (size_t(cfg_.head_dim) * kv_bits_ / 8 + 8);
    }
    size_t default_kv_bytes(double fraction, int max_batch_tokens) const override;
    void init(const BackendLimits& limits) override;
    float* forward(const BatchPlan& plan) override;
    void launch(const BatchPlan& plan) override;
    float* collect() override;
    bool asynchronous() const override { return !comm_; }
    void token_logprobs(const int* logit_index, const int* targets, int n, float* out) override;
    const int* greedy_ids() override { return h_ids_; }
    const float* greedy_values() override { return h_vals_; }
    bool samples_on_device() const override { return sw_.sampling && out_rows_ == cfg_.vocab_size; }
    // NCCL needs each rank's communicator aborted by its own thread, the
    // ranks together (an abort waits for the peers'): the failing rank's
    // thread aborts its own; another rank's thread does when it next waits
    // for its stream (wait()), which it polls for this request.
    void abort_collectives() override {
        if (!comm_) return;
        abort_requested_.store(true);
        if (barrier_) barrier_->abort();
        if (std::this_thread::get_id() == owner_) comm_->abort();
    }

private:
    // ForwardOps: the kernels of one step over step_'s rows, on stream_.
    void embed(WeightId table) override;
    void rmsnorm(WeightId w) override;
    void linear(WeightId w, Buf in, Buf out) override;
    void add_linear(WeightId w, Buf in) override;
    void qkv_rope_cache(const QkvEpilogue& e) override;
    void attention(int layer) override;
    void silu_mul() override;
    void logits(WeightId final_norm, WeightId output) override;

    void* buf(Buf b);
    void load_weights(const Workspace& ws);
    void gemm(const DevWeight& w, const void* x, int T, void* y, cudaDataType ytype, int ldy, float beta);
    void settle_reduce();
    cuda::BatchDev batch_dev() const;  // step_'s metadata as the attention kernels read it
    size_t step_bytes(int max_tokens) const;
    void launched(const char* what) { check(cudaGetLastError(), what); }
    // TM_TP_TRACE=1: each rank's host-side progress on stderr (hangs between ranks).
    void trace(const char* what, int a = -1) const {
        if (sw_.tp_trace && comm_) std::fprintf(stderr, "[rank %d] %s %d\n", rank_, what, a), std::fflush(stderr);
    }
    // The step the ops run over: its row counts and where its metadata sits in meta_.
    struct StepArgs {
        int T = 0, L = 0;
        size_t n_single = 0, n_tiles = 0;
        size_t o_pos = 0, o_seq = 0, o_lrows = 0, o_boff = 0, o_items = 0, o_row_items = 0, o_tiles = 0, o_blocks = 0;
    } step_;
    int pending_reduce_ = 0;  // tp > 1: rows of x_ whose all-reduce add_linear left to the next op
    void run(const StepArgs& a);
    static constexpr int kMaxGraphBatch = 256;
    cuda::CudaSwitches sw_;
    std::shared_ptr<const ModelProgram> program_;
    long steps_ = 0;  // decode steps so far (sw_.ncu_step)
    // TM_CUDA_STEP_GPU=1: per decode step, the GPU's time from the step's
    // first upload to its last download (events) against the host's time
    // from one collect() to the next; the difference is the GPU idle between
    // steps. Printed on standard error at the end.
    struct StepGpu {
        bool on = false;
        cudaEvent_t a = nullptr, b = nullptr;
        std::chrono::steady_clock::time_point last{}, enq{};
        long steps = 0;
        double gpu_ms = 0, wall_ms = 0, host_ms = 0;
    } sg_;
    std::unique_ptr<cuda::GemmTuner> tuner_;
    void tune_gemms();
    void capture_decode_graphs();
    std::vector<cudaGraphExec_t> graphs_ = std::vector<cudaGraphExec_t>(kMaxGraphBatch + 1, nullptr);

    ModelConfig cfg_;
    cuda::Dt dt_;
    cudaDataType cdt_;
    std::string device_name_;
    cudaStream_t stream_ = nullptr;
    cublasHandle_t blas_ = nullptr;
    void* arena_ = nullptr;
    size_t arena_used_ = 0, arena_size_ = 0;
    std::vector<DevWeight> w_;  // by WeightId
    DevBuf<float> inv_freq_;

    BackendLimits lim_;
    int kv_bits_ = 16;
    DevBuf<float> kv_params_;  // static scales (quantized cache), or empty
    int rank_ = 0;
    int out_rows_ = 0;  // rows of the output projection on this rank (vocab, or vocab / tp)
    std::unique_ptr<Communicator> comm_;  // tp > 1
    cuda::CudaCommunicator* fused_comm_ = nullptr;  // comm_, when it can fuse the norm
    std::atomic<bool> abort_requested_{false};
    std::thread::id owner_ = std::this_thread::get_id();  // the rank's thread (it built the backend)
    void wait(const char* what);
    void enqueue(const BatchPlan& plan);  // forward() up to the wait
    struct StepShape {
        int T = 0, L = 0, S = 0, Tp = 0;
        size_t n_tiles = 0, n_single = 0, n_blocks = 0;
        bool decode = false, use_graph = false;
    };
    StepShape shape_step(const BatchPlan& plan) const;
    MetaLayout write_meta(const BatchPlan& plan, const StepShape& sh);
    void queue_outputs(const BatchPlan& plan, bool decode, int T);
    struct Pending {  // what collect() returns and profiles
        float* out = nullptr;
        bool decode = false;
        int T = 0;
        bool queued = false;
    } pending_;
    [[noreturn]] void end_group(bool late);
    void sync_ranks();
    std::shared_ptr<HostBarrier> barrier_;  // tp > 1: shared by the ranks
    bool capturing_ = false;                // a decode graph is being captured
    cuda::StepProfile prof_;  // TM_CUDA_PROFILE=1
    DevBuf<uint16_t> kv_;
    cuda::KvLayout kvl_;
    DevBuf<float> x_, logits_, attn_split_;
    DevBuf<uint16_t> h_, qkv_, attn_, gu_, act_, hn_;
    DevBuf<int> meta_;
    DevBuf<char> blas_ws_;
    int* h_meta_ = nullptr;  // pinned
    size_t meta_cap_ = 0;
    std::vector<int> single_, lens_;  // a step's rows attended one by one, and their visible keys
    float* h_logits_ = nullptr;  // pinned
    DevBuf<int> ids_;
    int* h_ids_ = nullptr;  // pinned
    DevBuf<float> vals_;
    float* h_vals_ = nullptr;  // pinned
    DevBuf<cuda::SampleRow> spec_;
    cuda::SampleRow* h_spec_ = nullptr;  // pinned
};

}  // namespace tmc::gpu
