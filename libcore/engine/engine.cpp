// The engine loop: one thread owns every sequence, block and session. Each
// step it drains the inbox (submit, cancel, end session), plans a batch
// (decode tokens of running sequences first, then prompt chunks under the
// token budget: dynamic split-fuse), runs the backend, samples, checks stop
// conditions and emits outputs.
#include "model/decoder.hpp"
#include "tm/engine.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <list>
#include <random>
#include <thread>
#include <unordered_map>

#include "backend/backend.hpp"
#include "base/thread_pool.hpp"
#include "base/mapped_file.hpp"
#include "engine/block_manager.hpp"
#include "engine/sampler.hpp"
#include "model/tp_split.hpp"
#include "tm/device.hpp"
#include "tm/error.hpp"
#include "tm/qparams.hpp"
#include "tm/workspace.hpp"

namespace tmc {

const char* finish_reason_name(FinishReason r) {
    switch (r) {
        case FinishReason::Stop: return "stop";
        case FinishReason::Length: return "length";
        case FinishReason::Cancelled: return "cancelled";
        case FinishReason::Error: return "error";
        case FinishReason::None: break;
    }
    return "";
}

namespace {

using Clock = std::chrono::steady_clock;

struct Seq {
    std::vector<int> tokens;
    int computed = 0;  // tokens whose K/V are in the cache
    std::vector<int> blocks;
};

struct Session;

struct Req {
    uint64_t id = 0;
    Request req;
    Engine::Callback cb;
    Seq seq;
    Session* session = nullptr;
    bool prepared = false;
    int prompt_len = 0;
    int cached = 0;
    Rng rng;
    std::unique_ptr<StreamDecoder> dec;
    std::string held;             // decoded text not yet emitted (may start a stop string)
    std::vector<int> new_ids;     // since the last output
    std::vector<int> pending;     // tokens not yet decoded to text (sent during the next step)
    std::string new_text;
    std::vector<float> prompt_lp;
    std::vector<TokenLogprob> new_lp;  // with new_ids, when sampling.logprobs >= 0
    Clock::time_point t_submit, t_first;
    bool got_first = false;
    FinishReason done = FinishReason::None;  // set when a stop condition hit; finish() follows
    int final_completion = -1;               // completion tokens, fixed when the sequence is handed back
    int out_count() const { return int(seq.tokens.size()) - prompt_len; }
};

struct Session {
    uint64_t id = 0;
    Seq seq;
    uint64_t last_used = 0;
    Req* busy = nullptr;
    bool ending = false;
};

struct Command {
    enum Kind { Submit, Cancel, EndSession, Stop } kind;
    std::unique_ptr<Req> req;
    uint64_t id = 0;
};

}  // namespace

struct Engine::Impl {
    // TM_STEP_LOG=FILE: one JSON line per step (rows, sequences, times).
    std::unique_ptr<std::FILE, int (*)(std::FILE*)> step_log{nullptr, std::fclose};
    // Set once at open.
    std::unique_ptr<Workspace> ws;
    std::unique_ptr<Tokenizer> tok;
    std::optional<ChatTemplate> tpl;
    std::unique_ptr<Backend> backend;
    ModelConfig cfg;
    int max_ctx = 0;
    int max_batch_tokens = 512;
    int max_batch_size = 256;
    std::vector<int> eos_ids;
    // With an asynchronous backend, a step's tokens are decoded and sent
    // while the device runs the next step (requests without stop strings;
    // TM_ASYNC_OUTPUT=0: at once).
    bool defer_text = false;

    // Inbox, shared with callers.
    mutable std::mutex mu;
    std::condition_variable cv, idle_cv;
    std::vector<Command> inbox;
    std::atomic<uint64_t> next_id{1};
    EngineStats snapshot;
    std::unordered_map<uint64_t, std::vector<int>> session_tokens_snapshot;
    bool busy = false;

    // Engine thread state.
    std::unique_ptr<BlockManager> bm;
    // Sampling (temperature, top-k/p, penalties) runs on the host: one
    // sampler per pool thread, the rows of a step split between them.
    std::vector<std::unique_ptr<Sampler>> samplers;
    std::unique_ptr<ThreadPool> sample_pool;
    std::vector<int> picks;
    std::vector<TokenLogprob> pick_lp;
    std::vector<int> sample_jobs;
    std::vector<std::vector<float>> lp_rows;
    std::list<std::unique_ptr<Req>> waiting;
    std::vector<std::unique_ptr<Req>> running;  // oldest first
    std::unordered_map<uint64_t, Session> sessions;
    uint64_t tick = 0;
    EngineStats st;
    BatchPlan plan;
    struct Slot {
        Req* r;
        int rows;
        int logit_begin;   // index of the first logit row of this sequence
        int n_logits;
        bool sample;
    };
    std::vector<Slot> slots;
    std::vector<int> lp_index, lp_target;
    std::vector<float> lp_out;
    std::vector<float*> lp_dest;
    std::thread thread;

    void loop();
    bool drain();
    void prepare(Req& r);
    void schedule();
    void step();
    void finish(Req* r, FinishReason why, const std::string& error = {});
    void emit(Req& r, bool final, FinishReason why, const std::string& error);
    void preempt(std::unique_ptr<Req> r);
    bool evict_one_session();
    void release_session(Session& s);
    void on_token(Req& r, int token);
    void decode_pending(Req& r);
    void send_pending();
    void publish();
};

namespace {

// log-softmax of one logits row at `tok`, and its `n` most likely tokens.
TokenLogprob token_logprob(const std::vector<float>& row, int tok, int n) {
    float mx = -INFINITY;
    for (float x : row) mx = std::max(mx, x);
    double sum = 0;
    for (float x : row) sum += std::exp(double(x - mx));
    const float lse = mx + float(std::log(sum));
    TokenLogprob t;
    t.token = tok;
    t.logprob = row[size_t(tok)] - lse;
    n = std::min<int>(n, int(row.size()));
    if (n > 0) {
        std::vector<int> idx(row.size());
        for (size_t i = 0; i < idx.size(); ++i) idx[i] = int(i);
        std::partial_sort(idx.begin(), idx.begin() + n, idx.end(), [&](int a, int b) {
            return row[size_t(a)] > row[size_t(b)] || (row[size_t(a)] == row[size_t(b)] && a < b);
        });
        for (int i = 0; i < n; ++i) t.top.emplace_back(idx[size_t(i)], row[size_t(idx[size_t(i)])] - lse);
    }
    return t;
}

}  // namespace

// ------------------------------------------------------------------ open

namespace {

bool is_workspace(const std::string& path) { return path_exists(path + "/manifest.json"); }

// tm-qparams' scales (formats/workspace.md) for the whole model,
// [layers][4][kv_heads], assembled from every rank's file.
std::vector<float> static_kv_params(const Workspace& ws, int bits) {
    const ModelConfig& m = ws.model();
    const TpSplit sp = TpSplit::make(m, ws.tp());
    std::vector<float> out(size_t(m.num_layers) * 4 * m.num_kv_heads, 0.0f);
    for (int r = 0; r < ws.tp(); ++r) {
        const std::string rel = kv_qparams_path(r, bits);
        if (!ws.has_file(rel))
            throw Error(ws.dir() + ": kv_scales = static but the workspace has no int" + std::to_string(bits) +
                        " scales (run tm-qparams " + ws.dir() + " --kv int" + std::to_string(bits) +
                        ", or set kv_scales = online)");
        WeightView v = ws.tensor_at(rel);
        const int hk = sp.kv_heads, h0 = sp.kv_head_begin(r);
        if (v.dtype != DType::F32 || v.shape != std::vector<int64_t>{m.num_layers, 4, hk})
            throw Error(ws.dir() + "/" + rel + ": not [layers, 4, kv heads of the rank] fp32");
        const float* f = static_cast<const float*>(v.data);
        for (int l = 0; l < m.num_layers; ++l)
            for (int row = 0; row < 4; ++row)
                for (int h = 0; h < hk; ++h) {
                    const float x = f[(size_t(l) * 4 + row) * hk + h];
                    if (!std::isfinite(x) || (row % 2 == 0 && !(x > 0)))
                        throw Error(ws.dir() + "/" + rel + ": a scale is not a positive finite number");
                    out[(size_t(l) * 4 + row) * m.num_kv_heads + h0 + h] = x;
                }
    }
    return out;
}

// A scratch directory removed when the engine has mapped what it needs.
struct TempDir {
    std::string path;
    TempDir() {
        std::string tmpl = (std::filesystem::temp_directory_path() / "tm-hf-XXXXXX").string();
        if (!mkdtemp(tmpl.data())) throw Error("cannot create a temporary directory for the conversion");
        path = tmpl;
    }
    ~TempDir() {
        std::error_code ec;
        std::filesystem::remove_all(path, ec);
    }
};

}  // namespace

std::unique_ptr<Engine> Engine::open(const std::string& path, const EngineOptions& opt) {
    auto im = std::make_unique<Impl>();
    std::optional<TempDir> tmp;
    std::string ws_dir = path;
    if (!is_workspace(path)) {
        if (!path_exists(path + "/config.json"))
            throw Error(path + ": neither a workspace (no manifest.json) nor a Hugging Face model (no config.json)");
        // A Hugging Face directory: convert it first (files are unlinked once
        // mapped; the mappings stay valid).
        tmp.emplace();
        ws_dir = tmp->path + "/ws";
        ConvertOptions co;
        convert_hf_model(path, ws_dir, co);
    }
    im->ws = std::make_unique<Workspace>(ws_dir);
    im->cfg = im->ws->model();
    im->tok = Tokenizer::load(im->ws->tokenizer_dir());
    if (!opt.chat_template.empty()) {
        auto names = ChatTemplate::builtin_names();
        if (std::find(names.begin(), names.end(), opt.chat_template) != names.end() || opt.chat_template == "qwen" ||
            opt.chat_template == "smollm")
            im->tpl = ChatTemplate::builtin(opt.chat_template);
        else if (path_exists(opt.chat_template))
            im->tpl = ChatTemplate(read_file(opt.chat_template));
        else
            throw Error("--chat-template " + opt.chat_template + ": neither a built-in template nor a file");
    } else if (!im->tok->chat_template().empty()) {
        im->tpl = ChatTemplate(im->tok->chat_template());
    }

    std::string device = opt.device.empty() ? "auto" : opt.device;
    if (device != "auto" && device != "cpu" && device != "cuda")
        throw Error("unknown device \"" + device + "\" (cpu, cuda or auto)");
    const int kv_quant = opt.quant_policy >= 0 ? opt.quant_policy : im->ws->engine().quant_policy;
    if (kv_quant != 0 && kv_quant != 4 && kv_quant != 8) throw Error("quant_policy must be 0, 4 or 8");
    const int tp = im->ws->tp();
    if (opt.tp != 0 && opt.tp != tp)
        throw Error(im->ws->dir() + ": converted for --tp " + std::to_string(tp) + ", asked to run with --tp " +
                    std::to_string(opt.tp) + " (run with --tp " + std::to_string(tp) + ", or convert again with --tp " +
                    std::to_string(opt.tp) + ")");
    std::string why;
    if (device != "cpu") cuda_prepare_for_ranks(tp);
    const bool gpu = device != "cpu" && cuda_device_count(&why) > 0;
    if (device == "cuda" && !gpu) throw Error("--device cuda: no usable GPU (" + why + ")");
    std::vector<float> kv_params;
    if (kv_quant != 0 && im->ws->engine().kv_static) kv_params = static_kv_params(*im->ws, kv_quant);
    bool on_gpu = false;
    if (gpu) {
        try {
            CudaBackendOptions cbo;
            cbo.program = model_program(*im->ws);
            cbo.kv_quant = kv_quant;
            cbo.kv_params = kv_params;
            im->backend = make_cuda_tp_backend(*im->ws, cbo);
            on_gpu = true;
        } catch (const Error& e) {
            if (device == "cuda") throw;
            if (opt.log) opt.log(std::string("CUDA backend unavailable (") + e.what() + "); using the CPU");
        }
    }
    if (!im->backend) {
        CpuBackendOptions co;
        co.program = model_program(*im->ws);
        co.threads = opt.threads;
        co.kv_quant = kv_quant;
        co.kv_params = std::move(kv_params);
        if (const char* g = std::getenv("TM_CPU_ASYNC")) co.async = std::string(g) == "1";
        im->backend = make_cpu_tp_backend(*im->ws, co);
    }

    const EngineConfig& ec = im->ws->engine();
    int session_len = opt.session_len > 0 ? opt.session_len : ec.session_len > 0 ? ec.session_len
                                                                                 : im->cfg.max_position_embeddings;
    if (session_len <= 1) throw Error("session length must be at least 2 tokens");
    const int block_size = opt.block_size > 0 ? opt.block_size : ec.cache_block_seq_len;
    if (block_size <= 0 || block_size > 4096) throw Error("block size must be in 1..4096");
    const size_t per_token = im->backend->kv_bytes_per_token();
    // Default step budget: 512 tokens on the CPU, 4096 on a GPU (whose
    // prefill is efficient in large chunks; the figures of scripts/bench-gpu.sh).
    const int batch_tokens = opt.max_batch_tokens > 0 ? opt.max_batch_tokens : on_gpu ? 4096 : 512;
    int64_t tokens = opt.cache_tokens;
    if (tokens <= 0) {
        int64_t bytes = opt.cache_bytes > 0
                            ? opt.cache_bytes
                            : int64_t(im->backend->default_kv_bytes(ec.cache_max_entry_count, batch_tokens));
        tokens = bytes / int64_t(per_token);
        if (opt.cache_bytes <= 0) tokens = std::max<int64_t>(tokens, session_len);  // the default fits one full sequence
    }
    int num_blocks = int(std::min<int64_t>(tokens / block_size, 1 << 30));
    if (num_blocks < 1) throw Error("KV cache too small: " + std::to_string(tokens) + " tokens is less than one block of " +
                                    std::to_string(block_size));
    im->max_ctx = int(std::min<int64_t>(session_len, int64_t(num_blocks) * block_size));
    im->max_batch_tokens = batch_tokens;
    // Default sequences per step: 256 on the CPU, 1024 on a GPU (offline
    // throughput of the 8B model on an H100, 1000 requests: 8,787 output
    // tokens/s against 8,566 with 512, in the same run; every request starts
    // early, so fewer long ones are left alone at the end).
    im->max_batch_size = opt.max_batch_size > 0 ? opt.max_batch_size : on_gpu ? 1024 : 256;
    im->max_batch_size = std::min(im->max_batch_size, im->max_batch_tokens);
    BackendLimits lim;
    lim.num_blocks = num_blocks;
    lim.block_size = block_size;
    lim.max_batch_tokens = im->max_batch_tokens;
    lim.max_logit_rows = im->max_batch_tokens;
    lim.max_context = im->max_ctx;
    im->backend->init(lim);
    im->bm = std::make_unique<BlockManager>(num_blocks, block_size);
    {
        // Enough threads to sample a large batch quickly, leaving the rest of
        // the machine alone (a CPU backend uses its own pool).
        const int hw = int(std::thread::hardware_concurrency());
        int n = std::clamp(hw / 2, 1, 8);
        if (const char* t = std::getenv("TM_SAMPLE_THREADS")) n = std::clamp(std::atoi(t), 1, 64);
        im->sample_pool = std::make_unique<ThreadPool>(n);
        for (int i = 0; i < im->sample_pool->size(); ++i)
            im->samplers.push_back(std::make_unique<Sampler>(im->cfg.vocab_size));
        im->lp_rows.resize(size_t(im->sample_pool->size()));
    }
    im->eos_ids = im->cfg.eos_token_ids;
    if (im->tok->eos_id() >= 0 && std::find(im->eos_ids.begin(), im->eos_ids.end(), im->tok->eos_id()) == im->eos_ids.end())
        im->eos_ids.push_back(im->tok->eos_id());
    const char* async_output = std::getenv("TM_ASYNC_OUTPUT");
    im->defer_text = im->backend->asynchronous() && !(async_output && std::string(async_output) == "0");
    im->st.blocks_total = num_blocks;
    im->st.blocks_free = num_blocks;
    im->st.block_size = block_size;
    im->snapshot = im->st;
    if (opt.log)
        opt.log("backend " + im->backend->name() + "; KV cache " + std::to_string(int64_t(num_blocks) * block_size) +
                " tokens (" + std::to_string(num_blocks) + " blocks of " + std::to_string(block_size) +
                "); context " + std::to_string(im->max_ctx));
    if (const char* path = std::getenv("TM_STEP_LOG"); path && *path) {
        im->step_log.reset(std::fopen(path, "w"));
        if (!im->step_log) throw Error(std::string("TM_STEP_LOG: cannot write ") + path);
        std::setvbuf(im->step_log.get(), nullptr, _IOLBF, 0);
    }
    Impl* raw = im.get();
    im->thread = std::thread([raw] { raw->loop(); });
    return std::unique_ptr<Engine>(new Engine(std::move(im)));
}

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Engine::~Engine() {
    {
        std::lock_guard<std::mutex> lk(impl_->mu);
        impl_->inbox.push_back(Command{Command::Stop, nullptr, 0});
    }
    impl_->cv.notify_all();
    impl_->thread.join();
}

const Tokenizer& Engine::tokenizer() const { return *impl_->tok; }
const ModelConfig& Engine::model() const { return impl_->cfg; }
std::string Engine::backend_name() const { return impl_->backend->name(); }
int Engine::session_len() const { return impl_->max_ctx; }

namespace {
// The template and its options; throws when the model has none.
const ChatTemplate& chat_template(const Engine::Impl& im, bool add_generation_prompt, ChatRenderOptions* o);
}  // namespace

std::string Engine::render_chat(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const {
    ChatRenderOptions o;
    return chat_template(*impl_, add_generation_prompt, &o).render(messages, o);
}

std::string Engine::render_chat_json(const std::string& messages_json, bool add_generation_prompt) const {
    ChatRenderOptions o;
    return chat_template(*impl_, add_generation_prompt, &o).render_json(messages_json, o);
}

namespace {
const ChatTemplate& chat_template(const Engine::Impl& im, bool add_generation_prompt, ChatRenderOptions* o) {
    if (!im.tpl) throw Error("the model has no chat template; choose one (--chat-template)");
    o->add_generation_prompt = add_generation_prompt;
    o->bos_token = im.tok->bos_token();
    o->eos_token = im.tok->eos_token();
    return *im.tpl;
}
}  // namespace

std::vector<int> Engine::encode_chat(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const {
    // The template writes BOS itself where the model wants it.
    return impl_->tok->encode(render_chat(messages, add_generation_prompt), false);
}

// ------------------------------------------------------------------ requests

namespace {

void validate(const Request& r, const ModelConfig& cfg) {
    const SamplingParams& p = r.sampling;
    if (r.prompt.empty() && !(r.session_id && r.append)) throw Error("the prompt is empty");
    for (int t : r.prompt)
        if (t < 0 || t >= cfg.vocab_size)
            throw Error("token id " + std::to_string(t) + " is outside the vocabulary (0.." +
                        std::to_string(cfg.vocab_size - 1) + ")");
    auto finite = [](float x) { return std::isfinite(x); };
    if (p.max_tokens < 0) throw Error("max_tokens must be at least 0");
    if (!finite(p.temperature) || p.temperature < 0) throw Error("temperature must be at least 0");
    if (!finite(p.top_p) || p.top_p <= 0 || p.top_p > 1) throw Error("top_p must be in (0, 1]");
    if (p.top_k < 0) throw Error("top_k must be at least 0");
    if (!finite(p.min_p) || p.min_p < 0 || p.min_p > 1) throw Error("min_p must be in [0, 1]");
    if (!finite(p.repetition_penalty) || p.repetition_penalty <= 0) throw Error("repetition_penalty must be positive");
    if (!finite(p.presence_penalty) || p.presence_penalty < -2 || p.presence_penalty > 2)
        throw Error("presence_penalty must be in [-2, 2]");
    if (!finite(p.frequency_penalty) || p.frequency_penalty < -2 || p.frequency_penalty > 2)
        throw Error("frequency_penalty must be in [-2, 2]");
    if (p.logprobs < -1 || p.logprobs > 20) throw Error("top_logprobs must be in [0, 20]");
    for (int t : p.stop_token_ids)
        if (t < 0 || t >= cfg.vocab_size) throw Error("stop token id " + std::to_string(t) + " is outside the vocabulary");
    for (auto& s : p.stop)
        if (s.empty()) throw Error("stop strings must not be empty");
}

}  // namespace

uint64_t Engine::submit(Request req, Callback cb) {
    validate(req, impl_->cfg);
    auto r = std::make_unique<Req>();
    r->id = impl_->next_id++;
    r->req = std::move(req);
    r->cb = std::move(cb);
    r->rng = Rng(r->req.sampling.seed ? *r->req.sampling.seed : std::random_device{}() * 0x100000001ull ^ r->id);
    r->dec = std::make_unique<StreamDecoder>(*impl_->tok, r->req.sampling.skip_special_tokens);
    r->t_submit = Clock::now();
    const uint64_t id = r->id;
    {
        std::lock_guard<std::mutex> lk(impl_->mu);
        impl_->inbox.push_back(Command{Command::Submit, std::move(r), 0});
        impl_->busy = true;
    }
    impl_->cv.notify_all();
    return id;
}

Engine::Stream Engine::generate(Request req) {
    Stream s;
    s.q_ = std::make_shared<Stream::Queue>();
    auto q = s.q_;
    s.id_ = submit(std::move(req), [q](const Output& o) {
        {
            std::lock_guard<std::mutex> lk(q->mu);
            q->items.push_back(o);
        }
        q->cv.notify_all();
    });
    return s;
}

std::optional<bool> Engine::Stream::next_for(Output& out, std::chrono::milliseconds timeout) {
    if (done_ || !q_) return false;
    std::unique_lock<std::mutex> lk(q_->mu);
    if (!q_->cv.wait_for(lk, timeout, [&] { return !q_->items.empty(); })) return std::nullopt;
    out = std::move(q_->items.front());
    q_->items.pop_front();
    if (out.finished) done_ = true;
    return true;
}

bool Engine::Stream::next(Output& out) {
    for (;;) {
        auto r = next_for(out, std::chrono::hours(1));
        if (r) return *r;
    }
}

void Engine::cancel(uint64_t request_id) {
    {
        std::lock_guard<std::mutex> lk(impl_->mu);
        impl_->inbox.push_back(Command{Command::Cancel, nullptr, request_id});
    }
    impl_->cv.notify_all();
}

void Engine::end_session(uint64_t session_id) {
    {
        std::lock_guard<std::mutex> lk(impl_->mu);
        impl_->inbox.push_back(Command{Command::EndSession, nullptr, session_id});
        impl_->busy = true;
    }
    impl_->cv.notify_all();
}

std::vector<int> Engine::session_tokens(uint64_t session_id) const {
    std::lock_guard<std::mutex> lk(impl_->mu);
    auto it = impl_->session_tokens_snapshot.find(session_id);
    return it == impl_->session_tokens_snapshot.end() ? std::vector<int>{} : it->second;
}

EngineStats Engine::stats() const {
    std::lock_guard<std::mutex> lk(impl_->mu);
    return impl_->snapshot;
}

void Engine::wait_idle() {
    std::unique_lock<std::mutex> lk(impl_->mu);
    impl_->idle_cv.wait(lk, [&] { return !impl_->busy; });
}

// ------------------------------------------------------------------ engine thread

void Engine::Impl::publish() {
    st.blocks_free = bm->num_free();
    st.running = int(running.size());
    st.waiting = int(waiting.size());
    st.sessions = int(sessions.size());
    std::lock_guard<std::mutex> lk(mu);
    snapshot = st;
    if (inbox.empty() && running.empty() && waiting.empty() && busy) {
        busy = false;
        idle_cv.notify_all();
    }
}

// Takes the inbox; false when the engine is stopping.
bool Engine::Impl::drain() {
    std::vector<Command> cmds;
    {
        std::unique_lock<std::mutex> lk(mu);
        if (inbox.empty() && running.empty() && waiting.empty())
            cv.wait(lk, [&] { return !inbox.empty(); });
        cmds.swap(inbox);
    }
    bool stop = false;
    for (auto& c : cmds) {
        switch (c.kind) {
            case Command::Submit: waiting.push_back(std::move(c.req)); break;
            case Command::Cancel: {
                Req* r = nullptr;
                for (auto& w : waiting)
                    if (w->id == c.id) r = w.get();
                for (auto& w : running)
                    if (w->id == c.id) r = w.get();
                if (r) finish(r, FinishReason::Cancelled);
                break;
            }
            case Command::EndSession: {
                auto it = sessions.find(c.id);
                if (it == sessions.end()) break;
                if (it->second.busy) {
                    it->second.ending = true;
                } else {
                    bm->release_all(it->second.seq.blocks);
                    sessions.erase(it);
                    std::lock_guard<std::mutex> lk(mu);
                    session_tokens_snapshot.erase(c.id);
                }
                break;
            }
            case Command::Stop: stop = true; break;
        }
    }
    if (stop) {
        while (!running.empty()) finish(running.back().get(), FinishReason::Cancelled);
        while (!waiting.empty()) finish(waiting.back().get(), FinishReason::Cancelled);
    }
    return !stop;
}

void Engine::Impl::loop() {
    while (drain()) {
        try {
            if (!running.empty() || !waiting.empty()) step();
        } catch (const std::exception& e) {
            // A backend failure ends every request in flight with the error;
            // the engine stays up for the next ones.
            while (!running.empty()) finish(running.back().get(), FinishReason::Error, e.what());
        }
        publish();
    }
    publish();
}

void Engine::Impl::release_session(Session& s) {
    bm->release_all(s.seq.blocks);
    s.seq.computed = 0;
}

bool Engine::Impl::evict_one_session() {
    Session* victim = nullptr;
    for (auto& [id, s] : sessions)
        if (!s.busy && !s.seq.blocks.empty() && (!victim || s.last_used < victim->last_used)) victim = &s;
    if (!victim) return false;
    release_session(*victim);  // tokens stay: the next turn recomputes them
    ++st.session_evictions;
    return true;
}

void Engine::Impl::preempt(std::unique_ptr<Req> r) {
    if (!r->pending.empty()) {  // its text so far, not held back while it waits
        decode_pending(*r);
        emit(*r, false, FinishReason::None, {});
    }
    bm->release_all(r->seq.blocks);
    r->seq.computed = 0;
    ++st.preemptions;
    waiting.push_front(std::move(r));
}

// Attaches a request to its session (reusing the cached prefix) and checks
// that it fits in the context.
void Engine::Impl::prepare(Req& r) {
    r.prepared = true;
    std::vector<int> prompt = std::move(r.req.prompt);
    if (r.req.session_id) {
        Session& s = sessions[*r.req.session_id];
        s.id = *r.req.session_id;
        if (r.req.append) {
            std::vector<int> full = s.seq.tokens;
            full.insert(full.end(), prompt.begin(), prompt.end());
            prompt.swap(full);
        }
        int common = 0;
        if (!r.req.sampling.prompt_logprobs) {
            const int n = std::min<int>(s.seq.computed, int(prompt.size()));
            while (common < n && s.seq.tokens[size_t(common)] == prompt[size_t(common)]) ++common;
            common = std::min(common, int(prompt.size()) - 1);
        }
        r.seq = std::move(s.seq);
        s.seq = Seq{};
        bm->truncate(r.seq.blocks, common);
        r.seq.computed = common;
        r.cached = std::max(common, 0);
        s.busy = &r;
        r.session = &s;
    }
    r.seq.tokens = std::move(prompt);
    r.prompt_len = int(r.seq.tokens.size());
    if (r.req.sampling.prompt_logprobs) r.prompt_lp.assign(size_t(std::max(0, r.prompt_len - 1)), 0.0f);
}

void Engine::Impl::schedule() {
    plan.clear();
    slots.clear();
    int budget = max_batch_tokens;
    auto add = [&](Req& r, int take) {
        BatchPlan::Seq s;
        s.row_begin = int(plan.tokens.size());
        s.n_rows = take;
        s.ctx_len = r.seq.computed + take;
        s.blocks = r.seq.blocks.data();
        s.n_blocks = int(r.seq.blocks.size());
        for (int i = r.seq.computed; i < r.seq.computed + take; ++i) {
            plan.tokens.push_back(r.seq.tokens[size_t(i)]);
            plan.positions.push_back(i);
        }
        Slot sl{&r, take, int(plan.logit_rows.size()), 0, false};
        if (r.req.sampling.prompt_logprobs) {
            // Rows at positions p < prompt_len - 1 score prompt token p + 1.
            for (int i = 0; i < take; ++i) {
                int pos = r.seq.computed + i;
                if (pos < r.prompt_len - 1) plan.logit_rows.push_back(s.row_begin + i);
            }
        }
        const bool last = s.ctx_len == int(r.seq.tokens.size());
        if (last && r.req.sampling.max_tokens > r.out_count()) {
            if (plan.logit_rows.empty() || plan.logit_rows.back() != s.row_begin + take - 1)
                plan.logit_rows.push_back(s.row_begin + take - 1);
            sl.sample = true;
        }
        sl.n_logits = int(plan.logit_rows.size()) - sl.logit_begin;
        plan.seqs.push_back(s);
        slots.push_back(sl);
        budget -= take;
    };
    // Blocks for `tokens` tokens of r: evicts idle sessions, then preempts
    // running sequences newer than index `keep` (newest first).
    auto make_room = [&](Req& r, int64_t tokens, size_t keep) {
        while (!bm->reserve(r.seq.blocks, tokens)) {
            if (evict_one_session()) continue;
            if (running.size() > keep + 1) {
                auto victim = std::move(running.back());
                running.pop_back();
                preempt(std::move(victim));
                continue;
            }
            return false;
        }
        return true;
    };

    // 1. Running sequences, oldest first: a decode token or the next prompt chunk.
    for (size_t i = 0; i < running.size() && budget > 0;) {
        Req& r = *running[i];
        int take = std::min<int>(int(r.seq.tokens.size()) - r.seq.computed, budget);
        if (!make_room(r, r.seq.computed + take, i)) {
            int64_t fit = bm->capacity(r.seq.blocks) - r.seq.computed;
            if (fit >= 1) {
                take = int(std::min<int64_t>(take, fit));
                bm->reserve(r.seq.blocks, r.seq.computed + take);
            } else {
                // r is the newest: it waits until others finish.
                auto self = std::move(running[i]);
                running.erase(running.begin() + long(i));
                preempt(std::move(self));
                continue;
            }
        }
        add(r, take);
        ++i;
    }
    // 2. Waiting requests, first come first served, while budget and blocks last.
    for (auto it = waiting.begin(); it != waiting.end() && budget > 0 && int(running.size()) < max_batch_size;) {
        Req& r = **it;
        if (r.req.session_id && !r.prepared) {
            auto s = sessions.find(*r.req.session_id);
            if (s != sessions.end() && s->second.busy) {  // one request per session at a time
                ++it;
                continue;
            }
        }
        if (!r.prepared) {
            prepare(r);
            if (r.prompt_len == 0) {
                Req* rp = &r;
                ++it;
                finish(rp, FinishReason::Error, "the prompt is empty");
                continue;
            }
            if (r.prompt_len > max_ctx) {
                Req* rp = &r;
                ++it;
                finish(rp, FinishReason::Error,
                       "the prompt has " + std::to_string(r.prompt_len) + " tokens; the context holds " +
                           std::to_string(max_ctx) + " (session length and KV cache size)");
                continue;
            }
        }
        const int take = std::min<int>(int(r.seq.tokens.size()) - r.seq.computed, budget);
        if (!make_room(r, r.seq.computed + take, running.size())) break;
        running.push_back(std::move(*it));
        it = waiting.erase(it);
        add(*running.back(), take);
    }
}

void Engine::Impl::step() {
    const auto t_step = Clock::now();
    schedule();
    if (slots.empty() && running.empty() && !waiting.empty()) {
        // Waiting requests that hold session blocks can starve the front one:
        // let them recompute later.
        for (auto& w : waiting)
            if (!w->seq.blocks.empty()) {
                bm->release_all(w->seq.blocks);
                w->seq.computed = 0;
            }
        schedule();
    }
    if (slots.empty()) return;
    // When every sampled row is greedy and plain, the backend may return only
    // the argmax of each row (the GPU then sends back ids, not logits).
    // Rows that need the logits on the host: prompt log-probabilities, and
    // sampled rows with log-probabilities or penalties.
    auto needs_host = [](const Slot& sl) {
        const SamplingParams& p = sl.r->req.sampling;
        return p.prompt_logprobs || (sl.sample && (p.logprobs >= 0 || p.repetition_penalty != 1.0f ||
                                                   p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f));
    };
    plan.greedy_only = true;
    for (auto& sl : slots) {
        const SamplingParams& p = sl.r->req.sampling;
        if (needs_host(sl) || (sl.sample && !(p.temperature <= 0.0f || p.top_k == 1))) plan.greedy_only = false;
    }
    const auto t_fwd = Clock::now();
    // Otherwise, when the backend draws tokens itself and no row needs the
    // host (penalties, log-probabilities), each logit row gets its spec and
    // the uniform number of its request's stream.
    if (!plan.greedy_only && backend->samples_on_device() && std::none_of(slots.begin(), slots.end(), needs_host)) {
        plan.sample.assign(plan.logit_rows.size(), BatchPlan::SampleSpec{});
        for (auto& sl : slots) {
            if (!sl.sample) continue;
            const SamplingParams& p = sl.r->req.sampling;
            auto& q = plan.sample[size_t(sl.logit_begin + sl.n_logits - 1)];
            q.temperature = p.top_k == 1 ? 0.0f : p.temperature;
            q.top_k = p.top_k, q.top_p = p.top_p, q.min_p = p.min_p;
            if (q.temperature > 0) q.u = std::min(float(sl.r->rng.uniform()), 0x1.fffffep-1f);
        }
    }
    backend->launch(plan);
    if (defer_text) send_pending();  // the previous step's text, while the device runs this one
    float* logits = backend->collect();
    const auto t_post = Clock::now();
    const int* greedy = logits ? nullptr : backend->greedy_ids();
    if (!logits && !greedy) throw Error("the backend returned neither logits nor token ids");
    ++st.steps;
    const size_t V = size_t(cfg.vocab_size);
    // Prompt log-probabilities: rows at position p score prompt token p + 1.
    lp_index.clear();
    lp_target.clear();
    lp_dest.clear();
    for (auto& sl : slots) {
        Req& r = *sl.r;
        if (!r.req.sampling.prompt_logprobs) continue;
        for (int j = 0; j < sl.n_logits; ++j) {
            const int pos = plan.positions[size_t(plan.logit_rows[size_t(sl.logit_begin + j)])];
            if (pos >= r.prompt_len - 1) continue;
            lp_index.push_back(sl.logit_begin + j);
            lp_target.push_back(r.seq.tokens[size_t(pos) + 1]);
            lp_dest.push_back(&r.prompt_lp[size_t(pos)]);
        }
    }
    if (!lp_index.empty()) {
        lp_out.resize(lp_index.size());
        backend->token_logprobs(lp_index.data(), lp_target.data(), int(lp_index.size()), lp_out.data());
        for (size_t k = 0; k < lp_dest.size(); ++k) *lp_dest[k] = lp_out[k];
    }
    // Sampled rows first, in parallel when there are many (each request has
    // its own random stream, so the order does not matter).
    sample_jobs.clear();
    if (!greedy)
        for (size_t i = 0; i < slots.size(); ++i)
            if (slots[i].sample) sample_jobs.push_back(int(i));
    picks.assign(slots.size(), -1);
    pick_lp.resize(slots.size());
    auto sample_one = [&](int job, int thread) {
        const size_t i = size_t(sample_jobs[size_t(job)]);
        const Slot& sl = slots[i];
        Req& r = *sl.r;
        // Prompt log-probabilities were taken above: the row can be modified.
        float* row = logits + size_t(sl.logit_begin + sl.n_logits - 1) * V;
        std::span<const int> prompt(r.seq.tokens.data(), size_t(r.prompt_len));
        std::span<const int> out(r.seq.tokens.data() + r.prompt_len, size_t(r.out_count()));
        const int nlp = r.req.sampling.logprobs;
        std::vector<float>& lp_row = lp_rows[size_t(thread)];
        if (nlp >= 0) lp_row.assign(row, row + V);  // sampling modifies the row
        picks[i] = samplers[size_t(thread)]->sample(row, r.req.sampling, prompt, out, r.rng);
        if (nlp >= 0) pick_lp[i] = token_logprob(lp_row, picks[i], nlp);
    };
    if (sample_jobs.size() >= 8) {
        sample_pool->run(int(sample_jobs.size()), sample_one);
    } else {
        for (size_t j = 0; j < sample_jobs.size(); ++j) sample_one(int(j), 0);
    }
    std::vector<Req*> done;
    for (size_t i = 0; i < slots.size(); ++i) {
        const Slot& sl = slots[i];
        Req& r = *sl.r;
        st.prompt_tokens_computed += uint64_t(std::max(0, std::min(r.seq.computed + sl.rows, r.prompt_len) - r.seq.computed));
        r.seq.computed += sl.rows;
        if (sl.sample && greedy) {
            on_token(r, greedy[sl.logit_begin + sl.n_logits - 1]);
        } else if (sl.sample) {
            if (r.req.sampling.logprobs >= 0) r.new_lp.push_back(std::move(pick_lp[i]));
            on_token(r, picks[i]);
        } else if (r.seq.computed == int(r.seq.tokens.size())) {
            // Prefill only (max_tokens reached or 0).
            r.done = FinishReason::Length;
        }
    }
    // Finished requests leave the running list.
    for (size_t i = 0; i < running.size();) {
        if (running[i]->done != FinishReason::None) finish(running[i].get(), running[i]->done);
        else ++i;
    }
    if (step_log) {
        int decode = 0;
        long ctx = 0;
        for (auto& q : plan.seqs) decode += q.n_rows == 1, ctx += q.ctx_len;
        auto us = [](Clock::time_point a, Clock::time_point b) {
            return long(std::chrono::duration_cast<std::chrono::microseconds>(b - a).count());
        };
        std::fprintf(step_log.get(),
                     "{\"step\": %llu, \"rows\": %zu, \"seqs\": %zu, \"decode_seqs\": %d, \"context_tokens\": %ld, "
                     "\"running\": %zu, \"waiting\": %zu, \"greedy_only\": %s, \"schedule_us\": %ld, "
                     "\"forward_us\": %ld, \"after_us\": %ld}\n",
                     (unsigned long long)st.steps, plan.tokens.size(), plan.seqs.size(), decode, ctx, running.size(),
                     waiting.size(), plan.greedy_only ? "true" : "false", us(t_step, t_fwd), us(t_fwd, t_post),
                     us(t_post, Clock::now()));
    }
}

namespace {

// Length of the longest suffix of `text` that is a proper prefix of `s`.
size_t partial_suffix(const std::string& text, const std::string& s) {
    for (size_t k = std::min(text.size(), s.size() - 1); k > 0; --k)
        if (text.compare(text.size() - k, k, s, 0, k) == 0) return k;
    return 0;
}

}  // namespace

void Engine::Impl::on_token(Req& r, int tok) {
    const SamplingParams& p = r.req.sampling;
    r.seq.tokens.push_back(tok);
    r.new_ids.push_back(tok);
    ++st.generated_tokens;
    if (!r.got_first) {
        r.got_first = true;
        r.t_first = Clock::now();
    }
    const bool is_eos = std::find(eos_ids.begin(), eos_ids.end(), tok) != eos_ids.end();
    if ((is_eos && !p.ignore_eos) || std::find(p.stop_token_ids.begin(), p.stop_token_ids.end(), tok) != p.stop_token_ids.end()) {
        decode_pending(r);
        r.new_text += r.held;  // the held text did not become a stop string
        r.held.clear();
        r.done = FinishReason::Stop;
        return;
    }
    const bool at_max = r.out_count() >= p.max_tokens;
    const bool at_ctx = int(r.seq.tokens.size()) > max_ctx;
    if (defer_text && p.stop.empty()) {
        // Decoded and sent during the next step (send_pending), unless it is the last.
        r.pending.push_back(tok);
        if (!at_max && !at_ctx) return;
        decode_pending(r);
    } else {
        decode_pending(r);
        r.held += r.dec->push(tok);
    }
    if (!p.stop.empty()) {
        size_t cut = std::string::npos;
        for (auto& s : p.stop) cut = std::min(cut, r.held.find(s));
        if (cut != std::string::npos) {
            r.new_text += r.held.substr(0, cut);
            r.held.clear();
            r.done = FinishReason::Stop;
            return;
        }
        size_t keep = 0;
        for (auto& s : p.stop) keep = std::max(keep, partial_suffix(r.held, s));
        r.new_text += r.held.substr(0, r.held.size() - keep);
        r.held.erase(0, r.held.size() - keep);
    } else {
        r.new_text += r.held;
        r.held.clear();
    }
    if (at_max || at_ctx) {
        r.held += r.dec->finish();
        r.new_text += r.held;
        r.held.clear();
        r.done = FinishReason::Length;
        return;
    }
    emit(r, false, FinishReason::None, {});
}

// Text of the tokens on_token left for later (no stop strings to look for).
void Engine::Impl::decode_pending(Req& r) {
    for (int tok : r.pending) {
        r.held += r.dec->push(tok);
        r.new_text += r.held;
        r.held.clear();
    }
    r.pending.clear();
}

void Engine::Impl::send_pending() {
    for (auto& r : running)
        if (!r->pending.empty()) {
            decode_pending(*r);
            emit(*r, false, FinishReason::None, {});
        }
}

// Sends an output. A final one marks the request done (cb cleared after the
// call); the loop then removes it with finish().
void Engine::Impl::emit(Req& r, bool final, FinishReason why, const std::string& error) {
    if (!r.cb) return;
    if (!final && r.new_ids.empty() && r.new_text.empty()) return;
    Output o;
    o.request_id = r.id;
    o.token_ids.swap(r.new_ids);
    o.logprobs.swap(r.new_lp);
    o.text.swap(r.new_text);
    o.finished = final;
    o.finish_reason = final ? why : FinishReason::None;
    o.error = error;
    o.usage.prompt_tokens = r.prompt_len;
    o.usage.completion_tokens = r.final_completion >= 0 ? r.final_completion : std::max(0, r.out_count());
    o.usage.cached_tokens = r.cached;
    if (final) {
        o.prompt_logprobs = std::move(r.prompt_lp);
        if (r.got_first) o.time_to_first_token = std::chrono::duration<double>(r.t_first - r.t_submit).count();
    }
    try {
        r.cb(o);
    } catch (...) {
        // A callback must not throw; the engine goes on.
    }
    if (final) r.cb = nullptr;
}

// Ends a request wherever it is: returns its sequence to its session or
// frees its blocks, removes it, publishes the stats, then sends its final
// output (so a caller that sees the end also sees the blocks back).
void Engine::Impl::finish(Req* r, FinishReason why, const std::string& error) {
    decode_pending(*r);
    std::unique_ptr<Req> owned;
    for (size_t i = 0; i < running.size() && !owned; ++i)
        if (running[i].get() == r) {
            owned = std::move(running[i]);
            running.erase(running.begin() + long(i));
        }
    for (auto it = waiting.begin(); it != waiting.end() && !owned; ++it)
        if (it->get() == r) {
            owned = std::move(*it);
            waiting.erase(it);
            break;
        }
    r->final_completion = std::max(0, r->out_count());
    if (r->session) {
        Session& s = *r->session;
        s.seq = std::move(r->seq);
        s.last_used = ++tick;
        s.busy = nullptr;
        r->session = nullptr;
        std::lock_guard<std::mutex> lk(mu);
        if (s.ending) {
            session_tokens_snapshot.erase(s.id);
            bm->release_all(s.seq.blocks);
            sessions.erase(s.id);
        } else {
            session_tokens_snapshot[s.id] = s.seq.tokens;
        }
    } else {
        bm->release_all(r->seq.blocks);
    }
    publish();
    if (r->cb) {
        r->new_text += r->held;
        r->held.clear();
        emit(*r, true, why, error);
    }
}

}  // namespace tmc
