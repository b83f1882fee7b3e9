// HfTokenizer's loading: tokenizer.json's model (BPE vocabulary and
// merges), normalizer, pre-tokenizer, post-processor and decoder, its added
// tokens, and tokenizer_config.json's special tokens and chat template.
#include "base/mapped_file.hpp"
#include "tokenizer/hf_tokenizer.hpp"

namespace tmc::hftok {

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


}  // namespace tmc::hftok
