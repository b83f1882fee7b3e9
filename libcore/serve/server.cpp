// tm-serve's HTTP server (formats/http-api.md). One I/O thread runs every
// connection (Boost.Asio); Boost.Beast parses requests; responses, including
// server-sent events, are written as raw HTTP/1.1 (chunked when streaming).
// The engine's callbacks run on the engine thread and only post to the I/O
// thread, so all server state is touched by one thread.
//
// A connection serves one request at a time. While a request generates, a
// read stays posted on the socket: a client that hangs up is seen at once
// and its request cancelled (its KV blocks freed before the next step).
#include "tm/serve.hpp"

#include <simdjson.h>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <ctime>
#include <deque>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <unordered_map>

#include "api/request_fields.hpp"
#include "tm/json_write.hpp"
#include "tm/error.hpp"

namespace tmc {

namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using Clock = std::chrono::steady_clock;
using simdjson::dom::element;
using simdjson::dom::object;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// An error with its HTTP status and OpenAI error fields.
struct HttpError {
    int status;
    std::string message, type, param, code;
};

HttpError bad_request(std::string msg, std::string param = "", std::string code = "") {
    return {400, std::move(msg), "invalid_request_error", std::move(param), std::move(code)};
}

std::string error_body(const HttpError& e) {
    auto opt = [](const std::string& s) { return s.empty() ? std::string("null") : json_quote(s); };
    return "{\"error\": {\"message\": " + json_quote(e.message) + ", \"type\": " + json_quote(e.type) +
           ", \"param\": " + opt(e.param) + ", \"code\": " + opt(e.code) + "}}";
}

const char* reason_phrase(int status) {
    switch (status) {
        case 100: return "Continue";
        case 200: return "OK";
        case 204: return "No Content";
        case 400: return "Bad Request";
        case 401: return "Unauthorized";
        case 404: return "Not Found";
        case 405: return "Method Not Allowed";
        case 413: return "Payload Too Large";
        case 431: return "Request Header Fields Too Large";
        case 500: return "Internal Server Error";
        case 503: return "Service Unavailable";
        default: return "Unknown";
    }
}

struct Histogram {
    std::vector<double> bounds;
    std::vector<uint64_t> counts;
    double sum = 0;
    uint64_t n = 0;
    explicit Histogram(std::vector<double> b) : bounds(std::move(b)), counts(bounds.size(), 0) {}
    void observe(double v) {
        for (size_t i = 0; i < bounds.size(); ++i)
            if (v <= bounds[i]) ++counts[i];
        sum += v, ++n;
    }
    void write(std::string& o, const std::string& name, const std::string& help) const {
        o += "# HELP " + name + " " + help + "\n# TYPE " + name + " histogram\n";
        for (size_t i = 0; i < bounds.size(); ++i)
            o += name + "_bucket{le=\"" + json_number(bounds[i]) + "\"} " + std::to_string(counts[i]) + "\n";
        o += name + "_bucket{le=\"+Inf\"} " + std::to_string(n) + "\n";
        o += name + "_sum " + json_number(sum) + "\n" + name + "_count " + std::to_string(n) + "\n";
    }
};

std::string random_hex(std::mt19937_64& rng, int n) {
    static const char* hex = "0123456789abcdef";
    std::string s;
    for (int i = 0; i < n; ++i) s += hex[rng() & 15];
    return s;
}

enum class Kind { Chat, Completion, Interactive };

struct Server;

class Conn : public std::enable_shared_from_this<Conn> {
public:
    Conn(Server& s, tcp::socket sock) : srv_(s), sock_(std::move(sock)), idle_timer_(sock_.get_executor()) {}
    void start() { read_request(); }
    void on_output(const Output& o);
    void close();
    bool idle() const { return state_ == State::Idle || state_ == State::Reading; }
    bool generating() const { return state_ == State::Busy && gen_.active; }
    uint64_t request_id() const { return gen_.id; }

private:
    enum class State { Reading, Busy, Idle, Closed };

    // The request being generated.
    struct Gen {
        bool active = false;
        uint64_t id = 0;
        Kind kind = Kind::Chat;
        bool stream = false, include_usage = false, chat_logprobs = false;
        int logprobs = -1;
        int last_prompt_token = -1;  // for the text of the first token's logprobs
        std::string rid, prompt_text;
        std::optional<uint64_t> session;
        std::string text;
        std::vector<TokenLogprob> lps;
        std::vector<int> token_ids;
        Clock::time_point start, last;
        bool started = false, first_chunk = true, client_gone = false;
        Usage usage;
    };

    void read_request();
    void arm_idle_timer();
    void on_header(beast::error_code ec);
    void on_body(beast::error_code ec);
    void handle();
    void route(const http::request<http::string_body>& req);
    void start_generation(Kind kind, const std::string& body);
    void chat_or_completion(Kind kind, object obj);
    void interactive(object obj);
    void submit(Request req);

    void respond(int status, const std::string& body, const std::string& type = "application/json",
                 const std::string& extra_headers = "");
    void respond_error(const HttpError& e) { respond(e.status, error_body(e)); }
    void send(std::string bytes);
    void send_chunk(const std::string& data);
    void pump();
    void after_response();
    void arm_watch();
    void client_gone();
    void finish_generation(const Output& o);
    std::string chunk_json(const std::string& delta, const char* finish, const std::vector<TokenLogprob>* lps);
    std::string logprobs_json(const std::vector<TokenLogprob>& lps, size_t text_offset0) const;
    int token_before(size_t n_last) const;
    void log_request(int status, const Output* o);

    Server& srv_;
    tcp::socket sock_;
    net::steady_timer idle_timer_;  // closes a connection that sends no complete request in time
    beast::flat_buffer buf_;
    std::optional<http::request_parser<http::string_body>> parser_;
    State state_ = State::Reading;
    bool keep_alive_ = true, watch_pending_ = false, writing_ = false, respond_done_ = false;
    std::deque<std::string> wq_;
    Gen gen_;
    int status_ = 0;
    Clock::time_point t0_;
    std::string method_, target_;
};

struct Server {
    Engine& eng;
    ServeOptions opt;
    net::io_context ioc{1};
    tcp::acceptor acc{ioc};
    net::signal_set sigs{ioc, SIGTERM, SIGINT};
    net::steady_timer grace{ioc};
    net::steady_timer accept_retry{ioc};
    bool stopping = false;
    std::set<std::shared_ptr<Conn>> conns;
    std::mt19937_64 rng{std::random_device{}()};
    int64_t created = int64_t(std::time(nullptr));

    // Metrics.
    std::map<int, uint64_t> responses;  // by status
    uint64_t prompt_tokens = 0, generation_tokens = 0, cached_tokens = 0;
    Histogram ttft{{0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80}};
    Histogram itl{{0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5}};
    Histogram e2e{{0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300, 600}};


    Server(Engine& e, const ServeOptions& o) : eng(e), opt(o) {}

    void accept() {
        acc.async_accept([this](beast::error_code ec, tcp::socket s) {
            if (stopping || !acc.is_open()) return;
            if (ec) {
                // Out of file descriptors (or a transient error): try again
                // shortly instead of spinning; existing connections go on.
                if (opt.log && ec != net::error::connection_aborted)
                    opt.log("{\"event\": \"accept_failed\", \"error\": " + json_quote(ec.message()) + "}");
                accept_retry.expires_after(std::chrono::milliseconds(100));
                accept_retry.async_wait([this](beast::error_code e) {
                    if (!e) accept();
                });
                return;
            }
            beast::error_code ignored;
            s.set_option(tcp::no_delay(true), ignored);
            auto c = std::make_shared<Conn>(*this, std::move(s));
            conns.insert(c);
            c->start();
            accept();
        });
    }

    void remove(const std::shared_ptr<Conn>& c) {
        conns.erase(c);
        maybe_done();
    }

    int generating() const {
        int n = 0;
        for (auto& c : conns) n += c->generating();
        return n;
    }

    void maybe_done() {
        if (stopping && generating() == 0) {
            for (auto& c : std::set<std::shared_ptr<Conn>>(conns))
                if (c->idle()) c->close();
            if (conns.empty()) ioc.stop();
        }
    }

    void shutdown() {
        if (stopping) return;
        stopping = true;
        beast::error_code ec;
        acc.close(ec);
        accept_retry.cancel();
        if (opt.log) opt.log("{\"event\": \"shutdown\", \"running\": " + std::to_string(generating()) + "}");
        grace.expires_after(std::chrono::milliseconds(int64_t(opt.grace_seconds * 1000)));
        grace.async_wait([this](beast::error_code e) {
            if (e) return;
            for (auto& c : conns)
                if (c->generating()) eng.cancel(c->request_id());
        });
        maybe_done();
    }

    std::string metrics_text() {
        const EngineStats st = eng.stats();
        std::string o;
        auto gauge = [&](const char* name, const char* help, double v) {
            o += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " gauge\n" + name + " " +
                 json_number(v) + "\n";
        };
        auto counter = [&](const char* name, const char* help, double v) {
            o += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " counter\n" + name + " " +
                 json_number(v) + "\n";
        };
        gauge("tm_requests_running", "Requests being generated.", st.running);
        gauge("tm_requests_waiting", "Requests queued for the engine.", st.waiting);
        gauge("tm_kv_blocks", "KV cache blocks in the pool.", st.blocks_total);
        gauge("tm_kv_blocks_free", "KV cache blocks free.", st.blocks_free);
        gauge("tm_kv_blocks_used", "KV cache blocks in use (running requests and kept sessions).",
              st.blocks_total - st.blocks_free);
        gauge("tm_kv_block_size_tokens", "Tokens per KV cache block.", st.block_size);
        gauge("tm_sessions", "Sessions whose KV cache is kept.", st.sessions);
        counter("tm_prompt_tokens_total", "Prompt tokens of finished requests.", double(prompt_tokens));
        counter("tm_prompt_tokens_cached_total", "Prompt tokens served from a session's cache.", double(cached_tokens));
        counter("tm_generation_tokens_total", "Tokens generated by finished requests.", double(generation_tokens));
        counter("tm_prefill_tokens_total", "Prompt tokens computed by the engine.", double(st.prompt_tokens_computed));
        counter("tm_engine_steps_total", "Engine steps run.", double(st.steps));
        counter("tm_preemptions_total", "Requests preempted for KV blocks (recomputed later).", double(st.preemptions));
        o += "# HELP tm_http_responses_total HTTP responses by status.\n# TYPE tm_http_responses_total counter\n";
        if (responses.empty()) o += "tm_http_responses_total{status=\"200\"} 0\n";
        for (auto& [code, n] : responses)
            o += "tm_http_responses_total{status=\"" + std::to_string(code) + "\"} " + std::to_string(n) + "\n";
        ttft.write(o, "tm_time_to_first_token_seconds", "Time from a request's arrival to its first token.");
        itl.write(o, "tm_inter_token_latency_seconds", "Time between consecutive tokens of a request.");
        e2e.write(o, "tm_request_duration_seconds", "Time from a request's arrival to its last token.");
        return o;
    }
};

// ------------------------------------------------------------------ reading

// While a connection waits for (the rest of) a request: a client that
// stalls, or a keep-alive connection left idle, is closed after the timeout.
void Conn::arm_idle_timer() {
    idle_timer_.expires_after(std::chrono::milliseconds(int64_t(srv_.opt.idle_timeout_seconds * 1000)));
    idle_timer_.async_wait([weak = std::weak_ptr<Conn>(shared_from_this())](beast::error_code ec) {
        auto self = weak.lock();
        if (ec || !self) return;
        if (self->state_ == State::Reading || self->state_ == State::Idle) self->close();
    });
}

void Conn::read_request() {
    arm_idle_timer();
    state_ = State::Reading;
    parser_.emplace();
    parser_->body_limit(srv_.opt.max_body_bytes);
    parser_->header_limit(64 * 1024);
    http::async_read_header(sock_, buf_, *parser_,
                            [self = shared_from_this()](beast::error_code ec, size_t) { self->on_header(ec); });
}

void Conn::on_header(beast::error_code ec) {
    if (state_ == State::Closed) return;
    t0_ = Clock::now();
    if (ec == http::error::end_of_stream || ec == net::error::eof || ec == net::error::connection_reset ||
        ec == net::error::operation_aborted) {
        close();
        return;
    }
    keep_alive_ = false;
    if (parser_->is_header_done()) {
        method_ = std::string(parser_->get().method_string());
        target_ = std::string(parser_->get().target());
    }
    if (ec == http::error::body_limit) {
        respond_error({413, "the request body is larger than " + std::to_string(srv_.opt.max_body_bytes) + " bytes",
                       "invalid_request_error", "", "request_too_large"});
        return;
    }
    if (ec == http::error::header_limit) {
        respond_error({431, "the request headers are too large", "invalid_request_error", "", ""});
        return;
    }
    if (ec) {
        respond_error(bad_request("malformed HTTP request: " + ec.message()));
        return;
    }
    auto& req = parser_->get();
    if (req[http::field::expect] == "100-continue") send("HTTP/1.1 100 Continue\r\n\r\n");
    http::async_read(sock_, buf_, *parser_,
                     [self = shared_from_this()](beast::error_code e, size_t) { self->on_body(e); });
}

void Conn::on_body(beast::error_code ec) {
    if (state_ == State::Closed) return;
    keep_alive_ = false;
    if (ec == http::error::body_limit) {
        respond_error({413, "the request body is larger than " + std::to_string(srv_.opt.max_body_bytes) + " bytes",
                       "invalid_request_error", "", "request_too_large"});
        return;
    }
    if (ec) {
        if (ec == net::error::eof || ec == http::error::end_of_stream || ec == net::error::connection_reset ||
            ec == http::error::partial_message)
            close();
        else
            respond_error(bad_request("malformed HTTP request: " + ec.message()));
        return;
    }
    handle();
}

void Conn::handle() {
    idle_timer_.cancel();
    state_ = State::Busy;
    respond_done_ = false;
    const auto& req = parser_->get();
    keep_alive_ = req.keep_alive() && !srv_.stopping;
    method_ = std::string(req.method_string());
    target_ = std::string(req.target());
    try {
        route(req);
    } catch (const HttpError& e) {
        respond_error(e);
    } catch (const std::exception& e) {
        // The request-field readers name the field first: "\"top_p\" must be ..."
        std::string msg = e.what(), param;
        if (msg.size() > 2 && msg[0] == '"') param = msg.substr(1, msg.find('"', 1) - 1);
        respond_error(bad_request(msg, param));
    }
}

void Conn::route(const http::request<http::string_body>& req) {
    std::string path = target_.substr(0, target_.find('?'));
    const auto m = req.method();
    struct R {
        const char* path;
        http::verb verb;
    };
    static const R routes[] = {{"/", http::verb::get},
                               {"/health", http::verb::get},
                               {"/metrics", http::verb::get},
                               {"/v1/models", http::verb::get},
                               {"/v1/chat/completions", http::verb::post},
                               {"/v1/completions", http::verb::post},
                               {"/v1/chat/interactive", http::verb::post},
                               {"/v1/encode", http::verb::post}};
    const R* r = nullptr;
    for (auto& x : routes)
        if (path == x.path) r = &x;
    if (!r) throw HttpError{404, "no such endpoint: " + path, "invalid_request_error", "", "not_found"};
    if (m == http::verb::options) {
        respond(204, "", "text/plain",
                "Access-Control-Allow-Methods: GET, POST, OPTIONS\r\n"
                "Access-Control-Allow-Headers: Authorization, Content-Type\r\n");
        return;
    }
    if (m != r->verb && !(r->verb == http::verb::get && m == http::verb::head))
        throw HttpError{405, std::string(req.method_string()) + " is not allowed on " + path + " (use " +
                                 std::string(http::to_string(r->verb)) + ")",
                        "invalid_request_error", "", "method_not_allowed"};
    if (!srv_.opt.api_keys.empty() && path.rfind("/v1/", 0) == 0) {
        std::string auth(req[http::field::authorization]);
        const std::string pre = "Bearer ";
        bool ok = auth.rfind(pre, 0) == 0 &&
                  std::find(srv_.opt.api_keys.begin(), srv_.opt.api_keys.end(), auth.substr(pre.size())) !=
                      srv_.opt.api_keys.end();
        if (!ok)
            throw HttpError{401, auth.empty() ? "missing API key: send \"Authorization: Bearer KEY\""
                                              : "incorrect API key provided",
                            "invalid_request_error", "", "invalid_api_key"};
    }
    if (path == "/") return respond(200, chat_page_html(), "text/html; charset=utf-8");
    if (path == "/health") return respond(200, "{\"status\": \"ok\"}");
    if (path == "/metrics") return respond(200, srv_.metrics_text(), "text/plain; version=0.0.4; charset=utf-8");
    if (path == "/v1/models") {
        return respond(200, "{\"object\": \"list\", \"data\": [{\"id\": " + json_quote(srv_.opt.model_name) +
                                ", \"object\": \"model\", \"created\": " + std::to_string(srv_.created) +
                                ", \"owned_by\": \"tm\", \"root\": " + json_quote(srv_.opt.model_name) +
                                ", \"max_model_len\": " + std::to_string(srv_.eng.session_len()) + "}]}");
    }
    if (srv_.stopping) throw HttpError{503, "the server is shutting down", "server_error", "", "shutting_down"};
    if (path == "/v1/chat/completions") return start_generation(Kind::Chat, req.body());
    if (path == "/v1/completions") return start_generation(Kind::Completion, req.body());
    if (path == "/v1/chat/interactive") return start_generation(Kind::Interactive, req.body());
    // /v1/encode
    static thread_local simdjson::dom::parser parser;
    element root;
    auto err = parser.parse(simdjson::padded_string(req.body())).get(root);
    if (err) throw bad_request(err == simdjson::UTF8_ERROR ? "invalid UTF-8 in the body" : "invalid JSON in the body");
    object obj;
    if (root.get(obj)) throw bad_request("expected a JSON object");
    element in, e;
    if (obj["input"].get(in)) throw bad_request("missing \"input\"", "input");
    bool add_bos = true, preprocess = false;
    if (!obj["add_bos"].get(e)) add_bos = api::boolean(e, "add_bos");
    if (!obj["do_preprocess"].get(e)) preprocess = api::boolean(e, "do_preprocess");
    auto enc = [&](std::string_view s) {
        if (preprocess) return srv_.eng.encode_chat({{"user", std::string(s)}});
        return srv_.eng.tokenizer().encode(s, add_bos);
    };
    auto ids_json = [](const std::vector<int>& v) {
        std::string o = "[";
        for (size_t i = 0; i < v.size(); ++i) o += (i ? ", " : "") + std::to_string(v[i]);
        return o + "]";
    };
    std::string_view s;
    simdjson::dom::array arr;
    if (!in.get(s)) {
        auto ids = enc(s);
        return respond(200, "{\"input_ids\": " + ids_json(ids) + ", \"length\": " + std::to_string(ids.size()) + "}");
    }
    if (in.get(arr)) throw bad_request("\"input\" must be a string or an array of strings", "input");
    std::string ids = "[", lens = "[";
    bool first = true;
    for (element x : arr) {
        if (x.get(s)) throw bad_request("\"input\" must be a string or an array of strings", "input");
        auto v = enc(s);
        ids += (first ? "" : ", ") + ids_json(v);
        lens += (first ? "" : ", ") + std::to_string(v.size());
        first = false;
    }
    respond(200, "{\"input_ids\": " + ids + "], \"length\": " + lens + "]}");
}

// ------------------------------------------------------------------ generation

void Conn::start_generation(Kind kind, const std::string& body) {
    static thread_local simdjson::dom::parser parser;
    element root;
    auto err = parser.parse(simdjson::padded_string(body)).get(root);
    if (err == simdjson::UTF8_ERROR) throw bad_request("invalid UTF-8 in the body");
    if (err) throw bad_request(std::string("invalid JSON in the body: ") + simdjson::error_message(err));
    object obj;
    if (root.get(obj)) throw bad_request("the body must be a JSON object");
    gen_ = Gen{};
    gen_.kind = kind;
    gen_.start = gen_.last = Clock::now();
    if (kind == Kind::Interactive) interactive(obj);
    else chat_or_completion(kind, obj);
}

void Conn::chat_or_completion(Kind kind, object obj) {
    const bool chat = kind == Kind::Chat;
    static const std::set<std::string_view> common = {
        "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
        "frequency_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "skip_special_tokens", "stream",
        "stream_options", "n", "logprobs", "user", "logit_bias", "best_of", "session_id"};
    static const std::set<std::string_view> chat_only = {
        "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
        "parallel_tool_calls", "store", "metadata", "service_tier", "functions", "function_call"};
    static const std::set<std::string_view> completion_only = {"prompt", "echo", "suffix"};
    for (auto [key, v] : obj) {
        (void)v;
        if (!common.count(key) && !(chat ? chat_only : completion_only).count(key))
            throw bad_request("unrecognized request argument supplied: " + std::string(key), std::string(key),
                              "unknown_parameter");
    }
    element e;
    if (!obj["model"].get(e)) {
        std::string_view m;
        if (e.get(m)) throw bad_request("\"model\" must be a string", "model");
        if (m != srv_.opt.model_name)
            throw HttpError{404, "the model `" + std::string(m) + "` does not exist (this server serves `" +
                                     srv_.opt.model_name + "`)",
                            "invalid_request_error", "model", "model_not_found"};
    }
    if (!obj["n"].get(e) && !e.is_null()) {
        int64_t n = api::integer(e, "n", "1");
        if (n != 1) throw bad_request("\"n\" must be 1: one choice per request", "n");
    }
    if (!obj["best_of"].get(e) && !e.is_null() && api::integer(e, "best_of", "1") != 1)
        throw bad_request("\"best_of\" must be 1", "best_of");
    for (const char* f : {"tools", "functions"}) {
        simdjson::dom::array a;
        if (!obj[f].get(e) && !e.is_null() && !(e.get(a) == simdjson::SUCCESS && a.size() == 0))
            throw bad_request(std::string("\"") + f + "\" (tool calling) is not supported", f);
    }
    if (!obj["logit_bias"].get(e) && !e.is_null()) {
        object lb;
        if (e.get(lb) || lb.size() != 0) throw bad_request("\"logit_bias\" is not supported", "logit_bias");
    }
    if (!obj["response_format"].get(e) && !e.is_null()) {
        std::string_view t;
        if (e["type"].get(t) || t != "text")
            throw bad_request("\"response_format\" other than {\"type\": \"text\"} is not supported", "response_format");
    }
    if (!obj["echo"].get(e) && !e.is_null() && api::boolean(e, "echo"))
        throw bad_request("\"echo\" is not supported", "echo");
    if (!obj["suffix"].get(e) && !e.is_null()) throw bad_request("\"suffix\" is not supported", "suffix");

    Request req;
    req.sampling = srv_.opt.defaults;
    if (chat) {
        if (obj["messages"].get(e)) throw bad_request("missing \"messages\"", "messages");
        auto msgs = api::read_messages(e);
        gen_.prompt_text = srv_.eng.render_chat(msgs, true);
        req.prompt = srv_.eng.tokenizer().encode(gen_.prompt_text, false);
    } else {
        if (obj["prompt"].get(e)) throw bad_request("missing \"prompt\"", "prompt");
        simdjson::dom::array a;
        std::string_view s1;
        // ["text"] is one prompt; several prompts per request are not (n = 1).
        if (!e.get(a) && a.size() == 1 && !a.at(0).get(s1)) e = a.at(0).value();
        else if (!e.get(a) && a.size() > 1 && a.at(0).is_string())
            throw bad_request("one prompt per request: send several requests", "prompt");
        std::string_view s;
        if (!e.get(s)) gen_.prompt_text = std::string(s);
        req.prompt = api::read_prompt(e, srv_.eng);
    }
    if (req.prompt.empty()) throw bad_request("the prompt is empty", chat ? "messages" : "prompt");
    api::read_sampling(obj, srv_.eng, req.sampling);
    if (!obj["session_id"].get(e) && !e.is_null()) {
        int64_t v = api::integer(e, "session_id", "a non-negative integer");
        if (v < 0) throw bad_request("\"session_id\" must be a non-negative integer", "session_id");
        req.session_id = uint64_t(v);
    }
    if (!obj["stream"].get(e) && !e.is_null()) gen_.stream = api::boolean(e, "stream");
    if (!obj["stream_options"].get(e) && !e.is_null()) {
        object so;
        if (e.get(so)) throw bad_request("\"stream_options\" must be an object", "stream_options");
        if (!gen_.stream) throw bad_request("\"stream_options\" is only allowed with \"stream\": true", "stream_options");
        element u;
        if (!so["include_usage"].get(u)) gen_.include_usage = api::boolean(u, "stream_options.include_usage");
    }
    if (chat) {
        bool lp = false;
        if (!obj["logprobs"].get(e) && !e.is_null()) lp = api::boolean(e, "logprobs");
        int top = 0;
        if (!obj["top_logprobs"].get(e) && !e.is_null()) {
            int64_t v = api::integer(e, "top_logprobs", "an integer in [0, 20]");
            if (v < 0 || v > 20) throw bad_request("\"top_logprobs\" must be an integer in [0, 20]", "top_logprobs");
            if (!lp) throw bad_request("\"top_logprobs\" needs \"logprobs\": true", "top_logprobs");
            top = int(v);
        }
        gen_.chat_logprobs = lp;
        req.sampling.logprobs = lp ? top : -1;
    } else if (!obj["logprobs"].get(e) && !e.is_null()) {
        int64_t v = api::integer(e, "logprobs", "an integer in [0, 5]");
        if (v < 0 || v > 5) throw bad_request("\"logprobs\" must be an integer in [0, 5]", "logprobs");
        req.sampling.logprobs = int(v);
    }
    gen_.logprobs = req.sampling.logprobs;
    gen_.rid = (chat ? "chatcmpl-" : "cmpl-") + random_hex(srv_.rng, 24);
    submit(std::move(req));
}

// LMDeploy's /v1/chat/interactive: with interactive_mode the session keeps its
// conversation (and KV cache) between calls.
void Conn::interactive(object obj) {
    static const std::set<std::string_view> known = {
        "prompt", "session_id", "interactive_mode", "stream", "stop", "request_output_len", "max_tokens", "top_p",
        "top_k", "temperature", "repetition_penalty", "presence_penalty", "frequency_penalty", "ignore_eos",
        "skip_special_tokens", "cancel", "seed", "min_p", "end_session", "model", "stop_token_ids", "adapter_name"};
    for (auto [key, v] : obj) {
        (void)v;
        if (!known.count(key))
            throw bad_request("unrecognized request argument supplied: " + std::string(key), std::string(key),
                              "unknown_parameter");
    }
    element e;
    int64_t sid = -1;
    if (!obj["session_id"].get(e) && !e.is_null()) sid = api::integer(e, "session_id", "an integer");
    bool interactive = false, end = false, cancel = false;
    if (!obj["interactive_mode"].get(e) && !e.is_null()) interactive = api::boolean(e, "interactive_mode");
    if (!obj["end_session"].get(e) && !e.is_null()) end = api::boolean(e, "end_session");
    if (!obj["cancel"].get(e) && !e.is_null()) cancel = api::boolean(e, "cancel");
    if (!obj["stream"].get(e) && !e.is_null()) gen_.stream = api::boolean(e, "stream");
    if ((interactive || end || cancel) && sid < 0)
        throw bad_request("\"session_id\" (a non-negative integer) is needed with interactive_mode, end_session or cancel",
                          "session_id");
    std::vector<ChatMessage> turn;
    bool has_prompt = false;
    if (!obj["prompt"].get(e) && !e.is_null()) {
        std::string_view s;
        if (!e.get(s)) {
            if (!s.empty()) turn.push_back({"user", std::string(s)}), has_prompt = true;
        } else {
            turn = api::read_messages(e);
            has_prompt = true;
        }
    }
    auto plain = [&](const std::string& fr) {
        respond(200, "{\"text\": \"\", \"tokens\": 0, \"input_tokens\": 0, \"history_tokens\": 0, \"finish_reason\": " +
                         json_quote(fr) + "}");
    };
    // The engine owns sessions: their conversation, KV cache and running request.
    if (cancel) {
        if (auto id = srv_.eng.session_request(uint64_t(sid))) srv_.eng.cancel(*id);
        return plain("cancelled");
    }
    if (end || (!interactive && !has_prompt && sid >= 0)) {
        srv_.eng.end_session(uint64_t(sid));
        return plain("stop");
    }
    if (!has_prompt) throw bad_request("missing \"prompt\"", "prompt");
    if (sid >= 0 && srv_.eng.session_request(uint64_t(sid)))
        throw bad_request("session " + std::to_string(sid) + " is already generating", "session_id");
    Request req;
    req.sampling = srv_.opt.defaults;
    api::read_sampling(obj, srv_.eng, req.sampling);  // request_output_len among its names
    std::vector<ChatMessage> msgs;
    if (interactive) {
        // The conversation so far plus this turn, rendered whole: the engine
        // reuses the session's cache for the common prefix. A whole
        // conversation replaces the session's; its last message is the turn.
        if (turn.size() > 1) msgs = turn;
        else {
            msgs = srv_.eng.session_conversation(uint64_t(sid));
            msgs.push_back(turn.back());
        }
        req.conversation = msgs;
        req.session_id = uint64_t(sid);
        gen_.session = uint64_t(sid);
    } else {
        if (sid >= 0) srv_.eng.end_session(uint64_t(sid));
        msgs = std::move(turn);
    }
    gen_.prompt_text = srv_.eng.render_chat(msgs, true);
    req.prompt = srv_.eng.tokenizer().encode(gen_.prompt_text, false);
    gen_.rid = "chat-" + random_hex(srv_.rng, 24);
    submit(std::move(req));
}

void Conn::submit(Request req) {
    const int ctx = srv_.eng.session_len();
    if (int(req.prompt.size()) >= ctx)
        throw bad_request("this model's maximum context length is " + std::to_string(ctx) + " tokens; the prompt has " +
                              std::to_string(req.prompt.size()),
                          gen_.kind == Kind::Chat ? "messages" : "prompt", "context_length_exceeded");
    gen_.last_prompt_token = req.prompt.back();
    std::weak_ptr<Conn> weak = shared_from_this();
    Server* srv = &srv_;
    gen_.active = true;
    try {
        gen_.id = srv_.eng.submit(std::move(req), [weak, srv](const Output& o) {
            net::post(srv->ioc, [weak, o] {
                if (auto c = weak.lock()) c->on_output(o);
            });
        });
    } catch (...) {
        gen_.active = false;
        throw;
    }

    arm_watch();
}

// The token before the last n_last generated ones (the prompt's last if none).
int Conn::token_before(size_t n_last) const {
    const auto& t = gen_.token_ids;
    return t.size() > n_last ? t[t.size() - n_last - 1] : gen_.last_prompt_token;
}

std::string Conn::logprobs_json(const std::vector<TokenLogprob>& lps, size_t text_offset0) const {
    const Tokenizer& tok = srv_.eng.tokenizer();
    // A token's text as it reads after the token before it (a lone
    // SentencePiece token would lose its leading space).
    int prev = token_before(lps.size());
    auto piece_after = [&](int before, int id) {
        if (before < 0) return tok.decode({id}, false);
        const std::string a = tok.decode({before}, false), b = tok.decode({before, id}, false);
        return b.compare(0, a.size(), a) == 0 ? b.substr(a.size()) : tok.decode({id}, false);
    };
    auto bytes = [](const std::string& s) {
        std::string o = "[";
        for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(uint8_t(s[i]));
        return o + "]";
    };
    std::string o;
    if (gen_.kind == Kind::Chat) {
        o = "{\"content\": [";
        for (size_t i = 0; i < lps.size(); ++i) {
            const std::string p = piece_after(prev, lps[i].token);
            o += (i ? ", " : "") + std::string("{\"token\": ") + json_quote(p) +
                 ", \"logprob\": " + json_number(lps[i].logprob) + ", \"bytes\": " + bytes(p) + ", \"top_logprobs\": [";
            for (size_t k = 0; k < lps[i].top.size(); ++k) {
                const std::string q = piece_after(prev, lps[i].top[k].first);
                o += (k ? ", " : "") + std::string("{\"token\": ") + json_quote(q) +
                     ", \"logprob\": " + json_number(lps[i].top[k].second) + ", \"bytes\": " + bytes(q) + "}";
            }
            o += "]}";
            prev = lps[i].token;
        }
        return o + "]}";
    }
    std::string toks = "[", lp = "[", top = "[", off = "[";
    size_t at = text_offset0;
    for (size_t i = 0; i < lps.size(); ++i) {
        const std::string p = piece_after(prev, lps[i].token);
        const char* sep = i ? ", " : "";
        toks += sep + json_quote(p);
        lp += sep + json_number(lps[i].logprob);
        off += sep + std::to_string(at);
        at += p.size();
        top += std::string(sep) + "{";
        for (size_t k = 0; k < lps[i].top.size(); ++k)
            top += (k ? ", " : "") + json_quote(piece_after(prev, lps[i].top[k].first)) + ": " +
                   json_number(lps[i].top[k].second);
        top += "}";
        prev = lps[i].token;
    }
    return "{\"tokens\": " + toks + "], \"token_logprobs\": " + lp + "], \"top_logprobs\": " + top +
           "], \"text_offset\": " + off + "]}";
}

std::string Conn::chunk_json(const std::string& delta, const char* finish, const std::vector<TokenLogprob>* lps) {
    const std::string head = "{\"id\": " + json_quote(gen_.rid) + ", \"object\": " +
                             json_quote(gen_.kind == Kind::Chat ? "chat.completion.chunk" : "text_completion") +
                             ", \"created\": " + std::to_string(int64_t(std::time(nullptr))) +
                             ", \"model\": " + json_quote(srv_.opt.model_name) + ", \"choices\": [{\"index\": 0, ";
    std::string o = head;
    if (gen_.kind == Kind::Chat) {
        o += "\"delta\": {";
        if (gen_.first_chunk) o += "\"role\": \"assistant\", ";
        o += "\"content\": " + json_quote(delta) + "}";
    } else {
        o += "\"text\": " + json_quote(delta);
    }
    o += ", \"logprobs\": " + (lps && gen_.logprobs >= 0 ? logprobs_json(*lps, gen_.text.size() - delta.size()) : "null");
    o += ", \"finish_reason\": " + (finish ? json_quote(finish) : std::string("null")) + "}]";
    if (gen_.include_usage) o += ", \"usage\": null";
    gen_.first_chunk = false;
    return o + "}";
}

std::string usage_json(const Usage& u) {
    return "{\"prompt_tokens\": " + std::to_string(u.prompt_tokens) +
           ", \"completion_tokens\": " + std::to_string(u.completion_tokens) +
           ", \"total_tokens\": " + std::to_string(u.prompt_tokens + u.completion_tokens) +
           ", \"prompt_tokens_details\": {\"cached_tokens\": " + std::to_string(u.cached_tokens) + "}}";
}

const char* openai_finish(FinishReason r) {
    switch (r) {
        case FinishReason::Length: return "length";
        case FinishReason::Cancelled: return "abort";
        case FinishReason::Error: return "error";
        default: return "stop";
    }
}

void Conn::on_output(const Output& o) {
    if (!gen_.active || o.request_id != gen_.id) return;
    const double now_dt = seconds_since(gen_.last);
    if (!o.token_ids.empty()) {
        if (!gen_.started) srv_.ttft.observe(seconds_since(gen_.start));
        else
            for (size_t i = 0; i < o.token_ids.size(); ++i) srv_.itl.observe(now_dt / double(o.token_ids.size()));
        gen_.last = Clock::now();
    }
    gen_.usage = o.usage;
    gen_.text += o.text;
    gen_.token_ids.insert(gen_.token_ids.end(), o.token_ids.begin(), o.token_ids.end());
    if (gen_.logprobs >= 0) gen_.lps.insert(gen_.lps.end(), o.logprobs.begin(), o.logprobs.end());
    if (gen_.client_gone) {
        if (o.finished) finish_generation(o);
        return;
    }
    const bool error_first = o.finished && o.finish_reason == FinishReason::Error && !gen_.started;
    if (gen_.stream && !error_first) {
        if (!gen_.started) {
            const bool ndjson = gen_.kind == Kind::Interactive;
            send(std::string("HTTP/1.1 200 OK\r\nContent-Type: ") +
                 (ndjson ? "application/x-ndjson" : "text/event-stream") +
                 "\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\nX-Request-Id: " + gen_.rid +
                 (keep_alive_ ? "" : "\r\nConnection: close") + "\r\n\r\n");
            status_ = 200;
        }
        if (gen_.kind == Kind::Interactive) {
            if (!o.text.empty() || o.finished)
                send_chunk("{\"text\": " + json_quote(o.text) + ", \"tokens\": " +
                           std::to_string(o.usage.completion_tokens) + ", \"input_tokens\": " +
                           std::to_string(o.usage.prompt_tokens) + ", \"history_tokens\": " +
                           std::to_string(o.usage.cached_tokens) + ", \"finish_reason\": " +
                           (o.finished ? json_quote(openai_finish(o.finish_reason)) : std::string("null")) + "}\n");
        } else {
            if (!o.text.empty() || (!o.logprobs.empty() && gen_.logprobs >= 0) || (gen_.first_chunk && gen_.kind == Kind::Chat))
                send_chunk("data: " + chunk_json(o.text, nullptr, &o.logprobs) + "\n\n");
            if (o.finished) {
                if (o.finish_reason == FinishReason::Error)
                    send_chunk("data: " + error_body({500, o.error, "server_error", "", ""}) + "\n\n");
                send_chunk("data: " + chunk_json("", openai_finish(o.finish_reason), nullptr) + "\n\n");
                if (gen_.include_usage) {
                    std::string u = "{\"id\": " + json_quote(gen_.rid) + ", \"object\": " +
                                    json_quote(gen_.kind == Kind::Chat ? "chat.completion.chunk" : "text_completion") +
                                    ", \"created\": " + std::to_string(int64_t(std::time(nullptr))) +
                                    ", \"model\": " + json_quote(srv_.opt.model_name) +
                                    ", \"choices\": [], \"usage\": " + usage_json(o.usage) + "}";
                    send_chunk("data: " + u + "\n\n");
                }
                send_chunk("data: [DONE]\n\n");
            }
        }
        gen_.started = true;
        if (o.finished) {
            send("0\r\n\r\n");
            finish_generation(o);
        }
        return;
    }
    if (!o.token_ids.empty()) gen_.started = true;
    if (!o.finished) return;
    if (o.finish_reason == FinishReason::Error) {
        const bool ctx = o.error.find("context") != std::string::npos || o.error.find("long") != std::string::npos;
        respond_error(bad_request(o.error, "", ctx ? "context_length_exceeded" : ""));
    } else if (gen_.kind == Kind::Interactive) {
        respond(200, "{\"text\": " + json_quote(gen_.text) + ", \"tokens\": " + std::to_string(o.usage.completion_tokens) +
                         ", \"input_tokens\": " + std::to_string(o.usage.prompt_tokens) + ", \"history_tokens\": " +
                         std::to_string(o.usage.cached_tokens) + ", \"finish_reason\": " +
                         json_quote(openai_finish(o.finish_reason)) + "}");
    } else {
        const bool chat = gen_.kind == Kind::Chat;
        std::string b = "{\"id\": " + json_quote(gen_.rid) + ", \"object\": " +
                        json_quote(chat ? "chat.completion" : "text_completion") + ", \"created\": " +
                        std::to_string(int64_t(std::time(nullptr))) + ", \"model\": " + json_quote(srv_.opt.model_name) +
                        ", \"choices\": [{\"index\": 0, ";
        if (chat) b += "\"message\": {\"role\": \"assistant\", \"content\": " + json_quote(gen_.text) + "}";
        else b += "\"text\": " + json_quote(gen_.text);
        b += ", \"logprobs\": " + (gen_.logprobs >= 0 ? logprobs_json(gen_.lps, 0) : std::string("null"));
        b += ", \"finish_reason\": " + json_quote(openai_finish(o.finish_reason)) + "}], \"usage\": " +
             usage_json(o.usage) + "}";
        respond(200, b);
    }
    finish_generation(o);
}

void Conn::finish_generation(const Output& o) {
    gen_.active = false;
    srv_.prompt_tokens += uint64_t(o.usage.prompt_tokens);
    srv_.generation_tokens += uint64_t(o.usage.completion_tokens);
    srv_.cached_tokens += uint64_t(o.usage.cached_tokens);
    if (!gen_.token_ids.empty()) srv_.e2e.observe(seconds_since(gen_.start));
    if (gen_.client_gone) status_ = 499;
    log_request(status_ ? status_ : 200, &o);
    if (gen_.client_gone) {
        if (state_ != State::Closed) close();
        else srv_.remove(shared_from_this());
        return;
    }
    after_response();
    srv_.maybe_done();
}

void Conn::log_request(int status, const Output* o) {
    srv_.responses[status]++;
    if (!srv_.opt.log) return;
    std::string l = "{\"time\": " + json_number(double(std::time(nullptr))) + ", \"method\": " + json_quote(method_) +
                    ", \"path\": " + json_quote(target_) + ", \"status\": " + std::to_string(status);
    if (o) {
        l += ", \"id\": " + json_quote(gen_.rid) + ", \"stream\": " + (gen_.stream ? "true" : "false") +
             ", \"prompt_tokens\": " + std::to_string(o->usage.prompt_tokens) +
             ", \"cached_tokens\": " + std::to_string(o->usage.cached_tokens) +
             ", \"completion_tokens\": " + std::to_string(o->usage.completion_tokens) +
             ", \"finish_reason\": " + json_quote(gen_.client_gone ? "client_disconnected" : finish_reason_name(o->finish_reason)) +
             ", \"ttft_s\": " + json_number(o->time_to_first_token) + ", \"duration_s\": " + json_number(seconds_since(gen_.start));
        if (gen_.session) l += ", \"session_id\": " + std::to_string(*gen_.session);
        if (srv_.opt.log_prompts) l += ", \"prompt\": " + json_quote(gen_.prompt_text);
    } else {
        l += ", \"duration_s\": " + json_number(seconds_since(t0_));
    }
    srv_.opt.log(l + "}");
}

// ------------------------------------------------------------------ writing

void Conn::respond(int status, const std::string& body, const std::string& type, const std::string& extra) {
    status_ = status;
    std::string h = "HTTP/1.1 " + std::to_string(status) + " " + reason_phrase(status) + "\r\nContent-Type: " + type +
                    "\r\nContent-Length: " + std::to_string(body.size()) + "\r\nAccess-Control-Allow-Origin: *\r\n" + extra;
    if (!keep_alive_) h += "Connection: close\r\n";
    h += "\r\n";
    send(h + (method_ == "HEAD" ? std::string() : body));
    if (!gen_.active) log_request(status, nullptr);
    respond_done_ = true;
    if (!writing_) after_response();
}

void Conn::send_chunk(const std::string& data) {
    char hex[20];
    std::snprintf(hex, sizeof hex, "%zx\r\n", data.size());
    send(hex + data + "\r\n");
}

void Conn::send(std::string bytes) {
    if (state_ == State::Closed) return;
    wq_.push_back(std::move(bytes));
    pump();
}

void Conn::pump() {
    if (writing_ || wq_.empty() || state_ == State::Closed) return;
    writing_ = true;
    net::async_write(sock_, net::buffer(wq_.front()), [self = shared_from_this()](beast::error_code ec, size_t) {
        self->writing_ = false;
        if (self->state_ == State::Closed) return;
        self->wq_.pop_front();
        if (ec) {
            if (self->gen_.active) self->client_gone();
            else self->close();
            return;
        }
        if (!self->wq_.empty()) self->pump();
        else if (!self->gen_.active) self->after_response();
    });
}

// Called when a response is fully queued and every write has completed.
void Conn::after_response() {
    if (writing_ || !wq_.empty() || gen_.active || state_ == State::Closed) return;
    if (state_ == State::Reading && !respond_done_) return;
    respond_done_ = false;
    if (!keep_alive_ || srv_.stopping) {
        beast::error_code ec;
        sock_.shutdown(tcp::socket::shutdown_send, ec);
        close();
        return;
    }
    state_ = State::Idle;
    if (!watch_pending_) read_request();  // else the posted read picks it up
    else arm_idle_timer();
}

// A read posted while a request generates: EOF or an error means the client left.
void Conn::arm_watch() {
    if (watch_pending_ || state_ == State::Closed) return;
    watch_pending_ = true;
    sock_.async_read_some(buf_.prepare(4096), [self = shared_from_this()](beast::error_code ec, size_t n) {
        self->watch_pending_ = false;
        if (self->state_ == State::Closed) return;
        if (ec) {
            if (self->gen_.active) self->client_gone();
            else self->close();
            return;
        }
        self->buf_.commit(n);
        if (self->buf_.size() > (1u << 20)) {  // a client writing without reading
            if (self->gen_.active) self->client_gone();
            else self->close();
            return;
        }
        if (self->state_ == State::Idle) self->read_request();
        else self->arm_watch();
    });
}

void Conn::client_gone() {
    if (gen_.client_gone) return;
    gen_.client_gone = true;
    srv_.eng.cancel(gen_.id);
    beast::error_code ec;
    sock_.close(ec);
}

void Conn::close() {
    if (state_ == State::Closed) return;
    state_ = State::Closed;
    idle_timer_.cancel();
    beast::error_code ec;
    sock_.close(ec);
    if (gen_.active) {
        gen_.client_gone = true;
        srv_.eng.cancel(gen_.id);
        return;  // removed when its final output arrives
    }
    srv_.remove(shared_from_this());
}

}  // namespace

void serve(Engine& engine, const ServeOptions& opt) {
    Server srv(engine, opt);
    beast::error_code ec;
    auto addr = net::ip::make_address(opt.host, ec);
    if (ec) throw Error("--host " + opt.host + ": not an IP address");
    tcp::endpoint ep(addr, static_cast<unsigned short>(opt.port));
    srv.acc.open(ep.protocol(), ec);
    if (!ec) srv.acc.set_option(net::socket_base::reuse_address(true), ec);
    if (!ec) srv.acc.bind(ep, ec);
    if (!ec) srv.acc.listen(net::socket_base::max_listen_connections, ec);
    if (ec) throw Error("cannot listen on " + opt.host + ":" + std::to_string(opt.port) + ": " + ec.message());
    srv.sigs.async_wait([&](beast::error_code e, int) {
        if (!e) srv.shutdown();
    });
    if (opt.on_listening) opt.on_listening(opt.host, srv.acc.local_endpoint().port());
    srv.accept();
    srv.ioc.run();
    // Every request has ended (finished or cancelled); drain their callbacks.
    for (auto& c : std::set<std::shared_ptr<Conn>>(srv.conns))
        if (c->generating()) engine.cancel(c->request_id());
    engine.wait_idle();
}

}  // namespace tmc
