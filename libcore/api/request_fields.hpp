// Request fields shared by the JSON-lines schema (formats/jsonl.md) and the
// HTTP API (formats/http-api.md): each throws tmc::Error naming the field.
#pragma once

#include <simdjson.h>

#include <string>
#include <vector>

#include "tm/engine.hpp"

namespace tmc::api {

using simdjson::dom::element;
using simdjson::dom::object;

[[noreturn]] void bad(const std::string& field, const std::string& what);
double number(element e, const std::string& f, const char* what);
int64_t integer(element e, const std::string& f, const char* what);
bool boolean(element e, const std::string& f);

// A string (encoded with the tokenizer's special tokens, e.g. BOS) or token ids.
std::vector<int> read_prompt(element prompt, const Engine& engine);
// [{"role": ..., "content": string | [{"type": "text", "text": ...}]}, ...]
std::vector<ChatMessage> read_messages(element messages);
// max_tokens / max_completion_tokens / request_output_len (LMDeploy), temperature, top_p, top_k, min_p, the
// penalties, seed, stop, stop_token_ids, ignore_eos, skip_special_tokens.
void read_sampling(object obj, const Engine& engine, SamplingParams& p);

}  // namespace tmc::api
