// tm-client: the client of tm-serve (or any OpenAI-compatible server).
//   tm-client URL                   chat on a terminal, streamed
//   tm-client URL --jsonl           formats/jsonl.md requests in, response lines out
//   tm-client URL --bench ...       load generator; one JSON line of figures
// See tm-client(1).
#include <simdjson.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cxxopts.hpp>
#include <deque>
#include <fstream>
#include <iostream>
#include <random>
#include <thread>

#include "tm/json_write.hpp"
#include "chat_input.hpp"
#include "http_client.hpp"
#include "tool_main.hpp"

namespace {

using namespace tmc::tool;
using Clock = std::chrono::steady_clock;
const char* kProg = "tm-client";
const char* kUsage =
    "usage: tm-client URL [--model NAME] [--api-key KEY]                  chat\n"
    "       tm-client URL --jsonl [--stream] [--concurrency N]             JSON lines\n"
    "       tm-client URL --bench [--dataset FILE | --input-len N --output-len N] [--num-prompts N]\n"
    "                             [--request-rate R] [--concurrency N]\n";

double secs(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

std::string error_message(const HttpResult& r) {
    if (r.status == 0) return r.error;
    simdjson::dom::parser p;
    simdjson::dom::element e;
    std::string_view m;
    if (!p.parse(r.body).get(e) && !e["error"]["message"].get(m)) return "HTTP " + std::to_string(r.status) + ": " + std::string(m);
    return "HTTP " + std::to_string(r.status) + ": " + r.body.substr(0, 200);
}

// One streamed generation: text deltas, usage, finish reason, timings.
struct Generation {
    std::string text, finish_reason;
    int prompt_tokens = 0, completion_tokens = 0, cached_tokens = 0;
    Clock::time_point start, first, last;
    std::vector<double> itl;
    bool got_first = false;
    std::string stream_error;
    SseSplitter sse;

    // Feeds streamed bytes; calls on_delta(text) for each content delta.
    template <class F>
    void feed(std::string_view bytes, F&& on_delta) {
        sse.feed(bytes, [&](std::string_view data) {
            if (data == "[DONE]") return;
            simdjson::dom::parser p;
            simdjson::dom::element e;
            if (p.parse(simdjson::padded_string(data)).get(e)) return;
            std::string_view s;
            if (!e["error"]["message"].get(s)) stream_error = std::string(s);
            simdjson::dom::element u;
            if (!e["usage"].get(u) && !u.is_null()) {
                int64_t v;
                if (!u["prompt_tokens"].get(v)) prompt_tokens = int(v);
                if (!u["completion_tokens"].get(v)) completion_tokens = int(v);
                if (!u["prompt_tokens_details"]["cached_tokens"].get(v)) cached_tokens = int(v);
            }
            simdjson::dom::array choices;
            if (e["choices"].get(choices) || choices.size() == 0) return;
            simdjson::dom::element c = choices.at(0).value();
            std::string_view delta;
            bool has = !c["delta"]["content"].get(delta) || !c["text"].get(delta);
            if (!c["finish_reason"].get(s)) finish_reason = std::string(s);
            if (has && !delta.empty()) {
                const auto now = Clock::now();
                if (!got_first) got_first = true, first = now;
                else itl.push_back(secs(last, now));
                last = now;
                text += delta;
                on_delta(delta);
            }
        });
    }
};

// ------------------------------------------------------------------ chat

int run_chat(const Url& url, const std::string& model, const std::string& key, double temperature, int max_tokens) {
    std::fprintf(stderr,
                 "tm-client: chat with %s:%s. /reset: new conversation, /system TEXT: system prompt, /exit or Ctrl-D: "
                 "quit; Ctrl-C stops an answer.\n",
                 url.host.c_str(), url.port.c_str());
    install_sigint(false);
    std::vector<std::pair<std::string, std::string>> history;
    std::string system;
    // The conversation is a session of the server (tm-serve's session_id):
    // the engine keeps its KV cache between turns. Ended on /reset and exit.
    std::mt19937_64 rng(std::random_device{}());
    auto new_session = [&] { return rng() & ((uint64_t(1) << 48) - 1); };
    uint64_t session = new_session();
    auto end_session = [&] {
        net::io_context ioc;
        auto call = std::make_shared<HttpCall>(ioc, url);
        call->start(http::verb::post, "/v1/chat/interactive",
                    "{\"session_id\": " + std::to_string(session) + ", \"end_session\": true}", key, nullptr,
                    [](HttpResult) {});
        ioc.run_for(std::chrono::seconds(2));
    };
    for (;;) {
        const ChatLine cl = next_chat_line();
        if (cl.kind == ChatLine::Quit) {
            end_session();
            return 0;
        }
        if (cl.kind == ChatLine::Skip) continue;
        if (cl.kind == ChatLine::Reset || cl.kind == ChatLine::System) {
            if (cl.kind == ChatLine::System) system = cl.text;
            history.clear();
            end_session();
            session = new_session();
            continue;
        }
        const std::string& line = cl.text;
        // The whole conversation each turn: the server's session cache
        // serves the common prefix.
        std::string msgs = "[";
        if (!system.empty()) msgs += "{\"role\": \"system\", \"content\": " + tmc::json_quote(system) + "}, ";
        for (auto& [role, content] : history)
            msgs += "{\"role\": " + tmc::json_quote(role) + ", \"content\": " + tmc::json_quote(content) + "}, ";
        msgs += "{\"role\": \"user\", \"content\": " + tmc::json_quote(line) + "}]";
        std::string body = "{\"messages\": " + msgs + ", \"stream\": true, \"stream_options\": {\"include_usage\": true}" +
                           ", \"session_id\": " + std::to_string(session);
        if (!model.empty()) body += ", \"model\": " + tmc::json_quote(model);
        if (temperature >= 0) body += ", \"temperature\": " + tmc::json_number(temperature);
        if (max_tokens > 0) body += ", \"max_tokens\": " + std::to_string(max_tokens);
        body += "}";
        net::io_context ioc;
        auto call = std::make_shared<HttpCall>(ioc, url);
        Generation g;
        HttpResult res;
        bool stopped = false;
        g_interrupt = false;
        call->start(http::verb::post, "/v1/chat/completions", body, key,
                    [&](std::string_view d) {
                        g.feed(d, [&](std::string_view t) {
                            std::fwrite(t.data(), 1, t.size(), stdout);
                            std::fflush(stdout);
                        });
                    },
                    [&](HttpResult r) { res = std::move(r); });
        while (!ioc.stopped()) {
            ioc.run_for(std::chrono::milliseconds(20));
            if (g_interrupt.exchange(false) && !stopped) {
                stopped = true;
                call->cancel();  // the server sees the client leave and cancels the request
            }
        }
        std::printf("\n");
        if (stopped) std::fputs("(stopped)\n", stdout);
        std::fflush(stdout);
        if (!stopped && res.status != 200) {
            std::fprintf(stderr, "tm-client: error: %s\n", error_message(res).c_str());
            continue;
        }
        if (!stopped && !g.stream_error.empty()) std::fprintf(stderr, "tm-client: error: %s\n", g.stream_error.c_str());
        history.emplace_back("user", line);
        history.emplace_back("assistant", g.text);
    }
}

// ------------------------------------------------------------------ jsonl

// Standard input is read on its own thread and each line handed to the I/O
// thread, so answers are written while input is still awaited (a coprocess
// that waits for one answer before sending the next request works).
int run_jsonl(const Url& url, const std::string& key, int concurrency, bool stream) {
    net::io_context ioc;
    auto guard = net::make_work_guard(ioc);
    size_t lineno = 0, in_flight = 0;
    bool eof = false, failed = false;
    std::deque<std::string> pending;  // read, not yet sent (concurrency limit)
    std::function<void()> next;
    auto out = [](const std::string& s) {
        std::fwrite(s.data(), 1, s.size(), stdout);
        std::fputc('\n', stdout);
        std::fflush(stdout);
    };
    auto maybe_done = [&] {
        if (eof && pending.empty() && in_flight == 0) guard.reset();
    };
    std::thread reader([&] {
        std::string line;
        while (std::getline(std::cin, line))
            net::post(ioc, [&, l = std::move(line)]() mutable {
                pending.push_back(std::move(l));
                next();
            });
        net::post(ioc, [&] {
            eof = true;
            maybe_done();
        });
    });
    next = [&] {
        while (!pending.empty() && int(in_flight) < concurrency) {
            std::string line = std::move(pending.front());
            pending.pop_front();
            ++lineno;
            if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
            simdjson::dom::parser p;
            simdjson::dom::element root;
            simdjson::dom::object obj;
            std::string id_json;
            auto err = p.parse(simdjson::padded_string(line)).get(root);
            if (err || root.get(obj)) {
                failed = true;
                std::fprintf(stderr, "tm-client: error: line %zu: %s\n", lineno,
                             err == simdjson::UTF8_ERROR ? "invalid UTF-8" : "expected a JSON object");
                out(std::string("{\"error\": {\"message\": ") +
                    tmc::json_quote("line " + std::to_string(lineno) + ": not a JSON object") +
                    ", \"type\": \"invalid_request_error\"}}");
                continue;
            }
            // The line's fields go to the server as they are, but "id" (ours).
            std::string body = "{";
            bool chat = false;
            for (auto [k, v] : obj) {
                if (k == "id") {
                    id_json = std::string(simdjson::minify(v));
                    continue;
                }
                if (k == "return_token_ids" || k == "stream" || k == "stream_options") continue;
                if (k == "messages") chat = true;
                body += (body.size() > 1 ? ", " : "") + tmc::json_quote(k) + ": " + std::string(simdjson::minify(v));
            }
            body += std::string(body.size() > 1 ? ", " : "") + "\"stream\": true, \"stream_options\": {\"include_usage\": true}}";
            const std::string idp = id_json.empty() ? "" : "\"id\": " + id_json + ", ";
            auto call = std::make_shared<HttpCall>(ioc, url);
            auto g = std::make_shared<Generation>();
            ++in_flight;
            const size_t ln = lineno;
            call->start(http::verb::post, chat ? "/v1/chat/completions" : "/v1/completions", body, key,
                        [g, stream, idp, &out](std::string_view d) {
                            g->feed(d, [&](std::string_view t) {
                                if (stream) out("{" + idp + "\"delta\": " + tmc::json_quote(t) + "}");
                            });
                        },
                        [g, idp, ln, call, &ioc, &out, &failed, &in_flight, &next, &maybe_done](HttpResult r) {
                            --in_flight;
                            if (r.status != 200 || !g->stream_error.empty()) {
                                failed = true;
                                const std::string m = r.status != 200 ? error_message(r) : g->stream_error;
                                std::fprintf(stderr, "tm-client: error: line %zu: %s\n", ln, m.c_str());
                                out("{" + idp + "\"error\": {\"message\": " + tmc::json_quote(m) +
                                    ", \"type\": \"invalid_request_error\"}}");
                            } else {
                                out("{" + idp + "\"text\": " + tmc::json_quote(g->text) + ", \"finish_reason\": " +
                                    tmc::json_quote(g->finish_reason) + ", \"usage\": {\"prompt_tokens\": " +
                                    std::to_string(g->prompt_tokens) + ", \"completion_tokens\": " +
                                    std::to_string(g->completion_tokens) + ", \"total_tokens\": " +
                                    std::to_string(g->prompt_tokens + g->completion_tokens) +
                                    ", \"prompt_tokens_details\": {\"cached_tokens\": " +
                                    std::to_string(g->cached_tokens) + "}}}");
                            }
                            net::post(ioc, [&next, &maybe_done] {
                                next();
                                maybe_done();
                            });
                        });
        }
    };
    ioc.run();
    reader.join();
    return failed ? 1 : 0;
}

// ------------------------------------------------------------------ bench

// --request-rate: a positive number, or inf; 0 on anything else.
double request_rate(const cxxopts::ParseResult& a) {
    const std::string s = a["request-rate"].as<std::string>();
    if (s == "inf") return INFINITY;
    char* end = nullptr;
    const double v = std::strtod(s.c_str(), &end);
    return end && *end == 0 && std::isfinite(v) && v > 0 ? v : 0;
}

struct BenchItem {
    std::string body;  // JSON fields without "stream"
    bool chat = false;
};

struct BenchResult {
    bool ok = false;
    int prompt_tokens = 0, completion_tokens = 0;
    double ttft = 0, latency = 0;
    std::vector<double> itl;
};

double percentile(std::vector<double> v, double p) {
    if (v.empty()) return 0;
    std::sort(v.begin(), v.end());
    const double r = p / 100 * double(v.size() - 1);
    const size_t lo = size_t(std::floor(r)), hi = size_t(std::ceil(r));
    return v[lo] + (v[hi] - v[lo]) * (r - double(lo));
}

double mean(const std::vector<double>& v) {
    double s = 0;
    for (double x : v) s += x;
    return v.empty() ? 0 : s / double(v.size());
}

std::vector<BenchItem> bench_items(const cxxopts::ParseResult& a, const std::string& model) {
    const int n = a["num-prompts"].as<int>();
    std::mt19937_64 rng(a["seed"].as<uint64_t>());
    std::vector<BenchItem> items;
    auto synthetic = [&](int in, int out) {
        // Token ids as the prompt: exact input lengths on any tokenizer.
        std::string ids = "[";
        for (int i = 0; i < std::max(1, in); ++i) ids += (i ? ", " : "") + std::to_string(100 + rng() % 1000);
        BenchItem it;
        it.body = "\"prompt\": " + ids + "], \"max_tokens\": " + std::to_string(std::max(1, out)) + ", \"ignore_eos\": true";
        return it;
    };
    if (a.count("dataset")) {
        const std::string path = a["dataset"].as<std::string>();
        std::ifstream in(path);
        if (!in) throw std::runtime_error(path + ": cannot open");
        std::string line;
        size_t ln = 0;
        std::vector<BenchItem> all;
        while (std::getline(in, line)) {
            ++ln;
            if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
            simdjson::dom::parser p;
            simdjson::dom::element e, x;
            if (p.parse(simdjson::padded_string(line)).get(e) || !e.is_object())
                throw std::runtime_error(path + ": line " + std::to_string(ln) + ": expected a JSON object");
            int64_t il, ol;
            if (!e["input_len"].get(il) && !e["output_len"].get(ol)) {
                all.push_back(synthetic(int(il), int(ol)));
                continue;
            }
            BenchItem it;
            if (!e["messages"].get(x)) it.chat = true, it.body = "\"messages\": " + std::string(simdjson::minify(x));
            else if (!e["prompt"].get(x)) it.body = "\"prompt\": " + std::string(simdjson::minify(x));
            else
                throw std::runtime_error(path + ": line " + std::to_string(ln) +
                                         ": needs input_len and output_len, or prompt or messages");
            int64_t mt = 128;
            if ((!e["max_tokens"].get(x) || !e["output_len"].get(x)) && x.get(mt))
                throw std::runtime_error(path + ": line " + std::to_string(ln) + ": max_tokens must be an integer");
            it.body += ", \"max_tokens\": " + std::to_string(std::max<int64_t>(1, mt)) + ", \"ignore_eos\": true";
            all.push_back(it);
        }
        if (all.empty()) throw std::runtime_error(path + ": no requests");
        for (int i = 0; i < n; ++i) items.push_back(all[size_t(i) % all.size()]);
    } else {
        for (int i = 0; i < n; ++i) items.push_back(synthetic(a["input-len"].as<int>(), a["output-len"].as<int>()));
    }
    if (!model.empty())
        for (auto& it : items) it.body += ", \"model\": " + tmc::json_quote(model);
    return items;
}

int run_bench(const Url& url, const std::string& key, const cxxopts::ParseResult& a, const std::string& model) {
    std::vector<BenchItem> items = bench_items(a, model);
    const double rate = request_rate(a);
    const int conc = a["concurrency"].as<int>();
    std::mt19937_64 rng(a["seed"].as<uint64_t>() + 1);
    std::exponential_distribution<double> gap(std::isfinite(rate) && rate > 0 ? rate : 1.0);
    net::io_context ioc;
    std::vector<BenchResult> results(items.size());
    size_t next_item = 0, in_flight = 0, done = 0;
    std::deque<size_t> ready;  // arrived, waiting for a concurrency slot
    const auto t0 = Clock::now();
    net::steady_timer arrivals(ioc);
    std::function<void()> launch, arrive;
    launch = [&] {
        while (!ready.empty() && (conc <= 0 || int(in_flight) < conc)) {
            const size_t i = ready.front();
            ready.pop_front();
            ++in_flight;
            auto call = std::make_shared<HttpCall>(ioc, url);
            auto g = std::make_shared<Generation>();
            g->start = Clock::now();
            const std::string body = "{" + items[i].body + ", \"stream\": true, \"stream_options\": {\"include_usage\": true}}";
            call->start(http::verb::post, items[i].chat ? "/v1/chat/completions" : "/v1/completions", body, key,
                        [g](std::string_view d) { g->feed(d, [](std::string_view) {}); },
                        [&, g, i, call](HttpResult r) {
                            BenchResult& br = results[i];
                            br.ok = r.status == 200 && g->stream_error.empty();
                            if (!br.ok && done == 0)
                                std::fprintf(stderr, "tm-client: request failed: %s\n",
                                             r.status != 200 ? error_message(r).c_str() : g->stream_error.c_str());
                            br.prompt_tokens = g->prompt_tokens;
                            br.completion_tokens = g->completion_tokens;
                            br.latency = secs(g->start, Clock::now());
                            br.ttft = g->got_first ? secs(g->start, g->first) : br.latency;
                            br.itl = std::move(g->itl);
                            --in_flight;
                            ++done;
                            if (isatty(2)) std::fprintf(stderr, "\rtm-client: %zu/%zu", done, items.size());
                            net::post(ioc, [&] { launch(); });
                        });
        }
    };
    arrive = [&] {
        ready.push_back(next_item++);
        launch();
        if (next_item >= items.size()) return;
        if (!(std::isfinite(rate) && rate > 0)) return arrive();
        arrivals.expires_after(std::chrono::microseconds(int64_t(gap(rng) * 1e6)));
        arrivals.async_wait([&](beast::error_code ec) {
            if (!ec) arrive();
        });
    };
    if (!items.empty()) arrive();
    ioc.run();
    if (isatty(2)) std::fprintf(stderr, "\r\033[K");
    const double dur = secs(t0, Clock::now());
    std::vector<double> ttft, tpot, itl, e2e;
    int64_t in_tok = 0, out_tok = 0;
    int ok = 0;
    for (auto& r : results) {
        if (!r.ok) continue;
        ++ok;
        in_tok += r.prompt_tokens;
        out_tok += r.completion_tokens;
        ttft.push_back(r.ttft);
        e2e.push_back(r.latency);
        if (r.completion_tokens > 1) tpot.push_back((r.latency - r.ttft) / (r.completion_tokens - 1));
        itl.insert(itl.end(), r.itl.begin(), r.itl.end());
    }
    auto ms = [](double s) { return tmc::json_number(std::round(s * 1e6) / 1e3); };
    auto num = [](double v) { return tmc::json_number(std::round(v * 1000) / 1000); };
    std::string j = "{\"num_prompts\": " + std::to_string(items.size()) + ", \"completed\": " + std::to_string(ok) +
                    ", \"failed\": " + std::to_string(items.size() - size_t(ok)) +
                    ", \"request_rate\": " + (std::isfinite(rate) ? num(rate) : std::string("\"inf\"")) +
                    ", \"concurrency\": " + std::to_string(conc) + ", \"duration_s\": " + num(dur) +
                    ", \"total_input_tokens\": " + std::to_string(in_tok) +
                    ", \"total_output_tokens\": " + std::to_string(out_tok) +
                    ", \"request_throughput\": " + num(ok / dur) + ", \"input_throughput\": " + num(double(in_tok) / dur) +
                    ", \"output_throughput\": " + num(double(out_tok) / dur);
    auto stat = [&](const char* name, const std::vector<double>& v) {
        j += std::string(", \"mean_") + name + "_ms\": " + ms(mean(v)) + ", \"median_" + name + "_ms\": " +
             ms(percentile(v, 50)) + ", \"p99_" + name + "_ms\": " + ms(percentile(v, 99));
    };
    stat("ttft", ttft);
    stat("tpot", tpot);
    stat("itl", itl);
    stat("e2el", e2e);
    std::printf("%s}\n", j.c_str());
    std::fflush(stdout);
    std::fprintf(stderr,
                 "%-34s %zu / %zu\n%-34s %.2f\n%-34s %.3f\n%-34s %.1f\n%-34s %.1f\n"
                 "%-34s %.1f / %.1f / %.1f\n%-34s %.1f / %.1f / %.1f\n%-34s %.1f / %.1f / %.1f\n",
                 "requests completed / sent", size_t(ok), items.size(), "duration (s)", dur, "requests/s", ok / dur,
                 "input tokens/s", double(in_tok) / dur, "output tokens/s", double(out_tok) / dur,
                 "TTFT mean / median / p99 (ms)", mean(ttft) * 1e3, percentile(ttft, 50) * 1e3, percentile(ttft, 99) * 1e3,
                 "TPOT mean / median / p99 (ms)", mean(tpot) * 1e3, percentile(tpot, 50) * 1e3, percentile(tpot, 99) * 1e3,
                 "ITL mean / median / p99 (ms)", mean(itl) * 1e3, percentile(itl, 50) * 1e3, percentile(itl, 99) * 1e3);
    return ok == int(items.size()) ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
    cxxopts::Options options(kProg, "Client of tm-serve (or any OpenAI-compatible server): chat, JSON lines, load benchmark.");
    options.custom_help("URL [--jsonl | --bench] [options]");
    options.positional_help("");
    options.add_options()
        ("url", "server, e.g. http://127.0.0.1:23333", cxxopts::value<std::string>())
        ("jsonl", "JSON-lines requests on stdin, response lines on stdout")
        ("stream", "--jsonl: also write delta lines as tokens arrive")
        ("bench", "load benchmark: one JSON line of figures on stdout, a table on stderr")
        ("api-key", "API key (default: $TM_API_KEY)", cxxopts::value<std::string>())
        ("model", "model name to send (default: none, the server's)", cxxopts::value<std::string>())
        ("concurrency", "requests in flight at most (0: --jsonl 8, --bench no limit)", cxxopts::value<int>()->default_value("0"))
        ("temperature", "chat: temperature (default: the server's)", cxxopts::value<double>()->default_value("-1"))
        ("max-tokens", "chat: max_tokens (default: the server's)", cxxopts::value<int>()->default_value("0"))
        ("dataset", "--bench: JSON lines of {input_len, output_len} or {prompt | messages, max_tokens}", cxxopts::value<std::string>())
        ("input-len", "--bench without --dataset: prompt tokens", cxxopts::value<int>()->default_value("128"))
        ("output-len", "--bench without --dataset: tokens to generate", cxxopts::value<int>()->default_value("128"))
        ("num-prompts", "--bench: requests to send", cxxopts::value<int>()->default_value("100"))
        ("request-rate", "--bench: Poisson arrivals per second, or inf: all at once", cxxopts::value<std::string>()->default_value("inf"))
        ("seed", "--bench: random seed (prompts and arrivals)", cxxopts::value<uint64_t>()->default_value("0"))
        ("h,help", "show this help");
    options.parse_positional({"url"});
    cxxopts::ParseResult args;
    Url url;
    try {
        args = options.parse(argc, argv);
        if (args.count("help")) {
            std::cout << options.help() << "\nSee tm-client(1).\n";
            return 0;
        }
        if (!args.unmatched().empty()) throw UsageError("unexpected argument " + args.unmatched()[0]);
        if (!args.count("url")) throw UsageError("missing the server URL");
        url = Url::parse(args["url"].as<std::string>());
        if (args.count("jsonl") && args.count("bench")) throw UsageError("--jsonl and --bench do not go together");
        if (args.count("stream") && !args.count("jsonl")) throw UsageError("--stream goes with --jsonl");
        if (args["concurrency"].as<int>() < 0) throw UsageError("--concurrency must not be negative");
        if (args["num-prompts"].as<int>() < 1) throw UsageError("--num-prompts must be a positive integer");
        if (args["input-len"].as<int>() < 1 || args["output-len"].as<int>() < 1)
            throw UsageError("--input-len and --output-len must be positive integers");
        if (!(request_rate(args) > 0)) throw UsageError("--request-rate must be a positive number or inf");
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s: error: %s\n%s", kProg, e.what(), kUsage);
        return 2;
    }
    try {
        std::signal(SIGPIPE, SIG_IGN);
        std::string key = args.count("api-key") ? args["api-key"].as<std::string>() : "";
        if (key.empty() && std::getenv("TM_API_KEY")) key = std::getenv("TM_API_KEY");
        const std::string model = args.count("model") ? args["model"].as<std::string>() : "";
        if (args.count("bench")) return run_bench(url, key, args, model);
        if (args.count("jsonl") || !isatty(0))
            return run_jsonl(url, key, args["concurrency"].as<int>() ? args["concurrency"].as<int>() : 8,
                             args.count("stream") > 0);
        return run_chat(url, model, key, args["temperature"].as<double>(), args["max-tokens"].as<int>());
    } catch (const std::exception& e) {
        return fail(kProg, e.what());
    }
}
