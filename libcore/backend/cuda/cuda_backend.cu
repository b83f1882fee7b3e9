// The CUDA backend (cuda_backend.hpp): construction, weights and buffers,
// the ops of a model program, and the factories.
#include <cmath>

#include "backend/cuda/cuda_backend.hpp"

namespace tmc {

namespace gpu {

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

}  // namespace gpu

std::unique_ptr<Backend> make_cuda_backend(const Workspace& ws, const CudaBackendOptions& opt) {
    return std::make_unique<gpu::CudaBackend>(ws, opt);
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
    if (!opt.program) throw Error("cuda backend: no model program");
    const bool vocab_split = opt.program->output_rows() != ws.model().vocab_size;
    return make_tp_backend(ws.model(), tp, vocab_split, [=](int r) {
        CudaBackendOptions o = opt;
        o.switches = sw;
        o.device = r;
        o.tp = tp;
        o.rank = r;
        o.barrier = barrier;
        if (!opt.kv_params.empty())
            o.kv_params = rank_kv_params(opt.kv_params, *opt.program, w->model().num_kv_heads, r);
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
