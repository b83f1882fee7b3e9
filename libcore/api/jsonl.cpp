#include "tm/jsonl.hpp"

#include <simdjson.h>

#include <cmath>
#include <set>

#include "api/request_fields.hpp"
#include "tm/error.hpp"

namespace tmc {

namespace api {

[[noreturn]] void bad(const std::string& field, const std::string& what) {
    throw Error("\"" + field + "\" must be " + what);
}

double number(element e, const std::string& f, const char* what) {
    double d;
    if (e.is_bool() || e.get(d)) bad(f, what);
    if (!std::isfinite(d)) bad(f, what);
    return d;
}

int64_t integer(element e, const std::string& f, const char* what) {
    int64_t v;
    if (e.is_bool()) bad(f, what);
    if (!e.get(v)) return v;
    uint64_t u;
    if (!e.get(u)) bad(f, std::string(what) + " (too large)");
    double d;
    if (!e.get(d) && std::floor(d) == d && std::abs(d) < 9e15) return int64_t(d);
    bad(f, what);
}

bool boolean(element e, const std::string& f) {
    bool b;
    if (e.get(b)) bad(f, "true or false");
    return b;
}

std::string content_text(element c, const std::string& f) {
    if (c.is_null()) return "";
    std::string_view s;
    if (!c.get(s)) return std::string(s);
    simdjson::dom::array parts;
    if (c.get(parts)) bad(f, "a string or an array of text parts");
    std::string out;
    for (element p : parts) {
        std::string_view type, text;
        if (p["type"].get(type) || type != "text" || p["text"].get(text))
            bad(f, "a string or an array of {\"type\": \"text\", \"text\": ...} parts");
        out += text;
    }
    return out;
}

std::vector<int> read_prompt(element pe, const Engine& engine) {
    std::vector<int> prompt;
    std::string_view s;
    simdjson::dom::array ids;
    if (!pe.get(s)) {
        prompt = engine.tokenizer().encode(s, true);
    } else if (!pe.get(ids)) {  // token ids, as OpenAI's completions API allows
        for (element x : ids) {
            int64_t v = integer(x, "prompt", "a string or an array of token ids");
            if (v < 0 || v >= engine.model().vocab_size) bad("prompt", "an array of token ids in the vocabulary");
            prompt.push_back(int(v));
        }
        if (prompt.empty()) throw Error("\"prompt\" is empty");
    } else {
        bad("prompt", "a string or an array of token ids");
    }
    return prompt;
}

std::vector<ChatMessage> read_messages(element me) {
    simdjson::dom::array msgs;
    if (me.get(msgs)) bad("messages", "an array of messages");
    if (msgs.size() == 0) throw Error("\"messages\" is empty");
    std::vector<ChatMessage> list;
    size_t k = 0;
    for (element m : msgs) {
        const std::string f = "messages[" + std::to_string(k++) + "]";
        object mo;
        if (m.get(mo)) bad(f, "an object");
        std::string_view role;
        element c;
        if (mo["role"].get(role)) bad(f + ".role", "a string");
        if (mo["content"].get(c)) throw Error("missing \"" + f + ".content\"");
        list.push_back({std::string(role), content_text(c, f + ".content")});
    }
    return list;
}

void read_sampling(object obj, const Engine& engine, SamplingParams& p) {
    element e;
    const char* pos_int = "a positive integer";
    // The length limit by any of its names (OpenAI's two, LMDeploy's); the first given counts.
    for (const char* f : {"max_tokens", "max_completion_tokens", "request_output_len"}) {
        if (obj[f].get(e)) continue;
        if (e.is_null() && std::string_view(f) == "request_output_len") continue;
        const int64_t v = integer(e, f, pos_int);
        if (v < 1) bad(f, pos_int);
        p.max_tokens = int(std::min<int64_t>(v, 1 << 30));
        break;
    }
    auto num = [&](const char* f, float& dst, double lo, double hi, const char* what) {
        if (obj[f].get(e) || e.is_null()) return;
        double d = number(e, f, what);
        if (d < lo || d > hi) bad(f, what);
        dst = float(d);
    };
    num("temperature", p.temperature, 0, 1e6, "a number >= 0");
    num("top_p", p.top_p, 1e-9, 1, "a number in (0, 1]");
    num("min_p", p.min_p, 0, 1, "a number in [0, 1]");
    num("repetition_penalty", p.repetition_penalty, 1e-6, 1e6, "a positive number");
    num("presence_penalty", p.presence_penalty, -2, 2, "a number in [-2, 2]");
    num("frequency_penalty", p.frequency_penalty, -2, 2, "a number in [-2, 2]");
    if (!obj["top_k"].get(e) && !e.is_null()) {
        int64_t v = integer(e, "top_k", "an integer >= 0 (-1 or 0: off)");
        if (v < -1) bad("top_k", "an integer >= 0 (-1 or 0: off)");
        p.top_k = int(std::min<int64_t>(std::max<int64_t>(v, 0), 1 << 30));
    }
    if (!obj["seed"].get(e) && !e.is_null()) p.seed = uint64_t(integer(e, "seed", "an integer"));
    if (!obj["stop"].get(e) && !e.is_null()) {
        p.stop.clear();
        std::string_view s;
        simdjson::dom::array arr;
        if (!e.get(s)) {
            p.stop.emplace_back(s);
        } else if (!e.get(arr)) {
            for (element x : arr) {
                if (x.get(s)) bad("stop", "a string or an array of strings");
                p.stop.emplace_back(s);
            }
        } else {
            bad("stop", "a string or an array of strings");
        }
        for (auto& s2 : p.stop)
            if (s2.empty()) bad("stop", "non-empty strings");
    }
    if (!obj["stop_token_ids"].get(e) && !e.is_null()) {
        simdjson::dom::array arr;
        if (e.get(arr)) bad("stop_token_ids", "an array of token ids");
        for (element x : arr) {
            int64_t v = integer(x, "stop_token_ids", "an array of token ids");
            if (v < 0 || v >= engine.model().vocab_size) bad("stop_token_ids", "an array of token ids in the vocabulary");
            p.stop_token_ids.push_back(int(v));
        }
    }
    if (!obj["ignore_eos"].get(e)) p.ignore_eos = boolean(e, "ignore_eos");
    if (!obj["skip_special_tokens"].get(e)) p.skip_special_tokens = boolean(e, "skip_special_tokens");
}

}  // namespace api

using api::bad;
using api::boolean;
using api::integer;
using simdjson::dom::element;
using simdjson::dom::object;

JsonlRequest parse_jsonl_request(std::string_view line, const Engine& engine, const SamplingParams& defaults,
                                 std::string* id_json) {
    static thread_local simdjson::dom::parser parser;
    simdjson::padded_string text(line);
    element root;
    auto err = parser.parse(text).get(root);
    if (err == simdjson::UTF8_ERROR) throw Error("invalid UTF-8");
    if (err) throw Error(std::string("invalid JSON: ") + simdjson::error_message(err));
    object obj;
    if (root.get(obj)) throw Error("expected a JSON object");
    JsonlRequest out;
    element idv;
    if (!obj["id"].get(idv)) {
        if (!idv.is_string() && !idv.is_int64() && !idv.is_uint64()) bad("id", "a string or an integer");
        out.id_json = std::string(simdjson::minify(idv));
        if (id_json) *id_json = out.id_json;
    }
    static const std::set<std::string_view> known = {
        "id", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
        "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "stop", "stop_token_ids",
        "session_id", "ignore_eos", "return_token_ids", "skip_special_tokens", "model", "user"};
    for (auto [key, v] : obj) {
        (void)v;
        if (!known.count(key)) throw Error("unknown field \"" + std::string(key) + "\"");
    }
    Request& req = out.request;
    SamplingParams& p = req.sampling;
    p = defaults;
    element e, pe, me;
    const bool has_prompt = !obj["prompt"].get(pe), has_messages = !obj["messages"].get(me);
    if (has_prompt == has_messages) throw Error("give exactly one of \"prompt\" and \"messages\"");
    if (has_prompt) req.prompt = api::read_prompt(pe, engine);
    else req.prompt = engine.tokenizer().encode(engine.render_chat(api::read_messages(me), true), false);
    api::read_sampling(obj, engine, p);
    if (!obj["session_id"].get(e) && !e.is_null()) {
        int64_t v = integer(e, "session_id", "a non-negative integer");
        if (v < 0) bad("session_id", "a non-negative integer");
        req.session_id = uint64_t(v);
    }
    if (!obj["return_token_ids"].get(e)) out.return_token_ids = boolean(e, "return_token_ids");
    if (!obj["model"].get(e) && !e.is_string()) bad("model", "a string");
    return out;
}

namespace {
void append_ids(std::string& o, const std::vector<int>& ids) {
    o += "[";
    for (size_t i = 0; i < ids.size(); ++i) {
        if (i) o += ", ";
        o += std::to_string(ids[i]);
    }
    o += "]";
}
}  // namespace

std::string jsonl_response(const std::string& id_json, const std::string& text, const std::vector<int>* token_ids,
                           const Output& f) {
    std::string o = "{";
    if (!id_json.empty()) o += "\"id\": " + id_json + ", ";
    o += "\"text\": " + json_quote(text) + ", \"finish_reason\": " + json_quote(finish_reason_name(f.finish_reason));
    o += ", \"usage\": {\"prompt_tokens\": " + std::to_string(f.usage.prompt_tokens) +
         ", \"completion_tokens\": " + std::to_string(f.usage.completion_tokens) +
         ", \"total_tokens\": " + std::to_string(f.usage.prompt_tokens + f.usage.completion_tokens) +
         ", \"prompt_tokens_details\": {\"cached_tokens\": " + std::to_string(f.usage.cached_tokens) + "}}";
    if (token_ids) {
        o += ", \"token_ids\": ";
        append_ids(o, *token_ids);
    }
    if (f.finish_reason == FinishReason::Error)
        o += ", \"error\": {\"message\": " + json_quote(f.error) + ", \"type\": \"invalid_request_error\"}";
    return o + "}";
}

std::string jsonl_delta(const std::string& id_json, const std::string& text, const std::vector<int>* token_ids) {
    std::string o = "{";
    if (!id_json.empty()) o += "\"id\": " + id_json + ", ";
    o += "\"delta\": " + json_quote(text);
    if (token_ids) {
        o += ", \"token_ids\": ";
        append_ids(o, *token_ids);
    }
    return o + "}";
}

std::string jsonl_error(const std::string& id_json, const std::string& message, const std::string& type) {
    std::string o = "{";
    if (!id_json.empty()) o += "\"id\": " + id_json + ", ";
    return o + "\"error\": {\"message\": " + json_quote(message) + ", \"type\": " + json_quote(type) + "}}";
}

}  // namespace tmc
