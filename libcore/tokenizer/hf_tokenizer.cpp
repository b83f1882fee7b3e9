// tokenizer.json, as Hugging Face's `tokenizers` runs it:
//   1. split the text on added tokens (matched before anything else),
//   2. normalize each remaining segment (NFC/NFKC, Prepend, Replace, ...),
//   3. pre-tokenize it into words (Split regex, ByteLevel, Metaspace),
//   4. run the BPE model on each word,
//   5. post-process (TemplateProcessing: BOS/EOS) when asked.
// Decoding runs the decoder chain (ByteLevel; Replace, ByteFallback, Fuse, Strip).
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <simdjson.h>
#include <utf8proc.h>

#include <algorithm>
#include <map>

#include "base/mapped_file.hpp"
#include "tm/error.hpp"
#include "tm/tokenizer.hpp"
#include "tokenizer/bpe.hpp"
#include "base/utf8.hpp"

namespace tmc {

namespace {

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
const ByteLevelTable& byte_level_table() {
    static const ByteLevelTable t;
    return t;
}

const char* kGpt2Pattern =
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

std::string json_str(element e, const std::string& where) {
    std::string_view s;
    if (e.get(s)) throw Error(where + " must be a string");
    return std::string(s);
}

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
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

bool is_ascii(std::string_view s) {
    for (unsigned char c : s)
        if (c >= 0x80) return false;
    return true;
}

std::string utf8proc_apply(std::string_view s, utf8proc_option_t opts) {
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

HfTokenizer::HfTokenizer(const std::string& dir) {
    const std::string path = dir + "/tokenizer.json";
    if (!path_exists(path)) throw Error(path + ": not found");
    simdjson::dom::parser parser;
    simdjson::padded_string text(read_file(path));
    element root;
    if (auto err = parser.parse(text).get(root))
        throw Error(path + ": not valid JSON: " + simdjson::error_message(err));

    element pre, norm, dec, post, model;
    if (root["model"].get(model)) throw Error(path + ": missing \"model\"");
    if (!root["pre_tokenizer"].get(pre) && !pre.is_null()) load_pre_tokenizer(pre, path);
    load_model(model, path);
    if (!root["normalizer"].get(norm) && !norm.is_null()) load_normalizer(norm, path);
    if (!root["decoder"].get(dec) && !dec.is_null()) load_decoder(dec, path);

    // Added tokens extend (or override) the vocabulary.
    array added;
    if (!root["added_tokens"].get(added)) {
        for (element a : added) {
            AddedToken t{};
            int64_t id;
            if (a["id"].get(id) || id < 0 || id > (1 << 24)) throw Error(path + ": added token without a valid id");
            t.id = int(id);
            t.content = json_str(a["content"], path + ": added token content");
            bool v;
            t.special = !a["special"].get(v) && v;
            t.lstrip = !a["lstrip"].get(v) && v;
            t.rstrip = !a["rstrip"].get(v) && v;
            t.single_word = !a["single_word"].get(v) && v;
            t.normalized = !a["normalized"].get(v) && v;
            if (t.content.empty()) continue;
            added_.push_back(t);
        }
    }
    for (auto& t : added_) {
        if (size_t(t.id) >= id_to_token_.size()) {
            id_to_token_.resize(size_t(t.id) + 1);
            id_to_bytes_.resize(size_t(t.id) + 1);
        }
        id_to_token_[size_t(t.id)] = t.content;
        id_to_bytes_[size_t(t.id)] = t.content;
        token_to_id_[t.content] = t.id;
    }
    special_.assign(id_to_token_.size(), 0);
    is_added_.assign(id_to_token_.size(), 0);
    added_by_first_byte_.assign(256, {});
    for (size_t i = 0; i < added_.size(); ++i) {
        special_[size_t(added_[i].id)] = added_[i].special;
        is_added_[size_t(added_[i].id)] = 1;
        added_by_first_byte_[static_cast<uint8_t>(added_[i].content[0])].push_back(i);
    }
    for (auto& v : added_by_first_byte_)
        std::stable_sort(v.begin(), v.end(),
                         [&](size_t a, size_t b) { return added_[a].content.size() > added_[b].content.size(); });
    if (!root["post_processor"].get(post) && !post.is_null()) load_post_processor(post, path);

    // tokenizer_config.json: special token names and the chat template. Read
    // on demand: these files hold integers too big for a double
    // (model_max_length = 1e30) that a DOM parse refuses.
    const std::string cpath = dir + "/tokenizer_config.json";
    if (path_exists(cpath)) {
        try {
            simdjson::ondemand::parser cp;
            simdjson::padded_string ctext(read_file(cpath));
            auto doc = cp.iterate(ctext);
            auto token_value = [](simdjson::ondemand::value v) -> std::string {
                std::string_view s;
                if (v.type() == simdjson::ondemand::json_type::string) return std::string(std::string_view(v.get_string()));
                if (v.type() == simdjson::ondemand::json_type::object && !v["content"].get_string().get(s))
                    return std::string(s);
                return "";
            };
            for (auto field : doc.get_object()) {
                std::string_view key = field.unescaped_key();
                simdjson::ondemand::value v = field.value();
                if (key == "bos_token") bos_ = token_value(v);
                else if (key == "eos_token") eos_ = token_value(v);
                else if (key == "chat_template") {
                    auto t = v.type().value();
                    if (t == simdjson::ondemand::json_type::string) {
                        chat_template_ = std::string(std::string_view(v.get_string()));
                    } else if (t == simdjson::ondemand::json_type::array) {
                        // [{"name": "default", "template": "..."}, ...]
                        for (auto e : v.get_array()) {
                            std::string name, body;
                            for (auto f : e.get_object()) {
                                std::string_view k = f.unescaped_key();
                                if (k == "name") name = std::string(std::string_view(f.value().get_string()));
                                else if (k == "template") body = std::string(std::string_view(f.value().get_string()));
                            }
                            if (name == "default" || chat_template_.empty()) chat_template_ = body;
                        }
                    }
                }
            }
        } catch (const simdjson::simdjson_error& e) {
            throw Error(cpath + ": not valid JSON: " + e.what());
        }
    }
    if (auto id = token_to_id(bos_)) bos_id_ = *id;
    if (auto id = token_to_id(eos_)) eos_id_ = *id;
}

void HfTokenizer::load_model(element model, const std::string& where) {
    std::string type = json_str(model["type"], where + ": model.type");
    if (type != "BPE") throw Error(where + ": unsupported tokenizer model " + type + " (supported: BPE)");
    BpeOptions opt;
    bool v;
    opt.byte_fallback = !model["byte_fallback"].get(v) && v;
    opt.fuse_unk = !model["fuse_unk"].get(v) && v;
    opt.ignore_merges = !model["ignore_merges"].get(v) && v;
    opt.byte_level = byte_level_;
    element dropout;
    if (!model["dropout"].get(dropout) && !dropout.is_null()) {
        double d;
        if (!dropout.get(d) && d > 0) throw Error(where + ": BPE dropout is not supported");
    }
    object vocab;
    if (model["vocab"].get(vocab)) throw Error(where + ": model.vocab missing");
    const auto& table = byte_level_table();
    for (auto f : vocab) {
        int64_t id;
        if (f.value.get(id) || id < 0 || id > (1 << 24)) throw Error(where + ": vocab ids must be non-negative integers");
        if (size_t(id) >= id_to_token_.size()) {
            id_to_token_.resize(size_t(id) + 1);
            id_to_bytes_.resize(size_t(id) + 1);
        }
        std::string tok(f.key);
        id_to_bytes_[size_t(id)] = byte_level_ ? table.to_bytes(tok) : tok;
        token_to_id_[tok] = int(id);
        id_to_token_[size_t(id)] = std::move(tok);
    }
    std::vector<std::pair<std::string, std::string>> merges;
    array ms;
    if (!model["merges"].get(ms)) {
        merges.reserve(ms.size());
        for (element m : ms) {
            std::string_view s;
            array pair;
            std::string a, b;
            if (!m.get(s)) {
                size_t sp = s.find(' ', 1);
                if (sp == std::string_view::npos) throw Error(where + ": malformed merge \"" + std::string(s) + "\"");
                a = std::string(s.substr(0, sp));
                b = std::string(s.substr(sp + 1));
            } else if (!m.get(pair) && pair.size() == 2) {
                a = json_str(pair.at(0), where + ": merge");
                b = json_str(pair.at(1), where + ": merge");
            } else {
                throw Error(where + ": malformed merge");
            }
            if (byte_level_) {
                a = table.to_bytes(a);
                b = table.to_bytes(b);
            }
            merges.emplace_back(std::move(a), std::move(b));
        }
    }
    element unk;
    if (!model["unk_token"].get(unk) && !unk.is_null()) {
        auto it = token_to_id_.find(json_str(unk, where + ": unk_token"));
        if (it != token_to_id_.end()) opt.unk_id = it->second;
    }
    bpe_.init(opt, id_to_bytes_, merges, where);
    if (!byte_level_) {
        const std::string ms = "\xe2\x96\x81";
        split_at_metaspace_ = true;
        for (auto& t : id_to_bytes_) {
            for (size_t f = t.find(ms, 1); f != std::string::npos && split_at_metaspace_; f = t.find(ms, f + 1))
                if (t.compare(f - 3, 3, ms) != 0) split_at_metaspace_ = false;
            if (!split_at_metaspace_) break;
        }
    }
}

void HfTokenizer::load_normalizer(element n, const std::string& where) {
    std::string type = json_str(n["type"], where + ": normalizer.type");
    if (type == "Sequence") {
        array list;
        if (n["normalizers"].get(list)) throw Error(where + ": Sequence normalizer without normalizers");
        for (element e : list) load_normalizer(e, where);
        return;
    }
    NormStep s{};
    if (type == "NFC") s.kind = NormKind::NFC;
    else if (type == "NFKC") s.kind = NormKind::NFKC;
    else if (type == "NFD") s.kind = NormKind::NFD;
    else if (type == "NFKD") s.kind = NormKind::NFKD;
    else if (type == "Lowercase") s.kind = NormKind::Lowercase;
    else if (type == "Prepend") {
        s.kind = NormKind::Prepend;
        s.a = json_str(n["prepend"], where + ": Prepend.prepend");
    } else if (type == "Replace") {
        s.kind = NormKind::Replace;
        std::string_view str;
        if (n["pattern"]["String"].get(str)) throw Error(where + ": Replace normalizer: only String patterns are supported");
        s.a = std::string(str);
        s.b = json_str(n["content"], where + ": Replace.content");
    } else if (type == "Strip") {
        s.kind = NormKind::Strip;
        bool v;
        s.left = !n["strip_left"].get(v) && v;
        s.right = !n["strip_right"].get(v) && v;
    } else {
        throw Error(where + ": unsupported normalizer " + type);
    }
    norm_.push_back(std::move(s));
}

void HfTokenizer::load_pre_tokenizer(element p, const std::string& where) {
    std::string type = json_str(p["type"], where + ": pre_tokenizer.type");
    if (type == "Sequence") {
        array list;
        if (p["pretokenizers"].get(list)) throw Error(where + ": Sequence pre_tokenizer without pretokenizers");
        for (element e : list) load_pre_tokenizer(e, where);
        return;
    }
    PreStep s{};
    bool v;
    if (type == "Split") {
        s.kind = PreKind::Split;
        std::string_view pat;
        std::string regex;
        if (!p["pattern"]["Regex"].get(pat)) {
            regex = std::string(pat);
        } else if (!p["pattern"]["String"].get(pat)) {
            for (char c : pat) {  // quote the literal
                if (std::string_view("\\^$.|?*+()[]{}").find(c) != std::string_view::npos) regex.push_back('\\');
                regex.push_back(c);
            }
        } else {
            throw Error(where + ": Split pre_tokenizer without a pattern");
        }
        s.re = std::make_shared<Regex>(regex, where);
        std::string_view beh;
        if (!p["behavior"].get(beh)) s.behavior = std::string(beh);
        if (s.behavior != "Isolated" && s.behavior != "Removed" && s.behavior != "MergedWithPrevious" &&
            s.behavior != "MergedWithNext")
            throw Error(where + ": unsupported Split behavior " + s.behavior);
        s.invert = !p["invert"].get(v) && v;
        if (s.invert) throw Error(where + ": Split with invert is not supported");
    } else if (type == "ByteLevel") {
        s.kind = PreKind::ByteLevel;
        s.add_prefix_space = !p["add_prefix_space"].get(v) && v;
        bool use_regex = true;
        if (!p["use_regex"].get(v)) use_regex = v;
        if (use_regex) s.re = std::make_shared<Regex>(kGpt2Pattern, where);
        byte_level_ = true;
    } else if (type == "Metaspace") {
        s.kind = PreKind::Metaspace;
        s.replacement = "\xe2\x96\x81";
        std::string_view r;
        if (!p["replacement"].get(r)) s.replacement = std::string(r);
        s.prepend_scheme = "always";
        std::string_view ps;
        if (!p["prepend_scheme"].get(ps)) s.prepend_scheme = std::string(ps);
        else if (!p["add_prefix_space"].get(v) && !v) s.prepend_scheme = "never";
        if (!p["split"].get(v)) s.split = v;
    } else if (type == "WhitespaceSplit") {
        s.kind = PreKind::Whitespace;
    } else {
        throw Error(where + ": unsupported pre_tokenizer " + type);
    }
    pre_.push_back(std::move(s));
}

void HfTokenizer::load_post_processor(element p, const std::string& where) {
    std::string type = json_str(p["type"], where + ": post_processor.type");
    if (type == "Sequence") {
        array list;
        if (p["processors"].get(list)) throw Error(where + ": Sequence post_processor without processors");
        for (element e : list) load_post_processor(e, where);
        return;
    }
    if (type == "ByteLevel") return;  // offsets only
    if (type != "TemplateProcessing") throw Error(where + ": unsupported post_processor " + type);
    array single;
    if (p["single"].get(single)) throw Error(where + ": TemplateProcessing without \"single\"");
    object specials;
    if (p["special_tokens"].get(specials)) throw Error(where + ": TemplateProcessing without special_tokens");
    post_prefix_.clear();
    post_suffix_.clear();
    bool seen_seq = false;
    for (element piece : single) {
        element st;
        if (!piece["SpecialToken"].get(st)) {
            std::string name = json_str(st["id"], where + ": SpecialToken.id");
            array ids;
            if (specials[name]["ids"].get(ids)) throw Error(where + ": special token " + name + " has no ids");
            for (element i : ids) {
                int64_t id;
                if (i.get(id)) throw Error(where + ": special token ids must be integers");
                (seen_seq ? post_suffix_ : post_prefix_).push_back(int(id));
            }
        } else {
            seen_seq = true;
        }
    }
}

void HfTokenizer::load_decoder(element d, const std::string& where) {
    std::string type = json_str(d["type"], where + ": decoder.type");
    if (type == "Sequence") {
        array list;
        if (d["decoders"].get(list)) throw Error(where + ": Sequence decoder without decoders");
        for (element e : list) load_decoder(e, where);
        return;
    }
    DecStep s{};
    if (type == "ByteLevel") s.kind = DecKind::ByteLevel;
    else if (type == "ByteFallback") s.kind = DecKind::ByteFallback;
    else if (type == "Fuse") s.kind = DecKind::Fuse;
    else if (type == "Replace") {
        s.kind = DecKind::Replace;
        std::string_view str;
        if (d["pattern"]["String"].get(str)) throw Error(where + ": Replace decoder: only String patterns are supported");
        s.a = std::string(str);
        s.b = json_str(d["content"], where + ": Replace.content");
    } else if (type == "Strip") {
        s.kind = DecKind::Strip;
        s.a = json_str(d["content"], where + ": Strip.content");
        int64_t v;
        if (!d["start"].get(v)) s.start = int(v);
        if (!d["stop"].get(v)) s.stop = int(v);
    } else if (type == "Metaspace") {
        s.kind = DecKind::Metaspace;
        s.a = "\xe2\x96\x81";
        std::string_view r;
        if (!d["replacement"].get(r)) s.a = std::string(r);
        std::string_view ps;
        bool v;
        if (!d["prepend_scheme"].get(ps)) s.prepend = ps != "never";
        else if (!d["add_prefix_space"].get(v)) s.prepend = v;
    } else {
        throw Error(where + ": unsupported decoder " + type);
    }
    dec_.push_back(std::move(s));
}

std::string HfTokenizer::normalize(std::string_view in) const {
    std::string s(in);
    for (auto& n : norm_) {
        switch (n.kind) {
            case NormKind::NFC: s = utf8proc_apply(s, UTF8PROC_COMPOSE); break;
            case NormKind::NFKC: s = utf8proc_apply(s, utf8proc_option_t(UTF8PROC_COMPOSE | UTF8PROC_COMPAT)); break;
            case NormKind::NFD: s = utf8proc_apply(s, UTF8PROC_DECOMPOSE); break;
            case NormKind::NFKD: s = utf8proc_apply(s, utf8proc_option_t(UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT)); break;
            case NormKind::Lowercase: s = utf8proc_apply(s, UTF8PROC_CASEFOLD); break;
            case NormKind::Prepend:
                if (!s.empty()) s = n.a + s;
                break;
            case NormKind::Replace: s = replace_all(std::move(s), n.a, n.b); break;
            case NormKind::Strip: {
                size_t b = 0, e = s.size();
                if (n.left) while (b < e && isspace(static_cast<unsigned char>(s[b]))) ++b;
                if (n.right) while (e > b && isspace(static_cast<unsigned char>(s[e - 1]))) --e;
                s = s.substr(b, e - b);
                break;
            }
        }
    }
    return s;
}

void HfTokenizer::encode_segment(std::string_view seg, bool first_segment, std::vector<int>& out) const {
    std::string normalized = norm_.empty() ? std::string(seg) : normalize(seg);
    // Words are (begin, end) ranges of `text`, which pre-tokenizers may rewrite.
    std::string text = std::move(normalized);
    std::vector<std::pair<size_t, size_t>> words{{0, text.size()}}, next;
    for (auto& p : pre_) {
        next.clear();
        switch (p.kind) {
            case PreKind::ByteLevel:
                if (p.add_prefix_space && !text.empty() && text[0] != ' ') {
                    text.insert(text.begin(), ' ');
                    for (auto& w : words) {
                        if (w.first) ++w.first;
                        ++w.second;
                    }
                    words.front().first = 0;
                }
                if (!p.re) continue;
                [[fallthrough]];
            case PreKind::Split:
                for (auto [b, e] : words) {
                    std::string_view w(text.data() + b, e - b);
                    size_t last = 0;
                    auto gap = [&](size_t x, size_t y) {
                        if (y > x) next.emplace_back(b + x, b + y);
                    };
                    p.re->for_each_match(w, [&](size_t mb, size_t me) {
                        if (p.behavior == "Isolated" || p.behavior == "Removed" || p.kind == PreKind::ByteLevel) {
                            gap(last, mb);
                            if (p.behavior != "Removed") next.emplace_back(b + mb, b + me);
                        } else if (p.behavior == "MergedWithPrevious") {
                            gap(last, me);
                        } else {  // MergedWithNext
                            gap(last, mb);
                            next.emplace_back(b + mb, b + me);  // extended below
                        }
                        last = me;
                    });
                    if (p.behavior == "MergedWithNext" && p.kind != PreKind::ByteLevel && last < w.size() &&
                        !next.empty() && next.back().second == b + last) {
                        next.back().second = e;
                        last = w.size();
                    }
                    gap(last, w.size());
                }
                words.swap(next);
                break;
            case PreKind::Metaspace: {
                std::string rebuilt;
                std::vector<std::pair<size_t, size_t>> nw;
                for (size_t k = 0; k < words.size(); ++k) {
                    std::string w = replace_all(text.substr(words[k].first, words[k].second - words[k].first), " ",
                                                p.replacement);
                    bool prepend = p.prepend_scheme == "always" || (p.prepend_scheme == "first" && first_segment && k == 0);
                    if (prepend && w.compare(0, p.replacement.size(), p.replacement) != 0) w = p.replacement + w;
                    size_t base = rebuilt.size();
                    rebuilt += w;
                    if (!p.split) {
                        nw.emplace_back(base, rebuilt.size());
                        continue;
                    }
                    size_t start = 0;
                    for (size_t f; (f = w.find(p.replacement, start + 1)) != std::string::npos && start < w.size();) {
                        nw.emplace_back(base + start, base + f);
                        start = f;
                    }
                    if (start < w.size()) nw.emplace_back(base + start, base + w.size());
                }
                text = std::move(rebuilt);
                words = std::move(nw);
                break;
            }
            case PreKind::Whitespace: {
                for (auto [b, e] : words) {
                    size_t i = b;
                    while (i < e) {
                        while (i < e && isspace(static_cast<unsigned char>(text[i]))) ++i;
                        size_t j = i;
                        while (j < e && !isspace(static_cast<unsigned char>(text[j]))) ++j;
                        if (j > i) next.emplace_back(i, j);
                        i = j;
                    }
                }
                words.swap(next);
                break;
            }
        }
    }
    if (pre_.empty() && split_at_metaspace_) {
        const std::string_view ms = "\xe2\x96\x81";
        std::string_view t(text);
        size_t start = 0;
        for (size_t f = t.find(ms, 1); f != std::string_view::npos; f = t.find(ms, f + 3)) {
            if (f >= 3 && t.compare(f - 3, 3, ms) == 0) continue;  // inside a run of ▁
            bpe_.encode_word(t.substr(start, f - start), out);
            start = f;
        }
        bpe_.encode_word(t.substr(start), out);
        return;
    }
    for (auto [b, e] : words) bpe_.encode_word(std::string_view(text.data() + b, e - b), out);
}

void HfTokenizer::split_added(std::string_view text, std::vector<std::pair<std::string_view, int>>& out) const {
    size_t seg_start = 0, i = 0;
    auto is_word = [](unsigned char c) { return isalnum(c) || c == '_' || c >= 0x80; };
    while (i < text.size()) {
        const auto& cands = added_by_first_byte_[static_cast<uint8_t>(text[i])];
        const AddedToken* hit = nullptr;
        for (size_t k : cands) {
            const auto& t = added_[k];
            if (text.compare(i, t.content.size(), t.content) != 0) continue;
            if (t.single_word) {
                size_t e = i + t.content.size();
                if ((i > 0 && is_word(text[i - 1])) || (e < text.size() && is_word(text[e]))) continue;
            }
            hit = &t;
            break;
        }
        if (!hit) {
            ++i;
            continue;
        }
        size_t b = i, e = i + hit->content.size();
        if (hit->lstrip)
            while (b > seg_start && isspace(static_cast<unsigned char>(text[b - 1]))) --b;
        if (hit->rstrip)
            while (e < text.size() && isspace(static_cast<unsigned char>(text[e]))) ++e;
        if (b > seg_start) out.emplace_back(text.substr(seg_start, b - seg_start), -1);
        out.emplace_back(text.substr(b, e - b), hit->id);
        seg_start = i = e;
    }
    if (seg_start < text.size()) out.emplace_back(text.substr(seg_start), -1);
}

std::vector<int> HfTokenizer::encode(std::string_view raw, bool add_special_tokens) const {
    std::string fixed;
    if (!utf8::is_valid(raw)) {
        fixed = utf8::lossy(raw);
        raw = fixed;
    }
    std::vector<int> ids;
    if (add_special_tokens) ids = post_prefix_;
    std::vector<std::pair<std::string_view, int>> pieces;
    split_added(raw, pieces);
    bool first = true;
    for (auto& [s, id] : pieces) {
        if (id >= 0) ids.push_back(id);
        else encode_segment(s, first, ids);
        first = false;
    }
    if (add_special_tokens) ids.insert(ids.end(), post_suffix_.begin(), post_suffix_.end());
    return ids;
}

std::string HfTokenizer::decode(const std::vector<int>& ids, bool skip_special_tokens) const {
    std::vector<std::string> toks;
    toks.reserve(ids.size());
    for (int id : ids) {
        if (id < 0 || size_t(id) >= id_to_bytes_.size()) continue;
        if (skip_special_tokens && special_[size_t(id)]) continue;
        toks.push_back(id_to_bytes_[size_t(id)]);
    }
    for (auto& d : dec_) {
        switch (d.kind) {
            case DecKind::ByteLevel: {  // tokens are raw bytes already
                std::string all;
                for (auto& t : toks) all += t;
                toks.assign(1, utf8::lossy(all));
                break;
            }
            case DecKind::Replace:
                for (auto& t : toks) t = replace_all(std::move(t), d.a, d.b);
                break;
            case DecKind::ByteFallback: {
                std::vector<std::string> outv;
                std::string bytes;
                size_t nbytes = 0;
                auto flush = [&] {
                    if (!nbytes) return;
                    if (utf8::is_valid(bytes)) outv.push_back(bytes);
                    else
                        for (size_t k = 0; k < nbytes; ++k) outv.push_back("\xef\xbf\xbd");
                    bytes.clear();
                    nbytes = 0;
                };
                for (auto& t : toks) {
                    unsigned v;
                    if (t.size() == 6 && t[0] == '<' && t[1] == '0' && t[2] == 'x' && t[5] == '>' &&
                        sscanf(t.c_str() + 3, "%2X", &v) == 1) {
                        bytes.push_back(char(v));
                        ++nbytes;
                    } else {
                        flush();
                        outv.push_back(std::move(t));
                    }
                }
                flush();
                toks.swap(outv);
                break;
            }
            case DecKind::Fuse: {
                std::string all;
                for (auto& t : toks) all += t;
                toks.assign(1, std::move(all));
                break;
            }
            case DecKind::Strip:
                for (auto& t : toks) {
                    int k = 0;
                    size_t b = 0, e = t.size();
                    while (k < d.start && b < e && t.compare(b, d.a.size(), d.a) == 0) b += d.a.size(), ++k;
                    k = 0;
                    while (k < d.stop && e > b + d.a.size() - 1 && t.compare(e - d.a.size(), d.a.size(), d.a) == 0)
                        e -= d.a.size(), ++k;
                    t = t.substr(b, e - b);
                }
                break;
            case DecKind::Metaspace:
                for (size_t k = 0; k < toks.size(); ++k) {
                    toks[k] = replace_all(std::move(toks[k]), d.a, " ");
                    if (k == 0 && d.prepend && !toks[k].empty() && toks[k][0] == ' ') toks[k].erase(0, 1);
                }
                break;
        }
    }
    std::string out;
    for (auto& t : toks) out += t;
    return utf8::is_valid(out) ? out : utf8::lossy(out);
}

}  // namespace

std::unique_ptr<Tokenizer> Tokenizer::load(const std::string& dir) {
    // A workspace keeps its tokenizer in tokenizer/.
    if (!path_exists(dir + "/tokenizer.json") && path_exists(dir + "/tokenizer/tokenizer.json"))
        return std::make_unique<HfTokenizer>(dir + "/tokenizer");
    if (!is_directory(dir)) throw Error(dir + ": not a directory");
    return std::make_unique<HfTokenizer>(dir);
}

std::string StreamDecoder::push(int id) {
    ids_.push_back(id);
    std::vector<int> window(ids_.begin() + long(prefix_), ids_.end());
    std::vector<int> prefix_ids(ids_.begin() + long(prefix_), ids_.begin() + long(read_));
    std::string prefix_text = tok_.decode(prefix_ids, skip_special_);
    std::string text = tok_.decode(window, skip_special_);
    // Hold back while the newest bytes are an unfinished character.
    if (text.size() <= prefix_text.size() ||
        (text.size() >= 3 && text.compare(text.size() - 3, 3, "\xef\xbf\xbd") == 0))
        return "";
    if (text.compare(0, prefix_text.size(), prefix_text) != 0) return "";
    std::string delta = text.substr(prefix_text.size());
    prefix_ = read_;
    read_ = ids_.size();
    return delta;
}

std::string StreamDecoder::finish() {
    std::vector<int> window(ids_.begin() + long(prefix_), ids_.end());
    std::vector<int> prefix_ids(ids_.begin() + long(prefix_), ids_.begin() + long(read_));
    std::string prefix_text = tok_.decode(prefix_ids, skip_special_);
    std::string text = tok_.decode(window, skip_special_);
    std::string delta = text.size() > prefix_text.size() ? text.substr(prefix_text.size()) : "";
    prefix_ = read_ = ids_.size();
    return delta;
}

void StreamDecoder::reset() {
    ids_.clear();
    prefix_ = read_ = 0;
}

}  // namespace tmc
