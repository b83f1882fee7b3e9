#!/bin/sh
# Assembles what a GPU machine call needs in an ignored folder (default
# .carry/), within the 64 MiB a call carries; a call then names it in
# `carry` and unpacks there (see the header of scripts/test-gpu.sh):
#   bin.tar.gz       the tools, GPU tests and benches of build/, stripped
#   lib/             the shared libraries the device image lacks (simdjson)
#   shared/          the parts of SHARED the GPU scripts read: golden/tinytech,
#                    text/eval.txt, bench/sharegpt-like-1000.jsonl
#   tokenizers.tar.gz  SHARED/tokenizers/llama3 (9 MB as files: the carry
#                    would pass 64 MiB; untar into shared/)
#   tinytech.tar.gz  the trained 25M model (untar into shared/models)
#   random.tar.gz    the random models' configs and tokenizers (their weights
#                    are made there by scripts/gen-random-hf.py: smaller)
#   calib.stats      tm-calib of tinytech on text/calib.txt, 16 x 512 tokens
#                    (the static KV scales test-gpu.sh checks)
# Usage: scripts/device-carry.sh SHARED_DIR [OUT_DIR] (after make)
set -eu
SHARED=$1
C=${2:-.carry}
B=${BUILD:-build}
for f in "$B/bin/tm-run" "$B/bin/tm-convert" "$B/bin/tm-qparams" "$B/bin/tm-calib" "$B/tests/gpu-tests" \
         "$B/bench/engine_bench" "$B/bench/allreduce_bench" "$B/bench/sampler_bench" "$B/bench/attention_bench" "$B/bench/gemm_bench"; do
    [ -x "$f" ] || { echo "device-carry: $f missing (run make with nvcc present)" >&2; exit 1; }
done
mkdir -p "$C/lib"
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/bin"
for f in tm-run tm-convert tm-qparams tm-calib; do strip -o "$STAGE/bin/$f" "$B/bin/$f"; done
strip -o "$STAGE/bin/gpu-tests" "$B/tests/gpu-tests"
for f in engine_bench allreduce_bench sampler_bench attention_bench gemm_bench; do strip -o "$STAGE/bin/$f" "$B/bench/$f"; done
tar czf "$C/bin.tar.gz" -C "$STAGE" bin
# The libraries the binaries load that are not part of the CUDA image.
ldd "$B/bin/tm-run" | awk '/simdjson/ {print $3}' | while read -r so; do cp -L "$so" "$C/lib/"; done
for d in golden/tinytech text bench; do mkdir -p "$C/shared/$d"; done
cp "$SHARED/golden/tinytech/"*.jsonl "$C/shared/golden/tinytech/"
cp "$SHARED/text/eval.txt" "$C/shared/text/"
rm -rf "$C/shared/tokenizers"
tar czf "$C/tokenizers.tar.gz" -C "$SHARED" tokenizers/llama3
cp "$SHARED/bench/sharegpt-like-1000.jsonl" "$C/shared/bench/"
[ -f "$C/tinytech.tar.gz" ] || tar czf "$C/tinytech.tar.gz" -C "$SHARED/models" tinytech-25m
if [ ! -f "$C/random.tar.gz" ]; then
    mkdir -p "$STAGE/random"
    for m in random-mistral random-qwen2 random-qwen3; do
        mkdir -p "$STAGE/random/$m"
        cp "$SHARED/models/$m/"*.json "$STAGE/random/$m/"
        rm -f "$STAGE/random/$m/model.safetensors.index.json"
    done
    tar czf "$C/random.tar.gz" -C "$STAGE/random" .
fi
if [ ! -f "$C/calib.stats" ]; then
    "$B/bin/tm-convert" "$SHARED/models/tinytech-25m" -o "$STAGE/ws" > /dev/null
    "$B/bin/tm-calib" "$STAGE/ws" --dataset "$SHARED/text/calib.txt" --samples 16 --seqlen 512 -o "$C/calib.stats" ||
        { rm -f "$C/calib.stats"; echo "device-carry: tm-calib failed (static-scale checks will be skipped)" >&2; }
fi
du -sh "$C"
