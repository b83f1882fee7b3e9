#include "backend/cuda/switches.hpp"

#include <cstdlib>

#include "tm/error.hpp"

namespace tmc::cuda {

namespace {

// The fast paths by name, for from_env, all_off and describe.
struct Path {
    const char* env;
    const char* name;
    bool CudaSwitches::*field;
};
constexpr Path kPaths[] = {
    {"TM_CUDA_GRAPHS", "graphs", &CudaSwitches::graphs},
    {"TM_CUDA_GRAPH_BUCKETS", "graph_buckets", &CudaSwitches::graph_buckets},
    {"TM_CUDA_SPLIT_ATTENTION", "split_attention", &CudaSwitches::split_attention},
    {"TM_CUDA_MMA_ATTENTION", "mma_attention", &CudaSwitches::mma_attention},
    {"TM_CUDA_FA_PREFILL", "fa_prefill", &CudaSwitches::fa_prefill},
    {"TM_CUDA_RING_DECODE", "ring_decode", &CudaSwitches::ring_decode},
    {"TM_CUDA_MMA_DECODE", "mma_decode", &CudaSwitches::mma_decode},
    {"TM_CUDA_GEMV", "gemv", &CudaSwitches::gemv},
    {"TM_CUDA_SAMPLING", "sampling", &CudaSwitches::sampling},
    {"TM_CUDA_VECTOR_ELEMENTWISE", "vector_elementwise", &CudaSwitches::vector_elementwise},
    {"TM_CUDA_PDL", "pdl", &CudaSwitches::pdl},
    {"TM_CUDA_P2P_ALLREDUCE", "p2p_allreduce", &CudaSwitches::p2p_allreduce},
    {"TM_CUDA_GEMM_TUNE", "gemm_tune", &CudaSwitches::gemm_tune},
};

bool is(const char* v, const char* want) { return v && std::string(v) == want; }

// A whole number >= min; otherwise tmc::Error "NAME must be WHAT".
long whole(const char* name, const char* v, long min, const char* what) {
    char* end = nullptr;
    const long x = std::strtol(v, &end, 10);
    if (end == v || *end || x < min) throw Error(std::string(name) + " must be " + what);
    return x;
}

}  // namespace

CudaSwitches CudaSwitches::from_env() {
    CudaSwitches s;
    for (const Path& p : kPaths)
        if (const char* v = std::getenv(p.env)) s.*p.field = std::string(v) != "0";
    s.retune = is(std::getenv("TM_CUDA_GEMM_TUNE"), "retune");
    s.gemm_tune_log = std::getenv("TM_CUDA_GEMM_TUNE_LOG") != nullptr;
    s.profile = is(std::getenv("TM_CUDA_PROFILE"), "1");
    s.step_gpu = is(std::getenv("TM_CUDA_STEP_GPU"), "1");
    if (const char* v = std::getenv("TM_CUDA_NCU_STEP")) s.ncu_step = whole("TM_CUDA_NCU_STEP", v, 0, "a step number (0, 1, ...)");
    s.tp_trace = is(std::getenv("TM_TP_TRACE"), "1");
    if (const char* v = std::getenv("TM_TP_TIMEOUT")) s.tp_timeout_s = whole("TM_TP_TIMEOUT", v, 1, "a positive number of seconds");
    return s;
}

CudaSwitches CudaSwitches::all_off() {
    CudaSwitches s;
    for (const Path& p : kPaths) s.*p.field = false;
    return s;
}

std::string CudaSwitches::describe() const {
    std::string out;
    for (const Path& p : kPaths) out += std::string(out.empty() ? "" : " ") + p.name + "=" + (this->*p.field ? "1" : "0");
    return out;
}

}  // namespace tmc::cuda
