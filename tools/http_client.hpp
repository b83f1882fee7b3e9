// A small asynchronous HTTP/1.1 client for tm-client: one connection per
// request, streamed (chunked) bodies delivered as they arrive, all on one
// io_context.
#pragma once

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <functional>
#include <memory>
#include <optional>
#include <string>

namespace tmc::tool {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;

struct Url {
    std::string host, port = "80", base;  // base: path prefix without a trailing '/'
    // http://host[:port][/prefix]; throws std::runtime_error otherwise.
    static Url parse(const std::string& s) {
        const std::string scheme = "http://";
        if (s.rfind(scheme, 0) != 0)
            throw std::runtime_error("the URL must start with http:// (got \"" + s + "\")");
        Url u;
        std::string rest = s.substr(scheme.size());
        const size_t slash = rest.find('/');
        std::string hostport = rest.substr(0, slash);
        u.base = slash == std::string::npos ? "" : rest.substr(slash);
        while (!u.base.empty() && u.base.back() == '/') u.base.pop_back();
        if (!hostport.empty() && hostport[0] == '[') {  // [v6]:port
            const size_t close = hostport.find(']');
            if (close == std::string::npos) throw std::runtime_error("bad IPv6 address in " + s);
            u.host = hostport.substr(1, close - 1);
            if (close + 1 < hostport.size() && hostport[close + 1] == ':') u.port = hostport.substr(close + 2);
        } else {
            const size_t colon = hostport.rfind(':');
            u.host = hostport.substr(0, colon);
            if (colon != std::string::npos) u.port = hostport.substr(colon + 1);
        }
        if (u.host.empty()) throw std::runtime_error("no host in " + s);
        return u;
    }
};

struct HttpResult {
    int status = 0;       // 0: no response (error says why)
    std::string body;     // the body when not streamed (chunked bodies go to on_data)
    std::string error;    // transport error
};

class HttpCall : public std::enable_shared_from_this<HttpCall> {
public:
    using OnData = std::function<void(std::string_view)>;
    using OnDone = std::function<void(HttpResult)>;

    HttpCall(net::io_context& ioc, const Url& url) : url_(url), resolver_(ioc), stream_(ioc) {}

    // POST (body non-empty) or GET `path`.
    void start(http::verb verb, const std::string& path, const std::string& body, const std::string& api_key,
               OnData on_data, OnDone on_done) {
        on_data_ = std::move(on_data);
        on_done_ = std::move(on_done);
        req_ = {verb, url_.base + path, 11};
        req_.set(http::field::host, url_.host);
        req_.set(http::field::user_agent, "tm-client");
        req_.set(http::field::accept, "application/json, text/event-stream");
        if (!api_key.empty()) req_.set(http::field::authorization, "Bearer " + api_key);
        if (verb == http::verb::post) req_.set(http::field::content_type, "application/json");
        req_.body() = body;
        req_.prepare_payload();
        req_.keep_alive(false);
        resolver_.async_resolve(url_.host, url_.port,
                                [self = shared_from_this()](beast::error_code ec, net::ip::tcp::resolver::results_type r) {
                                    if (ec) return self->fail("cannot resolve " + self->url_.host + ": " + ec.message());
                                    self->stream_.async_connect(r, [self](beast::error_code e, auto) { self->on_connect(e); });
                                });
    }

    // Closes the connection (the server sees the client leave).
    void cancel() {
        cancelled_ = true;
        beast::error_code ec;
        stream_.socket().shutdown(net::ip::tcp::socket::shutdown_both, ec);
        stream_.close();
    }

private:
    void on_connect(beast::error_code ec) {
        if (ec) return fail("cannot connect to " + url_.host + ":" + url_.port + ": " + ec.message());
        stream_.socket().set_option(net::ip::tcp::no_delay(true));
        http::async_write(stream_, req_, [self = shared_from_this()](beast::error_code e, size_t) {
            if (e) return self->fail("cannot send the request: " + e.message());
            self->parser_.emplace();
            self->parser_->body_limit(std::numeric_limits<std::uint64_t>::max());
            // The parser keeps a reference to the callback: it lives in the call.
            self->chunk_cb_ = [p = self.get()](std::uint64_t, beast::string_view data, beast::error_code&) {
                if (p->on_data_) p->on_data_(std::string_view(data.data(), data.size()));
                return data.size();
            };
            self->parser_->on_chunk_body(self->chunk_cb_);
            http::async_read(self->stream_, self->buf_, *self->parser_,
                             [self](beast::error_code e2, size_t) { self->on_read(e2); });
        });
    }

    void on_read(beast::error_code ec) {
        if (ec && ec != http::error::end_of_stream)
            return fail(cancelled_ ? "cancelled" : "the connection broke: " + ec.message());
        HttpResult r;
        r.status = int(parser_->get().result_int());
        r.body = std::move(parser_->get().body());
        beast::error_code e;
        stream_.socket().shutdown(net::ip::tcp::socket::shutdown_both, e);
        done(std::move(r));
    }

    void fail(const std::string& why) {
        HttpResult r;
        r.error = why;
        done(std::move(r));
    }

    void done(HttpResult r) {
        if (!on_done_) return;
        auto cb = std::move(on_done_);
        on_done_ = nullptr;
        cb(std::move(r));
    }

    Url url_;
    net::ip::tcp::resolver resolver_;
    beast::tcp_stream stream_;
    beast::flat_buffer buf_;
    http::request<http::string_body> req_;
    std::optional<http::response_parser<http::string_body>> parser_;
    OnData on_data_;
    OnDone on_done_;
    std::function<size_t(std::uint64_t, beast::string_view, beast::error_code&)> chunk_cb_;
    bool cancelled_ = false;
};

// Splits a server-sent-events stream into the payloads of its "data:" lines.
class SseSplitter {
public:
    template <class F>
    void feed(std::string_view bytes, F&& on_event) {
        buf_.append(bytes);
        size_t at;
        while ((at = buf_.find('\n')) != std::string::npos) {
            std::string line = buf_.substr(0, at);
            buf_.erase(0, at + 1);
            if (!line.empty() && line.back() == '\r') line.pop_back();
            if (line.rfind("data:", 0) == 0) {
                size_t s = 5;
                if (s < line.size() && line[s] == ' ') ++s;
                on_event(std::string_view(line).substr(s));
            }
        }
    }

private:
    std::string buf_;
};

}  // namespace tmc::tool
