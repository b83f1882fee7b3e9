// tm-serve's HTTP server, shared by its files (formats/http-api.md):
//   http.cpp     connections: reading, routing (CORS, API keys, limits),
//                writing responses and streams, hang-ups, shutdown; serve()
//   openai.cpp   the handlers: /v1/chat/completions, /v1/completions,
//                /v1/chat/interactive (LMDeploy's), /v1/models, /v1/encode
//   metrics.cpp  counters and histograms for /metrics
// One I/O thread runs every connection (Boost.Asio); Boost.Beast parses
// requests; responses, including server-sent events, are written as raw
// HTTP/1.1 (chunked when streaming). The engine's callbacks run on the
// engine thread and only post to the I/O thread, so all server state is
// touched by one thread. Sessions belong to the engine (Engine::
// session_conversation, session_request): the server keeps none.
//
// A connection serves one request at a time. While a request generates, a
// read stays posted on the socket: a client that hangs up is seen at once
// and its request cancelled (its KV blocks freed before the next step).
#pragma once

#include <simdjson.h>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <csignal>
#include <ctime>
#include <deque>
#include <optional>
#include <random>
#include <set>
#include <string>

#include "serve/metrics.hpp"
#include "tm/json_write.hpp"
#include "tm/serve.hpp"

namespace tmc::srv {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using Clock = std::chrono::steady_clock;
using simdjson::dom::element;
using simdjson::dom::object;

inline double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// An error with its HTTP status and OpenAI error fields.
struct HttpError {
    int status;
    std::string message, type, param, code;
};
inline HttpError bad_request(std::string msg, std::string param = "", std::string code = "") {
    return {400, std::move(msg), "invalid_request_error", std::move(param), std::move(code)};
}
// {"error": {"message", "type", "param", "code"}}
std::string error_body(const HttpError& e);

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
    // openai.cpp: the API's handlers.
    void models();
    void encode(const std::string& body);
    void start_generation(Kind kind, const std::string& body);
    void check_openai_fields(Kind kind, object obj) const;
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
    JsonWriter& head(JsonWriter& w, bool chunk) const;
    void logprobs(JsonWriter& w, const std::vector<TokenLogprob>& lps, size_t text_offset0) const;
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
    Metrics metrics;

    Server(Engine& e, const ServeOptions& o) : eng(e), opt(o) {}
    void accept();
    void remove(const std::shared_ptr<Conn>& c);
    int generating() const;
    void maybe_done();
    void shutdown();
};

}  // namespace tmc::srv
