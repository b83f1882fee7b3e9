// One engine step: the scheduler's plan run on the backend, and its logits
// (or token ids) turned into each sequence's next token. Whether the backend
// may return only ids is decided here: every sampled row greedy and plain
// (the GPU then sends back argmaxes), or drawn on the device (temperature,
// top-k/p, min-p, with the request's own uniform number); rows with
// penalties, log-probabilities or prompt log-probabilities need the logits
// on the host, where the samplers run in parallel.
#include <algorithm>
#include <cmath>

#include "engine/engine_state.hpp"
#include "tm/error.hpp"

namespace tmc {

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


namespace {

// Rows that need the logits on the host: prompt log-probabilities, and
// sampled rows with log-probabilities or penalties.
bool needs_host(const SamplingParams& p, bool sample) {
    return p.prompt_logprobs || (sample && (p.logprobs >= 0 || p.repetition_penalty != 1.0f ||
                                            p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f));
}

}  // namespace

void Engine::Impl::step() {
    const auto t_step = Clock::now();
    schedule_step();
    if (slots.empty()) return;
    choose_greedy_only();
    const auto t_fwd = Clock::now();
    choose_device_sampling();
    backend->launch(plan);
    if (defer_text) send_pending();  // the previous step's text, while the device runs this one
    float* logits = backend->collect();
    const auto t_post = Clock::now();
    const int* greedy = logits ? nullptr : backend->greedy_ids();
    if (!logits && !greedy) throw Error("the backend returned neither logits nor token ids");
    ++st.steps;
    take_prompt_logprobs();
    if (!greedy) sample_rows(logits);
    apply_step(greedy);
    if (step_log) log_step(t_step, t_fwd, t_post);
}

// When every sampled row is greedy and plain, the backend may return only
// the argmax of each row (the GPU then sends back ids, not logits).
void Engine::Impl::choose_greedy_only() {
    plan.greedy_only = true;
    for (auto& sl : slots) {
        const SamplingParams& p = sl.r->req.sampling;
        if (needs_host(p, sl.sample) || (sl.sample && !(p.temperature <= 0.0f || p.top_k == 1)))
            plan.greedy_only = false;
    }
}

// Otherwise, when the backend draws tokens itself and no row needs the
// host (penalties, log-probabilities), each logit row gets its spec and
// the uniform number of its request's stream.
void Engine::Impl::choose_device_sampling() {
    if (plan.greedy_only || !backend->samples_on_device()) return;
    for (auto& sl : slots)
        if (needs_host(sl.r->req.sampling, sl.sample)) return;
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

// Prompt log-probabilities: rows at position p score prompt token p + 1.
void Engine::Impl::take_prompt_logprobs() {
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
    if (lp_index.empty()) return;
    lp_out.resize(lp_index.size());
    backend->token_logprobs(lp_index.data(), lp_target.data(), int(lp_index.size()), lp_out.data());
    for (size_t k = 0; k < lp_dest.size(); ++k) *lp_dest[k] = lp_out[k];
}

// The sampled rows' tokens (picks), in parallel when there are many (each
// request has its own random stream, so the order does not matter).
void Engine::Impl::sample_rows(float* logits) {
    const size_t V = size_t(cfg.vocab_size);
    sample_jobs.clear();
    for (size_t i = 0; i < slots.size(); ++i)
        if (slots[i].sample) sample_jobs.push_back(int(i));
    picks.assign(slots.size(), -1);
    pick_lp.resize(slots.size());
    auto sample_one = [&](int job, int thread) {
        const size_t i = size_t(sample_jobs[size_t(job)]);
        const Slot& sl = slots[i];
        Req& r = *sl.r;
        // Prompt log-probabilities were taken already: the row can be modified.
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
}

// Books the step: computed tokens, each sampled token to its request
// (on_token), and finished requests out of the running list.
void Engine::Impl::apply_step(const int* greedy) {
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
    for (size_t i = 0; i < running.size();) {
        if (running[i]->done != FinishReason::None) finish(running[i].get(), running[i]->done);
        else ++i;
    }
}

// TM_STEP_LOG: one JSON line per step.
void Engine::Impl::log_step(Clock::time_point t_step, Clock::time_point t_fwd, Clock::time_point t_post) {
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

}  // namespace tmc
