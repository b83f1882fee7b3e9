// tm-serve's API handlers (formats/http-api.md): OpenAI's chat completions,
// completions and models, LMDeploy's interactive endpoint, and /v1/encode.
// Each reads its JSON body (unknown fields refused, as OpenAI does), builds
// an engine Request through the common request-field readers (api/), and
// answers the engine's outputs as one JSON body or a stream of chunks
// (server-sent events; x-ndjson for the interactive endpoint). All JSON is
// written by JsonWriter.
#include <algorithm>

#include "api/request_fields.hpp"
#include "serve/server_state.hpp"
#include "tm/error.hpp"
#include "tm/json_write.hpp"

namespace tmc::srv {

namespace {

std::string random_hex(std::mt19937_64& rng, int n) {
    static const char* hex = "0123456789abcdef";
    std::string s;
    for (int i = 0; i < n; ++i) s += hex[rng() & 15];
    return s;
}

const char* openai_finish(FinishReason r) {
    switch (r) {
        case FinishReason::Length: return "length";
        case FinishReason::Cancelled: return "abort";
        case FinishReason::Error: return "error";
        default: return "stop";
    }
}

// OpenAI's usage object.
JsonWriter& usage(JsonWriter& w, const Usage& u) {
    w.object().field("prompt_tokens", u.prompt_tokens).field("completion_tokens", u.completion_tokens);
    w.field("total_tokens", u.prompt_tokens + u.completion_tokens);
    return w.key("prompt_tokens_details").object().field("cached_tokens", u.cached_tokens).end().end();
}

// LMDeploy's interactive answer (a whole body, or one line of the stream);
// finish null while it goes on.
std::string interactive_json(const std::string& text, const Usage& u, const char* finish) {
    JsonWriter w;
    w.object().field("text", text).field("tokens", u.completion_tokens).field("input_tokens", u.prompt_tokens);
    w.field("history_tokens", u.cached_tokens).key("finish_reason");
    if (finish) w.value(finish);
    else w.null();
    return w.end().str();
}

}  // namespace

void Conn::models() {
    JsonWriter w;
    w.object().field("object", "list").key("data").array().object();
    w.field("id", srv_.opt.model_name).field("object", "model").field("created", srv_.created).field("owned_by", "tm");
    w.field("root", srv_.opt.model_name).field("max_model_len", srv_.eng.session_len());
    respond(200, w.end().end().end().str());
}

// LMDeploy's /v1/encode: token ids of a string or of each of an array of strings.
void Conn::encode(const std::string& body) {
    static thread_local simdjson::dom::parser parser;
    element root;
    auto err = parser.parse(simdjson::padded_string(body)).get(root);
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
    auto ids = [](JsonWriter& w, const std::vector<int>& v) {
        w.array();
        for (int t : v) w.value(t);
        w.end();
    };
    std::string_view s;
    simdjson::dom::array arr;
    JsonWriter w;
    if (!in.get(s)) {
        const auto v = enc(s);
        w.object().key("input_ids");
        ids(w, v);
        return respond(200, w.field("length", v.size()).end().str());
    }
    if (in.get(arr)) throw bad_request("\"input\" must be a string or an array of strings", "input");
    std::vector<std::vector<int>> all;
    for (element x : arr) {
        if (x.get(s)) throw bad_request("\"input\" must be a string or an array of strings", "input");
        all.push_back(enc(s));
    }
    w.object().key("input_ids").array();
    for (auto& v : all) ids(w, v);
    w.end().key("length").array();
    for (auto& v : all) w.value(v.size());
    respond(200, w.end().end().str());
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

// The fields OpenAI defines that this server refuses or limits: unknown
// ones, another model, n or best_of other than 1, tools, logit_bias, JSON
// response formats, echo, suffix.
void Conn::check_openai_fields(Kind kind, object obj) const {
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
}

void Conn::chat_or_completion(Kind kind, object obj) {
    const bool chat = kind == Kind::Chat;
    check_openai_fields(kind, obj);
    element e;
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
    auto plain = [&](const char* fr) { respond(200, interactive_json("", Usage{}, fr)); };
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

int Conn::token_before(size_t n_last) const {
    const auto& t = gen_.token_ids;
    return t.size() > n_last ? t[t.size() - n_last - 1] : gen_.last_prompt_token;
}

// The head of a completion object: id, object, created, model.
JsonWriter& Conn::head(JsonWriter& w, bool chunk) const {
    const char* obj = gen_.kind == Kind::Chat ? (chunk ? "chat.completion.chunk" : "chat.completion") : "text_completion";
    w.object().field("id", gen_.rid).field("object", obj).field("created", int64_t(std::time(nullptr)));
    return w.field("model", srv_.opt.model_name);
}

// OpenAI's logprobs object of `lps` (chat: content[]; completions: tokens,
// token_logprobs, top_logprobs, text_offset from text_offset0).
void Conn::logprobs(JsonWriter& w, const std::vector<TokenLogprob>& lps, size_t text_offset0) const {
    const Tokenizer& tok = srv_.eng.tokenizer();
    // A token's text as it reads after the token before it (a lone
    // SentencePiece token would lose its leading space).
    int prev = token_before(lps.size());
    auto piece_after = [&](int before, int id) {
        if (before < 0) return tok.decode({id}, false);
        const std::string a = tok.decode({before}, false), b = tok.decode({before, id}, false);
        return b.compare(0, a.size(), a) == 0 ? b.substr(a.size()) : tok.decode({id}, false);
    };
    auto entry = [&](const std::string& piece, float lp) {
        w.field("token", piece).field("logprob", lp).key("bytes").array();
        for (char c : piece) w.value(int(uint8_t(c)));
        w.end();
    };
    if (gen_.kind == Kind::Chat) {
        w.object().key("content").array();
        for (const TokenLogprob& t : lps) {
            w.object();
            entry(piece_after(prev, t.token), t.logprob);
            w.key("top_logprobs").array();
            for (auto& [id, lp] : t.top) {
                w.object();
                entry(piece_after(prev, id), lp);
                w.end();
            }
            w.end().end();
            prev = t.token;
        }
        w.end().end();
        return;
    }
    std::vector<std::string> pieces;
    for (const TokenLogprob& t : lps) pieces.push_back(piece_after(prev, t.token)), prev = t.token;
    w.object().key("tokens").array();
    for (auto& p : pieces) w.value(p);
    w.end().key("token_logprobs").array();
    for (const TokenLogprob& t : lps) w.value(t.logprob);
    w.end().key("top_logprobs").array();
    prev = token_before(lps.size());
    for (const TokenLogprob& t : lps) {
        w.object();
        for (auto& [id, lp] : t.top) w.field(piece_after(prev, id), lp);
        w.end();
        prev = t.token;
    }
    w.end().key("text_offset").array();
    size_t at = text_offset0;
    for (auto& p : pieces) w.value(at), at += p.size();
    w.end().end();
}

std::string Conn::chunk_json(const std::string& delta, const char* finish, const std::vector<TokenLogprob>* lps) {
    JsonWriter w;
    head(w, true).key("choices").array().object().field("index", 0);
    if (gen_.kind == Kind::Chat) {
        w.key("delta").object();
        if (gen_.first_chunk) w.field("role", "assistant");
        w.field("content", delta).end();
    } else {
        w.field("text", delta);
    }
    w.key("logprobs");
    if (lps && gen_.logprobs >= 0) logprobs(w, *lps, gen_.text.size() - delta.size());
    else w.null();
    w.key("finish_reason");
    if (finish) w.value(finish);
    else w.null();
    w.end().end();
    if (gen_.include_usage) w.key("usage").null();
    gen_.first_chunk = false;
    return w.end().str();
}

void Conn::on_output(const Output& o) {
    if (!gen_.active || o.request_id != gen_.id) return;
    const double now_dt = seconds_since(gen_.last);
    if (!o.token_ids.empty()) {
        if (!gen_.started) srv_.metrics.ttft.observe(seconds_since(gen_.start));
        else
            for (size_t i = 0; i < o.token_ids.size(); ++i) srv_.metrics.itl.observe(now_dt / double(o.token_ids.size()));
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
                send_chunk(interactive_json(o.text, o.usage, o.finished ? openai_finish(o.finish_reason) : nullptr) +
                           "\n");
        } else {
            if (!o.text.empty() || (!o.logprobs.empty() && gen_.logprobs >= 0) || (gen_.first_chunk && gen_.kind == Kind::Chat))
                send_chunk("data: " + chunk_json(o.text, nullptr, &o.logprobs) + "\n\n");
            if (o.finished) {
                if (o.finish_reason == FinishReason::Error)
                    send_chunk("data: " + error_body({500, o.error, "server_error", "", ""}) + "\n\n");
                send_chunk("data: " + chunk_json("", openai_finish(o.finish_reason), nullptr) + "\n\n");
                if (gen_.include_usage) {
                    JsonWriter w;
                    head(w, true).key("choices").array().end();
                    usage(w.key("usage"), o.usage).end();
                    send_chunk("data: " + w.str() + "\n\n");
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
        respond(200, interactive_json(gen_.text, o.usage, openai_finish(o.finish_reason)));
    } else {
        JsonWriter w;
        head(w, false).key("choices").array().object().field("index", 0);
        if (gen_.kind == Kind::Chat) w.key("message").object().field("role", "assistant").field("content", gen_.text).end();
        else w.field("text", gen_.text);
        w.key("logprobs");
        if (gen_.logprobs >= 0) logprobs(w, gen_.lps, 0);
        else w.null();
        w.field("finish_reason", openai_finish(o.finish_reason)).end().end();
        usage(w.key("usage"), o.usage).end();
        respond(200, w.str());
    }
    finish_generation(o);
}

void Conn::finish_generation(const Output& o) {
    gen_.active = false;
    srv_.metrics.prompt_tokens += uint64_t(o.usage.prompt_tokens);
    srv_.metrics.generation_tokens += uint64_t(o.usage.completion_tokens);
    srv_.metrics.cached_tokens += uint64_t(o.usage.cached_tokens);
    if (!gen_.token_ids.empty()) srv_.metrics.e2e.observe(seconds_since(gen_.start));
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

}  // namespace tmc::srv
