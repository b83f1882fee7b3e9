#include "io/safetensors.hpp"

#include <dirent.h>

#include <algorithm>
#include <set>
#include <simdjson.h>

#include "tm/error.hpp"

namespace tmc {

namespace {

// The reference implementation refuses headers over 100 MB.
constexpr uint64_t kMaxHeader = 100ull << 20;

[[noreturn]] void fail(const std::string& path, const std::string& what) {
    throw Error(path + ": " + what);
}

bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) {
    return __builtin_mul_overflow(a, b, out);
}

}  // namespace

int64_t TensorView::numel() const {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : file_(path) {
    const size_t size = file_.size();
    if (size < 8) fail(path, "file too small for a safetensors header (" + std::to_string(size) + " bytes)");
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; --i) hlen = (hlen << 8) | file_.data()[i];
    if (hlen > size - 8)
        fail(path, "header length " + std::to_string(hlen) + " exceeds file size " +
                       std::to_string(size));
    if (hlen > kMaxHeader) fail(path, "header length " + std::to_string(hlen) + " is over 100 MB");
    const uint8_t* data = file_.data() + 8 + hlen;
    const size_t data_size = size - 8 - hlen;

    simdjson::dom::parser parser;
    simdjson::padded_string header(reinterpret_cast<const char*>(file_.data() + 8), hlen);
    simdjson::dom::element root;
    if (auto err = parser.parse(header).get(root))
        fail(path, std::string("header is not valid JSON: ") + simdjson::error_message(err));
    simdjson::dom::object obj;
    if (root.get(obj)) fail(path, "header is not a JSON object");

    struct Span {
        uint64_t begin, end;
        size_t idx;
    };
    std::vector<Span> spans;
    std::set<std::string> seen;
    for (auto field : obj) {
        std::string name(field.key);
        if (name == "__metadata__") continue;
        if (!seen.insert(name).second) fail(path, "tensor " + name + " appears twice");
        simdjson::dom::object t;
        if (field.value.get(t)) fail(path, "tensor " + name + ": entry is not an object");
        std::string_view dts;
        if (t["dtype"].get(dts)) fail(path, "tensor " + name + ": missing or non-string dtype");
        auto dt = dtype_from_safetensors(dts);
        if (!dt) fail(path, "tensor " + name + ": unknown dtype " + std::string(dts));
        simdjson::dom::array shape, offs;
        if (t["shape"].get(shape)) fail(path, "tensor " + name + ": missing shape");
        if (t["data_offsets"].get(offs)) fail(path, "tensor " + name + ": missing data_offsets");
        TensorView v;
        v.name = name;
        v.dtype = *dt;
        v.file = path;
        uint64_t numel = 1;
        for (auto d : shape) {
            int64_t x;
            if (d.get(x) || x < 0) fail(path, "tensor " + name + ": shape holds a non-integer or negative");
            if (mul_overflows(numel, uint64_t(x), &numel)) fail(path, "tensor " + name + ": shape overflows");
            v.shape.push_back(x);
        }
        uint64_t o[2];
        size_t k = 0;
        for (auto d : offs) {
            if (k >= 2 || d.get(o[k])) fail(path, "tensor " + name + ": data_offsets must be two unsigned integers");
            ++k;
        }
        if (k != 2) fail(path, "tensor " + name + ": data_offsets must be two unsigned integers");
        if (o[1] < o[0]) fail(path, "tensor " + name + ": data_offsets end before begin");
        if (o[1] > data_size)
            fail(path, "tensor " + name + ": data_offsets [" + std::to_string(o[0]) + ", " +
                           std::to_string(o[1]) + "] outside the data (" + std::to_string(data_size) +
                           " bytes)");
        uint64_t want;
        if (mul_overflows(numel, dtype_size(v.dtype), &want) || want != o[1] - o[0])
            fail(path, "tensor " + name + ": shape needs " + std::to_string(numel * dtype_size(v.dtype)) +
                           " bytes but data_offsets span " + std::to_string(o[1] - o[0]));
        v.data = data + o[0];
        v.bytes = o[1] - o[0];
        spans.push_back({o[0], o[1], tensors_.size()});
        tensors_.push_back(std::move(v));
    }
    std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
    for (size_t i = 1; i < spans.size(); ++i)
        if (spans[i].begin < spans[i - 1].end)
            fail(path, "tensors " + tensors_[spans[i - 1].idx].name + " and " + tensors_[spans[i].idx].name +
                           " overlap");
}

SafetensorsModel::SafetensorsModel(const std::string& dir) {
    std::vector<std::string> paths;
    const std::string single = dir + "/model.safetensors";
    const std::string index = dir + "/model.safetensors.index.json";
    if (path_exists(index)) {
        simdjson::dom::parser parser;
        simdjson::dom::element root;
        simdjson::padded_string text(read_file(index));
        if (parser.parse(text).get(root)) throw Error(index + ": not valid JSON");
        simdjson::dom::object wm;
        if (root["weight_map"].get(wm)) throw Error(index + ": missing weight_map");
        std::set<std::string> shards;
        for (auto f : wm) {
            std::string_view s;
            if (f.value.get(s)) throw Error(index + ": weight_map values must be file names");
            if (s.find('/') != std::string_view::npos) throw Error(index + ": shard name " + std::string(s) + " has a '/'");
            shards.insert(std::string(s));
        }
        for (auto& s : shards) paths.push_back(dir + "/" + s);
    } else if (path_exists(single)) {
        paths.push_back(single);
    } else {
        DIR* d = opendir(dir.c_str());
        if (!d) throw Error(dir + ": cannot open directory");
        while (auto* e = readdir(d)) {
            std::string n = e->d_name;
            if (n.size() > 12 && n.compare(n.size() - 12, 12, ".safetensors") == 0) paths.push_back(dir + "/" + n);
        }
        closedir(d);
        std::sort(paths.begin(), paths.end());
        if (paths.empty()) throw Error(dir + ": no model.safetensors (nor shards with an index)");
    }
    for (auto& p : paths) {
        files_.push_back(std::make_unique<SafetensorsFile>(p));
        for (auto& t : files_.back()->tensors()) {
            if (!index_.emplace(t.name, &t).second)
                throw Error(p + ": tensor " + t.name + " also appears in another shard");
        }
    }
}

const TensorView* SafetensorsModel::find(const std::string& name) const {
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : it->second;
}

const TensorView& SafetensorsModel::get(const std::string& name) const {
    auto* t = find(name);
    if (!t) throw Error("tensor " + name + " not found in the model's safetensors");
    return *t;
}

size_t SafetensorsModel::total_bytes() const {
    size_t n = 0;
    for (auto& [k, v] : index_) n += v->bytes;
    return n;
}

std::vector<std::string> SafetensorsModel::names() const {
    std::vector<std::string> out;
    for (auto& [k, v] : index_) out.push_back(k);
    return out;
}

}  // namespace tmc
