// The scheduler: which rows run in a step (dynamic split-fuse). Running
// sequences come first, oldest first, each with its decode token or its
// next prompt chunk; then waiting requests, first come first served, while
// the token budget (max_batch_tokens), the batch size and the KV blocks
// last. When blocks run out, idle sessions give theirs back first, then the
// newest running sequences are preempted (their blocks freed; they wait at
// the front and recompute). The result is the step's BatchPlan and a slot
// per sequence (its rows and logit rows).
#include <algorithm>

#include "engine/engine_state.hpp"

namespace tmc {

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

// schedule(), and when nothing could be scheduled because waiting requests
// that hold session blocks starve the front one, those blocks are released
// (the requests recompute later) and it plans again.
void Engine::Impl::schedule_step() {
    schedule();
    if (!slots.empty() || !running.empty() || waiting.empty()) return;
    for (auto& w : waiting)
        if (!w->seq.blocks.empty()) {
            bm->release_all(w->seq.blocks);
            w->seq.computed = 0;
        }
    schedule();
}

}  // namespace tmc
