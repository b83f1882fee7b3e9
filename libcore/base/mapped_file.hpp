// A read-only memory mapping of a whole file. Weight files are mapped, never
// read into buffers: the page cache is the only copy on the CPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "tm/files.hpp"

namespace tmc {

class MappedFile {
public:
    MappedFile() = default;
    // Throws tmc::Error naming the path if it cannot be opened or mapped.
    explicit MappedFile(const std::string& path);
    ~MappedFile();
    MappedFile(MappedFile&& o) noexcept;
    MappedFile& operator=(MappedFile&& o) noexcept;
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;

    const uint8_t* data() const { return data_; }
    size_t size() const { return size_; }
    const std::string& path() const { return path_; }

private:
    std::string path_;
    const uint8_t* data_ = nullptr;
    size_t size_ = 0;
};

}  // namespace tmc
