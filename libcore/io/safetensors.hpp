// Safetensors reader. The format: an 8-byte little-endian header length N,
// N bytes of JSON mapping tensor names to {dtype, shape, data_offsets}, then
// the data. The file is mmap'd; a tensor is a view into the mapping.
//
// The reader trusts nothing: the header length must fit in the file, the
// JSON must parse, every dtype must be known, offsets must lie inside the
// data area, must not overlap, and must span exactly prod(shape) elements.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "base/mapped_file.hpp"
#include "tm/dtype.hpp"

namespace tmc {

struct TensorView {
    std::string name;
    DType dtype = DType::F32;
    std::vector<int64_t> shape;
    const uint8_t* data = nullptr;
    size_t bytes = 0;
    std::string file;  // the file it came from, for error messages

    int64_t numel() const;
};

class SafetensorsFile {
public:
    // Throws tmc::Error "<path>: <what is wrong>".
    explicit SafetensorsFile(const std::string& path);
    const std::vector<TensorView>& tensors() const { return tensors_; }
    const std::string& path() const { return file_.path(); }

private:
    MappedFile file_;
    std::vector<TensorView> tensors_;
};

// A model's weights, from model.safetensors, or from the shards named by
// model.safetensors.index.json, or from every *.safetensors in the directory.
class SafetensorsModel {
public:
    explicit SafetensorsModel(const std::string& dir);
    const TensorView* find(const std::string& name) const;
    // Throws tmc::Error naming the tensor when it is absent.
    const TensorView& get(const std::string& name) const;
    size_t total_bytes() const;
    size_t num_tensors() const { return index_.size(); }
    std::vector<std::string> names() const;

private:
    std::vector<std::unique_ptr<SafetensorsFile>> files_;
    std::map<std::string, const TensorView*> index_;
};

}  // namespace tmc
