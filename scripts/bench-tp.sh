#!/bin/sh
# Tensor parallelism on a machine with two or more GPUs, one device call:
#   1. the GPU tests (CudaBackend.TensorParallelMatchesOneRank runs with 2+ GPUs);
#   2. the random Llama-3-8B-shaped model of scripts/bench-gpu.sh converted
#      with --tp 1 and --tp 2; greedy outputs of --tp 2 against --tp 1 on
#      the golden prompts' texts (32 tokens), on that model and on tinytech
#      (SHARED_DIR/models/tinytech-25m); with GPU_TESTS, the 8B model's
#      logits of both compared step by step (teacher forced);
#   3. batch-1 decode and offline throughput (sharegpt-like-1000) for --tp 1
#      and --tp 2 (engine_bench), and the NCCL all-reduce of one decode step
#      (4096 floats) and the bus bandwidth of large messages (allreduce_bench).
# Target: --tp 2 batch-1 decode >= 1.6x --tp 1.
# Usage: scripts/bench-tp.sh BIN_DIR SHARED_DIR [WORK_DIR] [GPU_TESTS]
# A device call is limited to 10 minutes: STEP=prep runs 1 and 2, STEP=bench
# runs 3 (the workspaces kept in WORK_DIR between the calls); default: both.
set -eu
STEP=${STEP:-all}
BIN=$1
SHARED=$2
W=${3:-/tmp/tm-tp}
GPU_TESTS=${4:-}
OUTDIR=${OUT:-$W/out}
HERE=$(cd "$(dirname "$0")" && pwd)
export NCCL_NVLS_ENABLE=0
mkdir -p "$W/llama8b" "$OUTDIR"
if [ "$STEP" != bench ]; then
if [ -n "$GPU_TESTS" ]; then
    TM_SHARED="$SHARED" timeout 300 "$GPU_TESTS" --gtest_filter='Nccl.*:CudaBackend.TensorParallel*' > "$OUTDIR/gpu-tests-tp.txt" 2>&1 ||
        echo "bench-tp: the tensor-parallel GPU tests failed or hung (TM_TP_TRACE=1 shows each rank's progress)"
    cat "$OUTDIR/gpu-tests-tp.txt"
fi
"$BIN/allreduce_bench" 4096 | tee "$OUTDIR/allreduce.jsonl"
cp "$HERE/llama3-8b-config.json" "$W/llama8b/config.json"
cp "$SHARED/tokenizers/llama3/"tokenizer*.json "$W/llama8b/"
[ -f "$W/llama8b/model.safetensors.index.json" ] || [ -f "$W/llama8b/model.safetensors" ] ||
    python3 "$HERE/gen-random-hf.py" "$W/llama8b" > /dev/null
[ -d "$W/ws1" ] || "$BIN/tm-convert" "$W/llama8b" -o "$W/ws1" > /dev/null
[ -d "$W/ws2" ] || "$BIN/tm-convert" "$W/llama8b" -o "$W/ws2" --tp 2 > /dev/null
python3 - "$SHARED/golden/tinytech/greedy-fp32.jsonl" > "$W/greedy.jsonl" <<'PY'
import json, sys
for i, l in enumerate(open(sys.argv[1])):
    g = json.loads(l)
    if "prompt" in g:
        print(json.dumps({"id": i, "prompt": g["prompt"], "temperature": 0, "max_tokens": 32, "ignore_eos": True,
                          "return_token_ids": True}))
PY
# Greedy outputs of --tp 2 against --tp 1 on the golden prompts (32 tokens):
# on the trained tinytech model, and on the random 8B model (whose logits are
# nearly flat: near ties may flip, see the teacher-forced test below).
greedy_pair() {  # NAME WS1 WS2
    "$BIN/tm-run" "$2" --device cuda --jsonl < "$W/greedy.jsonl" > "$OUTDIR/greedy-$1-tp1.jsonl"
    timeout 300 "$BIN/tm-run" "$3" --device cuda --jsonl < "$W/greedy.jsonl" > "$OUTDIR/greedy-$1-tp2.jsonl" ||
        { echo "bench-tp: tm-run --tp 2 failed or hung on $1 (exit $?)"; exit 1; }
    python3 - "$1" "$OUTDIR/greedy-$1-tp1.jsonl" "$OUTDIR/greedy-$1-tp2.jsonl" <<'PY'
import json, sys
a = {j["id"]: j["token_ids"] for j in map(json.loads, open(sys.argv[2]))}
b = {j["id"]: j["token_ids"] for j in map(json.loads, open(sys.argv[3]))}
same = sum(a[k] == b[k] for k in a)
first = [next((i for i, (x, y) in enumerate(zip(a[k], b[k])) if x != y), None) for k in a]
print(f"{sys.argv[1]}: greedy --tp 2 vs --tp 1: {same}/{len(a)} prompts equal over 32 tokens"
      + ("" if same == len(a) else f" (first differing token: {first})"))
PY
}
if [ -d "$SHARED/models/tinytech-25m" ]; then
    [ -d "$W/tt1" ] || "$BIN/tm-convert" "$SHARED/models/tinytech-25m" -o "$W/tt1" > /dev/null
    [ -d "$W/tt2" ] || "$BIN/tm-convert" "$SHARED/models/tinytech-25m" -o "$W/tt2" --tp 2 > /dev/null
    greedy_pair tinytech "$W/tt1" "$W/tt2"
fi
greedy_pair llama8b "$W/ws1" "$W/ws2"
if [ -n "$GPU_TESTS" ]; then
    TM_TP_WS1="$W/ws1" TM_TP_WS2="$W/ws2" timeout 300 "$GPU_TESTS" \
        --gtest_filter='CudaBackend.TensorParallelLargeModelTeacherForced' > "$OUTDIR/teacher-forced.txt" 2>&1 ||
        echo "bench-tp: the teacher-forced comparison failed"
    grep -E "tp2 vs tp1|Failure|Expected|Which|OK \]|FAILED" "$OUTDIR/teacher-forced.txt"
fi
fi
[ "$STEP" = prep ] && exit 0
# SUBSET=N with TM_BENCH_ONLY=decode_b1,offline_subset: the first N requests
# only (a short device call).
for tp in 1 2; do
    "$BIN/engine_bench" "$W/ws$tp" 0 cuda 4096 "$SHARED/bench/sharegpt-like-1000.jsonl" ${SUBSET:-} |
        sed "s/^{/{\"tp\": $tp, /" | tee "$OUTDIR/tm-tp$tp.jsonl"
done
python3 - "$OUTDIR" <<'PY'
import json, sys
out = sys.argv[1]
r = {tp: {d["bench"] + (f" ({d['requests']})" if "requests" in d else ""): d["value"]
          for d in map(json.loads, open(f"{out}/tm-tp{tp}.jsonl"))} for tp in (1, 2)}
for k in r[1]:
    if k in r[2]:
        print(f"{k:<22} tp1 {r[1][k]:>10.1f}  tp2 {r[2][k]:>10.1f}  x{r[2][k] / r[1][k]:.2f}")
PY
