// Decode attention over the paged KV cache on one GPU, Llama-3-8B's heads
// (32 query heads, 8 KV heads, head_dim 128, bf16 cache, blocks of 64
// tokens scattered over the pool): microseconds per launch for batches of
// decode rows, and the rate at which it reads K and V against the device's
// copy bandwidth measured in the same run (a device-to-device copy of 1 GiB,
// read + write). Each batch runs with the ring-of-chunks kernel over the
// backend's work items ("ring": long rows cut into pieces), over one item a
// row ("ring-whole-rows"), and with the generic row kernel ("generic",
// TM_CUDA_RING_DECODE=0). Then prefill
// chunks (whole prompts from position 0, tiled as the backend tiles them) on
// tensor cores: TFLOP/s of the two products (4 x visible keys x heads x
// head_dim a row) for the register kernel ("registers") and the shared-
// memory one ("wmma", TM_CUDA_FA_PREFILL=0). One JSON line per batch and
// kernel. A build without CUDA prints nothing and exits 0.
//   attention_bench [REQUESTS.jsonl]   (with it, decode batches whose contexts
//   are drawn from the requests: prompt + part of the output)
// TM_BENCH_BATCH=NAME runs the decode batch of that name alone; =prefill, the
// prefill batches alone (the last: the request file's prompts, to 16,384 tokens).
#include <cstdio>
#include <cstdlib>

#if TM_WITH_CUDA
#include <cuda_runtime.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <utility>
#include <string>
#include <vector>

#include "kernels/kernels.cuh"
#include "tests/bench/gpu_timing.hpp"

namespace {

void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) {
        std::fprintf(stderr, "attention_bench: %s: %s\n", what, cudaGetErrorString(e));
        std::exit(1);
    }
}

template <class T>
T* upload(const std::vector<T>& h) {
    T* d = nullptr;
    check(cudaMalloc(&d, h.size() * sizeof(T)), "cudaMalloc");
    check(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), "upload");
    return d;
}

using tmc::bench::time_it;

struct Batch {
    std::string name;
    int rows, lo, hi;      // contexts uniform in [lo, hi]
    std::vector<int> ctx = {};  // or these
};

// A pool of `bytes` of 8B-shaped cache blocks (`layers` layers each, filled
// with a constant), and the pool's block ids in a random order (blocks of a
// sequence scattered, as a serving engine's are).
struct Pool {
    tmc::cuda::KvLayout kv;
    std::vector<int> perm;
    Pool(int layers, size_t bytes, std::mt19937& g) {
        kv.layers = layers, kv.kv_heads = 8, kv.head_dim = 128, kv.block_size = 64;
        const int blocks = int(bytes / kv.block_bytes());
        check(cudaMalloc(&kv.base, size_t(blocks) * kv.block_bytes()), "cudaMalloc cache");
        check(cudaMemset(kv.base, 0x3c, size_t(blocks) * kv.block_bytes()), "fill cache");
        perm.resize(static_cast<size_t>(blocks));
        std::iota(perm.begin(), perm.end(), 0);
        std::shuffle(perm.begin(), perm.end(), g);
    }
    ~Pool() { cudaFree(kv.base); }
};

// The decode batches over one layout of the cache: `layers` layers in each
// block (the backend's layout: a block holds every layer), attending
// layer `layer`; with `generic`, the generic kernel too.
void decode_batches(const std::vector<Batch>& batches, int layers, int layer, size_t pool_bytes, double copy_gbs,
                    bool generic, std::mt19937& g) {
    const int nq = 32, nkv = 8, hd = 128, bs = 64;
    const Pool pool(layers, pool_bytes, g);
    const tmc::cuda::KvLayout& kv = pool.kv;
    const std::vector<int>& perm = pool.perm;
    const int qkv_ld = (nq + 2 * nkv) * hd;
    const char* only = std::getenv("TM_BENCH_BATCH");  // one batch (and no prefill), e.g. for ncu
    for (const Batch& bt : batches) {
        if (only && bt.name != only) continue;
        std::uniform_int_distribution<int> len(bt.lo, bt.hi);
        std::vector<int> positions, row_seq, block_offset, blocks;
        double kv_bytes = 0;
        size_t next = 0;
        for (int r = 0; r < bt.rows; ++r) {
            const int ctx = bt.ctx.empty() ? len(g) : bt.ctx[size_t(r)];
            positions.push_back(ctx - 1), row_seq.push_back(r), block_offset.push_back(int(blocks.size()));
            for (int b = 0; b < (ctx + bs - 1) / bs; ++b) blocks.push_back(perm[next++ % perm.size()]);
            kv_bytes += double(ctx) * nkv * hd * 2 * 2;
        }
        int *dpos = upload(positions), *dseq = upload(row_seq), *doff = upload(block_offset), *dblk = upload(blocks);
        std::vector<uint16_t> qh(size_t(bt.rows) * qkv_ld, 0x3c23);  // bf16 0.00995
        uint16_t* dq = upload(qh);
        void* out = nullptr;
        check(cudaMalloc(&out, size_t(bt.rows) * nq * hd * 2), "cudaMalloc out");
        const tmc::cuda::BatchDev bd{dpos, dseq, doff, dblk};
        // As the backend plans them: rows longest first, long ones cut into
        // pieces; and (for comparison) one item a row.
        std::vector<int> order(static_cast<size_t>(bt.rows)), lens(static_cast<size_t>(bt.rows));
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(),
                         [&](int x, int y) { return positions[size_t(x)] > positions[size_t(y)]; });
        for (int i = 0; i < bt.rows; ++i) lens[size_t(i)] = positions[size_t(order[size_t(i)])] + 1;
        const int cap = tmc::cuda::decode_item_capacity(bt.rows, nkv);
        float* scratch = nullptr;
        check(cudaMalloc(&scratch, tmc::cuda::attention_item_floats(cap, nq, hd) * 4), "cudaMalloc scratch");
        std::vector<int4> items(static_cast<size_t>(cap)), whole(static_cast<size_t>(cap));
        std::vector<int2> row_items(static_cast<size_t>(bt.rows)), whole_rows(static_cast<size_t>(bt.rows));
        tmc::cuda::plan_decode_items(order.data(), lens.data(), bt.rows, nkv, true, items.data(), row_items.data());
        tmc::cuda::plan_decode_items(order.data(), lens.data(), bt.rows, nkv, false, whole.data(), whole_rows.data());
        const int n_items = int(std::count_if(items.begin(), items.end(), [](const int4& v) { return v.x >= 0; }));
        int4 *ditems = upload(items), *dwhole = upload(whole);
        int2 *drows = upload(row_items), *dwrows = upload(whole_rows);
        // mma: on tensor cores (the default); ring: on CUDA cores; whole
        // rows: one item a row; generic: the row kernel.
        for (const int variant : {0, 1, 3, 4, 2}) {
            if (variant == 2 && !generic) continue;
            const bool whole_rows = variant == 1 || variant == 4;
            tmc::cuda::AttnArgs a{dq, qkv_ld, bt.rows, nq, nkv, hd, 0, 0.088f, layer, out, whole_rows ? nullptr : scratch};
            a.ring_decode = variant != 2;
            a.mma_decode = variant < 2;
            const double s = time_it(
                [&] {
                    tmc::cuda::paged_attention(tmc::cuda::Dt::BF16, a, bd, kv, whole_rows ? dwhole : ditems, cap,
                                               whole_rows ? dwrows : drows, bt.rows, nullptr);
                },
                20);
            check(cudaGetLastError(), "paged_attention");
            const double gbs = kv_bytes / s / 1e9;
            std::printf("{\"bench\": \"decode_attention\", \"batch\": \"%s\", \"layers\": %d, \"kernel\": \"%s\", "
                        "\"us\": %.1f, \"GBps\": %.1f, \"of_copy_bw\": %.3f, \"items\": %d}\n",
                        bt.name.c_str(), layers,
                        variant == 2   ? "generic"
                        : variant == 4 ? "ring-whole-rows"
                        : variant == 3 ? "ring"
                        : variant == 1 ? "mma-whole-rows"
                                       : "mma",
                        s * 1e6, gbs, gbs / copy_gbs, whole_rows ? bt.rows : n_items);
        }
        cudaFree(ditems), cudaFree(dwhole), cudaFree(drows), cudaFree(dwrows);
        cudaFree(dpos), cudaFree(dseq), cudaFree(doff), cudaFree(dblk), cudaFree(dq), cudaFree(out), cudaFree(scratch);
    }
}

}  // namespace

int main(int argc, char** argv) {
    const int nq = 32, nkv = 8, hd = 128, bs = 64;
    const double copy_gbs = tmc::bench::copy_bandwidth_gbs();  // the roofline

    std::vector<Batch> batches = {
        {"1x4096", 1, 4096, 4096},          {"16x1024", 16, 1024, 1024},  {"64x64-1024", 64, 64, 1024},
        {"181x64-800", 181, 64, 800},       {"279x64-900", 279, 64, 900}, {"512x64-1024", 512, 64, 1024},
        {"512x200-600", 512, 200, 600},     {"256x2048", 256, 2048, 2048}, {"128x32-4096", 128, 32, 4096},
        {"512x16-128", 512, 16, 128},
    };
    std::mt19937 g(7);
    // Decode rows as an offline run of a request file has them: each
    // request's prompt plus part of its output.
    std::vector<std::pair<int, int>> req;
    if (argc > 1) {
        if (FILE* f = std::fopen(argv[1], "r")) {
            char line[256];
            int in = 0, out = 0;
            while (std::fgets(line, sizeof line, f))
                if (std::sscanf(line, "{\"input_len\": %d, \"output_len\": %d", &in, &out) == 2) req.push_back({in, out});
            std::fclose(f);
        }
        for (int rows : {92, 187, 372, 685}) {
            if (req.empty()) break;
            Batch b{"requests-" + std::to_string(rows), rows, 0, 0};
            for (int r = 0; r < rows; ++r) {
                const auto& q = req[size_t(g() % req.size())];
                b.ctx.push_back(q.first + 1 + int(g() % unsigned(q.second + 1)));
            }
            batches.push_back(b);
            // The same rows with every context the mean: skew against length.
            long sum = 0;
            for (int c : b.ctx) sum += c;
            Batch flat{b.name + "-flat", rows, int(sum / rows), int(sum / rows)};
            batches.push_back(flat);
        }
    }
    decode_batches(batches, 1, 0, size_t(8) << 30, copy_gbs, true, g);
    // The backend's layout: 32 layers a block, 40 GB of cache.
    decode_batches(batches, 32, 17, size_t(40) << 30, copy_gbs, false, g);
    if (const char* only = std::getenv("TM_BENCH_BATCH"); only && std::string(only) != "prefill") return 0;
    const Pool pool(1, size_t(8) << 30, g);
    const tmc::cuda::KvLayout& kv = pool.kv;
    const std::vector<int>& perm = pool.perm;
    const int qkv_ld = (nq + 2 * nkv) * hd;
    // Prefill: `seqs` prompts of `len` tokens each, one step.
    struct Prefill {
        std::string name;
        std::vector<int> lens;
    };
    std::vector<Prefill> prefills = {{"1x2048", {2048}},
                                     {"8x512", std::vector<int>(8, 512)},
                                     {"16x256", std::vector<int>(16, 256)},
                                     {"4x1024", std::vector<int>(4, 1024)}};
    // The request file's prompts in order, whole, to 16,384 tokens: the
    // attention of an offline run's prompts.
    if (!req.empty()) {
        Prefill pr{"requests-prompts", {}};
        int sum = 0;
        for (const auto& q : req) {
            if (sum + q.first > 16384) break;
            pr.lens.push_back(q.first), sum += q.first;
        }
        prefills.push_back(pr);
    }
    for (const Prefill& pf : prefills) {
        int T = 0;
        for (int n : pf.lens) T += n;
        const int tr = tmc::cuda::attention_tile_rows(nq / nkv);
        std::vector<int> positions, row_seq, block_offset, blocks, tiles;
        size_t next = 0;
        double flops = 0;
        int row0 = 0;
        for (int q = 0; q < int(pf.lens.size()); ++q) {
            const int len = pf.lens[size_t(q)];
            block_offset.push_back(int(blocks.size()));
            for (int b = 0; b < (len + bs - 1) / bs; ++b) blocks.push_back(perm[next++ % perm.size()]);
            for (int p = 0; p < len; ++p) {
                positions.push_back(p), row_seq.push_back(q);
                flops += 4.0 * (p + 1) * nq * hd;
            }
            for (int r = 0; r < len; r += tr) tiles.push_back(row0 + r), tiles.push_back(std::min(tr, len - r));
            row0 += len;
        }
        int *dpos = upload(positions), *dseq = upload(row_seq), *doff = upload(block_offset), *dblk = upload(blocks),
            *dtiles = upload(tiles);
        std::vector<uint16_t> qh(size_t(T) * qkv_ld, 0x3c23);  // bf16 0.00995
        uint16_t* dq = upload(qh);
        void* out = nullptr;
        check(cudaMalloc(&out, size_t(T) * nq * hd * 2), "cudaMalloc out");
        const tmc::cuda::BatchDev bd{dpos, dseq, doff, dblk};
        for (const bool regs : {true, false}) {
            tmc::cuda::AttnArgs a{dq, qkv_ld, T, nq, nkv, hd, 0, 0.088f, 0, out};
            a.tensor_cores = true, a.register_tiles = regs;
            const double s = time_it(
                [&] {
                    tmc::cuda::paged_attention_tiled(tmc::cuda::Dt::BF16, a, bd, kv, reinterpret_cast<const int2*>(dtiles),
                                                     int(tiles.size() / 2), nullptr);
                },
                10);
            check(cudaGetLastError(), "paged_attention_tiled");
            std::printf("{\"bench\": \"prefill_attention\", \"batch\": \"%s\", \"kernel\": \"%s\", \"us\": %.1f, "
                        "\"TFLOPs\": %.1f}\n",
                        pf.name.c_str(), regs ? "registers" : "wmma", s * 1e6, flops / s / 1e12);
        }
        cudaFree(dpos), cudaFree(dseq), cudaFree(doff), cudaFree(dblk), cudaFree(dtiles), cudaFree(dq), cudaFree(out);
    }
    return 0;
}
#else
int main() { return 0; }
#endif
