// Hugging Face model directory -> workspace. The recipe, per rank:
// fuse q/k/v (rank's heads only) and gate/up (rank's columns only), slice wo
// and w2 by input columns, split an untied lm_head by vocabulary rows, copy
// norms and the embedding. Everything is written to a temporary directory
// beside the target and renamed into place at the end.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>

#include "base/mapped_file.hpp"
#include "io/safetensors.hpp"
#include "model/tp_split.hpp"
#include "model/weight_names.hpp"
#include "tm/error.hpp"
#include "tm/workspace.hpp"

namespace tmc {

namespace fs = std::filesystem;

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
    std::string o = "[";
    for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
    return o + "]";
}

void expect_shape(const TensorView& t, std::vector<int64_t> want) {
    if (t.shape != want)
        throw Error(t.file + ": tensor " + t.name + " has shape " + shape_str(t.shape) + ", expected " +
                    shape_str(want));
    if (t.dtype != DType::F32 && t.dtype != DType::F16 && t.dtype != DType::BF16)
        throw Error(t.file + ": tensor " + t.name + " has dtype " + dtype_name(t.dtype) +
                    ", expected a float type");
}

// A piece of a source tensor: rows [row0, row0+nrows) x cols [col0, col0+ncols)
// (a 1-D tensor is one column).
struct Piece {
    const TensorView* src;
    int64_t row0, nrows, col0, ncols;
};

Piece rows(const TensorView& t, int64_t r0, int64_t n) {
    int64_t cols = t.shape.size() > 1 ? t.shape[1] : 1;
    return {&t, r0, n, 0, cols};
}
Piece cols(const TensorView& t, int64_t c0, int64_t n) { return {&t, 0, t.shape[0], c0, n}; }

// Owns the temporary directory until commit(); removes it otherwise.
class WorkspaceWriter {
public:
    WorkspaceWriter(const std::string& out, bool force) : out_(fs::path(out).lexically_normal().string()) {
        if (out_.empty() || out_ == "." || out_ == "/") throw Error(out + ": not a valid workspace path");
        if (!out_.empty() && out_.back() == '/') out_.pop_back();
        if (path_exists(out_) && !force) throw Error(out_ + ": already exists (use --force to replace it)");
        fs::path parent = fs::path(out_).parent_path();
        if (parent.empty()) parent = ".";
        std::error_code mk;
        fs::create_directories(parent, mk);  // like `git clone a/b/c`: parents are made
        if (!is_directory(parent.string())) throw Error(parent.string() + ": cannot create directory");
        std::string tmpl = (parent / ("." + fs::path(out_).filename().string() + ".tmp-XXXXXX")).string();
        std::vector<char> buf(tmpl.begin(), tmpl.end());
        buf.push_back(0);
        if (!mkdtemp(buf.data())) throw Error(parent.string() + ": cannot create a directory: " + std::strerror(errno));
        tmp_ = buf.data();
    }
    ~WorkspaceWriter() {
        if (!committed_) {
            std::error_code ec;
            fs::remove_all(tmp_, ec);
        }
    }

    void write(const std::string& rel, const void* data, size_t n, ManifestEntry e) {
        fs::path full = fs::path(tmp_) / rel;
        std::error_code ec;
        fs::create_directories(full.parent_path(), ec);
        if (ec) throw Error(full.parent_path().string() + ": " + ec.message());
        int fd = ::open(full.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (fd < 0) throw Error(full.string() + ": " + std::strerror(errno));
        const char* p = static_cast<const char*>(data);
        size_t left = n;
        while (left) {
            ssize_t w = ::write(fd, p, left);
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) {
                int err = errno;
                ::close(fd);
                throw Error(full.string() + ": write failed: " + std::strerror(err));
            }
            p += w;
            left -= size_t(w);
        }
        if (::close(fd) != 0) throw Error(full.string() + ": close failed: " + std::strerror(errno));
        e.path = rel;
        e.bytes = n;
        e.xxh64 = XXH64(data, n, 0);
        manifest_.files.push_back(std::move(e));
    }

    void commit(const ModelConfig& m, const EngineConfig& ec_, bool force) {
        manifest_.tp = ec_.tp;
        std::string ini = config_ini_text(m, ec_);
        write_plain("config.ini", ini);
        write_plain("manifest.json", manifest_.to_json());
        std::error_code ec;
        std::string old;
        if (path_exists(out_)) {
            if (!force) throw Error(out_ + ": already exists (use --force to replace it)");
            old = tmp_ + ".old";
            fs::rename(out_, old, ec);
            if (ec) throw Error(out_ + ": cannot move the old workspace aside: " + ec.message());
        }
        fs::rename(tmp_, out_, ec);
        if (ec) {
            if (!old.empty()) fs::rename(old, out_, ec);
            throw Error(out_ + ": cannot rename into place: " + ec.message());
        }
        committed_ = true;
        if (!old.empty()) fs::remove_all(old, ec);
    }

    Manifest manifest_;

private:
    void write_plain(const std::string& rel, const std::string& s) {
        fs::path full = fs::path(tmp_) / rel;
        FILE* f = fopen(full.c_str(), "wx");
        if (!f) throw Error(full.string() + ": " + std::strerror(errno));
        bool ok = fwrite(s.data(), 1, s.size(), f) == s.size();
        ok &= fclose(f) == 0;
        if (!ok) throw Error(full.string() + ": write failed");
    }

    std::string out_, tmp_;
    bool committed_ = false;
};

}  // namespace

ConvertStats convert_hf_model(const std::string& hf_dir, const std::string& out, const ConvertOptions& opt) {
    ModelConfig m = model_config_from_hf(hf_dir);
    m.name = opt.model_name.empty() ? fs::path(hf_dir).lexically_normal().filename().string() : opt.model_name;
    if (m.name.empty()) m.name = fs::absolute(hf_dir).lexically_normal().parent_path().filename().string();
    if (m.name.find('\n') != std::string::npos) throw Error("--model-name must be one line");
    const std::string tok_json = hf_dir + "/tokenizer.json";
    if (!path_exists(tok_json)) throw Error(tok_json + ": not found (the workspace needs the tokenizer)");
    SafetensorsModel st(hf_dir);
    const DType dt = opt.dtype.value_or(m.weight_dtype);
    if (dt != DType::BF16 && dt != DType::F16) throw Error("--dtype must be bf16 or fp16");
    m.weight_dtype = dt;
    const TpSplit sp = TpSplit::make(m, opt.tp);

    const int64_t H = m.hidden_size, hd = m.head_dim, V = m.vocab_size;
    auto L = [](int l, const char* s) { return "model.layers." + std::to_string(l) + "." + s; };

    // Check every source tensor first, so a bad model fails before any write.
    const TensorView& emb = st.get("model.embed_tokens.weight");
    expect_shape(emb, {V, H});
    expect_shape(st.get("model.norm.weight"), {H});
    const TensorView* lm_head = st.find("lm_head.weight");
    if (!m.tie_word_embeddings) {
        if (!lm_head) throw Error(hf_dir + ": lm_head.weight missing and tie_word_embeddings is false");
        expect_shape(*lm_head, {V, H});
    }
    for (int l = 0; l < m.num_layers; ++l) {
        expect_shape(st.get(L(l, "input_layernorm.weight")), {H});
        expect_shape(st.get(L(l, "post_attention_layernorm.weight")), {H});
        expect_shape(st.get(L(l, "self_attn.q_proj.weight")), {m.q_size(), H});
        expect_shape(st.get(L(l, "self_attn.k_proj.weight")), {m.kv_size(), H});
        expect_shape(st.get(L(l, "self_attn.v_proj.weight")), {m.kv_size(), H});
        expect_shape(st.get(L(l, "self_attn.o_proj.weight")), {H, m.q_size()});
        expect_shape(st.get(L(l, "mlp.gate_proj.weight")), {m.intermediate_size, H});
        expect_shape(st.get(L(l, "mlp.up_proj.weight")), {m.intermediate_size, H});
        expect_shape(st.get(L(l, "mlp.down_proj.weight")), {H, m.intermediate_size});
        if (m.attn_bias) {
            expect_shape(st.get(L(l, "self_attn.q_proj.bias")), {m.q_size()});
            expect_shape(st.get(L(l, "self_attn.k_proj.bias")), {m.kv_size()});
            expect_shape(st.get(L(l, "self_attn.v_proj.bias")), {m.kv_size()});
        }
        if (m.qk_norm) {
            expect_shape(st.get(L(l, "self_attn.q_norm.weight")), {hd});
            expect_shape(st.get(L(l, "self_attn.k_norm.weight")), {hd});
        }
    }

    WorkspaceWriter w(out, opt.force);
    const size_t per_rank = 2 + (m.tie_word_embeddings ? 0 : 1) +
                            size_t(m.num_layers) * (6 + (m.attn_bias ? 1 : 0) + (m.qk_norm ? 2 : 0));
    const size_t total = per_rank * size_t(opt.tp);
    ConvertStats stats;
    std::vector<uint8_t> buf;
    const size_t es = dtype_size(dt);

    auto emit = [&](int rank, const std::string& name, std::vector<int64_t> shape, std::vector<Piece> pieces) {
        if (opt.cancel && opt.cancel->load()) throw Interrupted();
        int64_t n = 1;
        for (auto d : shape) n *= d;
        buf.resize(size_t(n) * es);
        uint8_t* dst = buf.data();
        for (auto& p : pieces) {
            const size_t ses = dtype_size(p.src->dtype);
            const int64_t src_cols = p.src->shape.size() > 1 ? p.src->shape[1] : 1;
            for (int64_t r = 0; r < p.nrows; ++r) {
                const uint8_t* s = p.src->data + (size_t((p.row0 + r) * src_cols + p.col0)) * ses;
                convert_floats(p.src->dtype, s, dt, dst, size_t(p.ncols));
                dst += size_t(p.ncols) * es;
            }
        }
        if (dst != buf.data() + buf.size()) throw Error("internal error: " + name + " pieces do not fill the tensor");
        ManifestEntry e;
        e.is_tensor = true;
        e.dtype = dt;
        e.shape = std::move(shape);
        w.write(Workspace::tensor_path(rank, name), buf.data(), buf.size(), std::move(e));
        ++stats.tensors;
        stats.bytes += buf.size();
        if (opt.progress) opt.progress(stats.tensors, total, stats.bytes);
    };

    for (int r = 0; r < opt.tp; ++r) {
        emit(r, wname::kEmbedding, {V, H}, {rows(emb, 0, V)});
        emit(r, wname::kFinalNorm, {H}, {rows(st.get("model.norm.weight"), 0, H)});
        if (!m.tie_word_embeddings) {
            int64_t vr = sp.vocab_split ? V / opt.tp : V;
            emit(r, wname::kOutput, {vr, H}, {rows(*lm_head, sp.vocab_split ? r * vr : 0, vr)});
        }
        const int64_t q0 = int64_t(r) * sp.heads * hd, qn = int64_t(sp.heads) * hd;
        const int64_t k0 = int64_t(sp.kv_head_begin(r)) * hd, kn = int64_t(sp.kv_heads) * hd;
        const int64_t i0 = int64_t(r) * sp.inter, in = sp.inter;
        for (int l = 0; l < m.num_layers; ++l) {
            auto g = [&](const char* s) -> const TensorView& { return st.get(L(l, s)); };
            emit(r, wname::layer(l, wname::kAttnNorm), {H}, {rows(g("input_layernorm.weight"), 0, H)});
            emit(r, wname::layer(l, wname::kWqkv), {qn + 2 * kn, H},
                 {rows(g("self_attn.q_proj.weight"), q0, qn), rows(g("self_attn.k_proj.weight"), k0, kn),
                  rows(g("self_attn.v_proj.weight"), k0, kn)});
            if (m.attn_bias)
                emit(r, wname::layer(l, wname::kBqkv), {qn + 2 * kn},
                     {rows(g("self_attn.q_proj.bias"), q0, qn), rows(g("self_attn.k_proj.bias"), k0, kn),
                      rows(g("self_attn.v_proj.bias"), k0, kn)});
            if (m.qk_norm) {
                emit(r, wname::layer(l, wname::kQNorm), {hd}, {rows(g("self_attn.q_norm.weight"), 0, hd)});
                emit(r, wname::layer(l, wname::kKNorm), {hd}, {rows(g("self_attn.k_norm.weight"), 0, hd)});
            }
            emit(r, wname::layer(l, wname::kWo), {H, qn}, {cols(g("self_attn.o_proj.weight"), q0, qn)});
            emit(r, wname::layer(l, wname::kFfnNorm), {H}, {rows(g("post_attention_layernorm.weight"), 0, H)});
            emit(r, wname::layer(l, wname::kW13), {2 * in, H},
                 {rows(g("mlp.gate_proj.weight"), i0, in), rows(g("mlp.up_proj.weight"), i0, in)});
            emit(r, wname::layer(l, wname::kW2), {H, in}, {cols(g("mlp.down_proj.weight"), i0, in)});
        }
    }

    for (const char* f : {"tokenizer.json", "tokenizer_config.json", "generation_config.json",
                          "special_tokens_map.json"}) {
        std::string p = hf_dir + "/" + f;
        if (!path_exists(p)) continue;
        MappedFile mf(p);
        w.write(std::string("tokenizer/") + f, mf.data(), mf.size(), ManifestEntry{});
    }
    if (opt.cancel && opt.cancel->load()) throw Interrupted();
    EngineConfig ec;
    ec.tp = opt.tp;
    ec.session_len = 0;
    w.commit(m, ec, opt.force);
    return stats;
}

}  // namespace tmc
