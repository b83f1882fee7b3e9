// The generation JSON-lines schema (formats/jsonl.md), shared by tm-run,
// tm-client and tm-serve: request lines to tmc::Request, outputs to lines.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "tm/engine.hpp"

namespace tmc {

struct JsonlRequest {
    std::string id_json;  // the request's "id" as JSON text; empty when it had none
    Request request;
    bool return_token_ids = false;
};

// Parses one request line. Defaults for absent sampling fields come from
// `defaults`. Throws tmc::Error with a one-line message (no line number);
// *id_json is set as soon as the line's id is known, so an error line can
// carry it.
JsonlRequest parse_jsonl_request(std::string_view line, const Engine& engine, const SamplingParams& defaults,
                                 std::string* id_json);

// {"id": ..., "text": ..., "finish_reason": ..., "usage": {...}[, "token_ids": [...]][, "error": {...}]}
std::string jsonl_response(const std::string& id_json, const std::string& text, const std::vector<int>* token_ids,
                           const Output& final);
// {"id": ..., "delta": ...[, "token_ids": [...]]}
std::string jsonl_delta(const std::string& id_json, const std::string& text, const std::vector<int>* token_ids);
// {"id": ..., "error": {"message": ..., "type": ...}}
std::string jsonl_error(const std::string& id_json, const std::string& message,
                        const std::string& type = "invalid_request_error");

// A quoted JSON string (invalid UTF-8 becomes U+FFFD) and a number.
std::string json_quote(std::string_view s);
std::string json_number(double v);

}  // namespace tmc
