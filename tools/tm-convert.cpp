// tm-convert: Hugging Face model directory -> tm workspace; --check verifies one.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cxxopts.hpp>
#include <iostream>

#include "tm/error.hpp"
#include "tm/workspace.hpp"
#include "tool_main.hpp"

namespace {

const char* kProg = "tm-convert";
std::atomic<bool> g_stop{false};

void on_signal(int) { g_stop.store(true); }

const char* kUsage =
    "usage: tm-convert HF_DIR -o WS [--tp N] [--dtype bf16|fp16] [--model-name NAME] [--force]\n"
    "       tm-convert --check WS\n";

int run_check(const std::string& ws_dir, bool quiet) {
    tmc::Workspace ws(ws_dir);
    const bool tty = isatty(2) && !quiet;
    auto problems = ws.verify([&](size_t done, size_t total) {
        if (tty) std::fprintf(stderr, "\r%s: checked %.1f / %.1f MB", kProg, done / 1e6, total / 1e6);
    });
    if (tty) std::fprintf(stderr, "\n");
    for (auto& p : problems) std::fprintf(stderr, "%s: error: %s\n", kProg, p.c_str());
    if (!problems.empty()) return 1;
    size_t bytes = 0;
    for (auto& f : ws.manifest().files) bytes += f.bytes;
    if (!quiet)
        std::printf("%s: ok (%zu files, %zu bytes, tp %d)\n", ws_dir.c_str(), ws.manifest().files.size(), bytes,
                    ws.tp());
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    cxxopts::Options options(kProg, "Convert a Hugging Face model directory into a tm workspace.");
    options.custom_help("HF_DIR -o WS [options] | --check WS");
    options.positional_help("");
    options.add_options()
        ("o,output", "workspace directory to create", cxxopts::value<std::string>())
        ("tp", "tensor-parallel ranks to split the weights for", cxxopts::value<int>()->default_value("1"))
        ("dtype", "weight type in the workspace: bf16 or fp16 (default: the model's)", cxxopts::value<std::string>())
        ("model-name", "name recorded in config.ini (default: HF_DIR's name)", cxxopts::value<std::string>())
        ("f,force", "replace WS if it exists")
        ("check", "verify workspace WS against its manifest", cxxopts::value<std::string>())
        ("q,quiet", "no progress or summary on stderr")
        ("h,help", "show this help")
        ("input", "", cxxopts::value<std::vector<std::string>>());
    options.parse_positional({"input"});
    cxxopts::ParseResult args;
    try {
        args = options.parse(argc, argv);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s: error: %s\n%s", kProg, e.what(), kUsage);
        return 2;
    }
    if (args.count("help")) {
        std::cout << options.help() << "\nSee tm-convert(1).\n";
        return 0;
    }
    const bool quiet = args.count("quiet") > 0;
    try {
        if (args.count("check")) {
            if (args.count("input") || args.count("output")) throw tmc::tool::UsageError("--check takes only WS");
            return run_check(args["check"].as<std::string>(), quiet);
        }
        if (!args.count("input") || args["input"].as<std::vector<std::string>>().size() != 1)
            throw tmc::tool::UsageError("expected one HF_DIR");
        if (!args.count("output")) throw tmc::tool::UsageError("missing -o WS");
        tmc::ConvertOptions opt;
        opt.tp = args["tp"].as<int>();
        if (opt.tp < 1 || opt.tp > 64) throw tmc::tool::UsageError("--tp must be between 1 and 64");
        if (args.count("dtype")) {
            auto d = args["dtype"].as<std::string>();
            if (d == "bf16") opt.dtype = tmc::DType::BF16;
            else if (d == "fp16" || d == "float16") opt.dtype = tmc::DType::F16;
            else throw tmc::tool::UsageError("--dtype must be bf16 or fp16, not \"" + d + "\"");
        }
        if (args.count("model-name")) opt.model_name = args["model-name"].as<std::string>();
        opt.force = args.count("force") > 0;
        opt.cancel = &g_stop;
        struct sigaction sa {};
        sa.sa_handler = on_signal;
        sigaction(SIGINT, &sa, nullptr);
        sigaction(SIGTERM, &sa, nullptr);
        sigaction(SIGHUP, &sa, nullptr);

        const bool tty = isatty(2) && !quiet;
        auto t0 = std::chrono::steady_clock::now();
        auto secs = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
        opt.progress = [&](size_t done, size_t total, size_t bytes) {
            if (tty)
                std::fprintf(stderr, "\r%s: %zu/%zu tensors, %.1f MB, %.0f MB/s   ", kProg, done, total, bytes / 1e6,
                             bytes / 1e6 / std::max(secs(), 1e-3));
        };
        const std::string in = args["input"].as<std::vector<std::string>>()[0];
        const std::string out = args["output"].as<std::string>();
        auto st = tmc::convert_hf_model(in, out, opt);
        if (tty) std::fprintf(stderr, "\n%s: wrote %s (%zu tensors, %.1f MB in %.2f s)\n", kProg, out.c_str(),
                              st.tensors, st.bytes / 1e6, secs());
        return 0;
    } catch (const tmc::tool::UsageError& e) {
        std::fprintf(stderr, "%s: error: %s\n%s", kProg, e.what(), kUsage);
        return 2;
    } catch (const tmc::Interrupted&) {
        std::fprintf(stderr, "\n%s: interrupted; nothing written\n", kProg);
        return 130;
    } catch (const std::exception& e) {
        return tmc::tool::fail(kProg, e.what());
    }
}
