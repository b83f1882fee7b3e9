#!/bin/sh
# GPU checks, run on the GPU machine (make test-gpu, or by hand with the
# binaries built elsewhere):
#   1. tests/gpu (build/tests/gpu-tests): each kernel and the whole CUDA
#      forward pass against the CPU reference on fresh random inputs;
#   2. the kernel tests again under compute-sanitizer memcheck;
#   3. tinytech end to end on the GPU: perplexity of eval.txt within 0.5% of
#      the reference bf16 figure 28.4168, and greedy outputs equal to the
#      reference for at least 10 of the 12 golden prompts over 16 tokens;
#      with the default paths and with the switchable ones off ($OFF).
# Usage: scripts/test-gpu.sh [BUILD_DIR] [SHARED_DIR]   (results also under $OUT when set)
set -eu
BUILD=${1:-build}
SHARED=${2:-${TM_SHARED:-../shared}}
BIN="$BUILD/bin"
GPU_TESTS=${GPU_TESTS:-$BUILD/tests/gpu-tests}
OUTDIR=${OUT:-$(mktemp -d)}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail=0
# The CUDA backend's switchable paths, all off (the default is all on).
OFF="TM_CUDA_MMA_ATTENTION=0 TM_CUDA_RING_DECODE=0 TM_CUDA_FA_PREFILL=0 TM_CUDA_GRAPH_BUCKETS=0 TM_CUDA_GEMV=0 TM_CUDA_SAMPLING=0 TM_CUDA_VECTOR_ELEMENTWISE=0"

echo "== gpu-tests"
TM_SHARED="$SHARED" timeout 600 "$GPU_TESTS" --gtest_output=json:"$OUTDIR/gpu-tests.json" || fail=1

SAN=${COMPUTE_SANITIZER:-/usr/local/cuda/bin/compute-sanitizer}
if [ -x "$SAN" ]; then
    echo "== compute-sanitizer memcheck (kernel tests)"
    TM_GPU_TESTS_QUICK=1 TM_SHARED="$SHARED" timeout 400 "$SAN" --tool memcheck --error-exitcode 9 "$GPU_TESTS" --gtest_filter='Kernels.*' \
        > "$OUTDIR/memcheck.log" 2>&1 && echo "memcheck: clean" || { echo "memcheck: errors (see memcheck.log)"; tail -30 "$OUTDIR/memcheck.log"; fail=1; }
fi

echo "== tinytech end to end on the GPU"
"$BIN/tm-convert" "$SHARED/models/tinytech-25m" -o "$TMP/ws" > /dev/null
# check_ppl FILE LABEL: the perplexity in FILE within 0.5% of the reference bf16 figure.
check_ppl() {
    python3 - "$1" "$2" <<'EOF' || fail=1
import json, sys
p = json.load(open(sys.argv[1]))["perplexity"]
ok = abs(p - 28.4168) / 28.4168 <= 0.005
print(f"{sys.argv[2]}: perplexity {p:.4f} vs reference bf16 28.4168: {'ok' if ok else 'FAIL'} ({(p / 28.4168 - 1) * 100:+.3f}%)")
sys.exit(0 if ok else 1)
EOF
}
"$BIN/tm-run" "$TMP/ws" --device cuda --ppl "$SHARED/text/eval.txt" | tee "$OUTDIR/ppl-cuda.json"
check_ppl "$OUTDIR/ppl-cuda.json" "default paths"
echo "== the switchable paths off ($OFF)"
env $OFF TM_SHARED="$SHARED" timeout 600 "$GPU_TESTS" --gtest_filter='CudaBackend.MatchesCpu*' \
    > "$OUTDIR/gpu-tests-off.txt" 2>&1 && echo "forward pass: ok" || { echo "forward pass: FAIL"; tail -20 "$OUTDIR/gpu-tests-off.txt"; fail=1; }
env $OFF "$BIN/tm-run" "$TMP/ws" --device cuda --ppl "$SHARED/text/eval.txt" > "$OUTDIR/ppl-cuda-off.json" || fail=1
check_ppl "$OUTDIR/ppl-cuda-off.json" "switchable paths off"
echo "== quantized KV cache on the GPU (tinytech perplexity)"
# Static scales come from CALIB_STATS (tm-calib of tinytech on calib.txt) when given.
for mode in int8-online int4-online int8-static int4-static; do
    bits=${mode%%-*}
    rm -rf "$TMP/q"
    cp -r "$TMP/ws" "$TMP/q"
    case $mode in
        *-online) "$BIN/tm-qparams" "$TMP/q" --kv "$bits" --online 2> /dev/null ;;
        *-static) [ -n "${CALIB_STATS:-}" ] || continue
                  "$BIN/tm-qparams" "$TMP/q" --kv "$bits" --stats "$CALIB_STATS" 2> /dev/null ;;
    esac
    "$BIN/tm-run" "$TMP/q" --device cuda --ppl "$SHARED/text/eval.txt" > "$OUTDIR/ppl-cuda-$mode.json" || fail=1
    python3 - "$OUTDIR/ppl-cuda-$mode.json" "$mode" <<'EOF' || fail=1
import json, sys
p = json.load(open(sys.argv[1]))["perplexity"]
mode = sys.argv[2]
bound = {"int8-online": 0.01, "int8-static": 0.01, "int4-online": 0.05, "int4-static": 0.05}[mode]
ok = abs(p / 28.4168 - 1) <= bound
print(f"{mode}: perplexity {p:.4f} ({(p / 28.4168 - 1) * 100:+.3f}% vs bf16 28.4168, bound {bound * 100:.0f}%): {'ok' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
EOF
done
python3 - "$SHARED/golden/tinytech/greedy-fp32.jsonl" > "$TMP/in.jsonl" <<'EOF'
import json, sys
for i, l in enumerate(open(sys.argv[1])):
    g = json.loads(l)
    if "prompt" in g:
        print(json.dumps({"id": i, "prompt": g["prompt"], "temperature": 0, "max_tokens": 16, "return_token_ids": True}))
EOF
"$BIN/tm-run" "$TMP/ws" --device cuda --jsonl < "$TMP/in.jsonl" > "$OUTDIR/greedy-cuda.jsonl" || fail=1
env $OFF "$BIN/tm-run" "$TMP/ws" --device cuda --jsonl < "$TMP/in.jsonl" > "$OUTDIR/greedy-cuda-off.jsonl" || fail=1
for f in greedy-cuda greedy-cuda-off; do
python3 - "$SHARED/golden/tinytech/greedy-fp32.jsonl" "$OUTDIR/$f.jsonl" "$f" <<'EOF' || fail=1
import json, sys
gold = [json.loads(l) for l in open(sys.argv[1])]
out = {o["id"]: o for o in map(json.loads, open(sys.argv[2]))}
same = sum(out[i]["token_ids"][:16] == g["output_ids"][:16] for i, g in enumerate(gold) if "prompt" in g)
n = sum("prompt" in g for g in gold)
print(f"{sys.argv[3]}: {same}/{n} prompts equal the reference over 16 tokens: {'ok' if same >= 10 else 'FAIL'}")
sys.exit(0 if same >= 10 else 1)
EOF
done
echo "== sampling on the GPU: seeded requests repeat, alone and in a batch"
python3 - "$SHARED/golden/tinytech/greedy-fp32.jsonl" > "$TMP/sampled.jsonl" <<'EOF'
import json, sys
for i, l in enumerate(open(sys.argv[1])):
    g = json.loads(l)
    if "prompt" in g:
        print(json.dumps({"id": i, "prompt": g["prompt"], "temperature": 0.8, "top_p": 0.9, "top_k": 50, "seed": i,
                          "max_tokens": 24, "ignore_eos": True, "return_token_ids": True}))
EOF
"$BIN/tm-run" "$TMP/ws" --device cuda --jsonl < "$TMP/sampled.jsonl" > "$OUTDIR/sampled-1.jsonl" || fail=1
"$BIN/tm-run" "$TMP/ws" --device cuda --jsonl < "$TMP/sampled.jsonl" > "$OUTDIR/sampled-2.jsonl" || fail=1
head -1 "$TMP/sampled.jsonl" | "$BIN/tm-run" "$TMP/ws" --device cuda --jsonl > "$OUTDIR/sampled-alone.jsonl" || fail=1
python3 - "$OUTDIR/sampled-1.jsonl" "$OUTDIR/sampled-2.jsonl" "$OUTDIR/sampled-alone.jsonl" <<'EOF' || fail=1
import json, sys
a, b, c = ({o["id"]: o["token_ids"] for o in map(json.loads, open(f))} for f in sys.argv[1:4])
ok = len(a) > 0 and len(c) == 1 and a == b and all(c[k] == a.get(k) for k in c) and all(len(v) == 24 for v in a.values())
print(f"sampled on the GPU: {len(a)} requests repeat with their seeds, alone and batched: {'ok' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
EOF
[ "$fail" -eq 0 ] && echo "test-gpu: all passed" || echo "test-gpu: FAILED"
exit "$fail"
