// tokenizer.json, as Hugging Face's `tokenizers` runs it:
//   1. split the text on added tokens (matched before anything else),
//   2. normalize each remaining segment (NFC/NFKC, Prepend, Replace, ...),
//   3. pre-tokenize it into words (Split regex, ByteLevel, Metaspace),
//   4. run the BPE model on each word,
//   5. post-process (TemplateProcessing: BOS/EOS) when asked.
// Decoding runs the decoder chain (ByteLevel; Replace, ByteFallback, Fuse, Strip).
// tokenizer.json's pipeline as HfTokenizer holds it, shared by its files:
// hf_tokenizer_load.cpp reads tokenizer.json (and tokenizer_config.json)
// into it, hf_tokenizer.cpp runs it (encode, decode, streaming decode).
#pragma once

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <simdjson.h>
#include <utf8proc.h>

#include <algorithm>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "base/utf8.hpp"
#include "tm/error.hpp"
#include "tm/tokenizer.hpp"
#include "tokenizer/bpe.hpp"

namespace tmc::hftok {

using simdjson::dom::array;
using simdjson::dom::element;
using simdjson::dom::object;

// GPT-2's byte <-> printable character table: bytes that are printable
// Latin-1 map to themselves, the others to U+0100 upwards.
struct ByteLevelTable {
    uint32_t byte_to_cp[256];
    std::map<uint32_t, uint8_t> cp_to_byte;
    ByteLevelTable() {
        int n = 0;
        for (int b = 0; b < 256; ++b) {
            bool keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
            byte_to_cp[b] = keep ? uint32_t(b) : uint32_t(256 + n++);
            cp_to_byte[byte_to_cp[b]] = uint8_t(b);
        }
    }
    // "Ġthe" -> " the"; characters outside the table keep their UTF-8 bytes.
    std::string to_bytes(std::string_view s) const {
        std::string out;
        for (size_t i = 0; i < s.size();) {
            size_t start = i;
            uint32_t cp = utf8::next_codepoint(s, i);
            auto it = cp_to_byte.find(cp);
            if (it != cp_to_byte.end()) out.push_back(char(it->second));
            else out.append(s.substr(start, i - start));
        }
        return out;
    }
};
inline const ByteLevelTable& byte_level_table() {
    static const ByteLevelTable t;
    return t;
}

inline const char* kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

class Regex {
public:
    Regex(const std::string& pattern, const std::string& where) {
        int err;
        PCRE2_SIZE off;
        code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                              PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &err, &off, nullptr);
        if (!code_) {
            PCRE2_UCHAR buf[256];
            pcre2_get_error_message(err, buf, sizeof buf);
            throw Error(where + ": regex " + pattern + ": " + reinterpret_cast<char*>(buf) + " at offset " +
                        std::to_string(off));
        }
        pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);
    }
    ~Regex() { pcre2_code_free(code_); }
    Regex(const Regex&) = delete;
    Regex& operator=(const Regex&) = delete;

    // Calls f(begin, end) for each match, left to right (non-empty matches).
    template <class F>
    void for_each_match(std::string_view s, F&& f) const {
        pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
        size_t pos = 0;
        while (pos <= s.size()) {
            int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos, 0, md, nullptr);
            if (rc < 0) break;
            PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
            size_t b = ov[0], e = ov[1];
            if (e == b) {  // empty match: step one character
                pos = b + (b < s.size() ? utf8::lead_len(static_cast<uint8_t>(s[b])) : 1);
                continue;
            }
            f(b, e);
            pos = e;
        }
        pcre2_match_data_free(md);
    }

private:
    pcre2_code* code_ = nullptr;
};

struct AddedToken {
    int id;
    std::string content;
    bool special, lstrip, rstrip, single_word, normalized;
};

enum class NormKind { NFC, NFKC, NFD, NFKD, Prepend, Replace, Lowercase, Strip };
struct NormStep {
    NormKind kind;
    std::string a, b;  // Prepend: a; Replace: a -> b
    bool left = false, right = false;
};

enum class PreKind { Split, ByteLevel, Metaspace, Whitespace };
struct PreStep {
    PreKind kind;
    std::shared_ptr<Regex> re;  // Split / ByteLevel with use_regex
    std::string behavior = "Isolated";
    bool invert = false;
    bool add_prefix_space = false;
    std::string replacement;        // Metaspace
    std::string prepend_scheme;     // Metaspace: always / first / never
    bool split = true;              // Metaspace
};

enum class DecKind { ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace };
struct DecStep {
    DecKind kind;
    std::string a, b;
    int start = 0, stop = 0;
    bool prepend = true;
};

inline std::string json_str(element e, const std::string& where) {
    std::string_view s;
    if (e.get(s)) throw Error(where + " must be a string");
    return std::string(s);
}

inline std::string replace_all(std::string s, const std::string& from, const std::string& to) {
    if (from.empty()) return s;
    std::string out;
    size_t pos = 0;
    for (size_t f; (f = s.find(from, pos)) != std::string::npos; pos = f + from.size()) {
        out.append(s, pos, f - pos);
        out += to;
    }
    out.append(s, pos);
    return out;
}

inline bool is_ascii(std::string_view s) {
    for (unsigned char c : s)
        if (c >= 0x80) return false;
    return true;
}

inline std::string utf8proc_apply(std::string_view s, utf8proc_option_t opts) {
    if (is_ascii(s)) return std::string(s);
    utf8proc_uint8_t* out = nullptr;
    auto n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()), utf8proc_ssize_t(s.size()), &out,
                          utf8proc_option_t(opts | UTF8PROC_STABLE));
    if (n < 0) return std::string(s);
    std::string r(reinterpret_cast<char*>(out), size_t(n));
    free(out);
    return r;
}

class HfTokenizer final : public Tokenizer {
public:
    explicit HfTokenizer(const std::string& dir);

    std::vector<int> encode(std::string_view text, bool add_special_tokens) const override;
    std::string decode(const std::vector<int>& ids, bool skip_special_tokens) const override;
    int vocab_size() const override { return int(id_to_token_.size()); }
    std::optional<int> token_to_id(std::string_view t) const override {
        auto it = token_to_id_.find(std::string(t));
        if (it == token_to_id_.end()) return std::nullopt;
        return it->second;
    }
    std::string id_to_token(int id) const override {
        return id >= 0 && size_t(id) < id_to_token_.size() ? id_to_token_[size_t(id)] : std::string();
    }
    bool is_special(int id) const override {
        return id >= 0 && size_t(id) < special_.size() && special_[size_t(id)];
    }
    const std::string& bos_token() const override { return bos_; }
    const std::string& eos_token() const override { return eos_; }
    int bos_id() const override { return bos_id_; }
    int eos_id() const override { return eos_id_; }
    const std::string& chat_template() const override { return chat_template_; }

private:
    void load_model(element model, const std::string& where);
    void load_normalizer(element n, const std::string& where);
    void load_pre_tokenizer(element p, const std::string& where);
    void load_post_processor(element p, const std::string& where);
    void load_decoder(element d, const std::string& where);

    std::string normalize(std::string_view s) const;
    void encode_segment(std::string_view seg, bool first_segment, std::vector<int>& out) const;
    // Splits text into (segment, -1) and (added token, id) pieces.
    void split_added(std::string_view text, std::vector<std::pair<std::string_view, int>>& out) const;

    BpeModel bpe_;
    bool byte_level_ = false;
    // SentencePiece-style models without a pre-tokenizer run BPE on a whole
    // segment. When no token has "▁" after another character, no merge can
    // cross a "x|▁" boundary, so splitting there gives the same ids and lets
    // words be cached (decided at load time from the vocabulary).
    bool split_at_metaspace_ = false;
    std::vector<NormStep> norm_;
    std::vector<PreStep> pre_;
    std::vector<DecStep> dec_;
    std::vector<int> post_prefix_, post_suffix_;

    std::vector<AddedToken> added_;
    std::vector<std::vector<size_t>> added_by_first_byte_;  // indices into added_, longest first
    std::vector<std::string> id_to_token_;      // vocabulary spelling (for id_to_token)
    std::vector<std::string> id_to_bytes_;      // what the id decodes to before the decoder chain
    std::vector<char> special_;
    std::vector<char> is_added_;
    std::unordered_map<std::string, int> token_to_id_;

    std::string bos_, eos_, chat_template_;
    int bos_id_ = -1, eos_id_ = -1;
};


}  // namespace tmc::hftok
