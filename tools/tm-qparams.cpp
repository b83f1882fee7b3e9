// tm-qparams: calibration statistics -> KV-cache quantization parameters in a
// workspace (formats/workspace.md). See tm-qparams(1).
//   tm-calib WS --dataset F | tm-qparams WS --kv int8
#include <unistd.h>

#include <cstdio>
#include <cxxopts.hpp>
#include <iostream>
#include <iterator>

#include "tm/calib.hpp"
#include "tm/error.hpp"
#include "tm/qparams.hpp"
#include "tool_main.hpp"

namespace {
const char* kProg = "tm-qparams";
const char* kUsage =
    "usage: tm-qparams WS --kv int8|int4 [--sym|--asym] [--full-range] [--stats STATS]   (statistics on stdin without --stats)\n"
    "       tm-qparams WS --kv int8|int4|none --online\n";

std::string read_all(std::FILE* f, const std::string& what) {
    std::string s;
    char buf[1 << 16];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) s.append(buf, n);
    if (std::ferror(f)) throw tmc::Error(what + ": read failed");
    return s;
}
}  // namespace

int main(int argc, char** argv) {
    cxxopts::Options options(kProg, "Turn calibration statistics into a quantized KV cache's parameters in a workspace.");
    options.custom_help("WS --kv int8|int4 [options]");
    options.positional_help("");
    options.add_options()
        ("ws", "workspace", cxxopts::value<std::string>())
        ("kv", "KV cache: int8, int4 (or none with --online)", cxxopts::value<std::string>())
        ("stats", "statistics file from tm-calib (default: standard input)", cxxopts::value<std::string>())
        ("sym", "symmetric scales (absmax; offset fixed at -2^(bits-1) scales)")
        ("asym", "asymmetric scales (min and max; the default)")
        ("full-range", "each head's whole min/max (absmax) range, no clipping of outlier channels")
        ("online", "no statistics: scales computed per token and head as the cache is written")
        ("h,help", "show this help");
    options.parse_positional({"ws"});
    cxxopts::ParseResult args;
    tmc::KvQuantOptions opt;
    bool online = false;
    try {
        args = options.parse(argc, argv);
        if (args.count("help")) {
            std::cout << options.help() << "\nSee tm-qparams(1).\n";
            return 0;
        }
        if (!args.unmatched().empty()) throw tmc::tool::UsageError("unexpected argument " + args.unmatched()[0]);
        if (!args.count("ws")) throw tmc::tool::UsageError("missing the workspace (WS)");
        if (!args.count("kv")) throw tmc::tool::UsageError("missing --kv int8|int4");
        const std::string kv = args["kv"].as<std::string>();
        online = args.count("online") > 0;
        if (kv == "int8") opt.bits = 8;
        else if (kv == "int4") opt.bits = 4;
        else if (kv == "none" && online) opt.bits = 0;
        else throw tmc::tool::UsageError("--kv must be int8 or int4 (or none with --online), not \"" + kv + "\"");
        if (args.count("sym") && args.count("asym")) throw tmc::tool::UsageError("--sym and --asym exclude each other");
        opt.symmetric = args.count("sym") > 0;
        if (online && args.count("stats")) throw tmc::tool::UsageError("--online takes no statistics");
        opt.clip_mse = args.count("full-range") == 0;
        if (online && args.count("full-range")) throw tmc::tool::UsageError("--online takes no --full-range");
        if (online && (args.count("sym") || args.count("asym")))
            throw tmc::tool::UsageError("--online scales are asymmetric per token and head; --sym/--asym need statistics");
        if (!online && !args.count("stats") && isatty(0))
            throw tmc::tool::UsageError("no statistics: pipe tm-calib's output in, or use --stats FILE or --online");
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s: error: %s\n%s", kProg, e.what(), kUsage);
        return 2;
    }
    try {
        const std::string ws = args["ws"].as<std::string>();
        if (online) {
            tmc::set_kv_quant(ws, opt, nullptr);
            if (opt.bits) std::fprintf(stderr, "%s: %s: int%d KV cache, scales per token and head (online)\n", kProg, ws.c_str(), opt.bits);
            else std::fprintf(stderr, "%s: %s: unquantized KV cache\n", kProg, ws.c_str());
            return 0;
        }
        std::string what = args.count("stats") ? args["stats"].as<std::string>() : "standard input";
        std::string bytes;
        if (args.count("stats")) {
            std::FILE* f = std::fopen(what.c_str(), "rb");
            if (!f) throw tmc::Error(what + ": cannot open");
            bytes = read_all(f, what);
            std::fclose(f);
        } else {
            bytes = read_all(stdin, what);
        }
        if (bytes.empty()) throw tmc::Error(what + ": empty (did tm-calib fail?)");
        const tmc::CalibStats s = tmc::parse_calib_stats(bytes, what);
        tmc::set_kv_quant(ws, opt, &s);
        std::fprintf(stderr, "%s: %s: int%d KV cache, static %s scales for %d layers x %d KV heads (%d samples, %lld tokens of %s)\n",
                     kProg, ws.c_str(), opt.bits, opt.symmetric ? "symmetric" : "asymmetric", s.layers, s.kv_heads,
                     s.samples, (long long)s.tokens, s.dataset.c_str());
        return 0;
    } catch (const std::exception& e) {
        return tmc::tool::fail(kProg, e.what());
    }
}
