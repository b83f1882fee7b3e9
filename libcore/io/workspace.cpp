#include "tm/workspace.hpp"

#include <simdjson.h>
#include <sys/stat.h>
#include <xxhash.h>

#include <set>
#include <sstream>

#include "tm/json_write.hpp"
#include "base/mapped_file.hpp"
#include "tm/error.hpp"

namespace tmc {

namespace {

std::string hex64(uint64_t v) {
    char buf[17];
    snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
    return buf;
}

bool safe_relpath(const std::string& p) {
    if (p.empty() || p[0] == '/') return false;
    std::stringstream ss(p);
    std::string part;
    while (std::getline(ss, part, '/'))
        if (part.empty() || part == "." || part == "..") return false;
    return true;
}

}  // namespace

std::string Manifest::to_json() const {
    std::string o = "{\n  \"format\": \"tm-workspace\",\n  \"format_version\": " + std::to_string(format_version) +
                    ",\n  \"tp\": " + std::to_string(tp) + ",\n  \"files\": [\n";
    for (size_t i = 0; i < files.size(); ++i) {
        const auto& f = files[i];
        o += "    {\"path\": " + json_quote(f.path);
        if (f.is_tensor) {
            o += ", \"dtype\": \"" + std::string(dtype_name(f.dtype)) + "\", \"shape\": [";
            for (size_t k = 0; k < f.shape.size(); ++k) o += (k ? ", " : "") + std::to_string(f.shape[k]);
            o += "]";
        }
        o += ", \"bytes\": " + std::to_string(f.bytes) + ", \"xxh64\": \"" + hex64(f.xxh64) + "\"}";
        o += i + 1 < files.size() ? ",\n" : "\n";
    }
    o += "  ]\n}\n";
    return o;
}

Manifest Manifest::parse(const std::string& text, const std::string& path) {
    simdjson::dom::parser parser;
    simdjson::padded_string pt(text);
    simdjson::dom::element root;
    if (auto err = parser.parse(pt).get(root))
        throw Error(path + ": not valid JSON: " + simdjson::error_message(err));
    std::string_view fmt;
    if (root["format"].get(fmt) || fmt != "tm-workspace") throw Error(path + ": not a tm workspace manifest");
    int64_t ver, tp;
    if (root["format_version"].get(ver)) throw Error(path + ": missing format_version");
    if (ver != kWorkspaceFormatVersion)
        throw Error(path + ": format version " + std::to_string(ver) + ", this build reads version " +
                    std::to_string(kWorkspaceFormatVersion) + " (convert the model again)");
    if (root["tp"].get(tp) || tp < 1 || tp > 1024) throw Error(path + ": missing or invalid tp");
    Manifest m;
    m.format_version = int(ver);
    m.tp = int(tp);
    simdjson::dom::array files;
    if (root["files"].get(files)) throw Error(path + ": missing files");
    std::set<std::string> seen;
    for (auto f : files) {
        ManifestEntry e;
        std::string_view p, dt, sum;
        if (f["path"].get(p)) throw Error(path + ": a file entry has no path");
        e.path = std::string(p);
        if (!safe_relpath(e.path)) throw Error(path + ": unsafe path " + e.path);
        if (!seen.insert(e.path).second) throw Error(path + ": " + e.path + " listed twice");
        if (f["bytes"].get(e.bytes)) throw Error(path + ": " + e.path + ": missing bytes");
        if (f["xxh64"].get(sum) || sum.size() != 16) throw Error(path + ": " + e.path + ": missing xxh64");
        try {
            size_t pos;
            e.xxh64 = std::stoull(std::string(sum), &pos, 16);
            if (pos != 16) throw 0;
        } catch (...) {
            throw Error(path + ": " + e.path + ": malformed xxh64");
        }
        if (!f["dtype"].get(dt)) {
            auto d = dtype_from_name(dt);
            if (!d) throw Error(path + ": " + e.path + ": unknown dtype " + std::string(dt));
            e.is_tensor = true;
            e.dtype = *d;
            simdjson::dom::array shape;
            if (f["shape"].get(shape)) throw Error(path + ": " + e.path + ": tensor without shape");
            uint64_t n = dtype_size(e.dtype);
            for (auto d2 : shape) {
                int64_t x;
                if (d2.get(x) || x < 0) throw Error(path + ": " + e.path + ": bad shape");
                if (__builtin_mul_overflow(n, uint64_t(x), &n)) throw Error(path + ": " + e.path + ": shape overflows");
                e.shape.push_back(x);
            }
            if (n != e.bytes)
                throw Error(path + ": " + e.path + ": shape and dtype need " + std::to_string(n) + " bytes, listed " +
                            std::to_string(e.bytes));
        }
        m.files.push_back(std::move(e));
    }
    return m;
}

std::string Workspace::tensor_path(int rank, const std::string& name) {
    return "weights/rank" + std::to_string(rank) + "/" + name + ".bin";
}

Workspace::Workspace(const std::string& dir) : dir_(dir) {
    if (!is_directory(dir)) throw Error(dir + ": not a directory");
    const std::string mpath = dir + "/manifest.json", cpath = dir + "/config.ini";
    if (!path_exists(mpath)) throw Error(mpath + ": not found (is " + dir + " a tm workspace?)");
    manifest_ = Manifest::parse(read_file(mpath), mpath);
    parse_config_ini(read_file(cpath), cpath, &model_, &engine_);
    if (engine_.tp != manifest_.tp)
        throw Error(cpath + ": tp = " + std::to_string(engine_.tp) + " but the weights are split for tp " +
                    std::to_string(manifest_.tp) + " (convert again with --tp)");
    for (auto& e : manifest_.files) {
        by_path_[e.path] = &e;
        struct stat st;
        std::string full = dir + "/" + e.path;
        if (::stat(full.c_str(), &st) != 0) throw Error(full + ": missing (listed in the manifest)");
        if (uint64_t(st.st_size) != e.bytes)
            throw Error(full + ": " + std::to_string(st.st_size) + " bytes, the manifest says " +
                        std::to_string(e.bytes));
    }
}

Workspace::~Workspace() = default;

bool Workspace::has_tensor(int rank, const std::string& name) const {
    return by_path_.count(tensor_path(rank, name)) > 0;
}

WeightView Workspace::tensor(int rank, const std::string& name) const {
    const std::string rel = tensor_path(rank, name);
    if (!by_path_.count(rel))
        throw Error(dir_ + "/" + rel + ": tensor " + name + " of rank " + std::to_string(rank) +
                    " is not in the manifest");
    return tensor_at(rel);
}

bool Workspace::has_file(const std::string& rel) const { return by_path_.count(rel) != 0; }

WeightView Workspace::tensor_at(const std::string& rel) const {
    auto it = by_path_.find(rel);
    if (it == by_path_.end() || !it->second->is_tensor)
        throw Error(dir_ + "/" + rel + ": not a tensor of the manifest");
    std::lock_guard<std::mutex> lk(mu_);
    auto& mf = maps_[rel];
    if (!mf) {
        auto m = std::make_unique<MappedFile>(dir_ + "/" + rel);
        if (m->size() != it->second->bytes)
            throw Error(m->path() + ": size changed since the workspace was opened");
        mf = std::move(m);
    }
    WeightView v;
    v.dtype = it->second->dtype;
    v.shape = it->second->shape;
    v.data = mf->data();
    v.bytes = mf->size();
    return v;
}

std::vector<std::string> Workspace::verify(const std::function<void(size_t, size_t)>& progress) const {
    std::vector<std::string> problems;
    size_t total = 0, done = 0;
    for (auto& e : manifest_.files) total += e.bytes;
    for (auto& e : manifest_.files) {
        const std::string full = dir_ + "/" + e.path;
        try {
            MappedFile f(full);
            if (f.size() != e.bytes) {
                problems.push_back(full + ": " + std::to_string(f.size()) + " bytes, the manifest says " +
                                   std::to_string(e.bytes));
                continue;
            }
            uint64_t h = XXH64(f.data(), f.size(), 0);
            if (h != e.xxh64)
                problems.push_back(full + ": checksum mismatch (manifest " + hex64(e.xxh64) + ", file " + hex64(h) +
                                   ")");
        } catch (const Error& err) {
            problems.push_back(err.what());
        }
        done += e.bytes;
        if (progress) progress(done, total);
    }
    return problems;
}

}  // namespace tmc
