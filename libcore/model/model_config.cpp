#include "tm/model_config.hpp"

#include <map>
#include <simdjson.h>
#include <sstream>

#include "tm/json_write.hpp"
#include "base/mapped_file.hpp"
#include "tm/error.hpp"

namespace tmc {

namespace {

using simdjson::dom::element;

const char* kArchs[] = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                        "Qwen3ForCausalLM"};

struct JsonCfg {
    std::string path;
    element root;

    bool has(const char* k) const {
        element e;
        return !root[k].get(e) && !e.is_null();
    }
    int64_t get_int(const char* k, int64_t def, bool required = false) const {
        element e;
        if (root[k].get(e) || e.is_null()) {
            if (required) throw Error(path + ": missing \"" + k + "\"");
            return def;
        }
        int64_t v;
        if (e.get(v)) throw Error(path + ": \"" + k + "\" must be an integer");
        return v;
    }
    double get_double(element obj, const char* k, double def) const {
        element e;
        if (obj[k].get(e) || e.is_null()) return def;
        double v;
        if (e.get(v)) throw Error(path + ": \"" + k + "\" must be a number");
        return v;
    }
};

int positive(const std::string& path, const char* field, int64_t v) {
    if (v <= 0 || v > (1 << 30)) throw Error(path + ": \"" + field + "\" must be a positive integer");
    return int(v);
}

void read_eos(element e, std::vector<int>* out, const std::string& path) {
    if (e.is_null()) return;
    int64_t v;
    if (!e.get(v)) {
        out->assign(1, int(v));
        return;
    }
    simdjson::dom::array arr;
    if (e.get(arr)) throw Error(path + ": \"eos_token_id\" must be an integer or a list");
    out->clear();
    for (auto x : arr) {
        if (x.get(v)) throw Error(path + ": \"eos_token_id\" must hold integers");
        out->push_back(int(v));
    }
}

}  // namespace

ModelConfig model_config_from_hf(const std::string& dir) {
    const std::string path = dir + "/config.json";
    if (!path_exists(path)) throw Error(path + ": not found (is " + dir + " a Hugging Face model directory?)");
    simdjson::dom::parser parser;
    simdjson::padded_string text(read_file(path));
    JsonCfg c{path, {}};
    if (auto err = parser.parse(text).get(c.root))
        throw Error(path + ": not valid JSON: " + simdjson::error_message(err));
    if (!c.root.is_object()) throw Error(path + ": not a JSON object");

    ModelConfig m;
    simdjson::dom::array archs;
    if (c.root["architectures"].get(archs) || archs.size() == 0)
        throw Error(path + ": missing \"architectures\"");
    std::string_view a;
    if (archs.at(0).get(a)) throw Error(path + ": \"architectures\" must hold strings");
    m.architecture = std::string(a);
    bool known = false;
    for (auto* k : kArchs) known |= m.architecture == k;
    if (!known)
        throw Error(path + ": unsupported architecture " + m.architecture +
                    " (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)");

    m.hidden_size = positive(path, "hidden_size", c.get_int("hidden_size", 0, true));
    m.num_layers = positive(path, "num_hidden_layers", c.get_int("num_hidden_layers", 0, true));
    m.num_heads = positive(path, "num_attention_heads", c.get_int("num_attention_heads", 0, true));
    m.num_kv_heads = positive(path, "num_key_value_heads", c.get_int("num_key_value_heads", m.num_heads));
    if (m.num_heads % m.num_kv_heads)
        throw Error(path + ": num_attention_heads must be a multiple of num_key_value_heads");
    if (c.has("head_dim")) {
        m.head_dim = positive(path, "head_dim", c.get_int("head_dim", 0));
    } else {
        if (m.hidden_size % m.num_heads) throw Error(path + ": hidden_size is not a multiple of num_attention_heads");
        m.head_dim = m.hidden_size / m.num_heads;
    }
    if (m.head_dim % 2) throw Error(path + ": head_dim must be even for rotary embeddings");
    m.intermediate_size = positive(path, "intermediate_size", c.get_int("intermediate_size", 0, true));
    m.vocab_size = positive(path, "vocab_size", c.get_int("vocab_size", 0, true));
    m.max_position_embeddings = positive(path, "max_position_embeddings", c.get_int("max_position_embeddings", 2048));
    m.rms_norm_eps = c.get_double(c.root, "rms_norm_eps", 1e-6);
    if (!(m.rms_norm_eps > 0)) throw Error(path + ": \"rms_norm_eps\" must be positive");

    // RoPE: transformers 5 writes rope_parameters; older files rope_theta + rope_scaling.
    m.rope_theta = c.get_double(c.root, "rope_theta", 10000.0);
    for (const char* key : {"rope_scaling", "rope_parameters"}) {
        element rp;
        if (c.root[key].get(rp) || rp.is_null()) continue;
        if (!rp.is_object()) throw Error(path + ": \"" + key + "\" must be an object");
        m.rope_theta = c.get_double(rp, "rope_theta", m.rope_theta);
        std::string_view t;
        if (!rp["rope_type"].get(t) || !rp["type"].get(t)) m.rope_type = std::string(t);
        m.rope_factor = c.get_double(rp, "factor", 1.0);
        m.rope_low_freq_factor = c.get_double(rp, "low_freq_factor", 1.0);
        m.rope_high_freq_factor = c.get_double(rp, "high_freq_factor", 4.0);
        m.rope_original_max_position = int(c.get_double(rp, "original_max_position_embeddings", 8192));
    }
    if (m.rope_type != "default" && m.rope_type != "linear" && m.rope_type != "llama3")
        throw Error(path + ": unsupported rope_type \"" + m.rope_type + "\" (supported: default, linear, llama3)");
    if (!(m.rope_theta > 0)) throw Error(path + ": \"rope_theta\" must be positive");

    element sw;
    if (!c.root["sliding_window"].get(sw) && !sw.is_null()) {
        int64_t v;
        if (sw.get(v) || v < 0) throw Error(path + ": \"sliding_window\" must be a non-negative integer or null");
        bool use = true;
        bool b;
        if (!c.root["use_sliding_window"].get(b)) use = b;
        m.sliding_window = use && v < m.max_position_embeddings ? int(v) : 0;
    }
    bool tie = false;
    element te;
    if (!c.root["tie_word_embeddings"].get(te) && !te.is_null() && te.get(tie))
        throw Error(path + ": \"tie_word_embeddings\" must be a boolean");
    m.tie_word_embeddings = tie;
    bool bias = m.architecture == "Qwen2ForCausalLM";
    element be;
    if (!c.root["attention_bias"].get(be) && !be.is_null() && be.get(bias))
        throw Error(path + ": \"attention_bias\" must be a boolean");
    m.attn_bias = bias;
    m.qk_norm = m.architecture == "Qwen3ForCausalLM";
    std::string_view dt;
    if (!c.root["torch_dtype"].get(dt) || !c.root["dtype"].get(dt))
        m.weight_dtype = dt == "float16" ? DType::F16 : DType::BF16;

    m.bos_token_id = int(c.get_int("bos_token_id", -1));
    element eos;
    if (!c.root["eos_token_id"].get(eos)) read_eos(eos, &m.eos_token_ids, path);

    // generation_config.json overrides the special ids where it names them.
    const std::string gpath = dir + "/generation_config.json";
    if (path_exists(gpath)) {
        simdjson::dom::parser gp;
        simdjson::padded_string gtext(read_file(gpath));
        element g;
        if (auto err = gp.parse(gtext).get(g))
            throw Error(gpath + ": not valid JSON: " + simdjson::error_message(err));
        int64_t v;
        element e;
        if (!g["bos_token_id"].get(e) && !e.is_null() && !e.get(v)) m.bos_token_id = int(v);
        if (!g["eos_token_id"].get(e)) read_eos(e, &m.eos_token_ids, gpath);
    }
    return m;
}

std::string config_ini_text(const ModelConfig& m, const EngineConfig& e) {
    std::ostringstream o;
    auto eos = [&] {
        std::string s;
        for (size_t i = 0; i < m.eos_token_ids.size(); ++i) s += (i ? "," : "") + std::to_string(m.eos_token_ids[i]);
        return s;
    };
    o << "# tm workspace configuration (formats/workspace.md).\n"
         "# [model] describes the weights: do not edit it.\n"
         "# [engine] holds run-time settings: edit them freely.\n\n"
         "[model]\n"
      << "name = " << m.name << "\n"
      << "architecture = " << m.architecture << "\n"
      << "hidden_size = " << m.hidden_size << "\n"
      << "num_layers = " << m.num_layers << "\n"
      << "num_heads = " << m.num_heads << "\n"
      << "num_kv_heads = " << m.num_kv_heads << "\n"
      << "head_dim = " << m.head_dim << "\n"
      << "intermediate_size = " << m.intermediate_size << "\n"
      << "vocab_size = " << m.vocab_size << "\n"
      << "rms_norm_eps = " << json_number(m.rms_norm_eps) << "\n"
      << "rope_theta = " << json_number(m.rope_theta) << "\n"
      << "rope_type = " << m.rope_type << "\n"
      << "rope_factor = " << json_number(m.rope_factor) << "\n"
      << "rope_low_freq_factor = " << json_number(m.rope_low_freq_factor) << "\n"
      << "rope_high_freq_factor = " << json_number(m.rope_high_freq_factor) << "\n"
      << "rope_original_max_position = " << m.rope_original_max_position << "\n"
      << "max_position_embeddings = " << m.max_position_embeddings << "\n"
      << "sliding_window = " << m.sliding_window << "\n"
      << "tie_word_embeddings = " << (m.tie_word_embeddings ? 1 : 0) << "\n"
      << "attn_bias = " << (m.attn_bias ? 1 : 0) << "\n"
      << "qk_norm = " << (m.qk_norm ? 1 : 0) << "\n"
      << "weight_dtype = " << dtype_name(m.weight_dtype) << "\n"
      << "bos_token_id = " << m.bos_token_id << "\n"
      << "eos_token_ids = " << eos() << "\n\n"
      << "[engine]\n"
      << "# Tensor-parallel ranks the weights are split for (set by tm-convert --tp).\n"
      << "tp = " << e.tp << "\n"
      << "# KV cache: 0 = 16-bit, 8 = int8, 4 = int4 (tm-qparams sets it).\n"
      << "quant_policy = " << e.quant_policy << "\n"
      << "# With quant_policy 4 or 8: online (per token and head) or static (tm-qparams' scales).\n"
      << "kv_scales = " << (e.kv_static ? "static" : "online") << "\n"
      << "# Longest session in tokens; 0 = max_position_embeddings.\n"
      << "session_len = " << e.session_len << "\n"
      << "# Tokens per KV cache block.\n"
      << "cache_block_seq_len = " << e.cache_block_seq_len << "\n"
      << "# Fraction of free GPU memory for the KV cache.\n"
      << "cache_max_entry_count = " << json_number(e.cache_max_entry_count) << "\n";
    return o.str();
}

namespace {

std::string trim(const std::string& s) {
    size_t a = s.find_first_not_of(" \t\r");
    if (a == std::string::npos) return "";
    size_t b = s.find_last_not_of(" \t\r");
    return s.substr(a, b - a + 1);
}

}  // namespace

void parse_config_ini(const std::string& text, const std::string& path, ModelConfig* m,
                      EngineConfig* e) {
    std::istringstream in(text);
    std::string line, section;
    int lineno = 0;
    std::map<std::string, bool> seen;
    while (std::getline(in, line)) {
        ++lineno;
        std::string t = trim(line);
        if (t.empty() || t[0] == '#' || t[0] == ';') continue;
        auto where = path + ":" + std::to_string(lineno);
        if (t.front() == '[') {
            if (t.back() != ']') throw Error(where + ": malformed section header");
            section = trim(t.substr(1, t.size() - 2));
            if (section != "model" && section != "engine") throw Error(where + ": unknown section [" + section + "]");
            continue;
        }
        auto eq = t.find('=');
        if (eq == std::string::npos) throw Error(where + ": expected key = value");
        std::string key = trim(t.substr(0, eq)), val = trim(t.substr(eq + 1));
        if (section.empty()) throw Error(where + ": " + key + " outside a section");
        seen[section + "." + key] = true;
        auto as_int = [&](int lo, int hi) {
            try {
                size_t pos;
                long long v = std::stoll(val, &pos);
                if (pos != val.size() || v < lo || v > hi) throw 0;
                return int(v);
            } catch (...) {
                throw Error(where + ": " + key + " must be an integer in [" + std::to_string(lo) + ", " +
                            std::to_string(hi) + "], got \"" + val + "\"");
            }
        };
        auto as_double = [&](double lo, double hi) {
            try {
                size_t pos;
                double v = std::stod(val, &pos);
                if (pos != val.size() || !(v >= lo && v <= hi)) throw 0;
                return v;
            } catch (...) {
                throw Error(where + ": " + key + " must be a number in [" + json_number(lo) + ", " +
                            json_number(hi) + "], got \"" + val + "\"");
            }
        };
        const int big = 1 << 30;
        if (section == "model") {
            if (key == "name") m->name = val;
            else if (key == "architecture") m->architecture = val;
            else if (key == "hidden_size") m->hidden_size = as_int(1, big);
            else if (key == "num_layers") m->num_layers = as_int(1, big);
            else if (key == "num_heads") m->num_heads = as_int(1, big);
            else if (key == "num_kv_heads") m->num_kv_heads = as_int(1, big);
            else if (key == "head_dim") m->head_dim = as_int(2, big);
            else if (key == "intermediate_size") m->intermediate_size = as_int(1, big);
            else if (key == "vocab_size") m->vocab_size = as_int(1, big);
            else if (key == "rms_norm_eps") m->rms_norm_eps = as_double(1e-30, 1);
            else if (key == "rope_theta") m->rope_theta = as_double(1e-30, 1e30);
            else if (key == "rope_type") m->rope_type = val;
            else if (key == "rope_factor") m->rope_factor = as_double(1e-30, 1e30);
            else if (key == "rope_low_freq_factor") m->rope_low_freq_factor = as_double(1e-30, 1e30);
            else if (key == "rope_high_freq_factor") m->rope_high_freq_factor = as_double(1e-30, 1e30);
            else if (key == "rope_original_max_position") m->rope_original_max_position = as_int(1, big);
            else if (key == "max_position_embeddings") m->max_position_embeddings = as_int(1, big);
            else if (key == "sliding_window") m->sliding_window = as_int(0, big);
            else if (key == "tie_word_embeddings") m->tie_word_embeddings = as_int(0, 1);
            else if (key == "attn_bias") m->attn_bias = as_int(0, 1);
            else if (key == "qk_norm") m->qk_norm = as_int(0, 1);
            else if (key == "weight_dtype") {
                auto d = dtype_from_name(val);
                if (!d || (*d != DType::BF16 && *d != DType::F16 && *d != DType::F32))
                    throw Error(where + ": weight_dtype must be bf16, fp16 or fp32");
                m->weight_dtype = *d;
            } else if (key == "bos_token_id") m->bos_token_id = as_int(-1, big);
            else if (key == "eos_token_ids") {
                m->eos_token_ids.clear();
                std::stringstream ss(val);
                std::string tok;
                while (std::getline(ss, tok, ',')) {
                    val = trim(tok);
                    m->eos_token_ids.push_back(as_int(0, big));
                }
            } else throw Error(where + ": unknown key " + key + " in [model]");
        } else {
            if (key == "tp") e->tp = as_int(1, 1024);
            else if (key == "quant_policy") {
                e->quant_policy = as_int(0, 8);
                if (e->quant_policy != 0 && e->quant_policy != 4 && e->quant_policy != 8)
                    throw Error(where + ": quant_policy must be 0, 4 or 8");
            } else if (key == "kv_scales") {
                if (val != "online" && val != "static") throw Error(where + ": kv_scales must be online or static");
                e->kv_static = val == "static";
            } else if (key == "session_len") e->session_len = as_int(0, big);
            else if (key == "cache_block_seq_len") e->cache_block_seq_len = as_int(1, 65536);
            else if (key == "cache_max_entry_count") e->cache_max_entry_count = as_double(1e-6, 1);
            else throw Error(where + ": unknown key " + key + " in [engine]");
        }
    }
    for (const char* k : {"model.architecture", "model.hidden_size", "model.num_layers", "model.num_heads",
                          "model.num_kv_heads", "model.head_dim", "model.intermediate_size", "model.vocab_size"})
        if (!seen.count(k)) throw Error(path + ": missing " + std::string(k + 6) + " in [model]");
}

}  // namespace tmc
