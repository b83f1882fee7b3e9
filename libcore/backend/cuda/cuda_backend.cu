// The CUDA backend: the ops of a model program (backend/model_program.hpp),
// weights in device memory (16-bit, as the workspace holds them), linear
// layers through cuBLAS (fp32 accumulation; the residual add fused as
// beta = 1), our own kernels for the rest (kernels/). Activations and the KV
// cache are 16-bit, the residual stream and logits fp32. Switches are read
// once, into CudaSwitches (switches.hpp).
#include <cuda_profiler_api.h>
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

namespace tmc {

namespace {

void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) throw Error(std::string("CUDA: ") + what + ": " + cudaGetErrorString(e));
}
void check(cublasStatus_t s, const char* what) {
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

// Every weight the program lists, into one device arena; a tensor listed
// twice (a tied output layer is the embedding table) is uploaded once.
void CudaBackend::load_weights(const Workspace& ws) {
    const auto& specs = program_->weights();
    std::vector<WeightView> views;
    size_t total = 0;
    for (const WeightSpec& sp : specs) {
        views.push_back(checked_weight(ws, rank_, sp, cfg_.weight_dtype));
        total += (views.back().bytes + 255) / 256 * 256;
    }
    check(cudaMalloc(&arena_, std::max<size_t>(total, 256)), "cudaMalloc (weights)");
    arena_size_ = total;
    w_.resize(specs.size());
    for (size_t i = 0; i < specs.size(); ++i) {
        size_t same = 0;
        while (same < i && specs[same].name != specs[i].name) ++same;
        if (same < i) {
            w_[i] = DevWeight{w_[same].ptr, specs[i].rows, specs[i].cols};
            continue;
        }
        const WeightView& v = views[i];
        void* dst = static_cast<char*>(arena_) + arena_used_;
        arena_used_ += (v.bytes + 255) / 256 * 256;
        check(cudaMemcpy(dst, v.data, v.bytes, cudaMemcpyHostToDevice), "weight upload");
        w_[i] = DevWeight{dst, specs[i].rows, specs[i].cols};
    }
}

CudaBackend::CudaBackend(const Workspace& ws, const CudaBackendOptions& opt) {
    if (!opt.program) throw Error("cuda backend: no model program");
    program_ = opt.program;
    if (ws.tp() != opt.tp)
        throw Error(ws.dir() + ": converted with --tp " + std::to_string(ws.tp()) + "; this backend runs " +
                    std::to_string(opt.tp) + " rank(s)");
    if (program_->tp() != opt.tp) throw Error("cuda backend: the model program is for another tensor-parallel degree");
    rank_ = opt.rank;
    cfg_ = program_->config();  // this rank's heads, KV heads, MLP columns
    out_rows_ = program_->output_rows();
    if (opt.tp > 1 && !opt.make_comm) throw Error("cuda backend: tensor parallelism without a communicator");
    if (cfg_.weight_dtype != DType::BF16 && cfg_.weight_dtype != DType::F16)
        throw Error(ws.dir() + ": the CUDA backend reads bf16 or fp16 weights");
    const int group = cfg_.num_heads / cfg_.num_kv_heads;
    if (group > 8 || cfg_.head_dim > 256 || cfg_.head_dim % 2)
        throw Error(ws.dir() + ": the CUDA attention kernel takes up to 8 query heads per KV head and head_dim <= 256");
    if (opt.kv_quant != 0 && opt.kv_quant != 8 && opt.kv_quant != 4) throw Error("quant_policy must be 0, 4 or 8");
    kv_bits_ = opt.kv_quant == 0 ? 16 : opt.kv_quant;
    if (!opt.kv_params.empty() && opt.kv_params.size() != size_t(cfg_.num_layers) * 4 * cfg_.num_kv_heads)
        throw Error(ws.dir() + ": the static KV scales do not match the model");
    dt_ = cfg_.weight_dtype == DType::BF16 ? cuda::Dt::BF16 : cuda::Dt::F16;
    cdt_ = cfg_.weight_dtype == DType::BF16 ? CUDA_R_16BF : CUDA_R_16F;
    check(cudaSetDevice(opt.device), "cudaSetDevice");
    cudaDeviceProp prop;
    check(cudaGetDeviceProperties(&prop, opt.device), "cudaGetDeviceProperties");
    device_name_ = prop.name;
    sw_ = opt.switches ? *opt.switches : cuda::CudaSwitches::from_env();
    if (sw_.step_gpu) {
        sg_.on = true;
        cudaEventCreate(&sg_.a);
        cudaEventCreate(&sg_.b);
    }
    cuda::set_programmatic_launch(sw_.pdl);
    if (sw_.profile) {
        prof_.enable(cfg_.num_layers * 11 + 8);
        sw_.graphs = false;  // events are timed outside graphs only
    }
    barrier_ = opt.barrier;
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    const auto& cb = cuda::cublas();
    check(cb.create(&blas_), "cublasCreate");
    check(cb.set_stream(blas_, stream_), "cublasSetStream");
    blas_ws_.alloc(size_t(32) << 20);
    check(cb.set_workspace(blas_, blas_ws_.p, blas_ws_.n), "cublasSetWorkspace");
    if (opt.tp > 1) {
        comm_ = opt.make_comm(stream_);
        fused_comm_ = dynamic_cast<cuda::CudaCommunicator*>(comm_.get());
    }

    load_weights(ws);
    const std::vector<float>& inv = program_->rope_inv_freq();
    inv_freq_.alloc(inv.size());
    check(cudaMemcpy(inv_freq_.p, inv.data(), inv.size() * 4, cudaMemcpyHostToDevice), "upload inv_freq");
    if (!opt.kv_params.empty()) {
        kv_params_.alloc(opt.kv_params.size());
        check(cudaMemcpy(kv_params_.p, opt.kv_params.data(), opt.kv_params.size() * 4, cudaMemcpyHostToDevice),
              "upload the KV scales");
        kvl_.qparams = kv_params_.p;
    }
}

CudaBackend::~CudaBackend() {
    if (sg_.on && sg_.steps > 0)
        std::fprintf(stderr,
                     "tm cuda step gpu (TM_CUDA_STEP_GPU=1): %ld decode steps, ms per step: wall %.3f, gpu %.3f, "
                     "host before launch %.3f, gpu idle %.3f\n",
                     sg_.steps, sg_.wall_ms / double(sg_.steps), sg_.gpu_ms / double(sg_.steps),
                     sg_.host_ms / double(sg_.steps), (sg_.wall_ms - sg_.gpu_ms) / double(sg_.steps));
    for (auto e : {sg_.a, sg_.b})
        if (e) cudaEventDestroy(e);
    if (comm_) {
        try {
            wait("shutdown");
        } catch (...) {
        }
        if (abort_requested_) comm_->abort();
    } else if (stream_) {
        cudaStreamSynchronize(stream_);
    }
    for (auto g : graphs_)
        if (g) cudaGraphExecDestroy(g);
    if (blas_) cuda::cublas().destroy(blas_);
    if (arena_) cudaFree(arena_);
    if (h_meta_) cudaFreeHost(h_meta_);
    if (h_logits_) cudaFreeHost(h_logits_);
    if (h_ids_) cudaFreeHost(h_ids_);
    if (h_spec_) cudaFreeHost(h_spec_);
    if (h_vals_) cudaFreeHost(h_vals_);
    if (stream_) cudaStreamDestroy(stream_);
}

size_t CudaBackend::step_bytes(int T) const {
    const size_t H = size_t(cfg_.hidden_size), I = size_t(cfg_.intermediate_size), V = size_t(cfg_.vocab_size);
    const size_t qkv = size_t(cfg_.q_size() + 2 * cfg_.kv_size());
    return size_t(T) * (H * 4 + H * 2 + qkv * 4 + size_t(cfg_.q_size()) * 2 + 3 * I * 2 + H * 2 + V * 4);
}

size_t CudaBackend::default_kv_bytes(double fraction, int max_batch_tokens) const {
    size_t free_b = 0, total_b = 0;
    check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
    const size_t reserve = step_bytes(max_batch_tokens) + (size_t(512) << 20);  // buffers, cuBLAS, graphs
    return free_b > reserve ? size_t(double(free_b - reserve) * fraction) : 0;
}

void CudaBackend::init(const BackendLimits& limits) {
    lim_ = limits;
    kvl_.layers = cfg_.num_layers;
    kvl_.kv_heads = cfg_.num_kv_heads;
    kvl_.head_dim = cfg_.head_dim;
    kvl_.block_size = lim_.block_size;
    kvl_.bits = kv_bits_;
    if (kv_bits_ != 16 && (kvl_.rows_per_block() * kvl_.row_bytes() % 8 || kvl_.block_bytes() % 8))
        throw Error("cuda backend: this block size and head_dim do not align the quantized cache's scales");
    kv_.alloc((size_t(lim_.num_blocks + 1) * kvl_.block_bytes() + 1) / 2);  // + the scratch block of padded rows
    kvl_.base = kv_.p;
    const size_t T = size_t(lim_.max_batch_tokens), H = size_t(cfg_.hidden_size), I = size_t(cfg_.intermediate_size);
    x_.alloc(T * H);
    h_.alloc(T * H);
    qkv_.alloc(T * size_t(cfg_.q_size() + 2 * cfg_.kv_size()));
    attn_.alloc(T * size_t(cfg_.q_size()));
    const int item_cap = cuda::decode_item_capacity(int(T), cfg_.num_kv_heads);
    attn_split_.alloc(cuda::attention_item_floats(item_cap, cfg_.num_heads, cfg_.head_dim));
    gu_.alloc(T * 2 * I);
    act_.alloc(T * I);
    hn_.alloc(size_t(lim_.max_logit_rows) * H);
    logits_.alloc(size_t(lim_.max_logit_rows) * size_t(out_rows_));
    check(cudaMallocHost(&h_logits_, size_t(lim_.max_logit_rows) * size_t(out_rows_) * 4), "cudaMallocHost");
    ids_.alloc(size_t(lim_.max_logit_rows));
    check(cudaMallocHost(&h_ids_, size_t(lim_.max_logit_rows) * 4), "cudaMallocHost");
    vals_.alloc(size_t(lim_.max_logit_rows));
    check(cudaMallocHost(&h_vals_, size_t(lim_.max_logit_rows) * 4), "cudaMallocHost");
    spec_.alloc(size_t(lim_.max_logit_rows));
    check(cudaMallocHost(&h_spec_, size_t(lim_.max_logit_rows) * sizeof(cuda::SampleRow)), "cudaMallocHost");
    // tokens, positions, row_seq (T each), logit rows (L), block offsets (T),
    // tiles, attention items and their rows, blocks.
    meta_cap_ = 8 * T + size_t(lim_.max_logit_rows) + 4 * size_t(item_cap) + 2 * T + 8 +
                T * size_t(lim_.max_context / lim_.block_size + 2) + 2;
    meta_.alloc(meta_cap_);
    check(cudaMallocHost(&h_meta_, meta_cap_ * 4), "cudaMallocHost");
    if (sw_.gemm_tune) tune_gemms();
    capture_decode_graphs();
}

// The linear layers a program multiplies, in the order it calls them: which
// weight, from which buffer, into what (tune_gemms groups them by shape).
class LinearRecorder final : public ForwardOps {
public:
    enum Into { Buffer, Residual, Logits };
    struct Use {
        WeightId w;
        Buf in, out;
        Into into;
    };
    std::vector<Use> uses;
    void embed(WeightId) override {}
    void rmsnorm(WeightId) override {}
    void linear(WeightId w, Buf in, Buf out) override { uses.push_back({w, in, out, Buffer}); }
    void add_linear(WeightId w, Buf in) override { uses.push_back({w, in, in, Residual}); }
    void qkv_rope_cache(const QkvEpilogue&) override {}
    void attention(int) override {}
    void silu_mul() override {}
    void logits(WeightId, WeightId output) override { uses.push_back({output, Buf::Normed, Buf::Normed, Logits}); }
};

// Each projection's matmul algorithm by number of rows (gemm_tuner.hpp),
// timed on this model's weights at start-up: one shape for each kind of
// linear layer the program multiplies (its calls of the same weight shape,
// input and output), timed over all of its weights in turn.
void CudaBackend::tune_gemms() {
    const auto t0 = std::chrono::steady_clock::now();
    const bool log = sw_.gemm_tune_log;
    tuner_ = std::make_unique<cuda::GemmTuner>(cdt_, stream_, blas_ws_.p, blas_ws_.n, log);
    const int T = lim_.max_batch_tokens, H = cfg_.hidden_size;
    const float residual_beta = !comm_ || rank_ == 0 ? 1.0f : 0.0f;  // add_linear's
    // Picks of earlier runs on this device and cuBLASLt (formats/gemm-tune.md).
    const std::string cache_path = gemm_tune_cache_path();
    const std::vector<GemmTuneEntry> cache = sw_.retune ? std::vector<GemmTuneEntry>{} : read_gemm_tune_cache(cache_path);
    std::vector<GemmTuneEntry> fresh;
    const char* ab = dt_ == cuda::Dt::BF16 ? "bf16" : "f16";
    const auto type_name = [&](cudaDataType t) { return t == CUDA_R_32F ? "f32" : ab; };
    const int lt_version = int(cuda::cublas_lt().version());
    LinearRecorder rec;
    program_->forward(rec);
    std::vector<void*> filled;  // input buffers holding random activations
    std::vector<bool> grouped(rec.uses.size(), false);
    int n_shapes = 0;
    for (size_t u = 0; u < rec.uses.size(); ++u) {
        if (grouped[u]) continue;
        const LinearRecorder::Use& use = rec.uses[u];
        const DevWeight& w0 = w_[size_t(use.w)];
        // The calls of this kind: same shape, input and output.
        std::vector<WeightId> ids;
        for (size_t v = u; v < rec.uses.size(); ++v) {
            const auto& o = rec.uses[v];
            const DevWeight& wv = w_[size_t(o.w)];
            if (grouped[v] || o.into != use.into || o.in != use.in || o.out != use.out || wv.rows != w0.rows ||
                wv.cols != w0.cols)
                continue;
            grouped[v] = true;
            if (std::find(ids.begin(), ids.end(), o.w) == ids.end()) ids.push_back(o.w);
        }
        const bool logit_rows = use.into == LinearRecorder::Logits;
        void* x = logit_rows ? static_cast<void*>(hn_.p) : buf(use.in);
        void* y = use.into == LinearRecorder::Buffer ? buf(use.out) : logit_rows ? static_cast<void*>(logits_.p) : x_.p;
        const cudaDataType yt = use.into == LinearRecorder::Buffer ? cdt_ : CUDA_R_32F;
        const float beta = use.into == LinearRecorder::Residual ? residual_beta : 0.0f;
        const int max_rows = logit_rows ? lim_.max_logit_rows : T;
        const int ldy = w0.rows;
        std::vector<const void*> ptrs;
        for (WeightId id : ids) ptrs.push_back(w_[size_t(id)].ptr);
        const cuda::GemmTuner::Shape sh{w0.rows, w0.cols, yt, ldy, beta};
        GemmTuneEntry key;
        key.device = device_name_, key.cublaslt = lt_version, key.ab = ab, key.y = type_name(yt);
        key.n = w0.rows, key.k = w0.cols, key.ldy = ldy, key.beta = beta;
        const std::vector<std::pair<int, int>>* cached = nullptr;
        for (auto& c : cache)
            if (c.same_shape(key)) cached = &c.picks;
        // Random activations for the timing.
        if (!cached && std::find(filled.begin(), filled.end(), x) == filled.end()) {
            cuda::fill_random(cdt_, x, size_t(max_rows) * size_t(w0.cols), 1.0f, stream_);
            filled.push_back(x);
        }
        // The output layer only to 1,024 rows (a batch's sampled rows; more
        // only with prompt log-probabilities): its tuning is the longest.
        const int tune_rows = logit_rows ? std::min(max_rows, 1024) : max_rows;
        const int id = tuner_->add(
            sh, ptrs, x, y, max_rows, tune_rows,
            [&](int rows, const void* w) {
                const float alpha = 1.0f;
                check(cuda::cublas().gemm_ex(blas_, CUBLAS_OP_T, CUBLAS_OP_N, w0.rows, rows, w0.cols, &alpha, w, cdt_,
                                             w0.cols, x, cdt_, w0.cols, &beta, y, yt, ldy, CUBLAS_COMPUTE_32F,
                                             CUBLAS_GEMM_DEFAULT),
                      "gemm");
            },
            cached);
        ++n_shapes;
        for (WeightId wid : ids) w_[size_t(wid)].tuned = id;
        if (tuner_->timed(id)) {
            // Saved with the rungs of earlier runs beyond this one's largest.
            for (auto& p : tuner_->picks(id)) key.picks.emplace_back(p.rows, p.heuristic);
            if (cached)
                for (auto& c : *cached)
                    if (c.first > key.picks.back().first) key.picks.push_back(c);
            fresh.push_back(std::move(key));
        }
        if (log)
            for (auto& p : tuner_->picks(id))
                std::fprintf(stderr, "tm cuda gemm %dx%d rows %d: %s, pick %d %.1f us (default %.1f us)\n", w0.rows,
                             w0.cols, p.rows, tuner_->timed(id) ? "timed" : "cached", p.heuristic, p.us_pick,
                             p.us_default);
    }
    check(cudaMemsetAsync(x_.p, 0, size_t(T) * H * 4, stream_), "tuning");
    check(cudaStreamSynchronize(stream_), "tuning");
    const bool saved = !fresh.empty() && write_gemm_tune_cache(cache_path, fresh);
    if (log)
        std::fprintf(stderr, "tm cuda gemm: %zu of %d shapes timed in %.2f s%s%s\n", fresh.size(), n_shapes,
                     std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
                     saved ? ", saved to " : "", saved ? cache_path.c_str() : "");
}

void CudaBackend::gemm(const DevWeight& w, const void* x, int T, void* y, cudaDataType ytype, int ldy, float beta) {
    // One or two decode rows: our matrix-vector kernel (streams W once at
    // HBM speed). From 3 rows on cuBLAS is faster on an H100 (offline step
    // logs of the 8B model: 4 rows 11.4 vs 12.8 ms a step, 8 rows 17.4 vs 22.1).
    constexpr int kGemvRows = 2;
    if (sw_.gemv && T <= kGemvRows &&
        cuda::gemv(dt_, w.ptr, w.rows, w.cols, x, w.cols, T, y, ytype == CUDA_R_32F, ldy, beta, stream_)) {
        launched("gemv");
        return;
    }
    if (tuner_ && w.tuned >= 0 && tuner_->run(w.tuned, T, w.ptr, x, y, ytype, ldy, beta)) return;
    const float alpha = 1.0f;
    // Row-major Y[T, N] = X[T, K] W[N, K]^T is column-major Y^T = W X^T.
    check(cuda::cublas().gemm_ex(blas_, CUBLAS_OP_T, CUBLAS_OP_N, w.rows, T, w.cols, &alpha, w.ptr, cdt_, w.cols, x,
                                 cdt_, w.cols, &beta, y, ytype, ldy, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          "gemm");
}


// Decode batches padded up to these sizes share one captured graph.
int graph_bucket(int T) {
    if (T <= 4) return T <= 1 ? 1 : T <= 2 ? 2 : 4;
    return (T + 7) / 8 * 8;
}

// Decode steps replay a captured CUDA graph per padded batch size
// (graph_bucket). Capturing one takes milliseconds (its launches recorded,
// the graph instantiated and uploaded), so with buckets every size up to
// kMaxGraphBatch is captured here, before any request, by a step of rows like
// the padding rows (each its own sequence at position 0 over the scratch
// block; their outputs are ignored), as vLLM and LMDeploy capture theirs at
// start-up. Without buckets (a graph for each size) graphs are captured as
// sizes first occur.
void CudaBackend::capture_decode_graphs() {
    if (!sw_.graphs || !sw_.graph_buckets) return;
    const int scratch = lim_.num_blocks;
    BatchPlan plan;
    for (int T = 1; T <= kMaxGraphBatch && T <= lim_.max_batch_tokens && T <= lim_.max_logit_rows; ++T) {
        if (graph_bucket(T) != T) continue;
        plan.clear();
        for (int r = 0; r < T; ++r) {
            plan.tokens.push_back(0);
            plan.positions.push_back(0);
            plan.logit_rows.push_back(r);
            BatchPlan::Seq q;
            q.row_begin = r, q.n_rows = 1, q.ctx_len = 1, q.blocks = &scratch, q.n_blocks = 1;
            plan.seqs.push_back(q);
        }
        plan.greedy_only = true;
        enqueue(plan);
        collect();
    }
    sg_ = StepGpu{.on = sg_.on, .a = sg_.a, .b = sg_.b};  // TM_CUDA_STEP_GPU counts requests' steps only
    steps_ = 0;                                           // and TM_CUDA_NCU_STEP
}

// The end of a step's work on stream_. A tensor-parallel rank polls, so
// that a peer's failure (abort_collectives from another thread) ends the
// wait: this thread aborts its own communicator, whose pending collectives
// then return, and the step fails.
void CudaBackend::wait(const char* what) {
    if (!comm_) {
        check(cudaStreamSynchronize(stream_), what);
        return;
    }
    const auto t0 = std::chrono::steady_clock::now();
    for (;;) {
        const cudaError_t e = cudaStreamQuery(stream_);
        if (e == cudaSuccess) return;
        if (e != cudaErrorNotReady) check(e, what);
        const bool late = std::chrono::steady_clock::now() - t0 > std::chrono::seconds(sw_.tp_timeout_s);
        if (abort_requested_.load() || late) end_group(late);
        std::this_thread::yield();
    }
}

// Ends the group from this rank's thread: its communicator aborted (pending
// collectives return), the barrier broken for the other ranks.
void CudaBackend::end_group(bool late) {
    abort_requested_.store(true);
    if (barrier_) barrier_->abort();
    comm_->abort();
    cudaStreamSynchronize(stream_);
    (void)cudaGetLastError();
    if (late)
        throw Error("a tensor-parallel step did not finish within " + std::to_string(sw_.tp_timeout_s) +
                    " s (a rank stopped; TM_TP_TIMEOUT sets the limit)");
    throw Error("the tensor-parallel group was ended after an error on another rank");
}

// The ranks are threads of one process, and a CUDA call that changes a
// device's page tables (a module that cuBLAS loads on a GEMM shape's first
// use, a graph's instantiation, an allocation) takes a lock of the process
// and can wait for the devices' work. If one rank's GPU is already spinning
// in a collective that waits for another rank, and that rank's thread is
// inside such a call before enqueuing its side, neither goes on (seen on
// 2 x H100: every --tp 2 run hung in its first step). So in steps run kernel
// by kernel the ranks meet before each collective is enqueued (every earlier
// collective is then enqueued on every rank and can finish) and after it
// (every rank has enqueued this one before any goes on to such a call); and
// before a newly captured graph is first launched. A captured graph's replay
// enqueues its collectives without the host, so it needs no meeting.
void CudaBackend::sync_ranks() {
    if (!barrier_ || capturing_) return;
    try {
        barrier_->arrive_and_wait();
    } catch (const Error&) {
        end_group(!abort_requested_.load());
    }
}

float* CudaBackend::forward(const BatchPlan& plan) {
    enqueue(plan);
    return collect();
}

void CudaBackend::launch(const BatchPlan& plan) { enqueue(plan); }

float* CudaBackend::collect() {
    if (!pending_.queued) throw Error("cuda backend: collect() without a launched step");
    pending_.queued = false;
    if (sg_.on) cudaEventRecord(sg_.b, stream_);
    wait("forward");
    if (sg_.on) {
        const auto now = std::chrono::steady_clock::now();
        if (pending_.decode && sg_.last.time_since_epoch().count() != 0) {
            float ms = 0;
            cudaEventElapsedTime(&ms, sg_.a, sg_.b);
            sg_.steps += 1;
            sg_.gpu_ms += ms;
            sg_.wall_ms += std::chrono::duration<double, std::milli>(now - sg_.last).count();
            sg_.host_ms += std::chrono::duration<double, std::milli>(sg_.enq - sg_.last).count();
        }
        sg_.last = now;
    }
    prof_.end(pending_.decode, pending_.T);
    return pending_.out;
}

// What a step is: its rows, how its attention work divides (tiles of prompt
// chunks, single rows), and whether it replays a decode graph (padded to Tp rows).
CudaBackend::StepShape CudaBackend::shape_step(const BatchPlan& plan) const {
    StepShape sh;
    const int T = int(plan.tokens.size()), L = int(plan.logit_rows.size()), S = int(plan.seqs.size());
    sh.T = T, sh.L = L, sh.S = S;
    // Attention work: sequences with several rows this step go in tiles of
    // consecutive rows (prefill chunks), the others row by row (decode).
    const int group = cfg_.num_heads / cfg_.num_kv_heads;
    const int tile_rows = cuda::attention_tile_rows(group);
    const bool tiles_ok = cuda::attention_tiles_supported(cfg_.head_dim);
    for (auto& q : plan.seqs) {
        if (q.n_rows >= 4 && tiles_ok) sh.n_tiles += size_t((q.n_rows + tile_rows - 1) / tile_rows);
        else sh.n_single += size_t(q.n_rows);
        sh.n_blocks += size_t(q.n_blocks);
    }
    // Decode steps (one row per sequence) replay a CUDA graph per batch size;
    // with buckets, the batch is padded to the bucket's size by rows of
    // token 0 at position 0, each its own sequence over the scratch block
    // (their K/V land there, their outputs are ignored).
    sh.decode = sh.n_tiles == 0 && size_t(T) == sh.n_single && L == T && S == T;
    sh.use_graph = sh.decode && sw_.graphs && T <= kMaxGraphBatch;
    sh.Tp = T;
    if (sh.use_graph && sw_.graph_buckets) {
        const int b = graph_bucket(T);
        if (b <= lim_.max_batch_tokens && b <= lim_.max_logit_rows) sh.Tp = b;
    }
    return sh;
}

// The step's metadata in h_meta_ (MetaLayout): tokens, positions, rows'
// sequences, logit rows, block offsets and tables, prefill tiles, and the
// decode work items, longest first; padding rows for a graph bucket.
MetaLayout CudaBackend::write_meta(const BatchPlan& plan, const StepShape& sh) {
    const int T = sh.T, L = sh.L, S = sh.S, Tp = sh.Tp, pad = Tp - T;
    const size_t n_tiles = sh.n_tiles, n_single = sh.n_single, n_blocks = sh.n_blocks;
    const int tile_rows = cuda::attention_tile_rows(cfg_.num_heads / cfg_.num_kv_heads);
    const bool tiles_ok = cuda::attention_tiles_supported(cfg_.head_dim);
    MetaLayout ml;
    ml.tokens = 0;
    ml.positions = size_t(Tp);
    ml.row_seq = 2 * size_t(Tp);
    ml.lrows = 3 * size_t(Tp);
    ml.boff = ml.lrows + size_t(L + pad);
    const int n_rows = int(n_single) + pad, item_cap = cuda::decode_item_capacity(n_rows, cfg_.num_kv_heads);
    ml.items = (ml.boff + size_t(S + pad) + 3) / 4 * 4;  // int4-aligned
    ml.row_items = ml.items + 4 * size_t(item_cap);
    ml.tiles = ml.row_items + 2 * size_t(n_rows);  // int2-aligned
    ml.blocks = ml.tiles + 2 * n_tiles;
    ml.total = ml.blocks + n_blocks + (pad > 0 ? 1 : 0);
    if (ml.total > meta_cap_) throw Error("cuda backend: step metadata larger than reserved");
    int* m = h_meta_;
    std::memcpy(m + ml.tokens, plan.tokens.data(), size_t(T) * 4);
    std::memcpy(m + ml.positions, plan.positions.data(), size_t(T) * 4);
    std::memcpy(m + ml.lrows, plan.logit_rows.data(), size_t(L) * 4);
    single_.clear();
    {
        int* tiles = m + ml.tiles;
        size_t bo = 0;
        for (int s = 0; s < S; ++s) {
            const auto& q = plan.seqs[size_t(s)];
            for (int r = 0; r < q.n_rows; ++r) m[ml.row_seq + size_t(q.row_begin + r)] = s;
            m[ml.boff + size_t(s)] = int(bo);
            std::memcpy(m + ml.blocks + bo, q.blocks, size_t(q.n_blocks) * 4);
            bo += size_t(q.n_blocks);
            if (q.n_rows >= 4 && tiles_ok) {
                for (int r = 0; r < q.n_rows; r += tile_rows) {
                    *tiles++ = q.row_begin + r;
                    *tiles++ = std::min(tile_rows, q.n_rows - r);
                }
            } else {
                for (int r = 0; r < q.n_rows; ++r) single_.push_back(q.row_begin + r);
            }
        }
        if (pad > 0) {
            m[ml.blocks + bo] = lim_.num_blocks;  // the scratch block
            for (int j = 0; j < pad; ++j) {
                const int r = T + j;
                m[ml.tokens + size_t(r)] = 0;
                m[ml.positions + size_t(r)] = 0;
                m[ml.lrows + size_t(r)] = r;
                m[ml.row_seq + size_t(r)] = S + j;
                m[ml.boff + size_t(S + j)] = int(bo);
                single_.push_back(r);
            }
        }
    }
    {
        // Longest first: the attention kernels' blocks start roughly in list
        // order, so long contexts do not start last and leave SMs idle at
        // the end of a large decode batch (LPT order). Work of a row or tile
        // is its visible keys.
        const int* pos = m + ml.positions;
        const int w = cfg_.sliding_window;
        const auto keys = [pos, w](int r) { return w > 0 ? std::min(pos[r] + 1, w) : pos[r] + 1; };
        std::stable_sort(single_.begin(), single_.begin() + long(n_single),
                         [&](int a, int b) { return keys(a) > keys(b); });
        auto* tiles = reinterpret_cast<std::array<int, 2>*>(m + ml.tiles);
        std::stable_sort(tiles, tiles + n_tiles, [&](const std::array<int, 2>& a, const std::array<int, 2>& b) {
            return keys(a[0] + a[1] - 1) > keys(b[0] + b[1] - 1);
        });
        // Work items of the single rows (padding rows included): long rows
        // cut into pieces (kernels/attention/attention.cu).
        lens_.resize(size_t(n_rows));
        for (int i = 0; i < n_rows; ++i) lens_[size_t(i)] = keys(single_[size_t(i)]);
        cuda::plan_decode_items(single_.data(), lens_.data(), n_rows, cfg_.num_kv_heads, sw_.split_attention,
                                reinterpret_cast<int4*>(m + ml.items), reinterpret_cast<int2*>(m + ml.row_items));
    }
    return ml;
}

void CudaBackend::enqueue(const BatchPlan& plan) {
    const StepShape sh = shape_step(plan);
    const int T = sh.T, L = sh.L, Tp = sh.Tp;
    const bool decode = sh.decode, use_graph = sh.use_graph;
    const size_t n_single = sh.n_single, n_tiles = sh.n_tiles;
    trace("forward rows", T);
    if (T == 0 || T > lim_.max_batch_tokens || L > lim_.max_logit_rows)
        throw Error("cuda backend: batch plan outside the limits it was initialized with");
    const MetaLayout ml = write_meta(plan, sh);
    if (sg_.on) {
        sg_.enq = std::chrono::steady_clock::now();
        cudaEventRecord(sg_.a, stream_);
    }
    check(cudaMemcpyAsync(meta_.p, h_meta_, ml.total * 4, cudaMemcpyHostToDevice, stream_), "metadata upload");
    // TM_CUDA_NCU_STEP=N: the N-th decode step's kernels between
    // cudaProfilerStart and Stop (ncu --profile-from-start off).
    const bool ncu = decode && sw_.ncu_step >= 0 && steps_++ == sw_.ncu_step;
    if (ncu) cudaProfilerStart();

    if (use_graph) {
        cudaGraphExec_t& exec = graphs_[size_t(Tp)];
        if (!exec) {
            cudaGraph_t graph;
            trace("capture rows", Tp);
            check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "graph capture");
            capturing_ = true;
            try {
                run(StepArgs{Tp, Tp, size_t(Tp), 0, ml.positions, ml.row_seq, ml.lrows, ml.boff, ml.items,
                             ml.row_items, ml.tiles, ml.blocks});
            } catch (...) {
                capturing_ = false;
                cudaStreamEndCapture(stream_, &graph);
                throw;
            }
            capturing_ = false;
            check(cudaStreamEndCapture(stream_, &graph), "graph capture");
            check(cudaGraphInstantiate(&exec, graph, 0), "graph instantiate");
            cudaGraphDestroy(graph);
            sync_ranks();  // every rank's graph instantiated before any runs
        }
        trace("graph launch rows", Tp);
        check(cudaGraphLaunch(exec, stream_), "graph launch");
    } else {
        run(StepArgs{T, L, n_single, n_tiles, ml.positions, ml.row_seq, ml.lrows, ml.boff, ml.items, ml.row_items,
                     ml.tiles, ml.blocks});
    }
    if (ncu) cudaProfilerStop();
    queue_outputs(plan, decode, T);
}

// After the forward pass: the step's results on their way to the host (the
// sampled or greedy ids, or the logits), for collect().
void CudaBackend::queue_outputs(const BatchPlan& plan, bool decode, int T) {
    const int L = int(plan.logit_rows.size());
    if (L > 0 && plan.sample.size() == size_t(L) && !plan.greedy_only && samples_on_device()) {
        // Sampled rows: drawn here, only the token ids come back.
        for (int i = 0; i < L; ++i) {
            const auto& q = plan.sample[size_t(i)];
            h_spec_[i] = cuda::SampleRow{q.temperature, q.top_p, q.min_p, q.u, q.top_k};
        }
        check(cudaMemcpyAsync(spec_.p, h_spec_, size_t(L) * sizeof(cuda::SampleRow), cudaMemcpyHostToDevice, stream_),
              "sampling upload");
        cuda::sample_rows(logits_.p, L, out_rows_, spec_.p, ids_.p, stream_);
        launched("sample_rows");
        prof_.mark(prof_.kLogits);
        check(cudaMemcpyAsync(h_ids_, ids_.p, size_t(L) * 4, cudaMemcpyDeviceToHost, stream_), "ids download");
        pending_ = {nullptr, decode, T, true};
        return;
    }
    if (L > 0 && plan.greedy_only) {
        // Greedy rows: only the token ids come back (and, on a rank holding
        // a slice of the vocabulary, each row's largest logit).
        const bool slice = out_rows_ != cfg_.vocab_size;
        cuda::argmax_rows(logits_.p, L, out_rows_, ids_.p, stream_, slice ? vals_.p : nullptr);
        launched("argmax");
        prof_.mark(prof_.kLogits);
        check(cudaMemcpyAsync(h_ids_, ids_.p, size_t(L) * 4, cudaMemcpyDeviceToHost, stream_), "ids download");
        if (slice)
            check(cudaMemcpyAsync(h_vals_, vals_.p, size_t(L) * 4, cudaMemcpyDeviceToHost, stream_), "values download");
        pending_ = {nullptr, decode, T, true};
        return;
    }
    trace("synchronize rows", T);
    if (L > 0)
        check(cudaMemcpyAsync(h_logits_, logits_.p, size_t(L) * size_t(out_rows_) * 4, cudaMemcpyDeviceToHost, stream_),
              "logits download");
    pending_ = {h_logits_, decode, T, true};
}

void* CudaBackend::buf(Buf b) {
    switch (b) {
        case Buf::Normed: return h_.p;
        case Buf::Qkv: return qkv_.p;
        case Buf::Attn: return attn_.p;
        case Buf::GateUp: return gu_.p;
        case Buf::Act: return act_.p;
    }
    throw Error("cuda backend: unknown buffer");
}

// The kernels of one step, on stream_ (captured into a graph for decode).
void CudaBackend::run(const StepArgs& a) {
    step_ = a;
    pending_reduce_ = 0;  // (a step that failed part-way may have left one)
    prof_.begin(stream_);
    program_->forward(*this);
    settle_reduce();
}

void CudaBackend::embed(WeightId table) {
    cuda::embedding(dt_, w_[size_t(table)].ptr, meta_.p, step_.T, cfg_.hidden_size, x_.p, stream_);
    launched("embedding");
    prof_.mark(prof_.kEmbed);
}

// Normed = RMSNorm(x) · w. After add_linear on a tensor-parallel rank the
// all-reduce it left pending may write the norm too (one kernel for both).
void CudaBackend::rmsnorm(WeightId w) {
    const int H = cfg_.hidden_size, T = step_.T;
    const float eps = float(cfg_.rms_norm_eps);
    if (pending_reduce_) {
        pending_reduce_ = 0;
        trace("all-reduce rows", T);
        sync_ranks();
        const bool fused = fused_comm_ && fused_comm_->all_reduce_sum_rmsnorm(x_.p, T, H, w_[size_t(w)].ptr, eps, h_.p,
                                                                              int(dt_));
        if (!fused) comm_->all_reduce_sum(x_.p, size_t(T) * size_t(H));
        sync_ranks();
        prof_.mark(prof_.kAllReduce);
        if (fused) return;
    }
    cuda::rmsnorm(dt_, x_.p, nullptr, T, H, w_[size_t(w)].ptr, eps, h_.p, stream_, sw_.vector_elementwise);
    launched("rmsnorm");
    prof_.mark(prof_.kNorm);
}

// The all-reduce add_linear left pending, before an op other than rmsnorm.
void CudaBackend::settle_reduce() {
    if (!pending_reduce_) return;
    pending_reduce_ = 0;
    trace("all-reduce rows", step_.T);
    sync_ranks();
    comm_->all_reduce_sum(x_.p, size_t(step_.T) * size_t(cfg_.hidden_size));
    sync_ranks();
    prof_.mark(prof_.kAllReduce);
}

void CudaBackend::linear(WeightId w, Buf in, Buf out) {
    settle_reduce();
    const DevWeight& W = w_[size_t(w)];
    gemm(W, buf(in), step_.T, buf(out), cdt_, W.rows, 0.0f);
    prof_.mark(prof_.kGemm);
}

// x += in · wᵀ (the residual add fused into the GEMM). With tensor
// parallelism rank 0 adds its partial product to x and the others start from
// zero, so the all-reduce leaves x + every rank's part on every rank; it is
// left pending for the next op (rmsnorm fuses it).
void CudaBackend::add_linear(WeightId w, Buf in) {
    settle_reduce();
    const DevWeight& W = w_[size_t(w)];
    gemm(W, buf(in), step_.T, x_.p, CUDA_R_32F, cfg_.hidden_size, !comm_ || rank_ == 0 ? 1.0f : 0.0f);
    prof_.mark(prof_.kGemm);
    if (comm_) pending_reduce_ = step_.T;
}

cuda::BatchDev CudaBackend::batch_dev() const {
    return cuda::BatchDev{meta_.p + step_.o_pos, meta_.p + step_.o_seq, meta_.p + step_.o_boff,
                          meta_.p + step_.o_blocks};
}

void CudaBackend::qkv_rope_cache(const QkvEpilogue& e) {
    settle_reduce();
    const int qkv_ld = cfg_.q_size() + 2 * cfg_.kv_size();
    auto ptr = [&](WeightId id) { return id == kNoWeight ? nullptr : w_[size_t(id)].ptr; };
    cuda::QkvArgs qa{qkv_.p,    qkv_ld,         step_.T,        cfg_.num_heads,
                     cfg_.num_kv_heads, cfg_.head_dim, ptr(e.bias), ptr(e.q_norm),
                     ptr(e.k_norm), float(cfg_.rms_norm_eps), inv_freq_.p, e.layer};
    cuda::qkv_rope_cache(dt_, qa, batch_dev(), kvl_, stream_);
    launched("qkv_rope_cache");
    prof_.mark(prof_.kRope);
}

void CudaBackend::attention(int layer) {
    settle_reduce();
    const int hd = cfg_.head_dim, qkv_ld = cfg_.q_size() + 2 * cfg_.kv_size();
    const cuda::BatchDev bd = batch_dev();
    cuda::AttnArgs aa{qkv_.p,
                      qkv_ld,
                      step_.T,
                      cfg_.num_heads,
                      cfg_.num_kv_heads,
                      hd,
                      cfg_.sliding_window,
                      1.0f / std::sqrt(float(hd)),
                      layer,
                      attn_.p,
                      sw_.split_attention ? attn_split_.p : nullptr,
                      sw_.mma_attention};
    aa.ring_decode = sw_.ring_decode;
    aa.mma_decode = sw_.mma_decode;
    aa.register_tiles = sw_.fa_prefill;
    const auto* tiles = reinterpret_cast<const int2*>(meta_.p + step_.o_tiles);
    const auto* items = reinterpret_cast<const int4*>(meta_.p + step_.o_items);
    const auto* row_items = reinterpret_cast<const int2*>(meta_.p + step_.o_row_items);
    const int item_cap = cuda::decode_item_capacity(int(step_.n_single), cfg_.num_kv_heads);
    cuda::paged_attention_tiled(dt_, aa, bd, kvl_, tiles, int(step_.n_tiles), stream_);  // head_dim supported (tiles_ok)
    cuda::paged_attention(dt_, aa, bd, kvl_, items, item_cap, row_items, int(step_.n_single), stream_);
    launched("paged_attention");
    prof_.mark(prof_.kAttention);
}

void CudaBackend::silu_mul() {
    settle_reduce();
    cuda::silu_mul(dt_, gu_.p, step_.T, cfg_.intermediate_size, act_.p, stream_, sw_.vector_elementwise);
    launched("silu_mul");
    prof_.mark(prof_.kActivation);
}

void CudaBackend::logits(WeightId final_norm, WeightId output) {
    settle_reduce();
    if (step_.L == 0) return;
    const int H = cfg_.hidden_size;
    cuda::rmsnorm(dt_, x_.p, meta_.p + step_.o_lrows, step_.L, H, w_[size_t(final_norm)].ptr,
                  float(cfg_.rms_norm_eps), hn_.p, stream_, sw_.vector_elementwise);
    launched("rmsnorm");
    gemm(w_[size_t(output)], hn_.p, step_.L, logits_.p, CUDA_R_32F, out_rows_, 0.0f);
    prof_.mark(prof_.kLogits);
}

void CudaBackend::token_logprobs(const int* logit_index, const int* targets, int n, float* out) {
    const size_t V = size_t(cfg_.vocab_size);
    const RowMath& k = row_math();
    for (int i = 0; i < n; ++i) {
        const float* lg = h_logits_ + size_t(logit_index[i]) * V;
        out[i] = lg[targets[i]] - k.logsumexp(lg, int(V));
    }
}

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(const Workspace& ws, const CudaBackendOptions& opt) {
    return std::make_unique<CudaBackend>(ws, opt);
}

std::unique_ptr<Backend> make_cuda_tp_backend(const Workspace& ws, const CudaBackendOptions& opt) {
    const int tp = ws.tp();
    if (tp == 1) return make_cuda_backend(ws, opt);
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n < tp)
        throw Error(ws.dir() + ": --tp " + std::to_string(tp) + " needs " + std::to_string(tp) + " GPUs; " +
                    std::to_string(n) + " visible");
    if (!cuda_eager_loading())
        throw Error("--tp " + std::to_string(tp) +
                    " on CUDA needs eager module loading (lazy loading can deadlock the ranks): start the program "
                    "with CUDA_MODULE_LOADING=EAGER");
    const cuda::NcclId id = cuda::nccl_unique_id();
    const Workspace* w = &ws;
    // ncclCommInitRank waits for every rank: a rank that fails before it
    // (no device, cuBLAS, memory) would leave the others waiting for ever.
    // So the ranks meet at a gate first, and go on only if all got there.
    struct Gate {
        std::mutex mu;
        std::condition_variable cv;
        int arrived = 0;
        bool failed = false;
    };
    auto gate = std::make_shared<Gate>();
    const cuda::CudaSwitches sw = opt.switches ? *opt.switches : cuda::CudaSwitches::from_env();
    auto barrier = std::make_shared<HostBarrier>(tp, sw.tp_timeout_s);
    auto peers = sw.p2p_allreduce ? cuda::make_peer_group(tp) : nullptr;
    return make_tp_backend(ws.model(), tp, [=](int r) {
        CudaBackendOptions o = opt;
        o.switches = sw;
        o.device = r;
        o.tp = tp;
        o.rank = r;
        o.barrier = barrier;
        if (!opt.kv_params.empty()) o.kv_params = rank_kv_params(opt.kv_params, w->model(), tp, r);
        bool passed = false;
        o.make_comm = [id, r, tp, gate, peers, &passed](void* stream) {
            {
                std::unique_lock<std::mutex> lk(gate->mu);
                ++gate->arrived;
                gate->cv.notify_all();
                gate->cv.wait(lk, [&] { return gate->failed || gate->arrived == tp; });
                if (gate->failed) throw Error("another tensor-parallel rank failed to start");
                passed = true;
            }
            return cuda::nccl_communicator(id, r, tp, static_cast<cudaStream_t>(stream), peers);
        };
        try {
            return make_cuda_backend(*w, o);
        } catch (...) {
            if (!passed) {
                std::lock_guard<std::mutex> lk(gate->mu);
                gate->failed = true;
                gate->cv.notify_all();
            }
            throw;
        }
    }, gate);
}

}  // namespace tmc
