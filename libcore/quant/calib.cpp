// Calibration statistics: a ForwardObserver on the CPU backend accumulates,
// per layer, K/V (after RoPE, as cached) min/max/absmax per (head, channel)
// and, for the input of each linear layer, per-channel max/min/mean/absmax/
// absmean; samples run one after another, each as one sequence.
#include "model/decoder.hpp"
#include "tm/calib.hpp"

#include <simdjson.h>
#include <xxhash.h>
#include <zstd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>

#include "backend/backend.hpp"
#include "tm/json_write.hpp"
#include "base/mapped_file.hpp"
#include "model/tp_split.hpp"
#include "tm/error.hpp"
#include "tm/tokenizer.hpp"
#include "tm/workspace.hpp"

namespace tmc {

const CalibArray* CalibStats::find(const std::string& name) const {
    for (auto& a : arrays)
        if (a.name == name) return &a;
    return nullptr;
}

std::string workspace_id(const Manifest& m) {
    // Every file but the quantization parameters, which tm-qparams adds and
    // replaces without changing the model.
    std::string lines;
    char buf[17];
    for (auto& e : m.files) {
        if (e.path.rfind("quant/", 0) == 0) continue;
        std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(e.xxh64));
        lines += e.path + " " + buf + "\n";
    }
    std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(XXH64(lines.data(), lines.size(), 0)));
    return buf;
}

std::string workspace_id(const std::string& workspace) {
    const std::string path = workspace + "/manifest.json";
    return workspace_id(Manifest::parse(read_file(path), path));
}

namespace {

// Per-channel running statistics over rows.
struct ChannelStats {
    std::vector<double> sum, abssum;
    std::vector<float> mn, mx, absmax;
    int64_t rows = 0;
    explicit ChannelStats(size_t n = 0)
        : sum(n, 0), abssum(n, 0), mn(n, INFINITY), mx(n, -INFINITY), absmax(n, 0) {}
    // Rows of `width` channels, the first being channel `col0` (a rank's
    // share; ranks add disjoint channels, and the one holding channel 0
    // counts the rows).
    void add(const float* rows_, int T, size_t ld, int width, int col0 = 0) {
        for (int t = 0; t < T; ++t) {
            const float* r = rows_ + size_t(t) * ld;
            for (int c = 0; c < width; ++c) {
                const float v = r[c];
                const size_t k = size_t(col0 + c);
                mn[k] = std::min(mn[k], v);
                mx[k] = std::max(mx[k], v);
                absmax[k] = std::max(absmax[k], std::abs(v));
                sum[k] += v;
                abssum[k] += std::abs(v);
            }
        }
        if (col0 == 0) rows += T;
    }
};

constexpr const char* kLinearPoints[] = {"attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2"};

class Collector final : public ForwardObserver {
public:
    explicit Collector(const ModelConfig& c) : cfg_(c) {
        for (int l = 0; l < c.num_layers; ++l) {
            kv_.emplace_back(size_t(c.kv_size()));
            kv_.emplace_back(size_t(c.kv_size()));
            lin_.emplace_back(size_t(c.hidden_size));
            lin_.emplace_back(size_t(c.q_size()));
            lin_.emplace_back(size_t(c.hidden_size));
            lin_.emplace_back(size_t(c.intermediate_size));
        }
    }
    void observe(int layer, Point p, const float* rows, int T, size_t ld, int width) override {
        add(layer, p, rows, T, ld, width, 0);
    }
    void add(int layer, Point p, const float* rows, int T, size_t ld, int width, int col0) {
        switch (p) {
            case K: kv_[size_t(layer) * 2].add(rows, T, ld, width, col0); break;
            case V: kv_[size_t(layer) * 2 + 1].add(rows, T, ld, width, col0); break;
            case AttnIn: lin_[size_t(layer) * 4].add(rows, T, ld, width, col0); break;
            case WoIn: lin_[size_t(layer) * 4 + 1].add(rows, T, ld, width, col0); break;
            case FfnIn: lin_[size_t(layer) * 4 + 2].add(rows, T, ld, width, col0); break;
            case W2In: lin_[size_t(layer) * 4 + 3].add(rows, T, ld, width, col0); break;
        }
    }

    // Tensor parallelism: rank r's K/V are its KV heads (recorded by the
    // first rank holding a replicated head), the attention output its query
    // heads, the down projection's input its MLP columns; the norms' outputs
    // are whole on every rank (recorded by rank 0).
    class Rank final : public ForwardObserver {
    public:
        Rank(Collector& c, const ModelConfig& m, int r, int tp) : c_(c), r_(r) {
            const TpSplit sp = TpSplit::make(m, tp);
            kv0_ = sp.kv_head_begin(r) * m.head_dim;
            kv_owner_ = m.num_kv_heads % tp == 0 || r % (tp / m.num_kv_heads) == 0;
            q0_ = r * sp.heads * m.head_dim;
            i0_ = r * sp.inter;
        }
        void observe(int layer, Point p, const float* rows, int T, size_t ld, int width) override {
            switch (p) {
                case K:
                case V:
                    if (kv_owner_) c_.add(layer, p, rows, T, ld, width, kv0_);
                    break;
                case AttnIn:
                case FfnIn:
                    if (r_ == 0) c_.add(layer, p, rows, T, ld, width, 0);
                    break;
                case WoIn: c_.add(layer, p, rows, T, ld, width, q0_); break;
                case W2In: c_.add(layer, p, rows, T, ld, width, i0_); break;
            }
        }

    private:
        Collector& c_;
        int r_, kv0_ = 0, q0_ = 0, i0_ = 0;
        bool kv_owner_ = true;
    };

    ForwardObserver* for_rank(int rank, int tp) override {
        if (tp == 1) return this;
        std::lock_guard<std::mutex> lk(mu_);  // the ranks are built on their own threads
        while (ranks_.size() < size_t(tp)) ranks_.push_back(std::make_unique<Rank>(*this, cfg_, int(ranks_.size()), tp));
        return ranks_[size_t(rank)].get();
    }
    void export_to(CalibStats& s) const {
        for (int l = 0; l < s.layers; ++l) {
            const std::string pre = "layers." + std::to_string(l) + ".";
            for (int kv = 0; kv < 2; ++kv) {
                const ChannelStats& c = kv_[size_t(l) * 2 + size_t(kv)];
                const std::vector<int64_t> shape = {s.kv_heads, s.head_dim};
                const std::string n = pre + (kv ? "v" : "k");
                s.arrays.push_back({n + ".min", shape, c.mn});
                s.arrays.push_back({n + ".max", shape, c.mx});
                s.arrays.push_back({n + ".absmax", shape, c.absmax});
            }
            for (int i = 0; i < 4; ++i) {
                const ChannelStats& c = lin_[size_t(l) * 4 + size_t(i)];
                const std::vector<int64_t> shape = {int64_t(c.mx.size())};
                const std::string n = pre + kLinearPoints[i] + ".input";
                std::vector<float> mean(c.sum.size()), absmean(c.sum.size());
                for (size_t k = 0; k < c.sum.size(); ++k) {
                    mean[k] = c.rows ? float(c.sum[k] / double(c.rows)) : 0.0f;
                    absmean[k] = c.rows ? float(c.abssum[k] / double(c.rows)) : 0.0f;
                }
                s.arrays.push_back({n + ".max", shape, c.mx});
                s.arrays.push_back({n + ".min", shape, c.mn});
                s.arrays.push_back({n + ".mean", shape, mean});
                s.arrays.push_back({n + ".absmax", shape, c.absmax});
                s.arrays.push_back({n + ".absmean", shape, absmean});
            }
        }
    }

private:
    ModelConfig cfg_;
    std::vector<ChannelStats> kv_, lin_;
    std::vector<std::unique_ptr<Rank>> ranks_;
    std::mutex mu_;
};

std::string dataset_text(const std::string& path) {
    std::string raw = read_file(path);
    // JSON lines when the first non-blank line is an object with a "text" string.
    size_t b = raw.find_first_not_of(" \t\r\n");
    if (b == std::string::npos || raw[b] != '{') return raw;
    simdjson::dom::parser parser;
    std::string out;
    size_t lineno = 0, start = 0;
    while (start < raw.size()) {
        size_t end = raw.find('\n', start);
        if (end == std::string::npos) end = raw.size();
        std::string line = raw.substr(start, end - start);
        start = end + 1;
        ++lineno;
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        simdjson::dom::element doc;
        std::string_view text;
        if (parser.parse(line).get(doc) || doc["text"].get(text))
            throw Error(path + ": line " + std::to_string(lineno) + ": expected a JSON object with a \"text\" string");
        out += text;
        out += "\n\n";
    }
    return out;
}

}  // namespace

CalibStats calibrate(const std::string& workspace, const std::string& dataset, const CalibOptions& opt) {
    if (opt.samples < 1 || opt.seqlen < 2) throw Error("calibration needs at least 1 sample of 2 tokens");
    Workspace ws(workspace);
    const ModelConfig& c = ws.model();
    auto tok = Tokenizer::load(ws.tokenizer_dir());
    std::vector<int> ids = tok->encode(dataset_text(dataset), false);
    const int bos = tok->bos_id() >= 0 ? tok->bos_id() : c.bos_token_id;
    const int body = bos >= 0 ? opt.seqlen - 1 : opt.seqlen;
    if (int64_t(ids.size()) < body) throw Error(dataset + ": " + std::to_string(ids.size()) +
                                                " tokens, fewer than one sample of " + std::to_string(opt.seqlen));
    // Windows at evenly spaced offsets (deterministic); overlapping only when
    // the text is shorter than samples x seqlen.
    const int64_t span = int64_t(ids.size()) - body;
    const int n = opt.samples;
    Collector col(c);
    CpuBackendOptions bo;
    bo.program = model_program(ws);
    bo.threads = opt.threads;
    bo.observer = &col;
    auto be = make_cpu_tp_backend(ws, bo);  // a --tp N workspace: its ranks as threads
    const int chunk = 512;
    BackendLimits lim;
    lim.block_size = 64;
    lim.num_blocks = (opt.seqlen + 63) / 64;
    lim.max_batch_tokens = chunk;
    lim.max_logit_rows = 1;
    lim.max_context = opt.seqlen;
    be->init(lim);
    std::vector<int> blocks(size_t(lim.num_blocks));
    for (int b = 0; b < lim.num_blocks; ++b) blocks[size_t(b)] = b;
    CalibStats s;
    s.workspace_id = workspace_id(workspace);
    s.model = c.name;
    s.layers = c.num_layers, s.kv_heads = c.num_kv_heads, s.head_dim = c.head_dim;
    s.hidden = c.hidden_size, s.q_size = c.q_size(), s.intermediate = c.intermediate_size;
    s.samples = n, s.seqlen = opt.seqlen;
    s.dataset = dataset.substr(dataset.find_last_of('/') + 1);
    BatchPlan plan;
    for (int i = 0; i < n; ++i) {
        const int64_t off = n > 1 ? span * i / (n - 1) : 0;
        std::vector<int> seq(ids.begin() + off, ids.begin() + off + body);
        if (bos >= 0) seq.insert(seq.begin(), bos);
        for (int from = 0; from < int(seq.size()); from += chunk) {
            const int to = std::min(int(seq.size()), from + chunk);
            plan.clear();
            BatchPlan::Seq q;
            q.row_begin = 0, q.n_rows = to - from, q.ctx_len = to;
            q.blocks = blocks.data(), q.n_blocks = int(blocks.size());
            for (int p = from; p < to; ++p) plan.tokens.push_back(seq[size_t(p)]), plan.positions.push_back(p);
            plan.seqs.push_back(q);
            be->forward(plan);
        }
        s.tokens += int64_t(seq.size());
        if (opt.progress) opt.progress(i + 1, n);
    }
    col.export_to(s);
    return s;
}

std::string calib_stats_bytes(const CalibStats& s) {
    std::string h = "{\"format\": \"tm-calib-stats\", \"version\": " + std::to_string(s.version) +
                    ", \"workspace_id\": " + json_quote(s.workspace_id) + ", \"model\": " + json_quote(s.model) +
                    ", \"layers\": " + std::to_string(s.layers) + ", \"kv_heads\": " + std::to_string(s.kv_heads) +
                    ", \"head_dim\": " + std::to_string(s.head_dim) + ", \"hidden\": " + std::to_string(s.hidden) +
                    ", \"q_size\": " + std::to_string(s.q_size) + ", \"intermediate\": " + std::to_string(s.intermediate) +
                    ", \"samples\": " + std::to_string(s.samples) + ", \"seqlen\": " + std::to_string(s.seqlen) +
                    ", \"tokens\": " + std::to_string(s.tokens) + ", \"dataset\": " + json_quote(s.dataset) + ", \"arrays\": [";
    for (size_t i = 0; i < s.arrays.size(); ++i) {
        h += i ? ", " : "";
        h += "{\"name\": " + json_quote(s.arrays[i].name) + ", \"shape\": [";
        for (size_t k = 0; k < s.arrays[i].shape.size(); ++k) h += (k ? ", " : "") + std::to_string(s.arrays[i].shape[k]);
        h += "]}";
    }
    h += "]}\n";
    std::string raw = h;
    for (auto& a : s.arrays) raw.append(reinterpret_cast<const char*>(a.data.data()), a.data.size() * 4);
    std::string out(ZSTD_compressBound(raw.size()), '\0');
    size_t n = ZSTD_compress(out.data(), out.size(), raw.data(), raw.size(), 9);
    if (ZSTD_isError(n)) throw Error(std::string("zstd: ") + ZSTD_getErrorName(n));
    out.resize(n);
    return out;
}

CalibStats parse_calib_stats(const std::string& bytes, const std::string& what) {
    if (bytes.empty()) throw Error(what + ": empty (no statistics)");
    unsigned long long size = ZSTD_getFrameContentSize(bytes.data(), bytes.size());
    if (size == ZSTD_CONTENTSIZE_ERROR || size == ZSTD_CONTENTSIZE_UNKNOWN || size > (1ull << 34))
        throw Error(what + ": not a tm-calib statistics file (not zstd)");
    std::string raw(size_t(size), '\0');
    size_t n = ZSTD_decompress(raw.data(), raw.size(), bytes.data(), bytes.size());
    if (ZSTD_isError(n) || n != size) throw Error(what + ": truncated or corrupt (" +
                                                  std::string(ZSTD_isError(n) ? ZSTD_getErrorName(n) : "short") + ")");
    const size_t nl = raw.find('\n');
    if (nl == std::string::npos) throw Error(what + ": no header");
    simdjson::dom::parser parser;
    simdjson::dom::element h;
    if (parser.parse(raw.data(), nl).get(h)) throw Error(what + ": malformed header");
    std::string_view fmt;
    if (h["format"].get(fmt) || fmt != "tm-calib-stats") throw Error(what + ": not a tm-calib statistics file");
    CalibStats s;
    int64_t v;
    auto geti = [&](const char* k) {
        int64_t x;
        if (h[k].get(x)) throw Error(what + ": header lacks \"" + k + "\"");
        return x;
    };
    auto gets = [&](const char* k) {
        std::string_view x;
        if (h[k].get(x)) throw Error(what + ": header lacks \"" + k + "\"");
        return std::string(x);
    };
    v = geti("version");
    if (v != 1) throw Error(what + ": statistics format version " + std::to_string(v) + " (this build reads 1)");
    s.workspace_id = gets("workspace_id");
    s.model = gets("model");
    s.dataset = gets("dataset");
    s.layers = int(geti("layers")), s.kv_heads = int(geti("kv_heads")), s.head_dim = int(geti("head_dim"));
    s.hidden = int(geti("hidden")), s.q_size = int(geti("q_size")), s.intermediate = int(geti("intermediate"));
    s.samples = int(geti("samples")), s.seqlen = int(geti("seqlen")), s.tokens = geti("tokens");
    simdjson::dom::array arrs;
    if (h["arrays"].get(arrs)) throw Error(what + ": header lacks \"arrays\"");
    size_t at = nl + 1;
    for (auto a : arrs) {
        CalibArray ca;
        std::string_view name;
        simdjson::dom::array shape;
        if (a["name"].get(name) || a["shape"].get(shape)) throw Error(what + ": malformed array entry");
        ca.name = std::string(name);
        size_t count = 1;
        for (auto d : shape) {
            int64_t x;
            if (d.get(x) || x < 0 || x > (1 << 30)) throw Error(what + ": " + ca.name + ": bad shape");
            ca.shape.push_back(x);
            count *= size_t(x);
        }
        if (at + count * 4 > raw.size()) throw Error(what + ": truncated (" + ca.name + ")");
        ca.data.resize(count);
        std::memcpy(ca.data.data(), raw.data() + at, count * 4);
        at += count * 4;
        s.arrays.push_back(std::move(ca));
    }
    if (at != raw.size()) throw Error(what + ": trailing bytes after the arrays");
    return s;
}

}  // namespace tmc
