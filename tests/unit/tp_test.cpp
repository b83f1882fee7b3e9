// Tensor parallelism on the CPU (ranks as threads, shared-memory all-reduce):
// a workspace converted with --tp N gives the logits of --tp 1 within 1e-4
// and the same greedy tokens, on every architecture, replicated KV heads
// included; the engine refuses a workspace run with another tp.
#include <atomic>
#include <chrono>
#include <random>
#include <thread>

#include "model/decoder.hpp"
#include "backend/backend.hpp"
#include "backend/comm.hpp"
#include "test_util.hpp"
#include "tm/engine.hpp"
#include "tm/error.hpp"
#include "tm/workspace.hpp"

namespace {

struct Ws {
    tmtest::TempDir d;
    std::unique_ptr<tmc::Workspace> ws;
    Ws(const std::string& model, int tp) {
        tmc::ConvertOptions opt;
        opt.tp = tp;
        tmc::convert_hf_model(tmtest::shared_dir() + "/models/" + model, d / "ws", opt);
        ws = std::make_unique<tmc::Workspace>(d / "ws");
    }
};

std::unique_ptr<tmc::Backend> backend(const tmc::Workspace& ws) {
    tmc::CpuBackendOptions o;
    o.program = tmc::model_program(ws);
    o.threads = 2;
    auto be = tmc::make_cpu_tp_backend(ws, o);
    tmc::BackendLimits lim;
    lim.num_blocks = 64, lim.block_size = 4, lim.max_batch_tokens = 64, lim.max_logit_rows = 64, lim.max_context = 128;
    be->init(lim);
    return be;
}

TEST(LocalGroup, AllReduceSumsInRankOrder) {
    for (int n : {1, 2, 3, 4}) {
        tmc::LocalGroup g(n);
        std::vector<std::vector<float>> bufs{size_t(n)};
        std::vector<std::thread> th;
        for (int r = 0; r < n; ++r) {
            bufs[size_t(r)].assign(1001, float(r + 1));
            th.emplace_back([&, r] {
                for (int rep = 0; rep < 3; ++rep) g.comm(r).all_reduce_sum(bufs[size_t(r)].data(), 1001);
            });
        }
        for (auto& t : th) t.join();
        // Three reductions: (n(n+1)/2) * n * n.
        const float want = float(n * (n + 1) / 2) * float(n) * float(n);
        for (int r = 0; r < n; ++r)
            for (float x : bufs[size_t(r)]) ASSERT_EQ(x, want) << "n " << n << " rank " << r;
    }
}

// The barrier the GPU ranks meet at around each collective: reusable, and
// it ends (an error, not a hang) when broken or when a rank never comes.
TEST(HostBarrier, ReleasesTogetherAndEndsOnAbortOrTimeout) {
    tmc::HostBarrier b(3);
    std::atomic<int> before{0};
    std::vector<std::thread> th;
    std::atomic<bool> ordered{true};
    for (int r = 0; r < 3; ++r)
        th.emplace_back([&] {
            for (int rep = 0; rep < 200; ++rep) {
                before.fetch_add(1);
                b.arrive_and_wait();
                if (before.load() < 3 * (rep + 1)) ordered = false;
                b.arrive_and_wait();
            }
        });
    for (auto& t : th) t.join();
    EXPECT_TRUE(ordered.load());

    tmc::HostBarrier ab(2);
    std::thread waiter([&] { EXPECT_THROW(ab.arrive_and_wait(), tmc::Error); });
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ab.abort();
    waiter.join();
    EXPECT_THROW(ab.arrive_and_wait(), tmc::Error);

    tmc::HostBarrier late(2, 1);
    EXPECT_THROW(late.arrive_and_wait(), tmc::Error);  // the other rank never comes: 1 s
}

TEST(TensorParallel, LogitsMatchOneRankOnEveryArchitecture) {
    struct Case { const char* model; int tp; };
    for (Case c : {Case{"tinytech-25m", 2}, Case{"random-qwen2", 2}, Case{"random-qwen3", 2}, Case{"random-mistral", 2},
                   Case{"random-qwen3", 4}, Case{"random-mistral", 4}}) {
        Ws one(c.model, 1), many(c.model, c.tp);
        auto b1 = backend(*one.ws), bn = backend(*many.ws);
        const int V = one.ws->model().vocab_size;
        std::mt19937 rng(11);
        // Two sequences: a prefill in two chunks, then greedy decode steps.
        std::vector<std::vector<int>> seqs = {std::vector<int>(23), std::vector<int>(9)};
        for (auto& s : seqs)
            for (auto& t : s) t = 3 + int(rng() % uint32_t(V - 3));
        std::vector<std::vector<int>> blocks = {{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, {20, 21, 22, 23, 24, 25, 26}};
        std::vector<int> done = {0, 0};
        std::vector<int> upto = {12, 9};
        for (int step = 0; step < 8; ++step) {
            tmc::BatchPlan p;
            for (size_t s = 0; s < seqs.size(); ++s) {
                tmc::BatchPlan::Seq q;
                q.row_begin = int(p.tokens.size());
                q.n_rows = upto[s] - done[s];
                q.ctx_len = upto[s];
                q.blocks = blocks[s].data();
                q.n_blocks = int(blocks[s].size());
                for (int i = done[s]; i < upto[s]; ++i) p.tokens.push_back(seqs[s][size_t(i)]), p.positions.push_back(i);
                p.logit_rows.push_back(q.row_begin + q.n_rows - 1);
                p.seqs.push_back(q);
            }
            const float* l1 = b1->forward(p);
            std::vector<float> want(l1, l1 + 2 * size_t(V));
            const float* ln = bn->forward(p);
            for (size_t s = 0; s < 2; ++s) {
                const float* w = want.data() + s * size_t(V);
                const float* g = ln + s * size_t(V);
                float err = 0;
                for (int i = 0; i < V; ++i) err = std::max(err, std::abs(w[i] - g[i]));
                EXPECT_LT(err, 1e-4f) << c.model << " tp " << c.tp << " step " << step << " seq " << s;
                const int a1 = int(std::max_element(w, w + V) - w), an = int(std::max_element(g, g + V) - g);
                EXPECT_EQ(a1, an) << c.model << " tp " << c.tp << " step " << step;
                done[s] = upto[s];
                if (upto[s] < int(seqs[s].size())) upto[s] = int(seqs[s].size());  // the rest of the prompt
                else {
                    seqs[s].push_back(a1);  // greedy decode
                    upto[s] = int(seqs[s].size());
                }
            }
        }
    }
}

TEST(TensorParallel, EngineRunsTp2AndRefusesAnotherTp) {
    Ws two("tinytech-25m", 2), one("tinytech-25m", 1);
    tmc::EngineOptions eo;
    eo.device = "cpu";
    eo.threads = 2;
    auto e2 = tmc::Engine::open(two.d / "ws", eo);
    auto e1 = tmc::Engine::open(one.d / "ws", eo);
    // A two-turn session and a batch give the tokens of tp 1.
    auto answer = [](tmc::Engine& e, std::vector<int> prompt, std::optional<uint64_t> session) {
        tmc::Request r;
        r.prompt = std::move(prompt);
        r.sampling.temperature = 0;
        r.sampling.max_tokens = 12;
        r.session_id = session;
        auto st = e.generate(std::move(r));
        std::vector<int> ids;
        tmc::Output o;
        int cached = 0;
        while (st.next(o)) {
            ids.insert(ids.end(), o.token_ids.begin(), o.token_ids.end());
            cached = o.usage.cached_tokens;
        }
        return std::make_pair(ids, cached);
    };
    auto p1 = e1->encode_chat({{"user", "Hello there"}});
    auto a1 = answer(*e1, p1, 1), a2 = answer(*e2, p1, 1);
    EXPECT_EQ(a1.first, a2.first);
    std::vector<int> turn2 = p1;
    turn2.insert(turn2.end(), a1.first.begin(), a1.first.end());
    auto more = e1->tokenizer().encode(" And then?", false);
    turn2.insert(turn2.end(), more.begin(), more.end());
    auto b1 = answer(*e1, turn2, 1), b2 = answer(*e2, turn2, 1);
    EXPECT_EQ(b1.first, b2.first);
    EXPECT_GE(b2.second, int(p1.size()));  // the second turn came from the session's cache
    eo.tp = 1;
    EXPECT_THROW(tmc::Engine::open(two.d / "ws", eo), tmc::Error);
    eo.tp = 2;
    EXPECT_THROW(tmc::Engine::open(one.d / "ws", eo), tmc::Error);
}

}  // namespace

namespace {

// Rank 1 fails in the middle of a forward pass: the other ranks, waiting for
// it in an all-reduce, must return (the error comes out of forward) rather
// than wait for ever; the group stays ended afterwards.
struct FailingRank final : tmc::ForwardObserver {
    FailingRank* other = nullptr;
    bool fail = false;
    void observe(int layer, Point p, const float*, int, size_t, int) override {
        if (fail && layer == 1 && p == FfnIn) throw tmc::Error("rank 1 failed");
    }
    ForwardObserver* for_rank(int rank, int) override { return rank == 1 ? other : this; }
};

TEST(TensorParallel, AFailingRankEndsTheGroupInsteadOfHanging) {
    Ws w("tinytech-25m", 2);
    FailingRank r0, r1;
    r1.fail = true;
    r0.other = &r1;
    tmc::CpuBackendOptions o;
    o.program = tmc::model_program(*w.ws);
    o.threads = 2;
    o.observer = &r0;
    setenv("TM_TP_TRACE", "1", 1);  // the failing rank says so on standard error
    auto be = tmc::make_cpu_tp_backend(*w.ws, o);
    unsetenv("TM_TP_TRACE");
    tmc::BackendLimits lim;
    lim.num_blocks = 16, lim.block_size = 4, lim.max_batch_tokens = 16, lim.max_logit_rows = 16, lim.max_context = 64;
    be->init(lim);
    std::vector<int> table = {0, 1};
    tmc::BatchPlan p;
    tmc::BatchPlan::Seq q;
    q.row_begin = 0, q.n_rows = 4, q.ctx_len = 4, q.blocks = table.data(), q.n_blocks = 2;
    p.tokens = {1, 5, 9, 13};
    p.positions = {0, 1, 2, 3};
    p.logit_rows = {3};
    p.seqs.push_back(q);
    testing::internal::CaptureStderr();
    EXPECT_THROW(be->forward(p), tmc::Error);
    EXPECT_NE(testing::internal::GetCapturedStderr().find("failed:"), std::string::npos);
    r1.fail = false;
    EXPECT_THROW(be->forward(p), tmc::Error);  // the group is gone
}

}  // namespace

namespace {

// A rank that answers greedy rows with the best of its vocabulary slice.
struct SliceRank final : tmc::Backend {
    tmc::ModelConfig cfg;
    std::vector<int> ids;
    std::vector<float> vals;
    std::string name() const override { return "slice"; }
    const tmc::ModelConfig& config() const override { return cfg; }
    size_t kv_bytes_per_token() const override { return 0; }
    void init(const tmc::BackendLimits&) override {}
    float* forward(const tmc::BatchPlan&) override { return nullptr; }
    const int* greedy_ids() override { return ids.data(); }
    const float* greedy_values() override { return vals.data(); }
    void token_logprobs(const int*, const int*, int, float*) override {}
    size_t default_kv_bytes(double, int) const override { return 0; }
};

// Greedy rows over an lm_head split by vocabulary: the token is the best of
// the ranks' bests, the lowest id on ties.
TEST(TensorParallel, GreedyIdsGatheredFromVocabularySlices) {
    tmc::ModelConfig c;
    c.hidden_size = 8, c.num_layers = 1, c.num_heads = 2, c.num_kv_heads = 2, c.head_dim = 4;
    c.intermediate_size = 4, c.vocab_size = 10, c.tie_word_embeddings = false;
    auto be = tmc::make_tp_backend(c, 2, /*vocab_split=*/true, [&](int r) {
        auto s = std::make_unique<SliceRank>();
        s->cfg = c;
        s->ids = r == 0 ? std::vector<int>{3, 0, 4} : std::vector<int>{1, 2, 0};
        s->vals = r == 0 ? std::vector<float>{1.0f, 5.0f, 2.0f} : std::vector<float>{2.0f, 5.0f, 1.0f};
        return s;
    }, nullptr);
    tmc::BackendLimits lim;
    lim.max_logit_rows = 4;
    be->init(lim);
    tmc::BatchPlan p;
    p.tokens = {1, 2, 3};
    p.positions = {0, 0, 0};
    p.logit_rows = {0, 1, 2};
    p.greedy_only = true;
    EXPECT_EQ(be->forward(p), nullptr);
    const int* ids = be->greedy_ids();
    EXPECT_EQ(ids[0], 6);  // rank 1's slice starts at 5
    EXPECT_EQ(ids[1], 0);  // a tie: rank 0
    EXPECT_EQ(ids[2], 4);
}

// A rank that cannot be built: the error comes out of the constructor, the
// rank threads are joined (not left running, not terminating the process).
TEST(TensorParallel, ARankThatFailsToBuildIsAnError) {
    tmc::ModelConfig c;
    c.hidden_size = 8, c.num_layers = 1, c.num_heads = 2, c.num_kv_heads = 2, c.head_dim = 4;
    c.intermediate_size = 4, c.vocab_size = 10;
    auto make = [&](int r) -> std::unique_ptr<tmc::Backend> {
        if (r == 1) throw tmc::Error("rank 1: no device");
        auto s = std::make_unique<SliceRank>();
        s->cfg = c;
        return s;
    };
    EXPECT_THROW(tmc::make_tp_backend(c, 2, false, make, nullptr), tmc::Error);
}

}  // namespace
