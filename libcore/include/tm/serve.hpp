// The HTTP server of tm-serve: OpenAI-compatible endpoints, LMDeploy's
// interactive-session endpoint, Prometheus metrics and a chat page, over one
// engine (formats/http-api.md).
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "tm/engine.hpp"

namespace tmc {

struct ServeOptions {
    std::string host = "127.0.0.1";
    int port = 23333;                     // 0: any free port (on_listening tells which)
    std::vector<std::string> api_keys;    // empty: no authentication
    std::string model_name;               // the id of /v1/models; requests naming another model get 404
    size_t max_body_bytes = 8u << 20;     // larger bodies get 413
    double grace_seconds = 10;            // SIGTERM: time given to running requests before they are cancelled
    double idle_timeout_seconds = 60;     // a connection that sends no complete request for this long is closed
    bool log_prompts = false;             // put prompt text in the request log
    SamplingParams defaults;              // for fields a request leaves out
    std::function<void(const std::string&)> log;  // one JSON line per request, and notices
    std::function<void(const std::string& host, int port)> on_listening;
};

// Serves until SIGTERM or SIGINT: then stops accepting, lets running requests
// finish for grace_seconds, cancels the rest, and returns. Throws tmc::Error
// if the address cannot be bound.
void serve(Engine& engine, const ServeOptions& opt);

// The chat page served at "/" (self-contained HTML).
const std::string& chat_page_html();

}  // namespace tmc
