// KV-cache quantization parameters: statistics -> per-layer, per-head scale
// and offset, written into the workspace per tensor-parallel rank. The
// workspace is changed by building its next version beside it (every file
// hard-linked, only config.ini, manifest.json and the parameter files new)
// and exchanging the two directories with one rename.
#include "tm/qparams.hpp"

#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <sstream>

#include "base/mapped_file.hpp"
#include "model/tp_split.hpp"
#include "tm/error.hpp"
#include "tm/workspace.hpp"

namespace tmc {

namespace fs = std::filesystem;

std::string kv_qparams_path(int rank, int bits) {
    return "quant/rank" + std::to_string(rank) + "/kv_int" + std::to_string(bits) + ".bin";
}

void check_stats_for(const Workspace& ws, const CalibStats& s) {
    const ModelConfig& m = ws.model();
    if (s.workspace_id != workspace_id(ws.manifest()))
        throw Error("the statistics were recorded on another model (" +
                    (s.model.empty() ? std::string("unnamed") : s.model) + ", workspace id " + s.workspace_id +
                    "), not on " + ws.dir() + " (" + workspace_id(ws.manifest()) + ")");
    auto dim = [&](const char* what, int got, int want) {
        if (got != want)
            throw Error("the statistics have " + std::to_string(got) + " " + what + ", " + ws.dir() + " has " +
                        std::to_string(want));
    };
    dim("layers", s.layers, m.num_layers);
    dim("KV heads", s.kv_heads, m.num_kv_heads);
    dim("channels per head", s.head_dim, m.head_dim);
    for (int l = 0; l < m.num_layers; ++l)
        for (const char* kv : {"k", "v"})
            for (const char* st : {"min", "max", "absmax"}) {
                const std::string name = "layers." + std::to_string(l) + "." + kv + "." + st;
                const CalibArray* a = s.find(name);
                if (!a) throw Error("the statistics have no " + name);
                if (a->shape != std::vector<int64_t>{m.num_kv_heads, m.head_dim})
                    throw Error("the statistics' " + name + " has the wrong shape");
                for (float x : a->data)
                    if (!std::isfinite(x)) throw Error("the statistics' " + name + " has a non-finite value");
            }
}

namespace {

// Expected squared error of quantizing a channel whose values are taken as
// uniform on [m, M] to the grid lo + k * step, k = 0 .. levels - 1 (values
// outside the grid clamp to its ends), per unit of value range.
double channel_mse(double m, double M, double lo, double step, double levels) {
    const double w = M - m;
    if (!(w > 0)) return 0;
    const double hi = lo + step * (levels - 1);
    const double inside = std::max(0.0, std::min(M, hi) - std::max(m, lo));
    double e = inside * step * step / 12;
    auto cube = [](double x) { return x * x * x; };
    if (m < lo) e += (cube(lo - m) - cube(lo - std::min(M, lo))) / 3;  // values below clamp to lo
    if (M > hi) e += (cube(M - hi) - cube(std::max(m, hi) - hi)) / 3;  // above, to hi
    return e / w;
}

// Narrows a head's range to the one with the least expected squared error
// over its channels (each uniform on its own [min, max]): outlier channels
// are clipped when that serves the others more than it costs them. The
// candidates move each end up to 80% of the way to the middle (asymmetric),
// or the absolute maximum down to 20% (symmetric).
void clip_range(const float* mn, const float* mx, int channels, float qmax, float half, bool symmetric, float& lo,
                float& hi, float& absmax) {
    auto total = [&](double grid_lo, double step) {
        double e = 0;
        for (int c = 0; c < channels; ++c) e += channel_mse(mn[c], mx[c], grid_lo, step, double(qmax) + 1);
        return e;
    };
    if (symmetric) {
        if (!(absmax > 0)) return;
        double best = INFINITY;
        float keep = absmax;
        for (int t = 0; t <= 16; ++t) {
            const double a = double(absmax) * (1.0 - t / 20.0), step = a / (double(half) - 1);
            const double e = total(-double(half) * step, step);
            if (e < best) best = e, keep = float(a);
        }
        absmax = keep;
        return;
    }
    if (!(hi > lo)) return;
    const double mid = 0.5 * (double(lo) + hi);
    double best = INFINITY;
    float blo = lo, bhi = hi;
    for (int t1 = 0; t1 <= 16; ++t1)
        for (int t2 = 0; t2 <= 16; ++t2) {
            const double a = lo + (mid - lo) * t1 / 20.0, b = hi - (hi - mid) * t2 / 20.0;
            const double e = total(a, (b - a) / qmax);
            if (e < best) best = e, blo = float(a), bhi = float(b);
        }
    lo = blo, hi = bhi;
}

}  // namespace

std::vector<float> kv_qparams_from_stats(const CalibStats& s, const KvQuantOptions& opt) {
    if (opt.bits != 8 && opt.bits != 4) throw Error("KV quantization has 8 or 4 bits");
    const int L = s.layers, nkv = s.kv_heads, hd = s.head_dim;
    const float qmax = float((1 << opt.bits) - 1), half = float(1 << (opt.bits - 1));
    std::vector<float> out(size_t(L) * 4 * nkv);
    for (int l = 0; l < L; ++l)
        for (int which = 0; which < 2; ++which) {
            const std::string base = "layers." + std::to_string(l) + (which ? ".v." : ".k.");
            const CalibArray* mn = s.find(base + "min");
            const CalibArray* mx = s.find(base + "max");
            const CalibArray* am = s.find(base + "absmax");
            if (!mn || !mx || !am) throw Error("the statistics have no " + base + "min/max/absmax");
            for (int h = 0; h < nkv; ++h) {
                float lo = INFINITY, hi = -INFINITY, a = 0;
                for (int c = 0; c < hd; ++c) {
                    const size_t i = size_t(h) * hd + c;
                    lo = std::min(lo, mn->data[i]), hi = std::max(hi, mx->data[i]), a = std::max(a, am->data[i]);
                }
                if (!(hi >= lo)) lo = hi = 0, a = 0;  // no tokens seen
                if (opt.clip_mse) clip_range(mn->data.data() + size_t(h) * hd, mx->data.data() + size_t(h) * hd, hd,
                                             qmax, half, opt.symmetric, lo, hi, a);
                float scale, offset;
                if (opt.symmetric) {
                    scale = a > 0 ? a / (half - 1) : 1.0f;
                    offset = -half * scale;
                } else {
                    scale = hi > lo ? (hi - lo) / qmax : 1.0f;
                    offset = lo;
                }
                float* p = out.data() + (size_t(l) * 4 + 2 * which) * nkv;
                p[h] = scale;
                p[nkv + h] = offset;
            }
        }
    return out;
}

namespace {

// config.ini with [engine] keys replaced (or added at the end of the
// section), every other line -- user comments included -- kept.
std::string edit_engine_keys(const std::string& text, std::vector<std::pair<std::string, std::string>> kv) {
    std::istringstream in(text);
    std::string line, out, section;
    std::vector<bool> done(kv.size(), false);
    auto flush_engine = [&] {
        for (size_t i = 0; i < kv.size(); ++i)
            if (!done[i]) out += kv[i].first + " = " + kv[i].second + "\n", done[i] = true;
    };
    while (std::getline(in, line)) {
        const size_t a = line.find_first_not_of(" \t");
        const std::string t = a == std::string::npos ? "" : line.substr(a);
        if (!t.empty() && t[0] == '[') {
            if (section == "engine") flush_engine();
            section = t.substr(1, t.find(']') - 1);
        } else if (section == "engine" && !t.empty() && t[0] != '#' && t[0] != ';') {
            std::string key = t.substr(0, t.find('='));
            key.erase(key.find_last_not_of(" \t") + 1);
            bool replaced = false;
            for (size_t i = 0; i < kv.size(); ++i)
                if (key == kv[i].first) {
                    out += kv[i].first + " = " + kv[i].second + "\n";
                    done[i] = replaced = true;
                }
            if (replaced) continue;
        }
        out += line + "\n";
    }
    if (section != "engine") out += "\n[engine]\n";
    flush_engine();
    return out;
}

void write_new(const fs::path& p, const void* data, size_t n) {
    const int fd = ::open(p.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) throw Error(p.string() + ": " + std::strerror(errno));
    const char* c = static_cast<const char*>(data);
    while (n > 0) {
        const ssize_t w = ::write(fd, c, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            ::close(fd);
            throw Error(p.string() + ": write failed: " + std::strerror(errno));
        }
        c += w, n -= size_t(w);
    }
    if (::fsync(fd) != 0 || ::close(fd) != 0) throw Error(p.string() + ": write failed: " + std::strerror(errno));
}

// The next version of a workspace, built beside it until swapped in.
class WorkspaceEdit {
public:
    explicit WorkspaceEdit(const std::string& dir) : dir_(fs::path(dir).lexically_normal()) {
        if (dir_.filename().empty()) dir_ = dir_.parent_path();
        fs::path parent = dir_.parent_path();
        if (parent.empty()) parent = ".";
        std::string tmpl = (parent / ("." + dir_.filename().string() + ".tmp-XXXXXX")).string();
        std::vector<char> buf(tmpl.begin(), tmpl.end());
        buf.push_back(0);
        if (!mkdtemp(buf.data())) throw Error(parent.string() + ": cannot create a directory: " + std::strerror(errno));
        tmp_ = buf.data();
    }
    ~WorkspaceEdit() {
        std::error_code ec;
        if (!tmp_.empty()) fs::remove_all(tmp_, ec);
    }

    // Links every file of the workspace except those in `skip` (relative paths).
    void link_all_but(const std::vector<std::string>& skip) {
        for (auto it = fs::recursive_directory_iterator(dir_); it != fs::recursive_directory_iterator(); ++it) {
            const fs::path rel = it->path().lexically_relative(dir_);
            const fs::path to = tmp_ / rel;
            if (it->is_directory()) {
                fs::create_directories(to);
            } else if (std::find(skip.begin(), skip.end(), rel.generic_string()) == skip.end()) {
                std::error_code ec;
                fs::create_hard_link(it->path(), to, ec);
                if (ec) fs::copy_file(it->path(), to);  // a filesystem without hard links
            }
        }
    }

    void write(const std::string& rel, const void* data, size_t n) {
        fs::create_directories((tmp_ / rel).parent_path());
        std::error_code ec;
        fs::remove(tmp_ / rel, ec);
        write_new(tmp_ / rel, data, n);
    }

    void commit() {
        // Exchange the two directories atomically; the old version ends up at tmp_.
        if (::renameat2(AT_FDCWD, tmp_.c_str(), AT_FDCWD, dir_.c_str(), RENAME_EXCHANGE) != 0) {
            if (errno != EINVAL && errno != ENOSYS)
                throw Error(dir_.string() + ": cannot swap in the new version: " + std::strerror(errno));
            // No RENAME_EXCHANGE on this filesystem: move aside, then into place.
            const fs::path old = tmp_.string() + ".old";
            std::error_code ec;
            fs::rename(dir_, old, ec);
            if (ec) throw Error(dir_.string() + ": cannot move aside: " + ec.message());
            fs::rename(tmp_, dir_, ec);
            if (ec) {
                fs::rename(old, dir_, ec);
                throw Error(dir_.string() + ": cannot rename into place");
            }
            tmp_ = old;
        }
    }

private:
    fs::path dir_, tmp_;
};

}  // namespace

void set_kv_quant(const std::string& workspace, const KvQuantOptions& opt, const CalibStats* stats) {
    if (opt.bits != 8 && opt.bits != 4 && !(opt.bits == 0 && !stats))
        throw Error("KV quantization has 8 or 4 bits (0: none, without statistics)");
    Workspace ws(workspace);
    const ModelConfig& m = ws.model();
    if (opt.bits == 4 && m.head_dim % 2) throw Error(workspace + ": an int4 KV cache needs an even head_dim");
    Manifest man = ws.manifest();
    std::vector<std::string> replaced = {"config.ini", "manifest.json"};
    std::vector<std::pair<std::string, std::vector<float>>> files;
    if (stats) {
        check_stats_for(ws, *stats);
        const std::vector<float> all = kv_qparams_from_stats(*stats, opt);
        const TpSplit sp = TpSplit::make(m, ws.tp());
        const int nkv = m.num_kv_heads;
        for (int r = 0; r < ws.tp(); ++r) {
            const int h0 = sp.kv_head_begin(r);
            std::vector<float> v(size_t(m.num_layers) * 4 * sp.kv_heads);
            for (int l = 0; l < m.num_layers; ++l)
                for (int row = 0; row < 4; ++row)
                    for (int h = 0; h < sp.kv_heads; ++h)
                        v[(size_t(l) * 4 + row) * sp.kv_heads + h] = all[(size_t(l) * 4 + row) * nkv + h0 + h];
            const std::string rel = kv_qparams_path(r, opt.bits);
            replaced.push_back(rel);
            man.files.erase(std::remove_if(man.files.begin(), man.files.end(),
                                           [&](const ManifestEntry& e) { return e.path == rel; }),
                            man.files.end());
            ManifestEntry e;
            e.path = rel;
            e.is_tensor = true;
            e.dtype = DType::F32;
            e.shape = {m.num_layers, 4, sp.kv_heads};
            e.bytes = v.size() * sizeof(float);
            e.xxh64 = XXH64(v.data(), e.bytes, 0);
            man.files.push_back(e);
            files.emplace_back(rel, std::move(v));
        }
    }
    const std::string ini_path = workspace + "/config.ini";
    const std::string ini = edit_engine_keys(read_file(ini_path), {{"quant_policy", std::to_string(opt.bits)},
                                                                    {"kv_scales", stats ? "static" : "online"}});
    ModelConfig m2;
    EngineConfig e2;
    parse_config_ini(ini, ini_path, &m2, &e2);  // the edit must read back

    WorkspaceEdit edit(workspace);
    edit.link_all_but(replaced);
    for (auto& [rel, v] : files) edit.write(rel, v.data(), v.size() * sizeof(float));
    const std::string mj = man.to_json();
    edit.write("manifest.json", mj.data(), mj.size());
    edit.write("config.ini", ini.data(), ini.size());
    edit.commit();
}

}  // namespace tmc
