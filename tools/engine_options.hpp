// Engine and sampling-default options shared by tm-run and tm-serve.
#pragma once

#include <cmath>
#include <cxxopts.hpp>
#include <string>

#include "tm/engine.hpp"
#include "tool_main.hpp"

namespace tmc::tool {

inline void add_engine_options(cxxopts::Options& o) {
    o.add_options("engine")
        ("device", "cpu, cuda or auto", cxxopts::value<std::string>()->default_value("auto"))
        ("threads", "CPU threads (default: all cores)", cxxopts::value<int>()->default_value("0"))
        ("session-len", "longest sequence in tokens (default: config.ini / the model's)", cxxopts::value<int>()->default_value("0"))
        ("cache-tokens", "KV cache size in tokens", cxxopts::value<int64_t>()->default_value("0"))
        ("cache-mib", "KV cache size in MiB (default: 1024 on the CPU, a share of free memory on a GPU)", cxxopts::value<int64_t>()->default_value("0"))
        ("max-batch-tokens", "tokens per step, decode and prefill chunks together (default 512 on the CPU, 4096 on a GPU)", cxxopts::value<int>()->default_value("0"))
        ("max-batch-size", "sequences per step (default 256 on the CPU, 1024 on a GPU)", cxxopts::value<int>()->default_value("0"))
        ("tp", "tensor-parallel ranks (default: the workspace's; must match it)", cxxopts::value<int>()->default_value("0"))
        ("quant-policy", "KV cache: 0 (unquantized), 8 (int8), 4 (int4); default: config.ini's", cxxopts::value<int>()->default_value("-1"))
        ("chat-template", "built-in template name (llama2, llama3, chatml, internlm2, vicuna) or a template file",
         cxxopts::value<std::string>());
}

inline void add_sampling_options(cxxopts::Options& o) {
    o.add_options("sampling defaults")
        ("max-tokens", "default max_tokens", cxxopts::value<int>()->default_value("512"))
        ("temperature", "default temperature (0: greedy)", cxxopts::value<float>()->default_value("1"))
        ("top-p", "default top_p", cxxopts::value<float>()->default_value("1"))
        ("top-k", "default top_k (0: off)", cxxopts::value<int>()->default_value("0"))
        ("min-p", "default min_p", cxxopts::value<float>()->default_value("0"))
        ("repetition-penalty", "default repetition_penalty", cxxopts::value<float>()->default_value("1"))
        ("presence-penalty", "default presence_penalty", cxxopts::value<float>()->default_value("0"))
        ("frequency-penalty", "default frequency_penalty", cxxopts::value<float>()->default_value("0"))
        ("seed", "default seed", cxxopts::value<uint64_t>())
        ("ignore-eos", "default ignore_eos");
}

// Throws UsageError for values out of range.
inline EngineOptions engine_options(const cxxopts::ParseResult& a) {
    for (const char* k : {"threads", "session-len", "max-batch-tokens", "max-batch-size"})
        if (a[k].as<int>() < 0) throw UsageError(std::string("--") + k + " must not be negative");
    EngineOptions eo;
    eo.device = a["device"].as<std::string>();
    eo.threads = a["threads"].as<int>();
    eo.session_len = a["session-len"].as<int>();
    eo.cache_tokens = a["cache-tokens"].as<int64_t>();
    if (eo.cache_tokens < 0 || a["cache-mib"].as<int64_t>() < 0) throw UsageError("cache sizes must not be negative");
    eo.cache_bytes = a["cache-mib"].as<int64_t>() * (int64_t(1) << 20);
    eo.max_batch_tokens = a["max-batch-tokens"].as<int>();
    eo.max_batch_size = a["max-batch-size"].as<int>();
    eo.quant_policy = a["quant-policy"].as<int>();
    eo.tp = a["tp"].as<int>();
    if (eo.tp < 0 || eo.tp > 64) throw UsageError("--tp must be in 1..64");
    if (eo.quant_policy != -1 && eo.quant_policy != 0 && eo.quant_policy != 4 && eo.quant_policy != 8)
        throw UsageError("--quant-policy must be 0, 4 or 8");
    if (a.count("chat-template")) eo.chat_template = a["chat-template"].as<std::string>();
    return eo;
}

inline SamplingParams sampling_defaults(const cxxopts::ParseResult& a) {
    SamplingParams sp;
    sp.max_tokens = a["max-tokens"].as<int>();
    sp.temperature = a["temperature"].as<float>();
    sp.top_p = a["top-p"].as<float>();
    sp.top_k = a["top-k"].as<int>();
    sp.min_p = a["min-p"].as<float>();
    sp.repetition_penalty = a["repetition-penalty"].as<float>();
    sp.presence_penalty = a["presence-penalty"].as<float>();
    sp.frequency_penalty = a["frequency-penalty"].as<float>();
    if (a.count("seed")) sp.seed = a["seed"].as<uint64_t>();
    sp.ignore_eos = a.count("ignore-eos") > 0;
    if (sp.max_tokens < 1) throw UsageError("--max-tokens must be a positive integer");
    if (sp.top_k < 0) throw UsageError("--top-k must not be negative");
    if (!std::isfinite(sp.temperature) || sp.temperature < 0 || !(sp.top_p > 0 && sp.top_p <= 1) ||
        !(sp.min_p >= 0 && sp.min_p <= 1) || !(sp.repetition_penalty > 0) ||
        !(std::abs(sp.presence_penalty) <= 2) || !(std::abs(sp.frequency_penalty) <= 2))
        throw UsageError("sampling options out of range (see --help)");
    return sp;
}

}  // namespace tmc::tool
