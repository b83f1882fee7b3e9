// The BPE model: a vocabulary and ranked merges, applied to one pre-token
// ("word") at a time. Tokens are kept as the bytes they stand for: a
// byte-level vocabulary (GPT-2 style, "Ġthe") is mapped back to raw bytes at
// load time, so the model works on text bytes directly and decoding is a
// concatenation.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace tmc {

struct BpeOptions {
    bool byte_level = false;    // initial symbols are single bytes; else UTF-8 chars
    bool byte_fallback = false;  // unknown chars become <0xXX> tokens
    bool fuse_unk = false;
    bool ignore_merges = false;  // a word found whole in the vocabulary is one token
    int unk_id = -1;
};

class BpeModel {
public:
    BpeModel() = default;
    void init(BpeOptions opt, std::vector<std::string> id_to_bytes,
              const std::vector<std::pair<std::string, std::string>>& merges, const std::string& source);

    // Appends the ids of one word to out.
    void encode_word(std::string_view word, std::vector<int>& out) const;

    int size() const { return int(tokens_.size()); }
    const std::string& token_bytes(int id) const { return tokens_[size_t(id)]; }
    int find(std::string_view bytes) const {
        auto it = vocab_.find(std::string(bytes));
        return it == vocab_.end() ? -1 : it->second;
    }
    const BpeOptions& options() const { return opt_; }
    int byte_token(uint8_t b) const { return byte_tokens_[b]; }

private:
    struct MergeTo {
        int rank;
        int id;
    };
    static uint64_t key(int a, int b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }
    void merge_symbols(std::vector<int>& syms) const;
    void initial_symbols(std::string_view word, std::vector<int>& syms) const;

    BpeOptions opt_;
    std::vector<std::string> tokens_;
    std::unordered_map<std::string, int> vocab_;
    std::unordered_map<uint64_t, MergeTo> merges_;
    int byte_tokens_[256];  // <0xXX> (fallback) or the single-byte token (byte-level); -1 if none

    // Word cache: most words recur; capped, cleared when full.
    mutable std::mutex cache_mu_;
    mutable std::unordered_map<std::string, std::vector<int>> cache_;
};

}  // namespace tmc
