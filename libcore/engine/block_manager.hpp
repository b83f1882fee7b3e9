// BlockManager: the KV cache pool as fixed-size blocks with reference
// counts. A sequence's block table lists the blocks that hold its tokens in
// order; block i holds positions [i * block_size, (i + 1) * block_size).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace tmc {

class BlockManager {
public:
    BlockManager(int num_blocks, int block_size);

    int num_blocks() const { return int(refs_.size()); }
    int block_size() const { return block_size_; }
    int num_free() const { return int(free_.size()); }
    int blocks_for(int64_t tokens) const { return int((tokens + block_size_ - 1) / block_size_); }

    // Grows `table` to cover `tokens` tokens. False (table unchanged) when
    // the pool does not have enough free blocks.
    bool reserve(std::vector<int>& table, int64_t tokens);
    // How many tokens `table` could cover if every free block went to it.
    int64_t capacity(const std::vector<int>& table) const {
        return int64_t(table.size() + free_.size()) * block_size_;
    }
    // Releases the blocks past those covering `tokens` tokens.
    void truncate(std::vector<int>& table, int64_t tokens);
    void release_all(std::vector<int>& table) { truncate(table, 0); }

    // Another holder of block b (prefix sharing); released by release().
    void retain(int b);
    void release(int b);
    int refcount(int b) const { return refs_[size_t(b)]; }

private:
    int block_size_;
    std::vector<int> refs_;
    std::vector<int> free_;  // a stack: recently freed blocks are reused first
};

}  // namespace tmc
