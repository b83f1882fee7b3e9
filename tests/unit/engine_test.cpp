// The engine through its public API on tinytech: greedy outputs against the
// reference, batch invariance, sessions, preemption under a small KV pool,
// cancellation, seeds, stop conditions, errors. Plus BlockManager and Sampler.
#include "tm/engine.hpp"
#include "tm/calib.hpp"

#include <simdjson.h>

#include <algorithm>
#include <map>
#include <random>
#include <thread>

#include "base/mapped_file.hpp"
#include "engine/block_manager.hpp"
#include "engine/sampler.hpp"
#include "sampling_reference.hpp"
#include "test_util.hpp"
#include "tm/error.hpp"
#include "tm/workspace.hpp"

namespace {

// One converted tinytech workspace for the whole suite.
const std::string& tinytech_ws() {
    static tmtest::TempDir* dir = new tmtest::TempDir();  // removed at exit
    static std::string ws = [] {
        tmc::ConvertOptions opt;
        tmc::convert_hf_model(tmtest::shared_dir() + "/models/tinytech-25m", *dir / "ws", opt);
        std::atexit([] { delete dir; });
        return *dir / "ws";
    }();
    return ws;
}

struct Result {
    std::vector<int> ids;
    std::string text;
    tmc::Output final;
};

Result run(tmc::Engine& e, tmc::Request r) {
    auto s = e.generate(std::move(r));
    Result res;
    for (tmc::Output o; s.next(o);) {
        res.ids.insert(res.ids.end(), o.token_ids.begin(), o.token_ids.end());
        res.text += o.text;
        if (o.finished) res.final = o;
    }
    return res;
}

// Submits all at once; results in request order.
std::vector<Result> run_all(tmc::Engine& e, std::vector<tmc::Request> reqs) {
    std::vector<tmc::Engine::Stream> ss;
    for (auto& r : reqs) ss.push_back(e.generate(std::move(r)));
    std::vector<Result> out(ss.size());
    for (size_t i = 0; i < ss.size(); ++i)
        for (tmc::Output o; ss[i].next(o);) {
            out[i].ids.insert(out[i].ids.end(), o.token_ids.begin(), o.token_ids.end());
            out[i].text += o.text;
            if (o.finished) out[i].final = o;
        }
    return out;
}

// The same tokens, text and finish reason, request by request.
void expect_same_results(const std::vector<Result>& got, const std::vector<Result>& want) {
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < want.size(); ++i) {
        SCOPED_TRACE("request " + std::to_string(i));
        EXPECT_EQ(got[i].ids, want[i].ids);
        EXPECT_EQ(got[i].text, want[i].text);
        EXPECT_EQ(got[i].final.finish_reason, want[i].final.finish_reason);
    }
}

tmc::Request greedy(std::vector<int> prompt, int max_tokens) {
    tmc::Request r;
    r.prompt = std::move(prompt);
    r.sampling.temperature = 0;
    r.sampling.max_tokens = max_tokens;
    return r;
}

struct Golden {
    std::vector<int> prompt, output;
    std::vector<std::vector<std::pair<int, double>>> top5;
};

std::vector<Golden> golden() {
    std::vector<Golden> out;
    simdjson::dom::parser parser;
    auto text = tmc::read_file(tmtest::shared_dir() + "/golden/tinytech/greedy-fp32.jsonl");
    for (auto doc : parser.parse_many(text)) {
        simdjson::dom::array pids;
        if (doc["prompt_ids"].get(pids)) continue;
        Golden g;
        for (auto x : pids) g.prompt.push_back(int(int64_t(x)));
        for (auto x : doc["output_ids"].get_array()) g.output.push_back(int(int64_t(x)));
        for (auto step : doc["top5"].get_array()) {
            std::vector<std::pair<int, double>> t;
            for (auto p : step.get_array()) t.emplace_back(int(int64_t(p.at(0))), double(p.at(1)));
            g.top5.push_back(t);
        }
        out.push_back(g);
    }
    return out;
}

tmc::EngineOptions cpu_opts() {
    tmc::EngineOptions o;
    o.device = "cpu";
    o.threads = 2;
    return o;
}

// An engine whose CPU backend runs each step on a worker thread
// (TM_CPU_ASYNC=1), as the CUDA backend does.
std::unique_ptr<tmc::Engine> open_async(const tmc::EngineOptions& o) {
    ::setenv("TM_CPU_ASYNC", "1", 1);
    auto e = tmc::Engine::open(tinytech_ws(), o);
    ::unsetenv("TM_CPU_ASYNC");
    return e;
}

TEST(BlockManager, ReserveTruncateRefcounts) {
    tmc::BlockManager bm(4, 16);
    std::vector<int> a, b;
    EXPECT_TRUE(bm.reserve(a, 17));
    EXPECT_EQ(a.size(), 2u);
    EXPECT_EQ(bm.num_free(), 2);
    EXPECT_FALSE(bm.reserve(b, 49));  // needs 4
    EXPECT_TRUE(b.empty());
    EXPECT_EQ(bm.capacity(a), 64);
    bm.retain(a[0]);
    bm.truncate(a, 0);
    EXPECT_EQ(bm.num_free(), 3);  // a[0] still held by the retain
    EXPECT_THROW(bm.release(a.empty() ? 3 : a[0]), tmc::Error);
}

TEST(Sampler, GreedySeedsAndFilters) {
    tmc::Sampler s(8);
    std::vector<float> base = {0.1f, 2.0f, 1.9f, -1.0f, 0.0f, 2.0f, 0.5f, 0.2f};
    tmc::SamplingParams p;
    p.temperature = 0;
    tmc::Rng rng(1);
    auto l = base;
    EXPECT_EQ(s.sample(l.data(), p, {}, {}, rng), 1);  // first of equal maxima
    p.temperature = 1;
    p.top_k = 1;
    l = base;
    EXPECT_EQ(s.sample(l.data(), p, {}, {}, rng), 1);
    p.top_k = 0;
    p.top_p = 1e-6f;
    l = base;
    EXPECT_EQ(s.sample(l.data(), p, {}, {}, rng), 1);
    p.top_p = 1;
    p.min_p = 0.99f;  // only tokens as likely as the best
    for (int i = 0; i < 20; ++i) {
        l = base;
        int t = s.sample(l.data(), p, {}, {}, rng);
        EXPECT_TRUE(t == 1 || t == 5);
    }
    // Seeded streams repeat.
    p.min_p = 0;
    tmc::Rng r1(42), r2(42);
    for (int i = 0; i < 50; ++i) {
        auto l1 = base, l2 = base;
        EXPECT_EQ(s.sample(l1.data(), p, {}, {}, r1), s.sample(l2.data(), p, {}, {}, r2));
    }
    // Repetition penalty pushes a seen token below the other maximum.
    p.temperature = 0;
    p.repetition_penalty = 2;
    l = base;
    std::vector<int> seen = {1};
    EXPECT_EQ(s.sample(l.data(), p, seen, {}, rng), 5);
    p.repetition_penalty = 1;
    p.presence_penalty = 1;
    l = base;
    EXPECT_EQ(s.sample(l.data(), p, {}, seen, rng), 5);
}

// Sampled tokens follow the filtered distribution: the kept set computed
// here by a full sort (top-k, then top-p of what is left, then min-p), the
// frequencies of many draws within a small total-variation distance of it.
TEST(Sampler, DrawsFollowTheFilteredDistribution) {
    const int V = 3000;
    std::mt19937 g(7);
    std::normal_distribution<float> nd(0, 2.5f);
    std::vector<float> base(V);
    for (auto& x : base) x = nd(g);
    struct F { float t; int k; float p, min_p; };
    for (F f : {F{1.0f, 0, 1.0f, 0}, F{0.7f, 0, 0.9f, 0}, F{1.2f, 50, 1.0f, 0}, F{0.9f, 200, 0.8f, 0},
                F{1.0f, 0, 1.0f, 0.05f}, F{0.8f, 0, 0.95f, 0.01f}}) {
        const auto want = tmtest::filtered_distribution(base, f.t, f.k, f.p, f.min_p);
        size_t n = 0;
        for (double w : want) n += w > 0;
        tmc::Sampler s(V);
        tmc::SamplingParams p;
        p.temperature = f.t, p.top_k = f.k, p.top_p = f.p, p.min_p = f.min_p;
        tmc::Rng rng(3);
        std::vector<double> got(V, 0.0);
        const int draws = 40000;
        std::vector<float> l(V);
        for (int d = 0; d < draws; ++d) {
            l = base;
            const int t = s.sample(l.data(), p, {}, {}, rng);
            ASSERT_GT(want[size_t(t)], 0.0) << "token " << t << " is filtered out (t " << f.t << " k " << f.k << " p " << f.p << ")";
            got[size_t(t)] += 1.0 / draws;
        }
        double tv = 0;
        for (int i = 0; i < V; ++i) tv += std::abs(got[size_t(i)] - want[size_t(i)]) / 2;
        EXPECT_LT(tv, n > 500 ? 0.12 : 0.05) << "t " << f.t << " k " << f.k << " p " << f.p << " min_p " << f.min_p
                                             << " (" << n << " tokens kept)";
    }
}

TEST(Engine, GreedyMatchesReferenceAndIsBatchInvariant) {
    auto e = tmc::Engine::open(tinytech_ws(), cpu_opts());
    auto gold = golden();
    ASSERT_EQ(gold.size(), 12u);
    std::vector<tmc::Request> reqs;
    for (auto& g : gold) reqs.push_back(greedy(g.prompt, 48));
    auto batched = run_all(*e, reqs);
    e->wait_idle();
    for (size_t i = 0; i < gold.size(); ++i) {
        auto solo = run(*e, greedy(gold[i].prompt, 48));
        EXPECT_EQ(solo.ids, batched[i].ids) << "prompt " << i;
        // Equal to the reference, except after a near tie in the reference itself.
        const auto& want = gold[i].output;
        size_t n = std::min(want.size(), solo.ids.size());
        size_t d = 0;
        while (d < n && want[d] == solo.ids[d]) ++d;
        if (d < want.size()) {
            ASSERT_LT(d, gold[i].top5.size());
            double gap = gold[i].top5[d][0].second - gold[i].top5[d][1].second;
            EXPECT_LT(gap, 1e-3) << "prompt " << i << " differs at step " << d;
        }
    }
    auto st = e->stats();
    EXPECT_EQ(st.blocks_free, st.blocks_total);
}

TEST(Engine, SessionSecondTurnPrefillsOnlyNewTokens) {
    auto e = tmc::Engine::open(tinytech_ws(), cpu_opts());
    std::vector<tmc::ChatMessage> msgs = {{"user", "What is a file system?"}};
    tmc::Request r = greedy(e->encode_chat(msgs), 12);
    r.session_id = 7;
    auto a = run(*e, r);
    EXPECT_EQ(a.final.usage.cached_tokens, 0);
    msgs.push_back({"assistant", a.text});
    msgs.push_back({"user", "And a directory?"});
    auto before = e->stats().prompt_tokens_computed;
    tmc::Request r2 = greedy(e->encode_chat(msgs), 12);
    const int n2 = int(r2.prompt.size());
    r2.session_id = 7;
    auto b = run(*e, r2);
    const int cached = b.final.usage.cached_tokens;
    // The whole first turn (prompt and answer) is reused.
    EXPECT_GE(cached, a.final.usage.prompt_tokens + a.final.usage.completion_tokens - 2);
    EXPECT_EQ(e->stats().prompt_tokens_computed - before, uint64_t(n2 - cached));
    // The same second turn without a session gives the same tokens.
    auto c = run(*e, greedy(e->encode_chat(msgs), 12));
    EXPECT_EQ(b.ids, c.ids);
    // Append mode (LMDeploy's interactive): only the new tokens are sent.
    tmc::Request r3 = greedy(e->tokenizer().encode(" More.", false), 4);
    r3.session_id = 7;
    r3.append = true;
    auto d = run(*e, r3);
    EXPECT_EQ(d.final.usage.cached_tokens, n2 + int(b.ids.size()) - 1);
    e->end_session(7);
    e->wait_idle();
    EXPECT_EQ(e->stats().blocks_free, e->stats().blocks_total);
    EXPECT_TRUE(e->session_tokens(7).empty());
}

// The engine is the one owner of a session: its conversation (kept with
// each answer when a request carries one) and its running request.
TEST(Engine, SessionKeepsItsConversationAndRunningRequest) {
    auto e = tmc::Engine::open(tinytech_ws(), cpu_opts());
    std::vector<tmc::ChatMessage> msgs = {{"user", "What is a file system?"}};
    tmc::Request r = greedy(e->encode_chat(msgs), 8);
    r.session_id = 5;
    r.conversation = msgs;
    EXPECT_FALSE(e->session_request(5));
    auto stream = e->generate(r);
    EXPECT_EQ(e->session_request(5), stream.id());  // set at submit, before the engine takes it
    std::string text;
    tmc::Output o;
    while (stream.next(o)) text += o.text;
    EXPECT_FALSE(e->session_request(5));  // cleared before the final output
    auto conv = e->session_conversation(5);
    ASSERT_EQ(conv.size(), 2u);
    EXPECT_EQ(conv[0].content, "What is a file system?");
    EXPECT_EQ(conv[1].role, "assistant");
    EXPECT_EQ(conv[1].content, text);
    // A request without a conversation leaves it as it is; one that fails does too.
    tmc::Request plain = greedy(e->encode_chat(msgs), 2);
    plain.session_id = 5;
    run(*e, plain);
    EXPECT_EQ(e->session_conversation(5).size(), 2u);
    tmc::Request too_long = greedy(std::vector<int>(size_t(e->session_len()) + 1, 100), 2);
    too_long.session_id = 5;
    too_long.conversation = {{"user", "x"}};
    auto f = run(*e, too_long);
    EXPECT_EQ(f.final.finish_reason, tmc::FinishReason::Error);
    EXPECT_EQ(e->session_conversation(5).size(), 2u);
    EXPECT_FALSE(e->session_request(5));
    e->end_session(5);
    EXPECT_TRUE(e->session_conversation(5).empty());  // at once
    e->wait_idle();
    EXPECT_EQ(e->stats().blocks_free, e->stats().blocks_total);
}

TEST(Engine, SmallPoolPreemptsAndStillMatchesSoloRuns) {
    auto o = cpu_opts();
    o.cache_tokens = 512;  // 32 blocks of 16: far less than 64 sequences need
    o.block_size = 16;
    o.max_batch_tokens = 128;
    auto e = tmc::Engine::open(tinytech_ws(), o);
    std::vector<tmc::Request> reqs;
    auto& tok = e->tokenizer();
    for (int i = 0; i < 64; ++i)
        reqs.push_back(greedy(tok.encode("Item " + std::to_string(i) + " of the list is", true), 24 + i % 16));
    auto all = run_all(*e, reqs);
    e->wait_idle();
    auto st = e->stats();
    EXPECT_GT(st.preemptions, 0u);
    EXPECT_EQ(st.blocks_free, st.blocks_total);
    for (int i = 0; i < 64; i += 9) {
        auto solo = run(*e, reqs[size_t(i)]);
        EXPECT_EQ(solo.ids, all[size_t(i)].ids) << i;
    }
    for (auto& r : all) EXPECT_EQ(r.final.finish_reason == tmc::FinishReason::Error, false) << r.final.error;
}

// The same under preemption with an asynchronous backend (a preempted
// request's undecoded tokens are sent as it leaves the batch): every request
// streams the tokens and text of the synchronous engine.
TEST(Engine, AsynchronousBackendUnderPreemptionSendsTheSameOutputs) {
    auto o = cpu_opts();
    o.cache_tokens = 256;
    o.block_size = 16;
    o.max_batch_tokens = 64;
    auto batch = [](tmc::Engine& e) {
        std::vector<tmc::Request> reqs;
        for (int i = 0; i < 16; ++i)
            reqs.push_back(greedy(e.tokenizer().encode("Item " + std::to_string(i) + " of the list is", true),
                                  20 + i % 8));
        auto out = run_all(e, reqs);
        e.wait_idle();
        return out;
    };
    auto sync = tmc::Engine::open(tinytech_ws(), o);
    const auto want = batch(*sync);
    sync.reset();
    auto async = open_async(o);
    const auto got = batch(*async);
    const auto st = async->stats();
    EXPECT_GT(st.preemptions, 0u);
    EXPECT_EQ(st.blocks_free, st.blocks_total);
    ASSERT_NO_FATAL_FAILURE(expect_same_results(got, want));  // stops here if the counts differ
}

TEST(Engine, IdleSessionsAreEvictedUnderPressure) {
    auto o = cpu_opts();
    o.cache_tokens = 256;
    auto e = tmc::Engine::open(tinytech_ws(), o);
    for (uint64_t s = 1; s <= 6; ++s) {
        tmc::Request r = greedy(e->tokenizer().encode("Session number " + std::to_string(s), true), 40);
        r.sampling.ignore_eos = true;
        r.session_id = s;
        auto res = run(*e, r);
        EXPECT_EQ(res.final.finish_reason, tmc::FinishReason::Length);
    }
    EXPECT_GT(e->stats().session_evictions, 0u);
    EXPECT_EQ(e->stats().sessions, 6);
    // An evicted session still continues (recomputed).
    tmc::Request r = greedy({}, 4);
    r.session_id = 1;
    r.append = true;
    r.prompt = e->tokenizer().encode(" again", false);
    EXPECT_NE(run(*e, r).final.finish_reason, tmc::FinishReason::Error);
}

TEST(Engine, CancelFreesBlocksAtOnce) {
    auto e = tmc::Engine::open(tinytech_ws(), cpu_opts());
    tmc::Request r = greedy(e->tokenizer().encode("The Linux kernel", true), 100000);
    r.sampling.ignore_eos = true;
    auto s = e->generate(r);
    tmc::Output o;
    ASSERT_TRUE(s.next(o));
    e->cancel(s.id());
    while (!o.finished) ASSERT_TRUE(s.next(o));
    EXPECT_EQ(o.finish_reason, tmc::FinishReason::Cancelled);
    e->wait_idle();
    EXPECT_EQ(e->stats().blocks_free, e->stats().blocks_total);
}

TEST(Engine, SeededSamplingRepeatsAloneAndInBatch) {
    auto e = tmc::Engine::open(tinytech_ws(), cpu_opts());
    tmc::Request r;
    r.prompt = e->tokenizer().encode("Once upon a time", true);
    r.sampling.temperature = 0.9f;
    r.sampling.top_p = 0.95f;
    r.sampling.top_k = 50;
    r.sampling.max_tokens = 24;
    r.sampling.seed = 1234;
    auto a = run(*e, r);
    std::vector<tmc::Request> batch(5, r);
    for (size_t i = 1; i < batch.size(); ++i) batch[i].sampling.seed = 99 + i;
    auto all = run_all(*e, batch);
    EXPECT_EQ(a.ids, all[0].ids);
    bool any_differs = false;
    for (size_t i = 1; i < all.size(); ++i) any_differs |= all[i].ids != a.ids;
    EXPECT_TRUE(any_differs);
}

// With an asynchronous backend a step's text is decoded and sent while the
// next step runs: the outputs are those of the synchronous engine, request
// by request (tokens, text, finish reason, log-probabilities, usage), for a
// batch mixing plain greedy requests, stop strings, stop tokens, sampling,
// log-probabilities and a cancellation.
TEST(Engine, AsynchronousBackendSendsTheSameOutputs) {
    auto batch = [](tmc::Engine& e) {
        const auto p1 = e.tokenizer().encode("The Linux kernel", true);
        const auto p2 = e.tokenizer().encode("Once upon a time", true);
        std::vector<tmc::Request> reqs;
        reqs.push_back(greedy(p1, 20));
        reqs.push_back(greedy(p2, 7));
        tmc::Request stop = greedy(p1, 30);
        stop.sampling.stop = {"the"};
        reqs.push_back(stop);
        tmc::Request stop_id = greedy(p2, 30);
        stop_id.sampling.stop_token_ids = {13};
        reqs.push_back(stop_id);
        tmc::Request sampled = greedy(p2, 16);
        sampled.sampling.temperature = 0.8f;
        sampled.sampling.seed = 7;
        sampled.sampling.logprobs = 2;
        reqs.push_back(sampled);
        tmc::Request one = greedy(p1, 1);
        reqs.push_back(one);
        return run_all(e, reqs);
    };
    auto sync = tmc::Engine::open(tinytech_ws(), cpu_opts());
    const auto want = batch(*sync);
    sync.reset();
    auto async = open_async(cpu_opts());
    const auto got = batch(*async);
    ASSERT_NO_FATAL_FAILURE(expect_same_results(got, want));  // stops here if the counts differ
    for (size_t i = 0; i < want.size(); ++i) {
        SCOPED_TRACE("request " + std::to_string(i));
        EXPECT_EQ(got[i].final.usage.completion_tokens, want[i].final.usage.completion_tokens);
        EXPECT_FALSE(got[i].text.empty());
    }
    // Streaming: every token reaches the client, and a cancelled request
    // still ends with one final output holding all its text.
    auto s = async->generate(greedy(async->tokenizer().encode("The Linux kernel", true), 200));
    std::vector<int> ids;
    std::string text;
    int finals = 0;
    bool cancelled = false;
    tmc::FinishReason why = tmc::FinishReason::None;
    for (tmc::Output o; s.next(o);) {
        ids.insert(ids.end(), o.token_ids.begin(), o.token_ids.end());
        text += o.text;
        if (ids.size() >= 5 && !o.finished && !cancelled) async->cancel(s.id()), cancelled = true;
        if (o.finished) ++finals, why = o.finish_reason;
    }
    EXPECT_EQ(finals, 1);
    EXPECT_EQ(why, tmc::FinishReason::Cancelled);
    ASSERT_GE(ids.size(), 5u);
    EXPECT_LT(ids.size(), 200u);
    EXPECT_EQ(std::vector<int>(want[0].ids.begin(), want[0].ids.begin() + 5), std::vector<int>(ids.begin(), ids.begin() + 5));
    const std::string all = async->tokenizer().decode(ids, true);
    EXPECT_EQ(all.substr(0, text.size()), text);
    EXPECT_GE(text.size() + 4, all.size());  // at most a held partial character is missing
}

TEST(Engine, StopStringsStopTokensAndLimits) {
    auto e = tmc::Engine::open(tinytech_ws(), cpu_opts());
    auto prompt = e->tokenizer().encode("The Linux kernel", true);
    auto full = run(*e, greedy(prompt, 30));
    ASSERT_GT(full.text.size(), 12u);
    // A stop string in the middle of the text: the text ends just before it.
    std::string stop = full.text.substr(8, 5);
    tmc::Request r = greedy(prompt, 30);
    r.sampling.stop = {stop};
    auto s = run(*e, r);
    EXPECT_EQ(s.final.finish_reason, tmc::FinishReason::Stop);
    EXPECT_EQ(s.text, full.text.substr(0, full.text.find(stop)));
    // A stop token id: generation ends with it.
    tmc::Request r2 = greedy(prompt, 30);
    r2.sampling.stop_token_ids = {full.ids[3]};
    auto s2 = run(*e, r2);
    EXPECT_EQ(s2.final.finish_reason, tmc::FinishReason::Stop);
    EXPECT_EQ(s2.ids, std::vector<int>(full.ids.begin(), full.ids.begin() + 4));
    // max_tokens.
    auto s3 = run(*e, greedy(prompt, 5));
    EXPECT_EQ(s3.final.finish_reason, tmc::FinishReason::Length);
    EXPECT_EQ(s3.final.usage.completion_tokens, 5);
}

TEST(Engine, ContextLimitAndBadRequests) {
    auto o = cpu_opts();
    o.session_len = 64;
    auto e = tmc::Engine::open(tinytech_ws(), o);
    // A prompt longer than the context: an error for that request only.
    std::vector<int> long_prompt(100, 415);
    auto bad = run(*e, greedy(long_prompt, 4));
    EXPECT_EQ(bad.final.finish_reason, tmc::FinishReason::Error);
    EXPECT_NE(bad.final.error.find("context"), std::string::npos);
    // Generation stops at the context length.
    tmc::Request r = greedy(std::vector<int>(60, 415), 100);
    r.sampling.ignore_eos = true;
    auto cut = run(*e, r);
    EXPECT_EQ(cut.final.finish_reason, tmc::FinishReason::Length);
    EXPECT_EQ(cut.final.usage.prompt_tokens + cut.final.usage.completion_tokens, 65);
    // Invalid settings are refused at submit.
    tmc::Request x = greedy({1, 2, 3}, 4);
    x.prompt.push_back(32000);
    EXPECT_THROW(e->submit(x, nullptr), tmc::Error);
    x = greedy({1, 2}, 4);
    x.sampling.top_p = 0;
    EXPECT_THROW(e->submit(x, nullptr), tmc::Error);
    EXPECT_THROW(e->submit(greedy({}, 4), nullptr), tmc::Error);
    e->wait_idle();
    EXPECT_EQ(e->stats().blocks_free, e->stats().blocks_total);
}

TEST(Engine, PromptLogprobsMatchTheLastRowOfGeneration) {
    auto e = tmc::Engine::open(tinytech_ws(), cpu_opts());
    auto prompt = e->tokenizer().encode("The quick brown fox jumps over the lazy dog", true);
    tmc::Request r;
    r.prompt = prompt;
    r.sampling.max_tokens = 0;
    r.sampling.prompt_logprobs = true;
    auto res = run(*e, r);
    ASSERT_EQ(res.final.prompt_logprobs.size(), prompt.size() - 1);
    for (float lp : res.final.prompt_logprobs) {
        EXPECT_LE(lp, 0.0f);
        EXPECT_GT(lp, -30.0f);
    }
    EXPECT_EQ(res.final.finish_reason, tmc::FinishReason::Length);
    EXPECT_EQ(res.final.usage.completion_tokens, 0);
}

TEST(Engine, OpensAHuggingFaceDirectory) {
    auto e = tmc::Engine::open(tmtest::shared_dir() + "/models/random-qwen3", cpu_opts());
    auto res = run(*e, greedy({785, 3974, 13876, 38835}, 4));
    EXPECT_EQ(res.ids, (std::vector<int>{67113, 15497, 128024, 128024}));
}

}  // namespace

namespace {

TEST(CalibStats, RoundTripAndDamage) {
    tmc::CalibStats s;
    s.workspace_id = "0123456789abcdef";
    s.model = "m";
    s.layers = 1, s.kv_heads = 2, s.head_dim = 4, s.hidden = 8, s.q_size = 8, s.intermediate = 16;
    s.samples = 3, s.seqlen = 10, s.tokens = 30, s.dataset = "d.txt";
    s.arrays.push_back({"layers.0.k.min", {2, 4}, {1, 2, 3, 4, 5, 6, 7, 8}});
    s.arrays.push_back({"layers.0.k.max", {2, 4}, {9, 8, 7, 6, 5, 4, 3, 2}});
    const std::string bytes = tmc::calib_stats_bytes(s);
    tmc::CalibStats r = tmc::parse_calib_stats(bytes, "x");
    EXPECT_EQ(r.workspace_id, s.workspace_id);
    EXPECT_EQ(r.tokens, 30);
    ASSERT_NE(r.find("layers.0.k.max"), nullptr);
    EXPECT_EQ(r.find("layers.0.k.max")->data, s.arrays[1].data);
    EXPECT_THROW(tmc::parse_calib_stats(bytes.substr(0, bytes.size() / 2), "x"), tmc::Error);
    EXPECT_THROW(tmc::parse_calib_stats("", "x"), tmc::Error);
    EXPECT_THROW(tmc::parse_calib_stats("not zstd at all", "x"), tmc::Error);
}

}  // namespace
