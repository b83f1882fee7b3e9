#include "engine/block_manager.hpp"

#include "tm/error.hpp"

namespace tmc {

BlockManager::BlockManager(int num_blocks, int block_size) : block_size_(block_size) {
    if (num_blocks <= 0 || block_size <= 0) throw Error("KV cache: need at least one block of at least one token");
    refs_.assign(size_t(num_blocks), 0);
    free_.reserve(size_t(num_blocks));
    for (int b = num_blocks - 1; b >= 0; --b) free_.push_back(b);
}

bool BlockManager::reserve(std::vector<int>& table, int64_t tokens) {
    const int need = blocks_for(tokens) - int(table.size());
    if (need <= 0) return true;
    if (need > int(free_.size())) return false;
    for (int i = 0; i < need; ++i) {
        int b = free_.back();
        free_.pop_back();
        refs_[size_t(b)] = 1;
        table.push_back(b);
    }
    return true;
}

void BlockManager::truncate(std::vector<int>& table, int64_t tokens) {
    const size_t keep = size_t(blocks_for(tokens));
    while (table.size() > keep) {
        release(table.back());
        table.pop_back();
    }
}

void BlockManager::retain(int b) {
    if (refs_[size_t(b)] <= 0) throw Error("KV cache: retain of a free block");
    ++refs_[size_t(b)];
}

void BlockManager::release(int b) {
    if (refs_[size_t(b)] <= 0) throw Error("KV cache: release of a free block");
    if (--refs_[size_t(b)] == 0) free_.push_back(b);
}

}  // namespace tmc
