// A step of the CUDA backend (cuda_backend.hpp): its metadata, decode graphs,
// launch and collect, and the waits of tensor-parallel ranks.
#include <cuda_profiler_api.h>

#include "backend/cuda/cuda_backend.hpp"

namespace tmc::gpu {

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

}  // namespace tmc::gpu
