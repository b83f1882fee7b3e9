// Engine::open: the workspace (or a Hugging Face directory converted on the
// fly), the tokenizer and chat template, the backend (CUDA when a GPU is
// usable, else the CPU), and the KV cache sized from the options, the
// workspace's [engine] section or the device's free memory.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>

#include "base/mapped_file.hpp"
#include "engine/engine_state.hpp"
#include "model/decoder.hpp"
#include "model/tp_split.hpp"
#include "tm/device.hpp"
#include "tm/error.hpp"
#include "tm/qparams.hpp"

namespace tmc {

namespace {

bool is_workspace(const std::string& path) { return path_exists(path + "/manifest.json"); }

// tm-qparams' scales (formats/workspace.md) for the whole model,
// [layers][4][kv_heads], assembled from every rank's file.
std::vector<float> static_kv_params(const Workspace& ws, int bits) {
    const ModelConfig& m = ws.model();
    const TpSplit sp = TpSplit::make(m, ws.tp());
    std::vector<float> out(size_t(m.num_layers) * 4 * m.num_kv_heads, 0.0f);
    for (int r = 0; r < ws.tp(); ++r) {
        const std::string rel = kv_qparams_path(r, bits);
        if (!ws.has_file(rel))
            throw Error(ws.dir() + ": kv_scales = static but the workspace has no int" + std::to_string(bits) +
                        " scales (run tm-qparams " + ws.dir() + " --kv int" + std::to_string(bits) +
                        ", or set kv_scales = online)");
        WeightView v = ws.tensor_at(rel);
        const int hk = sp.kv_heads, h0 = sp.kv_head_begin(r);
        if (v.dtype != DType::F32 || v.shape != std::vector<int64_t>{m.num_layers, 4, hk})
            throw Error(ws.dir() + "/" + rel + ": not [layers, 4, kv heads of the rank] fp32");
        const float* f = static_cast<const float*>(v.data);
        for (int l = 0; l < m.num_layers; ++l)
            for (int row = 0; row < 4; ++row)
                for (int h = 0; h < hk; ++h) {
                    const float x = f[(size_t(l) * 4 + row) * hk + h];
                    if (!std::isfinite(x) || (row % 2 == 0 && !(x > 0)))
                        throw Error(ws.dir() + "/" + rel + ": a scale is not a positive finite number");
                    out[(size_t(l) * 4 + row) * m.num_kv_heads + h0 + h] = x;
                }
    }
    return out;
}

// A scratch directory removed when the engine has mapped what it needs.
struct TempDir {
    std::string path;
    TempDir() {
        std::string tmpl = (std::filesystem::temp_directory_path() / "tm-hf-XXXXXX").string();
        if (!mkdtemp(tmpl.data())) throw Error("cannot create a temporary directory for the conversion");
        path = tmpl;
    }
    ~TempDir() {
        std::error_code ec;
        std::filesystem::remove_all(path, ec);
    }
};

}  // namespace

namespace {

// The workspace, its tokenizer and the chat template (--chat-template, or
// the tokenizer's own).
void load_model(Engine::Impl& im, const std::string& ws_dir, const EngineOptions& opt) {
    im.ws = std::make_unique<Workspace>(ws_dir);
    im.cfg = im.ws->model();
    im.tok = Tokenizer::load(im.ws->tokenizer_dir());
    if (!opt.chat_template.empty()) {
        auto names = ChatTemplate::builtin_names();
        if (std::find(names.begin(), names.end(), opt.chat_template) != names.end() || opt.chat_template == "qwen" ||
            opt.chat_template == "smollm")
            im.tpl = ChatTemplate::builtin(opt.chat_template);
        else if (path_exists(opt.chat_template))
            im.tpl = ChatTemplate(read_file(opt.chat_template));
        else
            throw Error("--chat-template " + opt.chat_template + ": neither a built-in template nor a file");
    } else if (!im.tok->chat_template().empty()) {
        im.tpl = ChatTemplate(im.tok->chat_template());
    }

}

// The backend: CUDA when a GPU is usable (or asked for), else the CPU.
// Returns whether it runs on a GPU.
bool open_backend(Engine::Impl& im, const EngineOptions& opt) {
    std::string device = opt.device.empty() ? "auto" : opt.device;
    if (device != "auto" && device != "cpu" && device != "cuda")
        throw Error("unknown device \"" + device + "\" (cpu, cuda or auto)");
    const int kv_quant = opt.quant_policy >= 0 ? opt.quant_policy : im.ws->engine().quant_policy;
    if (kv_quant != 0 && kv_quant != 4 && kv_quant != 8) throw Error("quant_policy must be 0, 4 or 8");
    const int tp = im.ws->tp();
    if (opt.tp != 0 && opt.tp != tp)
        throw Error(im.ws->dir() + ": converted for --tp " + std::to_string(tp) + ", asked to run with --tp " +
                    std::to_string(opt.tp) + " (run with --tp " + std::to_string(tp) + ", or convert again with --tp " +
                    std::to_string(opt.tp) + ")");
    std::string why;
    if (device != "cpu") cuda_prepare_for_ranks(tp);
    const bool gpu = device != "cpu" && cuda_device_count(&why) > 0;
    if (device == "cuda" && !gpu) throw Error("--device cuda: no usable GPU (" + why + ")");
    std::vector<float> kv_params;
    if (kv_quant != 0 && im.ws->engine().kv_static) kv_params = static_kv_params(*im.ws, kv_quant);
    bool on_gpu = false;
    if (gpu) {
        try {
            CudaBackendOptions cbo;
            cbo.program = model_program(*im.ws);
            cbo.kv_quant = kv_quant;
            cbo.kv_params = kv_params;
            im.backend = make_cuda_tp_backend(*im.ws, cbo);
            on_gpu = true;
        } catch (const Error& e) {
            if (device == "cuda") throw;
            if (opt.log) opt.log(std::string("CUDA backend unavailable (") + e.what() + "); using the CPU");
        }
    }
    if (!im.backend) {
        CpuBackendOptions co;
        co.program = model_program(*im.ws);
        co.threads = opt.threads;
        co.kv_quant = kv_quant;
        co.kv_params = std::move(kv_params);
        if (const char* g = std::getenv("TM_CPU_ASYNC")) co.async = std::string(g) == "1";
        im.backend = make_cpu_tp_backend(*im.ws, co);
    }

    return on_gpu;
}

}  // namespace

std::unique_ptr<Engine> Engine::open(const std::string& path, const EngineOptions& opt) {
    auto im = std::make_unique<Impl>();
    std::optional<TempDir> tmp;
    std::string ws_dir = path;
    if (!is_workspace(path)) {
        if (!path_exists(path + "/config.json"))
            throw Error(path + ": neither a workspace (no manifest.json) nor a Hugging Face model (no config.json)");
        // A Hugging Face directory: convert it first (files are unlinked once
        // mapped; the mappings stay valid).
        tmp.emplace();
        ws_dir = tmp->path + "/ws";
        ConvertOptions co;
        convert_hf_model(path, ws_dir, co);
    }
    load_model(*im, ws_dir, opt);
    const bool on_gpu = open_backend(*im, opt);
    const EngineConfig& ec = im->ws->engine();
    int session_len = opt.session_len > 0 ? opt.session_len : ec.session_len > 0 ? ec.session_len
                                                                                 : im->cfg.max_position_embeddings;
    if (session_len <= 1) throw Error("session length must be at least 2 tokens");
    const int block_size = opt.block_size > 0 ? opt.block_size : ec.cache_block_seq_len;
    if (block_size <= 0 || block_size > 4096) throw Error("block size must be in 1..4096");
    const size_t per_token = im->backend->kv_bytes_per_token();
    // Default step budget: 512 tokens on the CPU, 4096 on a GPU (whose
    // prefill is efficient in large chunks; the figures of scripts/bench-gpu.sh).
    const int batch_tokens = opt.max_batch_tokens > 0 ? opt.max_batch_tokens : on_gpu ? 4096 : 512;
    int64_t tokens = opt.cache_tokens;
    if (tokens <= 0) {
        int64_t bytes = opt.cache_bytes > 0
                            ? opt.cache_bytes
                            : int64_t(im->backend->default_kv_bytes(ec.cache_max_entry_count, batch_tokens));
        tokens = bytes / int64_t(per_token);
        if (opt.cache_bytes <= 0) tokens = std::max<int64_t>(tokens, session_len);  // the default fits one full sequence
    }
    int num_blocks = int(std::min<int64_t>(tokens / block_size, 1 << 30));
    if (num_blocks < 1) throw Error("KV cache too small: " + std::to_string(tokens) + " tokens is less than one block of " +
                                    std::to_string(block_size));
    im->max_ctx = int(std::min<int64_t>(session_len, int64_t(num_blocks) * block_size));
    im->max_batch_tokens = batch_tokens;
    // Default sequences per step: 256 on the CPU, 1024 on a GPU (offline
    // throughput of the 8B model on an H100, 1000 requests: 8,787 output
    // tokens/s against 8,566 with 512, in the same run; every request starts
    // early, so fewer long ones are left alone at the end).
    im->max_batch_size = opt.max_batch_size > 0 ? opt.max_batch_size : on_gpu ? 1024 : 256;
    im->max_batch_size = std::min(im->max_batch_size, im->max_batch_tokens);
    BackendLimits lim;
    lim.num_blocks = num_blocks;
    lim.block_size = block_size;
    lim.max_batch_tokens = im->max_batch_tokens;
    lim.max_logit_rows = im->max_batch_tokens;
    lim.max_context = im->max_ctx;
    im->backend->init(lim);
    im->bm = std::make_unique<BlockManager>(num_blocks, block_size);
    {
        // Enough threads to sample a large batch quickly, leaving the rest of
        // the machine alone (a CPU backend uses its own pool).
        const int hw = int(std::thread::hardware_concurrency());
        int n = std::clamp(hw / 2, 1, 8);
        if (const char* t = std::getenv("TM_SAMPLE_THREADS")) n = std::clamp(std::atoi(t), 1, 64);
        im->sample_pool = std::make_unique<ThreadPool>(n);
        for (int i = 0; i < im->sample_pool->size(); ++i)
            im->samplers.push_back(std::make_unique<Sampler>(im->cfg.vocab_size));
        im->lp_rows.resize(size_t(im->sample_pool->size()));
    }
    im->eos_ids = im->cfg.eos_token_ids;
    if (im->tok->eos_id() >= 0 && std::find(im->eos_ids.begin(), im->eos_ids.end(), im->tok->eos_id()) == im->eos_ids.end())
        im->eos_ids.push_back(im->tok->eos_id());
    const char* async_output = std::getenv("TM_ASYNC_OUTPUT");
    im->defer_text = im->backend->asynchronous() && !(async_output && std::string(async_output) == "0");
    im->st.blocks_total = num_blocks;
    im->st.blocks_free = num_blocks;
    im->st.block_size = block_size;
    im->snapshot = im->st;
    if (opt.log)
        opt.log("backend " + im->backend->name() + "; KV cache " + std::to_string(int64_t(num_blocks) * block_size) +
                " tokens (" + std::to_string(num_blocks) + " blocks of " + std::to_string(block_size) +
                "); context " + std::to_string(im->max_ctx));
    if (const char* path = std::getenv("TM_STEP_LOG"); path && *path) {
        im->step_log.reset(std::fopen(path, "w"));
        if (!im->step_log) throw Error(std::string("TM_STEP_LOG: cannot write ") + path);
        std::setvbuf(im->step_log.get(), nullptr, _IOLBF, 0);
    }
    Impl* raw = im.get();
    im->thread = std::thread([raw] { raw->loop(); });
    return std::unique_ptr<Engine>(new Engine(std::move(im)));
}

}  // namespace tmc
