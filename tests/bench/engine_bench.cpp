// CPU engine benchmark (scripts/bench-cpu.sh runs it): batch-1 decode,
// batch-16 decode throughput and prompt processing through the public API,
// next to two baselines measured in the same run: the naive reference
// forward pass (one thread, fp32) and the memory-bandwidth bound of
// batch-1 decode (weight bytes read per token / measured read bandwidth).
// One JSON line per figure on stdout. On a GPU (scripts/bench-gpu.sh): the
// engine's figures alone (TM_BENCH_ONLY picks some; TM_BENCH_DECODE=B,P,G
// adds decode steps of one shape).
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "model/decoder.hpp"
#include "backend/cpu/reference_model.hpp"
#include "tm/engine.hpp"
#include "tm/workspace.hpp"

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

std::vector<int> prompt_of(int n, int salt) {
    std::vector<int> p = {1};
    for (int i = 1; i < n; ++i) p.push_back(300 + (i * 7919 + salt * 104729) % 20000);
    return p;
}

// Decode tokens/s over `batch` concurrent requests of `gen` tokens each,
// counted once every request has its first token (prompts are in). The
// callbacks run on the engine thread; this thread sleeps meanwhile.
double decode_rate(tmc::Engine& e, int batch, int prompt_len, int gen) {
    std::mutex mu;
    std::condition_variable cv;
    int with_first = 0, finished = 0;
    long tokens_after = 0;
    Clock::time_point t0;
    for (int b = 0; b < batch; ++b) {
        tmc::Request r;
        r.prompt = prompt_of(prompt_len, b);
        r.sampling.temperature = 0;
        r.sampling.ignore_eos = true;
        r.sampling.max_tokens = gen;
        auto seen = std::make_shared<int>(0);
        e.submit(std::move(r), [&, seen](const tmc::Output& o) {
            std::lock_guard<std::mutex> lk(mu);
            if (with_first == batch) tokens_after += long(o.token_ids.size());
            if (*seen == 0 && !o.token_ids.empty() && ++with_first == batch) t0 = Clock::now();
            *seen += int(o.token_ids.size());
            if (o.finished && ++finished == batch) cv.notify_all();
        });
    }
    std::unique_lock<std::mutex> lk(mu);
    cv.wait(lk, [&] { return finished == batch; });
    return double(tokens_after) / since(t0);
}

double prompt_rate(tmc::Engine& e, int n) {
    tmc::Request r;
    r.prompt = prompt_of(n, 99);
    r.sampling.max_tokens = 1;
    r.sampling.temperature = 0;
    auto t = Clock::now();
    auto s = e.generate(std::move(r));
    tmc::Output o;
    while (s.next(o)) {
    }
    return n / since(t);
}

double read_bandwidth(int threads) {
    const size_t n = size_t(512) << 20;
    std::vector<char> buf(n, 1);
    double best = 0;
    for (int rep = 0; rep < 3; ++rep) {
        auto t = Clock::now();
        std::vector<std::thread> th;
        std::vector<uint64_t> sums(static_cast<size_t>(threads));
        for (int i = 0; i < threads; ++i)
            th.emplace_back([&, i] {
                const uint64_t* p = reinterpret_cast<const uint64_t*>(buf.data() + n / size_t(threads) * size_t(i));
                uint64_t s = 0;
                for (size_t k = 0; k < n / size_t(threads) / 8; k += 8)
                    s += p[k] ^ p[k + 1] ^ p[k + 2] ^ p[k + 3] ^ p[k + 4] ^ p[k + 5] ^ p[k + 6] ^ p[k + 7];
                sums[size_t(i)] = s;
            });
        for (auto& x : th) x.join();
        best = std::max(best, double(n) / since(t));
    }
    return best;
}

// The median of three runs: this machine's neighbours make single runs noisy.
template <class F>
double median3(F f) {
    double a = f(), b = f(), c = f();
    return std::max(std::min(a, b), std::min(std::max(a, b), c));
}

void line(const char* name, double value, const char* unit, const std::string& extra) {
    std::printf("{\"bench\": \"%s\", \"value\": %.1f, \"unit\": \"%s\"%s}\n", name, value, unit, extra.c_str());
    std::fflush(stdout);
}

// All requests of a ShareGPT-like file ({"input_len", "output_len"} lines) at
// once, ignore_eos: output tokens/s and requests/s over the wall time.
void offline(tmc::Engine& e, const std::string& path, int limit) {
    std::vector<std::pair<int, int>> lens;
    {
        std::FILE* f = std::fopen(path.c_str(), "r");
        if (!f) throw std::runtime_error("cannot open " + path);
        char buf[512];
        while (std::fgets(buf, sizeof buf, f) && int(lens.size()) < limit) {
            int in = 0, out = 0;
            const char* a = std::strstr(buf, "\"input_len\"");
            const char* b = std::strstr(buf, "\"output_len\"");
            if (!a || !b) continue;
            in = std::atoi(std::strchr(a, ':') + 1);
            out = std::atoi(std::strchr(b, ':') + 1);
            if (in > 0 && out > 0) lens.emplace_back(in, out);
        }
        std::fclose(f);
    }
    std::mutex mu;
    std::condition_variable cv;
    size_t done = 0;
    long out_tokens = 0, in_tokens = 0;
    auto t0 = Clock::now();
    for (size_t i = 0; i < lens.size(); ++i) {
        tmc::Request r;
        r.prompt = prompt_of(lens[i].first, int(i));
        r.sampling.temperature = 0;
        r.sampling.ignore_eos = true;
        r.sampling.max_tokens = lens[i].second;
        in_tokens += lens[i].first;
        e.submit(std::move(r), [&](const tmc::Output& o) {
            std::lock_guard<std::mutex> lk(mu);
            out_tokens += long(o.token_ids.size());
            if (o.finished && ++done == lens.size()) cv.notify_all();
        });
    }
    std::unique_lock<std::mutex> lk(mu);
    cv.wait(lk, [&] { return done == lens.size(); });
    const double secs = since(t0);
    const tmc::EngineStats st = e.stats();
    line("offline_output", double(out_tokens) / secs, "tok/s",
         ", \"requests\": " + std::to_string(lens.size()) + ", \"requests_per_s\": " + std::to_string(double(lens.size()) / secs) +
             ", \"input_tokens\": " + std::to_string(in_tokens) + ", \"output_tokens\": " + std::to_string(out_tokens) +
             ", \"seconds\": " + std::to_string(secs) + ", \"engine_steps\": " + std::to_string(st.steps) +
             ", \"preemptions\": " + std::to_string(st.preemptions) + ", \"kv_blocks\": " + std::to_string(st.blocks_total) +
             ", \"block_size\": " + std::to_string(st.block_size));
}

}  // namespace

// engine_bench WS [THREADS] [cpu|cuda] [MAX_BATCH_TOKENS] [SHAREGPT_FILE [SUBSET]]
int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: engine_bench WS [threads] [cpu|cuda] [max_batch_tokens] [sharegpt.jsonl [limit]]\n");
        return 2;
    }
    const int threads = argc > 2 ? std::atoi(argv[2]) : 0;
    tmc::EngineOptions eo;
    eo.device = argc > 3 ? argv[3] : "cpu";
    eo.threads = threads;
    eo.max_batch_tokens = argc > 4 ? std::atoi(argv[4]) : 0;
    if (const char* mb = std::getenv("TM_BENCH_MAX_BATCH")) eo.max_batch_size = std::atoi(mb);  // sequences per step
    auto e = tmc::Engine::open(argv[1], eo);
    const int nthreads = threads > 0 ? threads : int(std::thread::hardware_concurrency());
    decode_rate(*e, 1, 16, 16);  // warm up (page in the weights)
    if (eo.device != "cpu") {
        // GPU: the engine's figures; scripts/bench-gpu.sh puts them next to
        // Hugging Face and the hardware bounds.
        // TM_BENCH_ONLY=decode_b1,offline (say) runs those figures alone;
        // offline_subset: only the first SUBSET requests.
        const char* only = std::getenv("TM_BENCH_ONLY");
        auto want = [&](const char* fig) { return !only || std::strstr(only, fig); };
        if (want("decode_b1")) line("decode_b1", median3([&] { return decode_rate(*e, 1, 128, 256); }), "tok/s", "");
        if (want("prefill")) {
            const double pre = median3([&] { return prompt_rate(*e, 2048); });
            line("prefill_2048", pre, "tok/s", ", \"ttft_s\": " + std::to_string(2048.0 / pre));
        }
        // TM_BENCH_DECODE=B,P,G: decode tokens/s of B requests of P prompt
        // and G new tokens (a step shape of interest, for profiling).
        if (const char* d = std::getenv("TM_BENCH_DECODE")) {
            int b = 0, p = 0, g = 0;
            if (std::sscanf(d, "%d,%d,%d", &b, &p, &g) != 3 || b <= 0 || p <= 0 || g <= 0) {
                std::fprintf(stderr, "engine_bench: TM_BENCH_DECODE must be B,P,G (positive integers)\n");
                return 2;
            }
            const double r = decode_rate(*e, b, p, g);
            line("decode_custom", r, "tok/s", ", \"batch\": " + std::to_string(b) + ", \"prompt\": " +
                                                  std::to_string(p) + ", \"ms_per_step\": " +
                                                  std::to_string(1e3 * b / r));
        }
        if (want("decode_b16")) line("decode_b16", median3([&] { return decode_rate(*e, 16, 128, 128); }), "tok/s", "");
        if (want("offline")) {
            if (argc > 6) offline(*e, argv[5], std::atoi(argv[6]));  // the subset Hugging Face also runs
            if (argc > 5 && !(only && std::strstr(only, "offline_subset"))) offline(*e, argv[5], 1 << 30);
        }
        return 0;
    }
    tmc::Workspace ws(argv[1]);
    const auto& c = ws.model();
    double weight_bytes = 0;
    for (auto& f : ws.manifest().files)
        if (f.is_tensor) weight_bytes += double(f.bytes);
    if (!c.tie_word_embeddings) weight_bytes -= double(c.vocab_size) * c.hidden_size * 2;  // embedding: one row read
    const double bw = read_bandwidth(nthreads);
    const double bound = bw / weight_bytes;

    // The naive reference: one thread, one token at a time.
    tmc::ReferenceModel ref(ws, tmc::model_program(ws));
    auto cache = ref.new_cache();
    ref.forward(prompt_of(16, 0), cache);
    auto t = Clock::now();
    int n = 0;
    for (; n < 32; ++n) ref.forward({300 + n}, cache);
    const double ref_rate = n / since(t);

    const double b1 = median3([&] { return decode_rate(*e, 1, 128, 256); });
    line("decode_b1", b1, "tok/s",
         ", \"reference\": " + std::to_string(ref_rate) + ", \"x_reference\": " + std::to_string(b1 / ref_rate) +
             ", \"bandwidth_bound\": " + std::to_string(bound) + ", \"of_bound\": " + std::to_string(b1 / bound) +
             ", \"read_GBps\": " + std::to_string(bw / 1e9));
    const double b16 = median3([&] { return decode_rate(*e, 16, 128, 128); });
    line("decode_b16", b16, "tok/s", ", \"x_b1\": " + std::to_string(b16 / b1));
    const double pp = median3([&] { return prompt_rate(*e, 512); });
    line("prompt_512", pp, "tok/s", ", \"x_reference\": " + std::to_string(pp / ref_rate));
    return 0;
}
