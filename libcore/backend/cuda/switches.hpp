// Every switch of the CUDA backend, read from the environment once, when a
// backend starts (CudaSwitches::from_env), and handed to what it selects:
// nothing below reads TM_CUDA_* or TM_TP_* itself. tm-run(1) documents
// them; the GPU tests run each fast path alone by setting these fields.
#pragma once

#include <string>

namespace tmc::cuda {

struct CudaSwitches {
    // Fast paths, each on by default; NAME=0 turns it off.
    bool graphs = true;              // TM_CUDA_GRAPHS: decode steps replay captured CUDA graphs
    bool graph_buckets = true;       // TM_CUDA_GRAPH_BUCKETS: padded batch sizes, captured at start-up
    bool split_attention = true;     // TM_CUDA_SPLIT_ATTENTION: long decode rows cut into pieces, then merged
    bool mma_attention = true;       // TM_CUDA_MMA_ATTENTION: prefill tiles on tensor cores
    bool fa_prefill = true;          // TM_CUDA_FA_PREFILL: prefill tiles in registers (flash attention)
    bool ring_decode = true;         // TM_CUDA_RING_DECODE: decode rows by the ring of 32-key chunks
    bool mma_decode = true;          // TM_CUDA_MMA_DECODE: decode rows on tensor cores
    bool gemv = true;                // TM_CUDA_GEMV: projections of 1-2 rows by the matrix-vector kernel
    bool sampling = true;            // TM_CUDA_SAMPLING: sampled rows drawn on the GPU
    bool vector_elementwise = true;  // TM_CUDA_VECTOR_ELEMENTWISE: RMSNorm and SiLU-mul vectorized
    bool pdl = true;                 // TM_CUDA_PDL: programmatic dependent launch
    bool p2p_allreduce = true;       // TM_CUDA_P2P_ALLREDUCE: small all-reduces through peer memory
    bool gemm_tune = true;           // TM_CUDA_GEMM_TUNE: each GEMM shape's algorithm timed at start-up
    // Tuning and profiling.
    bool retune = false;         // TM_CUDA_GEMM_TUNE=retune: time again, ignoring the cache file
    bool gemm_tune_log = false;  // TM_CUDA_GEMM_TUNE_LOG (set): the picks on standard error
    bool profile = false;        // TM_CUDA_PROFILE=1: time each kind of kernel (graphs off)
    bool step_gpu = false;       // TM_CUDA_STEP_GPU=1: decode steps' GPU time against wall time
    long ncu_step = -1;          // TM_CUDA_NCU_STEP=N: the N-th decode step between cudaProfilerStart/Stop
    // Tensor parallelism.
    bool tp_trace = false;     // TM_TP_TRACE=1: each rank's host-side progress on standard error
    long tp_timeout_s = 600;   // TM_TP_TIMEOUT: the longest a rank waits for the others (seconds)

    // Throws tmc::Error for a malformed value (TM_TP_TIMEOUT, TM_CUDA_NCU_STEP).
    static CudaSwitches from_env();
    // The fast paths off (scripts/test-gpu.sh's OFF set, as one value).
    static CudaSwitches all_off();
    // "graphs=1 graph_buckets=0 ...": the fast paths, for logs and test names.
    std::string describe() const;
};

}  // namespace tmc::cuda
