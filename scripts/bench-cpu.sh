#!/bin/sh
# CPU engine speed on tinytech (or MODEL_DIR): batch-1 decode tokens/s
# (prompt 128, 256 new tokens), batch-16 decode throughput (16 x 128 new
# tokens), and prompt processing tokens/s (one 512-token prompt), each the
# median of three runs, greedy with ignore_eos. Baselines measured in the same
# run: the naive reference forward pass (one thread, fp32) and the memory
# bandwidth bound of batch-1 decode (weight bytes / measured read bandwidth;
# it can be beaten when part of the weights stays in the L3 cache).
# Each figure on every instruction-set path the CPU has (AVX-512 where
# present, and AVX2). One JSON line per figure (with its "isa"), then a table.
# Usage: scripts/bench-cpu.sh [MODEL_DIR] [BUILD_DIR] [THREADS]
set -eu
MODEL=${1:-${TM_SHARED:-../shared}/models/tinytech-25m}
BUILD=${2:-build}
THREADS=${3:-0}
make -s "$BUILD/bench/engine_bench" "$BUILD/bin/tm-convert" >/dev/null 2>&1 || make "$BUILD/bench/engine_bench" "$BUILD/bin/tm-convert"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$BUILD/bin/tm-convert" "$MODEL" -o "$TMP/ws" >/dev/null
# Every instruction-set path the CPU has: AVX2 always (most users' machines),
# AVX-512 where present (the default there); TM_CPU_ISA picks the path.
ISAS=avx2
grep -q avx512f /proc/cpuinfo 2>/dev/null && grep -q avx512bw /proc/cpuinfo && grep -q avx512vl /proc/cpuinfo && ISAS="avx512 avx2"
: > "$TMP/out.jsonl"
for isa in $ISAS; do
    TM_CPU_ISA=$isa "$BUILD/bench/engine_bench" "$TMP/ws" "$THREADS" | sed "s/^{/{\"isa\": \"$isa\", /" | tee -a "$TMP/out.jsonl"
done
python3 - "$TMP/out.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print()
print(f"{'isa':<7} {'figure':<12} {'tok/s':>9}  baseline")
for r in rows:
    extra = ""
    if r["bench"] == "decode_b1":
        extra = f"{r['x_reference']:.0f}x the reference; {r['of_bound']:.2f} of the bandwidth bound ({r['bandwidth_bound']:.0f} tok/s at {r['read_GBps']:.1f} GB/s)"
    elif r["bench"] == "decode_b16":
        extra = f"{r['x_b1']:.2f}x batch 1"
    else:
        extra = f"{r['x_reference']:.0f}x the reference"
    print(f"{r['isa']:<7} {r['bench']:<12} {r['value']:>9.1f}  {extra}")
EOF
