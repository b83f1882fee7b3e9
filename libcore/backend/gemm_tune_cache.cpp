#include "backend/gemm_tune_cache.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <simdjson.h>

#include "tm/json_write.hpp"

namespace tmc {

namespace {

constexpr const char* kFormat = "tm-gemm-tune";
constexpr int kVersion = 1;

bool parse_line(simdjson::dom::parser& parser, const std::string& line, GemmTuneEntry& e) {
    simdjson::dom::element doc;
    if (parser.parse(line).get(doc)) return false;
    std::string_view fmt, device, ab, y;
    int64_t version = 0, cublaslt = 0, n = 0, k = 0, ldy = 0;
    double beta = 0;
    simdjson::dom::array picks;
    if (doc["format"].get(fmt) || fmt != kFormat || doc["version"].get(version) || version != kVersion ||
        doc["device"].get(device) || doc["cublaslt"].get(cublaslt) || doc["ab"].get(ab) || doc["y"].get(y) ||
        doc["n"].get(n) || doc["k"].get(k) || doc["ldy"].get(ldy) || doc["beta"].get(beta) || doc["picks"].get(picks))
        return false;
    if (n <= 0 || k <= 0 || ldy < n || cublaslt <= 0) return false;
    e = GemmTuneEntry{};
    e.device = std::string(device);
    e.cublaslt = int(cublaslt);
    e.ab = std::string(ab);
    e.y = std::string(y);
    e.n = int(n), e.k = int(k), e.ldy = int(ldy);
    e.beta = float(beta);
    int last = 0;
    for (auto p : picks) {
        simdjson::dom::array pair;
        int64_t rows = 0, h = 0;
        if (p.get(pair) || pair.size() != 2 || pair.at(0).get(rows) || pair.at(1).get(h)) return false;
        if (rows <= last || h < -1 || h > 63) return false;  // rows ascending; -1 or a heuristic index
        last = int(rows);
        e.picks.emplace_back(int(rows), int(h));
    }
    return !e.picks.empty();
}

std::string format_line(const GemmTuneEntry& e) {
    std::string s = "{\"format\": \"";
    s += kFormat;
    s += "\", \"version\": " + std::to_string(kVersion) + ", \"device\": ";
    json_append_string(s, e.device);
    s += ", \"cublaslt\": " + std::to_string(e.cublaslt) + ", \"ab\": ";
    json_append_string(s, e.ab);
    s += ", \"y\": ";
    json_append_string(s, e.y);
    s += ", \"n\": " + std::to_string(e.n) + ", \"k\": " + std::to_string(e.k) + ", \"ldy\": " + std::to_string(e.ldy) +
         ", \"beta\": " + json_number(e.beta) + ", \"picks\": [";
    for (size_t i = 0; i < e.picks.size(); ++i)
        s += (i ? ", [" : "[") + std::to_string(e.picks[i].first) + ", " + std::to_string(e.picks[i].second) + "]";
    return s + "]}";
}

}  // namespace

std::string gemm_tune_cache_path() {
    const auto set = [](const char* v) { return v && *v; };
    if (const char* d = std::getenv("TM_CACHE_DIR"); set(d)) return std::string(d) + "/gemm-tune.jsonl";
    if (const char* d = std::getenv("XDG_CACHE_HOME"); set(d)) return std::string(d) + "/tm/gemm-tune.jsonl";
    if (const char* d = std::getenv("HOME"); set(d)) return std::string(d) + "/.cache/tm/gemm-tune.jsonl";
    return {};
}

std::vector<GemmTuneEntry> read_gemm_tune_cache(const std::string& path) {
    std::vector<GemmTuneEntry> out;
    std::ifstream in(path);
    if (!in) return out;
    simdjson::dom::parser parser;
    for (std::string line; std::getline(in, line);) {
        GemmTuneEntry e;
        if (parse_line(parser, line, e)) out.push_back(std::move(e));
    }
    return out;
}

bool write_gemm_tune_cache(const std::string& path, const std::vector<GemmTuneEntry>& entries) {
    namespace fs = std::filesystem;
    if (path.empty()) return false;
    std::error_code ec;
    const fs::path p(path);
    if (p.has_parent_path()) fs::create_directories(p.parent_path(), ec);
    // Writers (processes, tensor-parallel ranks) take turns on a lock file.
    const std::string lock_path = path + ".lock";
    const int lock = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (lock < 0) return false;
    if (::flock(lock, LOCK_EX) != 0) {
        ::close(lock);
        return false;
    }
    std::vector<GemmTuneEntry> all = read_gemm_tune_cache(path);
    for (const auto& e : entries) {
        bool replaced = false;
        for (auto& o : all)
            if (o.same_shape(e)) o = e, replaced = true;
        if (!replaced) all.push_back(e);
    }
    const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
    bool ok = false;
    {
        std::ofstream out(tmp, std::ios::trunc);
        if (out) {
            for (const auto& e : all) out << format_line(e) << '\n';
            out.flush();
            ok = bool(out);
        }
    }
    if (ok) {
        fs::rename(tmp, p, ec);
        ok = !ec;
    }
    if (!ok) fs::remove(tmp, ec);
    ::flock(lock, LOCK_UN);
    ::close(lock);
    return ok;
}

}  // namespace tmc
