#include "tokenizer/bpe.hpp"

#include <queue>

#include "tm/error.hpp"
#include "base/utf8.hpp"

namespace tmc {

void BpeModel::init(BpeOptions opt, std::vector<std::string> id_to_bytes,
                    const std::vector<std::pair<std::string, std::string>>& merges, const std::string& source) {
    opt_ = opt;
    tokens_ = std::move(id_to_bytes);
    vocab_.reserve(tokens_.size() * 2);
    for (size_t i = 0; i < tokens_.size(); ++i) vocab_.emplace(tokens_[i], int(i));
    for (int b = 0; b < 256; ++b) {
        byte_tokens_[b] = -1;
        if (opt_.byte_level) {
            byte_tokens_[b] = find(std::string(1, char(b)));
        } else if (opt_.byte_fallback) {
            char name[8];
            snprintf(name, sizeof name, "<0x%02X>", b);
            byte_tokens_[b] = find(name);
        }
    }
    merges_.reserve(merges.size() * 2);
    for (size_t r = 0; r < merges.size(); ++r) {
        int a = find(merges[r].first), b = find(merges[r].second);
        int m = find(merges[r].first + merges[r].second);
        if (a < 0 || b < 0 || m < 0)
            throw Error(source + ": merge " + std::to_string(r) + " names a token missing from the vocabulary");
        merges_.emplace(key(a, b), MergeTo{int(r), m});  // first (lowest rank) wins
    }
}

void BpeModel::initial_symbols(std::string_view word, std::vector<int>& syms) const {
    syms.clear();
    if (opt_.byte_level) {
        for (unsigned char c : word) {
            int id = byte_tokens_[c];
            if (id < 0) id = opt_.unk_id;
            if (id >= 0) syms.push_back(id);
        }
        return;
    }
    bool last_unk = false;
    for (size_t i = 0; i < word.size();) {
        size_t n = utf8::lead_len(static_cast<uint8_t>(word[i]));
        if (i + n > word.size()) n = word.size() - i;
        std::string_view ch = word.substr(i, n);
        i += n;
        int id = find(ch);
        if (id >= 0) {
            syms.push_back(id);
            last_unk = false;
            continue;
        }
        if (opt_.byte_fallback) {
            bool all = true;
            for (unsigned char c : ch) all &= byte_tokens_[c] >= 0;
            if (all) {
                for (unsigned char c : ch) syms.push_back(byte_tokens_[c]);
                last_unk = false;
                continue;
            }
        }
        if (opt_.unk_id < 0) throw Error("tokenizer: a character is not in the vocabulary and there is no unk token");
        if (!(opt_.fuse_unk && last_unk)) syms.push_back(opt_.unk_id);
        last_unk = true;
    }
}

// Applies merges lowest rank first, leftmost first among equal ranks: the
// order Hugging Face's BPE uses. Short words use a scan; long ones a heap.
void BpeModel::merge_symbols(std::vector<int>& syms) const {
    const size_t n = syms.size();
    if (n < 2) return;
    if (n <= 48) {
        for (;;) {
            int best_rank = INT32_MAX, best_id = -1;
            size_t best_pos = 0;
            for (size_t i = 0; i + 1 < syms.size(); ++i) {
                auto it = merges_.find(key(syms[i], syms[i + 1]));
                if (it != merges_.end() && it->second.rank < best_rank) {
                    best_rank = it->second.rank;
                    best_id = it->second.id;
                    best_pos = i;
                }
            }
            if (best_id < 0) return;
            syms[best_pos] = best_id;
            syms.erase(syms.begin() + long(best_pos) + 1);
        }
    }
    struct Cand {
        int rank;
        int pos;
        int id;  // the merged token
        int right;  // id of the right symbol when pushed (to detect staleness)
        bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::vector<int> prev(n), next(n);
    std::vector<char> alive(n, 1);
    for (size_t i = 0; i < n; ++i) {
        prev[i] = int(i) - 1;
        next[i] = i + 1 < n ? int(i + 1) : -1;
    }
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> pq;
    auto push = [&](int i) {
        if (i < 0 || next[size_t(i)] < 0) return;
        auto it = merges_.find(key(syms[size_t(i)], syms[size_t(next[size_t(i)])]));
        if (it != merges_.end()) pq.push({it->second.rank, i, it->second.id, syms[size_t(next[size_t(i)])]});
    };
    for (size_t i = 0; i + 1 < n; ++i) push(int(i));
    while (!pq.empty()) {
        Cand c = pq.top();
        pq.pop();
        size_t i = size_t(c.pos);
        if (!alive[i] || next[i] < 0) continue;
        size_t j = size_t(next[i]);
        auto it = merges_.find(key(syms[i], syms[j]));
        if (it == merges_.end() || it->second.id != c.id || syms[j] != c.right) continue;
        syms[i] = c.id;
        alive[j] = 0;
        next[i] = next[j];
        if (next[j] >= 0) prev[size_t(next[j])] = int(i);
        push(prev[i]);
        push(int(i));
    }
    size_t w = 0;
    for (size_t i = 0; i < n; ++i)
        if (alive[i]) syms[w++] = syms[i];
    syms.resize(w);
}

void BpeModel::encode_word(std::string_view word, std::vector<int>& out) const {
    if (word.empty()) return;
    if (opt_.ignore_merges) {
        int id = find(word);
        if (id >= 0) {
            out.push_back(id);
            return;
        }
    }
    const bool cacheable = word.size() <= 64;
    if (cacheable) {
        std::lock_guard<std::mutex> lk(cache_mu_);
        auto it = cache_.find(std::string(word));
        if (it != cache_.end()) {
            out.insert(out.end(), it->second.begin(), it->second.end());
            return;
        }
    }
    std::vector<int> syms;
    initial_symbols(word, syms);
    merge_symbols(syms);
    out.insert(out.end(), syms.begin(), syms.end());
    if (cacheable) {
        std::lock_guard<std::mutex> lk(cache_mu_);
        if (cache_.size() > 200000) cache_.clear();
        cache_.emplace(std::string(word), std::move(syms));
    }
}

}  // namespace tmc
