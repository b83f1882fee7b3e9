// tm-calib: activation statistics of a model on calibration text, for
// tm-qparams (formats/calib-stats.md). See tm-calib(1).
//   tm-calib WS --dataset FILE [--samples 128] [--seqlen 2048] [-o STATS]
#include <unistd.h>

#include <cstdio>
#include <cxxopts.hpp>
#include <filesystem>
#include <iostream>

#include "tm/calib.hpp"
#include "tm/error.hpp"
#include "tool_main.hpp"

namespace {
const char* kProg = "tm-calib";
const char* kUsage = "usage: tm-calib WS --dataset FILE [--samples N] [--seqlen N] [-o STATS]\n";

// Writes next to the target and renames: a failed run leaves nothing.
void write_atomically(const std::string& path, const std::string& bytes) {
    std::string tmp = path + ".tmp-" + std::to_string(getpid());
    std::FILE* f = std::fopen(tmp.c_str(), "wb");
    if (!f) throw tmc::Error(path + ": cannot write");
    bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
    ok = std::fclose(f) == 0 && ok;
    if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
        std::remove(tmp.c_str());
        throw tmc::Error(path + ": cannot write");
    }
}
}  // namespace

int main(int argc, char** argv) {
    cxxopts::Options options(kProg, "Record a model's activation statistics on calibration text.");
    options.custom_help("WS --dataset FILE [options]");
    options.positional_help("");
    options.add_options()
        ("ws", "workspace", cxxopts::value<std::string>())
        ("dataset", "calibration text: plain text, or JSON lines with a \"text\" field", cxxopts::value<std::string>())
        ("samples", "windows of text to run", cxxopts::value<int>()->default_value("128"))
        ("seqlen", "tokens per window, BOS included", cxxopts::value<int>()->default_value("2048"))
        ("o,output", "statistics file (default: standard output)", cxxopts::value<std::string>())
        ("threads", "CPU threads (default: all cores)", cxxopts::value<int>()->default_value("0"))
        ("h,help", "show this help");
    options.parse_positional({"ws"});
    cxxopts::ParseResult args;
    try {
        args = options.parse(argc, argv);
        if (args.count("help")) {
            std::cout << options.help() << "\nSee tm-calib(1).\n";
            return 0;
        }
        if (!args.unmatched().empty()) throw tmc::tool::UsageError("unexpected argument " + args.unmatched()[0]);
        if (!args.count("ws")) throw tmc::tool::UsageError("missing the workspace (WS)");
        if (!args.count("dataset")) throw tmc::tool::UsageError("missing --dataset FILE");
        if (args["samples"].as<int>() < 1) throw tmc::tool::UsageError("--samples must be a positive integer");
        if (args["seqlen"].as<int>() < 2) throw tmc::tool::UsageError("--seqlen must be at least 2");
        if (!args.count("output") && isatty(1))
            throw tmc::tool::UsageError("the statistics are binary: redirect standard output or use -o FILE");
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s: error: %s\n%s", kProg, e.what(), kUsage);
        return 2;
    }
    try {
        tmc::CalibOptions opt;
        opt.samples = args["samples"].as<int>();
        opt.seqlen = args["seqlen"].as<int>();
        opt.threads = args["threads"].as<int>();
        const bool tty = isatty(2);
        opt.progress = [&](int done, int total) {
            if (tty) std::fprintf(stderr, "\r%s: %d/%d samples", kProg, done, total);
            else if (done == total) std::fprintf(stderr, "%s: %d samples\n", kProg, total);
        };
        tmc::CalibStats s = tmc::calibrate(args["ws"].as<std::string>(), args["dataset"].as<std::string>(), opt);
        if (tty) std::fprintf(stderr, "\r\033[K%s: %d samples, %lld tokens\n", kProg, s.samples, (long long)s.tokens);
        const std::string bytes = tmc::calib_stats_bytes(s);
        if (args.count("output")) {
            write_atomically(args["output"].as<std::string>(), bytes);
        } else {
            if (std::fwrite(bytes.data(), 1, bytes.size(), stdout) != bytes.size() || std::fflush(stdout) != 0)
                throw tmc::Error("cannot write the statistics to standard output");
        }
        return 0;
    } catch (const std::exception& e) {
        return tmc::tool::fail(kProg, e.what());
    }
}
