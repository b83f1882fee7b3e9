// tm-serve's connections (server_state.hpp has the design): reading a
// request, routing it (CORS preflight, methods, API keys), writing the
// response or stream, noticing hang-ups, and shutting down gracefully.
#include <algorithm>
#include <cstdio>

#include "serve/server_state.hpp"
#include "tm/error.hpp"
#include "tm/json_write.hpp"

namespace tmc {

namespace srv {

namespace {

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

}  // namespace

std::string error_body(const HttpError& e) {
    JsonWriter w;
    w.object().key("error").object().field("message", e.message).field("type", e.type);
    w.key("param").string_or_null(e.param).key("code").string_or_null(e.code).end().end();
    return w.str();
}

// ------------------------------------------------------------------ the server

void Server::accept() {
    acc.async_accept([this](beast::error_code ec, tcp::socket s) {
        if (stopping || !acc.is_open()) return;
        if (ec) {
            // Out of file descriptors (or a transient error): try again
            // shortly instead of spinning; existing connections go on.
            if (opt.log && ec != net::error::connection_aborted)
                opt.log(JsonWriter().object().field("event", "accept_failed").field("error", ec.message()).end().str());
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

void Server::remove(const std::shared_ptr<Conn>& c) {
    conns.erase(c);
    maybe_done();
}

int Server::generating() const {
    int n = 0;
    for (auto& c : conns) n += c->generating();
    return n;
}

void Server::maybe_done() {
    if (stopping && generating() == 0) {
        for (auto& c : std::set<std::shared_ptr<Conn>>(conns))
            if (c->idle()) c->close();
        if (conns.empty()) ioc.stop();
    }
}

void Server::shutdown() {
    if (stopping) return;
    stopping = true;
    beast::error_code ec;
    acc.close(ec);
    accept_retry.cancel();
    if (opt.log) opt.log(JsonWriter().object().field("event", "shutdown").field("running", generating()).end().str());
    grace.expires_after(std::chrono::milliseconds(int64_t(opt.grace_seconds * 1000)));
    grace.async_wait([this](beast::error_code e) {
        if (e) return;
        for (auto& c : conns)
            if (c->generating()) eng.cancel(c->request_id());
    });
    maybe_done();
}

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
    if (path == "/health") return respond(200, JsonWriter().object().field("status", "ok").end().str());
    if (path == "/metrics") return respond(200, srv_.metrics.text(srv_.eng.stats()), "text/plain; version=0.0.4; charset=utf-8");
    if (path == "/v1/models") return models();
    if (srv_.stopping) throw HttpError{503, "the server is shutting down", "server_error", "", "shutting_down"};
    if (path == "/v1/chat/completions") return start_generation(Kind::Chat, req.body());
    if (path == "/v1/completions") return start_generation(Kind::Completion, req.body());
    if (path == "/v1/chat/interactive") return start_generation(Kind::Interactive, req.body());
    encode(req.body());
}

// The access log: one JSON line per response (--log).
void Conn::log_request(int status, const Output* o) {
    srv_.metrics.responses[status]++;
    if (!srv_.opt.log) return;
    JsonWriter w;
    w.object().field("time", double(std::time(nullptr))).field("method", method_).field("path", target_);
    w.field("status", status);
    if (o) {
        w.field("id", gen_.rid).field("stream", gen_.stream).field("prompt_tokens", o->usage.prompt_tokens);
        w.field("cached_tokens", o->usage.cached_tokens).field("completion_tokens", o->usage.completion_tokens);
        w.field("finish_reason", gen_.client_gone ? "client_disconnected" : finish_reason_name(o->finish_reason));
        w.field("ttft_s", o->time_to_first_token).field("duration_s", seconds_since(gen_.start));
        if (gen_.session) w.field("session_id", *gen_.session);
        if (srv_.opt.log_prompts) w.field("prompt", gen_.prompt_text);
    } else {
        w.field("duration_s", seconds_since(t0_));
    }
    srv_.opt.log(w.end().str());
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

}  // namespace srv

void serve(Engine& engine, const ServeOptions& opt) {
    using namespace srv;
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
