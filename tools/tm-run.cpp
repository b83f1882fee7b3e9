// tm-run: local inference.
//   tm-run WS                      interactive chat on a terminal (multi-turn, one session)
//   tm-run WS --jsonl [--stream]   JSON-lines generation requests in, results out (also when
//                                  stdin is not a terminal); all requests run concurrently
//   tm-run WS --ppl FILE           perplexity of a text file
//   tm-run --tokenizer DIR (--encode | --decode | --render-chat)
// WS is a workspace or a Hugging Face model directory. See tm-run(1), formats/jsonl.md.
#include <signal.h>
#include <simdjson.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cxxopts.hpp>
#include <iostream>
#include <mutex>
#include <optional>

#include "tm/json_write.hpp"
#include "tm/files.hpp"
#include "tm/chat_template.hpp"
#include "tm/engine.hpp"
#include "tm/error.hpp"
#include "tm/jsonl.hpp"
#include "tm/tokenizer.hpp"
#include "chat_input.hpp"
#include "engine_options.hpp"
#include "tool_main.hpp"

namespace {

const char* kProg = "tm-run";
const char* kUsage =
    "usage: tm-run WS [--jsonl [--stream] | --ppl FILE] [options]\n"
    "       tm-run --tokenizer DIR (--encode | --decode | --render-chat) [--chat-template NAME|FILE]\n";

enum class Mode { Encode, Decode, RenderChat };

struct LineError {
    std::string msg;
};

std::string ids_json(const std::vector<int>& ids) {
    std::string o = "[";
    for (size_t i = 0; i < ids.size(); ++i) {
        if (i) o += ", ";
        o += std::to_string(ids[i]);
    }
    return o + "]";
}

bool opt_bool(simdjson::dom::object& obj, const char* key, bool def) {
    simdjson::dom::element e;
    if (obj[key].get(e) || e.is_null()) return def;
    bool b;
    if (e.get(b)) throw LineError{std::string("\"") + key + "\" must be a boolean"};
    return b;
}

class Runner {
public:
    Runner(Mode mode, const tmc::Tokenizer& tok, std::optional<tmc::ChatTemplate> tpl, bool skip_special)
        : mode_(mode), tok_(tok), tpl_(std::move(tpl)), skip_special_(skip_special) {}

    // Returns the output line (without newline); an error line on bad input.
    std::string handle(const std::string& line, size_t lineno, bool* failed) {
        std::string id_field;
        try {
            simdjson::padded_string text(line);
            simdjson::dom::element root;
            auto err = parser_.parse(text).get(root);
            if (err == simdjson::UTF8_ERROR) throw LineError{"invalid UTF-8"};
            if (err) throw LineError{std::string("invalid JSON: ") + simdjson::error_message(err)};
            simdjson::dom::object obj;
            if (root.get(obj)) throw LineError{"expected a JSON object"};
            simdjson::dom::element idv;
            if (!obj["id"].get(idv)) {
                if (!idv.is_string() && !idv.is_int64() && !idv.is_uint64())
                    throw LineError{"\"id\" must be a string or an integer"};
                id_field = "\"id\": " + std::string(simdjson::minify(idv)) + ", ";
            }
            return "{" + id_field + body(obj) + "}";
        } catch (const LineError& e) {
            *failed = true;
            return error_line(id_field, "line " + std::to_string(lineno) + ": " + e.msg);
        } catch (const tmc::Error& e) {
            *failed = true;
            return error_line(id_field, "line " + std::to_string(lineno) + ": " + e.what());
        }
    }

private:
    static std::string error_line(const std::string& id_field, const std::string& msg) {
        return "{" + id_field + "\"error\": {\"message\": " + tmc::json_quote(msg) +
               ", \"type\": \"invalid_request_error\"}}";
    }

    std::string body(simdjson::dom::object& obj) {
        switch (mode_) {
            case Mode::Encode: {
                std::string_view text;
                simdjson::dom::element e;
                if (obj["text"].get(e)) throw LineError{"missing \"text\""};
                if (e.get(text)) throw LineError{"\"text\" must be a string"};
                bool special = opt_bool(obj, "add_special_tokens", false);
                return "\"ids\": " + ids_json(tok_.encode(text, special));
            }
            case Mode::Decode: {
                simdjson::dom::element e;
                simdjson::dom::array arr;
                if (obj["ids"].get(e)) throw LineError{"missing \"ids\""};
                if (e.get(arr)) throw LineError{"\"ids\" must be an array of integers"};
                std::vector<int> ids;
                for (auto x : arr) {
                    int64_t v;
                    if (x.get(v)) throw LineError{"\"ids\" must be an array of integers"};
                    if (v < 0 || v >= tok_.vocab_size())
                        throw LineError{"id " + std::to_string(v) + " is outside the vocabulary (0.." +
                                        std::to_string(tok_.vocab_size() - 1) + ")"};
                    ids.push_back(int(v));
                }
                bool skip = opt_bool(obj, "skip_special_tokens", skip_special_);
                return "\"text\": " + tmc::json_quote(tok_.decode(ids, skip));
            }
            case Mode::RenderChat: {
                simdjson::dom::element e;
                simdjson::dom::array msgs;
                if (obj["messages"].get(e)) throw LineError{"missing \"messages\""};
                if (e.get(msgs)) throw LineError{"\"messages\" must be an array"};
                if (msgs.size() == 0) throw LineError{"\"messages\" is empty"};
                size_t k = 0;
                for (auto m : msgs) {
                    simdjson::dom::object mo;
                    std::string_view role;
                    if (m.get(mo)) throw LineError{"messages[" + std::to_string(k) + "] must be an object"};
                    if (mo["role"].get(role))
                        throw LineError{"messages[" + std::to_string(k) + "].role must be a string"};
                    simdjson::dom::element c;
                    if (mo["content"].get(c) || !(c.is_string() || c.is_null()))
                        throw LineError{"messages[" + std::to_string(k) + "].content must be a string"};
                    ++k;
                }
                tmc::ChatRenderOptions opt;
                opt.add_generation_prompt = opt_bool(obj, "add_generation_prompt", true);
                opt.bos_token = tok_.bos_token();
                opt.eos_token = tok_.eos_token();
                std::string text = tpl_->render_json(std::string(simdjson::minify(e)), opt);
                return "\"text\": " + tmc::json_quote(text) + ", \"ids\": " + ids_json(tok_.encode(text, false));
            }
        }
        return "";
    }

    Mode mode_;
    const tmc::Tokenizer& tok_;
    std::optional<tmc::ChatTemplate> tpl_;
    bool skip_special_;
    simdjson::dom::parser parser_;
};

// ------------------------------------------------------------------ signals

using tmc::tool::g_interrupt;
using tmc::tool::install_sigint;

void write_line(const std::string& s) {
    std::fwrite(s.data(), 1, s.size(), stdout);
    std::fputc('\n', stdout);
    std::fflush(stdout);
}

// ------------------------------------------------------------------ --jsonl

int run_jsonl(tmc::Engine& engine, const tmc::SamplingParams& defaults, bool stream) {
    std::mutex out_mu;
    std::condition_variable cv;
    int in_flight = 0;
    bool failed = false;
    constexpr int kMaxInFlight = 4096;
    std::string line;
    size_t lineno = 0;
    while (std::getline(std::cin, line)) {
        ++lineno;
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        std::string id_json;
        std::optional<tmc::JsonlRequest> jr;
        try {
            jr = tmc::parse_jsonl_request(line, engine, defaults, &id_json);
        } catch (const tmc::Error& e) {
            std::lock_guard<std::mutex> lk(out_mu);
            failed = true;
            write_line(tmc::jsonl_error(id_json, "line " + std::to_string(lineno) + ": " + e.what()));
            continue;
        }
        if (id_json.empty()) id_json = std::to_string(lineno);  // answers always carry an id
        struct State {
            std::string id_json, text;
            std::vector<int> ids;
            bool want_ids;
        };
        auto st = std::make_shared<State>(State{id_json, {}, {}, jr->return_token_ids});
        {
            std::unique_lock<std::mutex> lk(out_mu);
            cv.wait(lk, [&] { return in_flight < kMaxInFlight; });
            ++in_flight;
        }
        try {
            engine.submit(std::move(jr->request), [&, st](const tmc::Output& o) {
                st->text += o.text;
                if (st->want_ids) st->ids.insert(st->ids.end(), o.token_ids.begin(), o.token_ids.end());
                std::lock_guard<std::mutex> lk(out_mu);
                if (stream && (!o.text.empty() || (st->want_ids && !o.token_ids.empty())))
                    write_line(tmc::jsonl_delta(st->id_json, o.text, st->want_ids ? &o.token_ids : nullptr));
                if (o.finished) {
                    if (o.finish_reason == tmc::FinishReason::Error) failed = true;
                    write_line(tmc::jsonl_response(st->id_json, st->text, st->want_ids ? &st->ids : nullptr, o));
                    --in_flight;
                    cv.notify_all();
                }
            });
        } catch (const tmc::Error& e) {
            std::lock_guard<std::mutex> lk(out_mu);
            --in_flight;
            failed = true;
            write_line(tmc::jsonl_error(id_json, "line " + std::to_string(lineno) + ": " + e.what()));
        }
    }
    std::unique_lock<std::mutex> lk(out_mu);
    cv.wait(lk, [&] { return in_flight == 0; });
    return failed ? 1 : 0;
}

// ------------------------------------------------------------------ --ppl

// Perplexity as the reference computes it: the text's tokens in chunks of
// chunk - 1, each chunk scored after a BOS token.
int run_ppl(tmc::Engine& engine, const std::string& path, int chunk) {
    std::string text = tmc::read_file(path);
    std::vector<int> ids = engine.tokenizer().encode(text, false);
    const int bos = engine.tokenizer().bos_id() >= 0 ? engine.tokenizer().bos_id() : engine.model().bos_token_id;
    const int body = bos >= 0 ? chunk - 1 : chunk;
    if (ids.size() < 2) throw tmc::Error(path + ": too little text to score");
    if (chunk > engine.session_len()) throw tmc::Error("--ppl-chunk is longer than the context");
    std::vector<tmc::Engine::Stream> streams;
    size_t n_chunks = (ids.size() + size_t(body) - 1) / size_t(body);
    double nll = 0;
    size_t count = 0, done = 0;
    const bool progress = isatty(2);
    auto collect = [&](tmc::Engine::Stream& s) {
        tmc::Output o, last;
        while (s.next(o)) last = std::move(o);
        if (last.finish_reason == tmc::FinishReason::Error) throw tmc::Error(last.error);
        for (float lp : last.prompt_logprobs) nll -= double(lp);
        count += last.prompt_logprobs.size();
        if (progress && ++done % 8 == 0) std::fprintf(stderr, "\rtm-run: %zu/%zu chunks", done, n_chunks);
    };
    constexpr size_t kWindow = 64;  // chunks in flight
    size_t next_collect = 0;
    for (size_t c = 0; c < n_chunks; ++c) {
        tmc::Request r;
        if (bos >= 0) r.prompt.push_back(bos);
        size_t b = c * size_t(body), e = std::min(ids.size(), b + size_t(body));
        r.prompt.insert(r.prompt.end(), ids.begin() + long(b), ids.begin() + long(e));
        if (r.prompt.size() < 2) continue;
        r.sampling.max_tokens = 0;
        r.sampling.prompt_logprobs = true;
        streams.push_back(engine.generate(std::move(r)));
        if (streams.size() - next_collect >= kWindow) collect(streams[next_collect++]);
        if (g_interrupt) throw tmc::Interrupted();
    }
    while (next_collect < streams.size()) {
        collect(streams[next_collect++]);
        if (g_interrupt) throw tmc::Interrupted();
    }
    if (progress) std::fprintf(stderr, "\r\033[K");
    write_line("{\"perplexity\": " + tmc::json_number(std::exp(nll / double(count))) +
               ", \"tokens\": " + std::to_string(count) + ", \"chunks\": " + std::to_string(streams.size()) + "}");
    return 0;
}

// ------------------------------------------------------------------ chat

int run_chat(tmc::Engine& engine, const tmc::SamplingParams& params, bool verbose) {
    engine.render_chat({{"user", "x"}});  // fails early when there is no chat template
    std::fprintf(stderr,
                 "tm-run: %s on %s. /reset: new conversation, /system TEXT: system prompt, /exit or Ctrl-D: quit; "
                 "Ctrl-C stops an answer.\n",
                 engine.model().name.c_str(), engine.backend_name().c_str());
    install_sigint(false);
    std::vector<tmc::ChatMessage> history;
    std::string system;
    uint64_t session = 1;
    for (;;) {
        const tmc::tool::ChatLine cl = tmc::tool::next_chat_line();
        if (cl.kind == tmc::tool::ChatLine::Quit) return 0;
        if (cl.kind == tmc::tool::ChatLine::Skip) continue;
        if (cl.kind == tmc::tool::ChatLine::Reset || cl.kind == tmc::tool::ChatLine::System) {
            if (cl.kind == tmc::tool::ChatLine::System) system = cl.text;
            engine.end_session(session++);
            history.clear();
            continue;
        }
        const std::string& in = cl.text;
        history.push_back({"user", in});
        std::vector<tmc::ChatMessage> msgs;
        if (!system.empty()) msgs.push_back({"system", system});
        msgs.insert(msgs.end(), history.begin(), history.end());
        tmc::Request req;
        try {
            req.prompt = engine.encode_chat(msgs);
        } catch (const tmc::Error& e) {
            std::fprintf(stderr, "tm-run: error: %s\n", e.what());
            history.pop_back();
            continue;
        }
        req.sampling = params;
        req.session_id = session;
        auto t0 = std::chrono::steady_clock::now();
        auto stream = engine.generate(std::move(req));
        std::string answer;
        tmc::Output o, last;
        g_interrupt = false;
        bool cancelled = false;
        for (;;) {
            // Checked on every output too: tokens can arrive faster than the timeout.
            if (g_interrupt.exchange(false) && !cancelled) {
                engine.cancel(stream.id());
                cancelled = true;
            }
            auto r = stream.next_for(o, std::chrono::milliseconds(20));
            if (!r) continue;
            if (!*r) break;
            std::fwrite(o.text.data(), 1, o.text.size(), stdout);
            std::fflush(stdout);
            answer += o.text;
            if (o.finished) {
                last = o;
                break;
            }
        }
        std::fputs("\n", stdout);
        double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (last.finish_reason == tmc::FinishReason::Error) {
            std::fprintf(stderr, "tm-run: error: %s\n", last.error.c_str());
            history.pop_back();
            continue;
        }
        if (last.finish_reason == tmc::FinishReason::Cancelled) std::fputs("(stopped)\n", stdout);
        if (last.finish_reason == tmc::FinishReason::Length &&
            last.usage.prompt_tokens + last.usage.completion_tokens >= engine.session_len())
            std::fputs("(the conversation has reached the context length; /reset to start over)\n", stdout);
        if (verbose)
            std::fprintf(stderr, "[prompt %d tokens, %d cached, %d prefilled; %d tokens generated in %.2f s]\n",
                         last.usage.prompt_tokens, last.usage.cached_tokens,
                         last.usage.prompt_tokens - last.usage.cached_tokens, last.usage.completion_tokens, secs);
        history.push_back({"assistant", answer});
    }
}

}  // namespace

int main(int argc, char** argv) {
    cxxopts::Options options(kProg, "Run a model locally: chat, JSON-lines batch, perplexity.");
    options.custom_help("WS [--jsonl [--stream] | --ppl FILE] [options]");
    options.positional_help("");
    options.add_options()
        ("ws", "workspace or Hugging Face model directory", cxxopts::value<std::string>())
        ("jsonl", "JSON-lines requests on stdin, results on stdout (default when stdin is not a terminal)")
        ("stream", "--jsonl: also write delta lines as tokens arrive")
        ("ppl", "perplexity of a text file", cxxopts::value<std::string>())
        ("ppl-chunk", "--ppl: tokens per chunk, BOS included", cxxopts::value<int>()->default_value("512"))
        ("v,verbose", "notices on stderr (backend, cache; per-turn token counts in chat)")
        ("tokenizer", "tokenizer modes: tokenizer directory, model directory or workspace", cxxopts::value<std::string>())
        ("encode", "JSON lines {\"text\"} -> {\"ids\"}")
        ("decode", "JSON lines {\"ids\"} -> {\"text\"}")
        ("render-chat", "JSON lines {\"messages\"} -> {\"text\", \"ids\"}")
        ("skip-special-tokens", "--decode: leave special tokens out of the text")
        ("h,help", "show this help");
    tmc::tool::add_engine_options(options);
    tmc::tool::add_sampling_options(options);
    options.parse_positional({"ws"});
    cxxopts::ParseResult args;
    int token_modes = 0;
    tmc::EngineOptions eo;
    tmc::SamplingParams sp;
    try {
        args = options.parse(argc, argv);
        if (args.count("help")) {
            std::cout << options.help() << "\nSee tm-run(1).\n";
            return 0;
        }
        if (!args.unmatched().empty()) throw tmc::tool::UsageError("unexpected argument " + args.unmatched()[0]);
        token_modes = int(args.count("encode") + args.count("decode") + args.count("render-chat"));
        if (token_modes > 1) throw tmc::tool::UsageError("choose one of --encode, --decode, --render-chat");
        if (token_modes && !args.count("tokenizer")) throw tmc::tool::UsageError("missing --tokenizer DIR");
        if (args.count("tokenizer") && !token_modes)
            throw tmc::tool::UsageError("--tokenizer goes with --encode, --decode or --render-chat");
        if (!token_modes && !args.count("ws")) throw tmc::tool::UsageError("missing the workspace (WS)");
        if (args.count("jsonl") && args.count("ppl")) throw tmc::tool::UsageError("--jsonl and --ppl do not go together");
        if (args.count("stream") && args.count("ppl")) throw tmc::tool::UsageError("--stream goes with --jsonl");
        if (args["ppl-chunk"].as<int>() < 2) throw tmc::tool::UsageError("--ppl-chunk must be at least 2");
        eo = tmc::tool::engine_options(args);
        sp = tmc::tool::sampling_defaults(args);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s: error: %s\n%s", kProg, e.what(), kUsage);
        return 2;
    }
    try {
        if (token_modes) {
            Mode mode = args.count("encode") ? Mode::Encode : args.count("decode") ? Mode::Decode : Mode::RenderChat;
            auto tok = tmc::Tokenizer::load(args["tokenizer"].as<std::string>());
            std::optional<tmc::ChatTemplate> tpl;
            if (mode == Mode::RenderChat) {
                if (args.count("chat-template")) {
                    std::string name = args["chat-template"].as<std::string>();
                    tpl = tmc::path_exists(name) ? tmc::ChatTemplate(tmc::read_file(name)) : tmc::ChatTemplate::builtin(name);
                } else if (!tok->chat_template().empty()) {
                    tpl = tmc::ChatTemplate(tok->chat_template());
                } else {
                    throw tmc::Error("the tokenizer has no chat_template; pass --chat-template NAME (" +
                                     std::string("llama2, llama3, chatml, internlm2, vicuna)"));
                }
            }
            Runner runner(mode, *tok, std::move(tpl), args.count("skip-special-tokens") > 0);
            std::ios::sync_with_stdio(false);
            std::string line;
            size_t lineno = 0;
            bool failed = false;
            while (std::getline(std::cin, line)) {
                ++lineno;
                if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
                write_line(runner.handle(line, lineno, &failed));
            }
            return failed ? 1 : 0;
        }

        const bool verbose = args.count("verbose") > 0;
        if (verbose) eo.log = [](const std::string& m) { std::fprintf(stderr, "tm-run: %s\n", m.c_str()); };
        auto engine = tmc::Engine::open(args["ws"].as<std::string>(), eo);
        if (args.count("ppl")) {
            install_sigint(true);
            return run_ppl(*engine, args["ppl"].as<std::string>(), args["ppl-chunk"].as<int>());
        }
        if (args.count("jsonl") || !isatty(0)) return run_jsonl(*engine, sp, args.count("stream") > 0);
        return run_chat(*engine, sp, verbose);
    } catch (const tmc::Interrupted&) {
        std::fprintf(stderr, "\n%s: interrupted\n", kProg);
        return 130;
    } catch (const std::exception& e) {
        return tmc::tool::fail(kProg, e.what());
    }
}
