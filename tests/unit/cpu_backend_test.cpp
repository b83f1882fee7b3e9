// The CPU backend against the reference forward pass on every architecture,
// and bit-for-bit batch invariance (a sequence gives the same logits alone,
// batched with others, and prefilled in chunks).
#include <simdjson.h>

#include <cstring>
#include <random>

#include "model/decoder.hpp"
#include "backend/backend.hpp"
#include "backend/cpu/kernels.hpp"
#include "backend/cpu/reference_model.hpp"
#include "base/mapped_file.hpp"
#include "test_util.hpp"
#include "tm/workspace.hpp"

namespace {

struct Fixture {
    tmtest::TempDir d;
    std::unique_ptr<tmc::Workspace> ws;
    std::unique_ptr<tmc::Backend> be;
    explicit Fixture(const std::string& model, int threads = 2, int kv_quant = 0) {
        tmc::ConvertOptions opt;
        tmc::convert_hf_model(tmtest::shared_dir() + "/models/" + model, d / "ws", opt);
        ws = std::make_unique<tmc::Workspace>(d / "ws");
        tmc::CpuBackendOptions o;
        o.program = tmc::model_program(*ws);
        o.threads = threads;
        o.kv_quant = kv_quant;
        be = tmc::make_cpu_backend(*ws, o);
        tmc::BackendLimits lim;
        lim.num_blocks = 64;
        lim.block_size = 4;  // small blocks: sequences span several
        // (up to 256 tokens)
        lim.max_batch_tokens = 64;
        lim.max_logit_rows = 64;
        lim.max_context = 128;
        be->init(lim);
    }
};

// Runs sequences (token lists, each with its own blocks) in one plan: each
// sequence's tokens [from, to) given that [0, from) are cached. Returns the
// logits of each sequence's last row.
std::vector<std::vector<float>> run(tmc::Backend& be, const std::vector<std::vector<int>>& seqs,
                                    const std::vector<std::vector<int>>& blocks, const std::vector<int>& from,
                                    const std::vector<int>& to) {
    tmc::BatchPlan p;
    for (size_t s = 0; s < seqs.size(); ++s) {
        tmc::BatchPlan::Seq q;
        q.row_begin = int(p.tokens.size());
        q.n_rows = to[s] - from[s];
        q.ctx_len = to[s];
        q.blocks = blocks[s].data();
        q.n_blocks = int(blocks[s].size());
        for (int i = from[s]; i < to[s]; ++i) {
            p.tokens.push_back(seqs[s][size_t(i)]);
            p.positions.push_back(i);
        }
        p.logit_rows.push_back(q.row_begin + q.n_rows - 1);
        p.seqs.push_back(q);
    }
    const float* lg = be.forward(p);
    const size_t V = size_t(be.config().vocab_size);
    std::vector<std::vector<float>> out;
    for (size_t s = 0; s < seqs.size(); ++s) out.emplace_back(lg + s * V, lg + (s + 1) * V);
    return out;
}

TEST(CpuBackend, MatchesReferenceOnEveryArchitecture) {
    for (const char* m : {"tinytech-25m", "random-qwen2", "random-qwen3", "random-mistral"}) {
        Fixture f(m);
        tmc::ReferenceModel ref(*f.ws, tmc::model_program(*f.ws));
        std::vector<int> toks = {1, 415, 2936, 9060, 285, 1142, 28705, 754, 12, 99, 1000, 7};
        for (auto& t : toks) t %= f.be->config().vocab_size;
        auto cache = ref.new_cache();
        auto want = ref.forward(toks, cache);
        std::vector<int> blocks = {5, 2, 9, 0};
        auto got = run(*f.be, {toks}, {blocks}, {0}, {int(toks.size())})[0];
        for (size_t i = 0; i < want.size(); ++i) ASSERT_NEAR(got[i], want[i], 2e-4 + 2e-4 * std::abs(want[i])) << m << " " << i;
        // One more token (decode) on top of the cache.
        toks.push_back(42);
        want = ref.forward({42}, cache);
        got = run(*f.be, {toks}, {blocks}, {int(toks.size()) - 1}, {int(toks.size())})[0];
        for (size_t i = 0; i < want.size(); ++i) ASSERT_NEAR(got[i], want[i], 2e-4 + 2e-4 * std::abs(want[i])) << m << " " << i;
    }
}

// Along the reference's greedy path (its tokens fed back), every logged
// top-5 logit is within `tol` of transformers' fp32 value.
void check_golden(const std::string& model, const std::string& golden, double tol) {
    Fixture f(model);
    simdjson::dom::parser parser;
    auto text = tmc::read_file(golden);
    size_t checked = 0;
    std::vector<int> blocks;
    for (int b = 0; b < 64; ++b) blocks.push_back(63 - b);  // out of order on purpose
    for (auto doc : parser.parse_many(text)) {
        simdjson::dom::array pids;
        if (doc["prompt_ids"].get(pids)) continue;  // the perplexity line
        std::vector<int> toks;
        for (auto x : pids) toks.push_back(int(int64_t(x)));
        std::vector<int> out;
        for (auto x : doc["output_ids"].get_array()) out.push_back(int(int64_t(x)));
        auto logits = run(*f.be, {toks}, {blocks}, {0}, {int(toks.size())})[0];
        size_t step = 0;
        for (auto top5 : doc["top5"].get_array()) {
            for (auto pair : top5.get_array()) {
                int id = int(int64_t(pair.at(0)));
                EXPECT_NEAR(logits[size_t(id)], double(pair.at(1)), tol) << model << " step " << step;
                ++checked;
            }
            if (step + 1 >= out.size()) break;
            toks.push_back(out[step++]);
            logits = run(*f.be, {toks}, {blocks}, {int(toks.size()) - 1}, {int(toks.size())})[0];
        }
    }
    EXPECT_GT(checked, 0u);
}

TEST(CpuBackend, TinytechLogitsMatchTransformers) {
    check_golden("tinytech-25m", tmtest::shared_dir() + "/golden/tinytech/greedy-fp32.jsonl", 1e-3);
}

TEST(CpuBackend, RandomModelsLogitsMatchTransformers) {
    for (const char* m : {"random-qwen2", "random-qwen3", "random-mistral"})
        check_golden(m, tmtest::shared_dir() + "/golden/random/" + std::string(m) + ".jsonl", 1e-3);
}

TEST(CpuBackend, BatchInvariant) {
    Fixture f("tinytech-25m");
    std::mt19937 rng(7);
    std::vector<std::vector<int>> seqs;
    std::vector<std::vector<int>> blocks;
    for (int s = 0; s < 5; ++s) {
        std::vector<int> t(size_t(5 + 3 * s));
        for (auto& x : t) x = int(rng() % 32000);
        seqs.push_back(t);
        std::vector<int> b;
        for (int i = 0; i < 8; ++i) b.push_back(s * 8 + i);
        blocks.push_back(b);
    }
    std::vector<std::vector<float>> solo;
    for (size_t s = 0; s < seqs.size(); ++s)
        solo.push_back(run(*f.be, {seqs[s]}, {blocks[s]}, {0}, {int(seqs[s].size())})[0]);
    std::vector<int> from(seqs.size(), 0), to;
    for (auto& s : seqs) to.push_back(int(s.size()));
    auto batched = run(*f.be, seqs, blocks, from, to);
    for (size_t s = 0; s < seqs.size(); ++s)
        ASSERT_EQ(0, std::memcmp(solo[s].data(), batched[s].data(), solo[s].size() * 4)) << "sequence " << s;
    // Chunked: the first 3 tokens of each, then the rest.
    std::vector<int> mid(seqs.size(), 3);
    run(*f.be, seqs, blocks, from, mid);
    auto chunked = run(*f.be, seqs, blocks, mid, to);
    for (size_t s = 0; s < seqs.size(); ++s)
        ASSERT_EQ(0, std::memcmp(solo[s].data(), chunked[s].data(), solo[s].size() * 4)) << "sequence " << s;
}

// Quantized KV caches: logits close to the unquantized ones (int8 closely,
// int4 roughly), still bit-identical alone and batched, on every architecture.
TEST(CpuBackend, QuantizedKvCache) {
    for (const char* m : {"tinytech-25m", "random-qwen3", "random-mistral"}) {
        Fixture ref(m);
        std::mt19937 rng(3);
        std::vector<int> toks(50);
        for (auto& t : toks) t = int(rng() % uint32_t(ref.be->config().vocab_size));
        std::vector<int> blocks;
        for (int b = 0; b < 18; ++b) blocks.push_back(b * 3 % 64);
        auto want = run(*ref.be, {toks}, {blocks}, {0}, {int(toks.size())})[0];
        for (int bits : {8, 4}) {
            Fixture f(m, 2, bits);
            // Prefill in two chunks, the second starting at an odd position.
            run(*f.be, {toks}, {blocks}, {0}, {33});
            auto got = run(*f.be, {toks}, {blocks}, {33}, {int(toks.size())})[0];
            float scale = 0, err = 0;
            for (size_t i = 0; i < want.size(); ++i) {
                scale = std::max(scale, std::abs(want[i]));
                err = std::max(err, std::abs(want[i] - got[i]));
            }
            EXPECT_LT(err, (bits == 8 ? 0.02f : 0.25f) * scale) << m << " int" << bits;
            auto solo = run(*f.be, {toks}, {blocks}, {0}, {int(toks.size())})[0];
            std::vector<int> other(13, 7), oblocks = {40, 41, 42, 43, 44, 45, 46, 47};
            auto both = run(*f.be, {other, toks}, {oblocks, blocks}, {0, 0}, {13, int(toks.size())});
            ASSERT_EQ(0, std::memcmp(solo.data(), both[1].data(), solo.size() * 4)) << m << " int" << bits;
        }
    }
}

TEST(CpuKernels, IsasAgreeOnGemm) {
    // The AVX2 build against the AVX-512 build (when the CPU has it) on odd shapes.
    std::mt19937 rng(1);
    std::uniform_real_distribution<float> u(-1, 1);
    for (int K : {16, 37, 384}) {
        const int N = 87, T = 9;
        std::vector<uint16_t> W(size_t(N * K));
        std::vector<float> X(size_t(T * K)), Y1(size_t(T * N)), Y2(size_t(T * N));
        for (auto& w : W) w = tmc::f32_to_bf16(u(rng));
        for (auto& x : X) x = u(rng);
        std::vector<uint16_t> Wp(tmc::cpu::packed_size(N, K));
        tmc::cpu::pack_weights(W.data(), N, K, Wp.data());
        const auto& k = tmc::cpu::cpu_kernels();
        k.gemm(tmc::cpu::kWeightBF16, Wp.data(), K, X.data(), size_t(K), T, Y1.data(), size_t(N), 0, N, false);
        for (int t = 0; t < T; ++t)
            for (int n = 0; n < N; ++n) {
                double s = 0;
                for (int i = 0; i < K; ++i) s += double(tmc::bf16_to_f32(W[size_t(n * K + i)])) * X[size_t(t * K + i)];
                ASSERT_NEAR(Y1[size_t(t * N + n)], s, 1e-4 * K) << K;
            }
        const auto& k2 = tmc::cpu::cpu_kernels_avx2();
        k2.gemm(tmc::cpu::kWeightBF16, Wp.data(), K, X.data(), size_t(K), T, Y2.data(), size_t(N), 0, N, false);
        // Same order of operations: the same bits on both instruction sets.
        ASSERT_EQ(0, std::memcmp(Y1.data(), Y2.data(), Y1.size() * 4));
        // And row by row (batch invariance at the kernel level).
        for (int t = 0; t < T; ++t) {
            std::vector<float> y(static_cast<size_t>(N));
            k.gemm(tmc::cpu::kWeightBF16, Wp.data(), K, X.data() + size_t(t * K), size_t(K), 1, y.data(), size_t(N), 0, N, false);
            ASSERT_EQ(0, std::memcmp(y.data(), Y1.data() + size_t(t * N), size_t(N) * 4));
        }
    }
}

}  // namespace
