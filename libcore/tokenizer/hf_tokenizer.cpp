// tokenizer.json, as Hugging Face's `tokenizers` runs it:
//   1. split the text on added tokens (matched before anything else),
//   2. normalize each remaining segment (NFC/NFKC, Prepend, Replace, ...),
//   3. pre-tokenize it into words (Split regex, ByteLevel, Metaspace),
//   4. run the BPE model on each word,
//   5. post-process (TemplateProcessing: BOS/EOS) when asked.
// Decoding runs the decoder chain (ByteLevel; Replace, ByteFallback, Fuse, Strip).
// (Loading: hf_tokenizer_load.cpp.)
#include "tm/files.hpp"
#include "tokenizer/hf_tokenizer.hpp"

namespace tmc {

namespace hftok {

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


}  // namespace hftok


std::unique_ptr<Tokenizer> Tokenizer::load(const std::string& dir) {
    // A workspace keeps its tokenizer in tokenizer/.
    if (!path_exists(dir + "/tokenizer.json") && path_exists(dir + "/tokenizer/tokenizer.json"))
        return std::make_unique<hftok::HfTokenizer>(dir + "/tokenizer");
    if (!is_directory(dir)) throw Error(dir + ": not a directory");
    return std::make_unique<hftok::HfTokenizer>(dir);
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
