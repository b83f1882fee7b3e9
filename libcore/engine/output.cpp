// A request's output: each sampled token is appended, checked against the
// stop conditions (EOS, stop ids, stop strings through the streaming
// decoder, max_tokens, the context), decoded to text (held back while it
// may begin a stop string; with an asynchronous backend, decoded while the
// device runs the next step) and emitted to the request's callback; finish()
// ends a request wherever it is.
#include <algorithm>

#include "engine/engine_state.hpp"

namespace tmc {

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
    if (!r.req.conversation.empty()) r.answer += r.new_text;
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
    if (r->session) return_to_session(*r, why);
    else bm->release_all(r->seq.blocks);
    if (r->req.session_id) {
        std::lock_guard<std::mutex> lk(mu);
        auto it = session_request.find(*r->req.session_id);
        if (it != session_request.end() && it->second == r->id) session_request.erase(it);
    }
    publish();
    if (r->cb) {
        r->new_text += r->held;
        r->held.clear();
        emit(*r, true, why, error);
    }
}


}  // namespace tmc
