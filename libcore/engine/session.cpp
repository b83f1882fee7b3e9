// Sessions (a request's session_id): the engine thread is the one owner of
// a conversation's state. Between requests a session keeps its sequence
// (token ids and their KV blocks); the next request of the session reuses
// the longest common prefix of its prompt, and idle sessions give their
// blocks back under memory pressure (least recently used first; the next
// turn then recomputes). Callers see sessions only through the public API:
// Request::session_id / append, Engine::end_session and session_tokens.
#include <algorithm>

#include "engine/engine_state.hpp"

namespace tmc {

// Attaches a request to its session (reusing the cached prefix) and sets its
// prompt.
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

// Engine::end_session: the session's blocks freed now, or when its request ends.
void Engine::Impl::end_session(uint64_t id) {
    auto it = sessions.find(id);
    if (it == sessions.end()) return;
    if (it->second.busy) {
        it->second.ending = true;
        return;
    }
    bm->release_all(it->second.seq.blocks);
    sessions.erase(it);
    std::lock_guard<std::mutex> lk(mu);
    session_tokens_snapshot.erase(id);
    session_conversation_snapshot.erase(id);
}

// A finished request hands its sequence back to its session (or, when the
// session was ended meanwhile, frees it), and its conversation with the
// answer when it ended without an error.
void Engine::Impl::return_to_session(Req& r, FinishReason why) {
    Session& s = *r.session;
    s.seq = std::move(r.seq);
    s.last_used = ++tick;
    s.busy = nullptr;
    r.session = nullptr;
    const bool talk = !r.req.conversation.empty() && why != FinishReason::Error;
    if (talk) {
        s.conversation = std::move(r.req.conversation);
        s.conversation.push_back({"assistant", r.answer + r.new_text + r.held});
    }
    std::lock_guard<std::mutex> lk(mu);
    if (s.ending) {
        session_tokens_snapshot.erase(s.id);
        session_conversation_snapshot.erase(s.id);
        bm->release_all(s.seq.blocks);
        sessions.erase(s.id);
    } else {
        session_tokens_snapshot[s.id] = s.seq.tokens;
        if (talk) session_conversation_snapshot[s.id] = s.conversation;
    }
}

}  // namespace tmc
