// The workspace: a directory the engine loads (formats/workspace.md).
//
//   WS/config.ini       [model] + [engine], human-editable
//   WS/manifest.json    format version; every file with dtype, shape, bytes, xxh64
//   WS/tokenizer/       tokenizer.json, tokenizer_config.json, generation_config.json
//   WS/weights/rankR/   one raw little-endian file per tensor, named <tensor>.bin
//
// Workspace reads and validates it; convert_hf_model() writes one from a
// Hugging Face model directory, atomically.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "tm/dtype.hpp"
#include "tm/model_config.hpp"

namespace tmc {

class MappedFile;

constexpr int kWorkspaceFormatVersion = 1;

struct ManifestEntry {
    std::string path;  // relative to the workspace
    bool is_tensor = false;
    DType dtype = DType::U8;        // tensors only
    std::vector<int64_t> shape;     // tensors only
    uint64_t bytes = 0;
    uint64_t xxh64 = 0;
};

struct Manifest {
    int format_version = kWorkspaceFormatVersion;
    int tp = 1;
    std::vector<ManifestEntry> files;

    std::string to_json() const;
    // Throws tmc::Error "<path>: ..." on anything malformed or of another version.
    static Manifest parse(const std::string& text, const std::string& path);
};

// A tensor of one rank, mapped from its file.
struct WeightView {
    DType dtype = DType::U8;
    std::vector<int64_t> shape;
    const void* data = nullptr;
    size_t bytes = 0;
    int64_t numel() const {
        int64_t n = 1;
        for (auto d : shape) n *= d;
        return n;
    }
};

class Workspace {
public:
    // Reads config.ini and manifest.json; checks the format version, that
    // every listed file exists with its listed size, and that every tensor's
    // byte count matches its dtype and shape. Checksums are left to verify().
    explicit Workspace(const std::string& dir);
    ~Workspace();

    const std::string& dir() const { return dir_; }
    const ModelConfig& model() const { return model_; }
    const EngineConfig& engine() const { return engine_; }
    const Manifest& manifest() const { return manifest_; }
    int tp() const { return manifest_.tp; }
    std::string tokenizer_dir() const { return dir_ + "/tokenizer"; }

    bool has_tensor(int rank, const std::string& name) const;
    // Maps the file of tensor `name` of `rank` (once; later calls reuse the
    // mapping). Throws tmc::Error if absent or malformed.
    WeightView tensor(int rank, const std::string& name) const;
    // Any tensor file of the manifest, by its path relative to the workspace.
    WeightView tensor_at(const std::string& rel) const;
    bool has_file(const std::string& rel) const;

    // Recomputes every file's checksum. Returns one line per problem.
    std::vector<std::string> verify(const std::function<void(size_t done, size_t total)>& progress = {}) const;

    static std::string tensor_path(int rank, const std::string& name);

private:
    std::string dir_;
    ModelConfig model_;
    EngineConfig engine_;
    Manifest manifest_;
    std::map<std::string, const ManifestEntry*> by_path_;
    mutable std::mutex mu_;
    mutable std::map<std::string, std::unique_ptr<MappedFile>> maps_;
};

struct ConvertOptions {
    int tp = 1;
    std::optional<DType> dtype;  // default: the model's own (bf16 or fp16)
    std::string model_name;      // default: the HF directory's name
    bool force = false;          // replace an existing workspace
    const std::atomic<bool>* cancel = nullptr;
    // Called after each tensor file is written.
    std::function<void(size_t tensors_done, size_t tensors_total, size_t bytes_written)> progress;
};

struct ConvertStats {
    size_t tensors = 0;
    size_t bytes = 0;  // bytes of weight files written
};

// Converts a Hugging Face model directory into a workspace at `out`. Writes
// into a temporary directory beside `out` and renames it into place last: on
// any failure (or cancellation) nothing is left behind.
ConvertStats convert_hf_model(const std::string& hf_dir, const std::string& out, const ConvertOptions& opt);

}  // namespace tmc
