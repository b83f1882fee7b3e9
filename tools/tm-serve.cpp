// tm-serve: an OpenAI-compatible HTTP server over one engine, with LMDeploy's
// interactive-session endpoint, Prometheus metrics and a chat page.
// See tm-serve(1) and formats/http-api.md.
//   tm-serve WS [--host 127.0.0.1] [--port 23333] [--api-keys FILE] [engine options]
#include <csignal>
#include <cstdio>
#include <cxxopts.hpp>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "engine_options.hpp"
#include "tm/error.hpp"
#include "tm/serve.hpp"
#include "tool_main.hpp"

namespace {
const char* kProg = "tm-serve";
const char* kUsage = "usage: tm-serve WS [--host ADDR] [--port N] [--api-keys FILE] [options]\n";

std::vector<std::string> read_keys(const std::string& path) {
    std::ifstream in(path);
    if (!in) throw tmc::Error(path + ": cannot open");
    std::vector<std::string> keys;
    std::string line;
    while (std::getline(in, line)) {
        const size_t a = line.find_first_not_of(" \t\r"), b = line.find_last_not_of(" \t\r");
        if (a == std::string::npos || line[a] == '#') continue;
        keys.push_back(line.substr(a, b - a + 1));
    }
    if (keys.empty()) throw tmc::Error(path + ": no API keys (one per line; # starts a comment)");
    return keys;
}
}  // namespace

int main(int argc, char** argv) {
    cxxopts::Options options(kProg, "Serve a model over HTTP: OpenAI-compatible API, sessions, metrics, a chat page.");
    options.custom_help("WS [options]");
    options.positional_help("");
    options.add_options()
        ("ws", "workspace or Hugging Face model directory", cxxopts::value<std::string>())
        ("host", "address to listen on", cxxopts::value<std::string>()->default_value("127.0.0.1"))
        ("port", "TCP port (0: any free port)", cxxopts::value<int>()->default_value("23333"))
        ("api-keys", "file of accepted API keys, one per line (default: no authentication)", cxxopts::value<std::string>())
        ("model-name", "model id clients use (default: the workspace's model name)", cxxopts::value<std::string>())
        ("max-body-mib", "largest request body in MiB", cxxopts::value<double>()->default_value("8"))
        ("grace", "seconds running requests get to finish after SIGTERM", cxxopts::value<double>()->default_value("10"))
        ("idle-timeout", "seconds a connection may take to send a request (and stay idle between requests)",
         cxxopts::value<double>()->default_value("60"))
        ("log-prompts", "put prompt text in the request log")
        ("v,verbose", "engine notices on stderr")
        ("h,help", "show this help");
    tmc::tool::add_engine_options(options);
    tmc::tool::add_sampling_options(options);
    options.parse_positional({"ws"});
    cxxopts::ParseResult args;
    tmc::EngineOptions eo;
    tmc::ServeOptions so;
    try {
        args = options.parse(argc, argv);
        if (args.count("help")) {
            std::cout << options.help() << "\nSee tm-serve(1).\n";
            return 0;
        }
        if (!args.unmatched().empty()) throw tmc::tool::UsageError("unexpected argument " + args.unmatched()[0]);
        if (!args.count("ws")) throw tmc::tool::UsageError("missing the workspace (WS)");
        eo = tmc::tool::engine_options(args);
        so.defaults = tmc::tool::sampling_defaults(args);
        so.host = args["host"].as<std::string>();
        so.port = args["port"].as<int>();
        if (so.port < 0 || so.port > 65535) throw tmc::tool::UsageError("--port must be in 0..65535");
        const double mib = args["max-body-mib"].as<double>();
        if (!(mib > 0 && mib <= 4096)) throw tmc::tool::UsageError("--max-body-mib must be in (0, 4096]");
        so.max_body_bytes = size_t(mib * 1048576);
        so.grace_seconds = args["grace"].as<double>();
        if (!(so.grace_seconds >= 0 && so.grace_seconds <= 86400)) throw tmc::tool::UsageError("--grace must be in [0, 86400]");
        so.log_prompts = args.count("log-prompts") > 0;
        so.idle_timeout_seconds = args["idle-timeout"].as<double>();
        if (!(so.idle_timeout_seconds > 0 && so.idle_timeout_seconds <= 86400))
            throw tmc::tool::UsageError("--idle-timeout must be in (0, 86400]");
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s: error: %s\n%s", kProg, e.what(), kUsage);
        return 2;
    }
    try {
        if (args.count("api-keys")) so.api_keys = read_keys(args["api-keys"].as<std::string>());
        // The signals are taken by the server once it runs; until then they
        // interrupt loading as usual. SIGPIPE never kills the server.
        std::signal(SIGPIPE, SIG_IGN);
        if (args.count("verbose")) eo.log = [](const std::string& m) { std::fprintf(stderr, "tm-serve: %s\n", m.c_str()); };
        const std::string ws = args["ws"].as<std::string>();
        auto engine = tmc::Engine::open(ws, eo);
        so.model_name = args.count("model-name") ? args["model-name"].as<std::string>() : engine->model().name;
        if (so.model_name.empty()) so.model_name = std::filesystem::path(ws).filename().string();
        so.log = [](const std::string& line) {
            std::fprintf(stderr, "%s\n", line.c_str());
            std::fflush(stderr);
        };
        const std::string backend = engine->backend_name();
        so.on_listening = [&](const std::string& host, int port) {
            std::fprintf(stderr,
                         "{\"event\": \"listening\", \"url\": \"http://%s:%d\", \"model\": \"%s\", \"backend\": \"%s\", "
                         "\"context\": %d}\n",
                         host.find(':') != std::string::npos ? ("[" + host + "]").c_str() : host.c_str(), port,
                         so.model_name.c_str(), backend.c_str(), engine->session_len());
            std::fflush(stderr);
        };
        tmc::serve(*engine, so);
        std::fprintf(stderr, "{\"event\": \"stopped\"}\n");
        return 0;
    } catch (const std::exception& e) {
        return tmc::tool::fail(kProg, e.what());
    }
}
