// The engine: its public API (tm/engine.hpp) and the loop of the engine
// thread, which owns every sequence, block and session. Each step it drains
// the inbox (submit, cancel, end session), plans a batch (scheduler.cpp),
// runs the backend and samples (step.cpp), and sends outputs (output.cpp).
#include "tm/engine.hpp"

#include <cmath>
#include <random>

#include "engine/engine_state.hpp"
#include "tm/error.hpp"

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

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Engine::~Engine() {
    {
        std::lock_guard<std::mutex> lk(impl_->mu);
        impl_->inbox.push_back(eng::Command{eng::Command::Stop, nullptr, 0});
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
    auto r = std::make_unique<eng::Req>();
    r->id = impl_->next_id++;
    r->req = std::move(req);
    r->cb = std::move(cb);
    r->rng = Rng(r->req.sampling.seed ? *r->req.sampling.seed : std::random_device{}() * 0x100000001ull ^ r->id);
    r->dec = std::make_unique<StreamDecoder>(*impl_->tok, r->req.sampling.skip_special_tokens);
    r->t_submit = eng::Clock::now();
    const uint64_t id = r->id;
    {
        std::lock_guard<std::mutex> lk(impl_->mu);
        if (r->req.session_id) impl_->session_request[*r->req.session_id] = id;
        impl_->inbox.push_back(eng::Command{eng::Command::Submit, std::move(r), 0});
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
        impl_->inbox.push_back(eng::Command{eng::Command::Cancel, nullptr, request_id});
    }
    impl_->cv.notify_all();
}

void Engine::end_session(uint64_t session_id) {
    {
        std::lock_guard<std::mutex> lk(impl_->mu);
        impl_->inbox.push_back(eng::Command{eng::Command::EndSession, nullptr, session_id});
        impl_->session_conversation_snapshot.erase(session_id);
        impl_->busy = true;
    }
    impl_->cv.notify_all();
}

std::vector<int> Engine::session_tokens(uint64_t session_id) const {
    std::lock_guard<std::mutex> lk(impl_->mu);
    auto it = impl_->session_tokens_snapshot.find(session_id);
    return it == impl_->session_tokens_snapshot.end() ? std::vector<int>{} : it->second;
}

std::vector<ChatMessage> Engine::session_conversation(uint64_t session_id) const {
    std::lock_guard<std::mutex> lk(impl_->mu);
    auto it = impl_->session_conversation_snapshot.find(session_id);
    return it == impl_->session_conversation_snapshot.end() ? std::vector<ChatMessage>{} : it->second;
}

std::optional<uint64_t> Engine::session_request(uint64_t session_id) const {
    std::lock_guard<std::mutex> lk(impl_->mu);
    auto it = impl_->session_request.find(session_id);
    if (it == impl_->session_request.end()) return std::nullopt;
    return it->second;
}

EngineStats Engine::stats() const {
    std::lock_guard<std::mutex> lk(impl_->mu);
    return impl_->snapshot;
}

void Engine::wait_idle() {
    std::unique_lock<std::mutex> lk(impl_->mu);
    impl_->idle_cv.wait(lk, [&] { return !impl_->busy; });
}

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


bool Engine::Impl::drain() {
    std::vector<eng::Command> cmds;
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
            case Command::EndSession: end_session(c.id); break;
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

}  // namespace tmc
