#!/bin/sh
# GPU benchmark, one device call: a random-weight model with Llama-3-8B's
# shapes (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336,
# vocab 128256, untied, bf16) generated with PyTorch and converted, then:
#   (a) batch-1 decode tokens/s (prompt 128, 256 new tokens);
#   (b) prefill tokens/s of one 2048-token prompt, and time to first token;
#   (c) offline throughput: the 1000 requests of ../shared/bench/sharegpt-like-1000.jsonl
#       (ShareGPT's input-length histogram under the Llama-3 tokenizer,
#       log-normal outputs with median 130 capped at 1024) submitted at once,
#       EOS ignored: output tokens/s and requests/s;
# each next to Hugging Face transformers on the same GPU in the same call
# (bf16, sdpa; (c) as batched generate over the first SUBSET requests, which
# tm also runs alone for the ratio) and the hardware bound: (a) weight bytes /
# measured copy bandwidth, (b) 2 x params x tokens / measured cuBLAS bf16 peak.
# Writes tm.jsonl, hf.jsonl, bench-gpu.jsonl (one line per figure) and a table
# under $OUT.
# Usage: scripts/bench-gpu.sh BIN_DIR SHARED_DIR [WORK_DIR] [SUBSET]
# A device call is limited to 10 minutes: STEP=tm runs tm's figures only,
# STEP=hf the Hugging Face ones and the table (the model and tm.jsonl kept in
# WORK_DIR between the two calls on a warm machine); default: both.
set -eu
STEP=${STEP:-all}
BIN=$1
SHARED=$2
W=${3:-/tmp/tm-bench}
SUBSET=${4:-128}
OUTDIR=${OUT:-$W/out}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$W/llama8b" "$OUTDIR"
cp "$HERE/llama3-8b-config.json" "$W/llama8b/config.json"
cp "$SHARED/tokenizers/llama3/"tokenizer*.json "$W/llama8b/"
t=$(date +%s)
[ -f "$W/llama8b/model.safetensors.index.json" ] || [ -f "$W/llama8b/model.safetensors" ] ||
    python3 "$HERE/gen-random-hf.py" "$W/llama8b"
echo "generated in $(( $(date +%s) - t )) s"
t=$(date +%s)
[ -d "$W/ws" ] || "$BIN/tm-convert" "$W/llama8b" -o "$W/ws"
echo "converted in $(( $(date +%s) - t )) s"
if [ "$STEP" != hf ]; then
    "$BIN/engine_bench" "$W/ws" 0 cuda 4096 "$SHARED/bench/sharegpt-like-1000.jsonl" "$SUBSET" | tee "$W/tm.jsonl"
fi
[ "$STEP" = tm ] && { cp "$W/tm.jsonl" "$OUTDIR/"; exit 0; }
cp "$W/tm.jsonl" "$OUTDIR/tm.jsonl"
PYTHONUNBUFFERED=1 python3 "$HERE/bench_hf.py" "$W/llama8b" "$SHARED/bench/sharegpt-like-1000.jsonl" "$SUBSET" | tee "$OUTDIR/hf.jsonl"
python3 - "$OUTDIR" "$W/ws/manifest.json" <<'EOF'
import json, sys
out = sys.argv[1]
tm = [json.loads(l) for l in open(out + "/tm.jsonl")]
hf = {d["bench"]: d for d in map(json.loads, open(out + "/hf.jsonl"))}
weight_bytes = sum(f["bytes"] for f in json.load(open(sys.argv[2]))["files"] if "shape" in f)
weight_bytes -= 128256 * 4096 * 2  # the embedding table: one row per token is read
params = hf["params"]["value"] * 1e9
bw, peak = hf["copy_GBps"]["value"] * 1e9, hf["bf16_TFLOPs"]["value"] * 1e12
rows, lines = [], []
offline = [d for d in tm if d["bench"] == "offline_output"]
for d in tm:
    name, v = d["bench"], d["value"]
    r = {"bench": name, "tm": v, "unit": d["unit"]}
    if name == "decode_b1":
        r["bound"] = bw / weight_bytes
    if name == "prefill_2048":
        r["bound"] = peak / (2 * params)
        r["tm_ttft_s"] = d["ttft_s"]
    if name in hf and not (name == "offline_output" and d is offline[-1] and len(offline) > 1):
        r["hf"] = hf[name]["value"]
        r["x_hf"] = v / hf[name]["value"]
    if name == "offline_output":
        r["requests"] = d["requests"]
        r["requests_per_s"] = d["requests_per_s"]
    if "bound" in r:
        r["of_bound"] = v / r["bound"]
    rows.append(r)
with open(out + "/bench-gpu.jsonl", "w") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
print(f"\ncopy {bw / 1e9:.0f} GB/s, bf16 peak {peak / 1e12:.0f} TFLOP/s, {params / 1e9:.2f}B params")
print(f"{'figure':<16} {'tm':>10} {'HF':>10} {'x HF':>6} {'bound':>10} {'of bound':>8}")
for r in rows:
    name = r["bench"] + (f" ({r['requests']})" if "requests" in r else "")
    print(f"{name:<16} {r['tm']:>10.1f} {r.get('hf', float('nan')):>10.1f} {r.get('x_hf', float('nan')):>6.2f} "
          f"{r.get('bound', float('nan')):>10.1f} {r.get('of_bound', float('nan')):>8.2f}")
EOF
