#!/usr/bin/env bats
# tm-calib on tinytech: statistics to a file and to a pipe, deterministic,
# the format's header and array sizes, bad input.

load helpers

setup_file() {
    tm-convert "$SHARED/models/tinytech-25m" -o "$BATS_FILE_TMPDIR/ws" > /dev/null 2>&1
}

setup() {
    T="$BATS_TEST_TMPDIR"
    WS="$BATS_FILE_TMPDIR/ws"
}

# header FILE: the JSON header line of a statistics file.
header() { zstd -dc "$1" | head -1; }

@test "statistics to a file and to stdout are the same bytes, run after run" {
    tm-calib "$WS" --dataset "$SHARED/text/calib.txt" --samples 4 --seqlen 256 -o "$T/a.stats"
    tm-calib "$WS" --dataset "$SHARED/text/calib.txt" --samples 4 --seqlen 256 > "$T/b.stats"
    cmp "$T/a.stats" "$T/b.stats"
    [ "$(leftovers "$T" a.stats b.stats)" = "" ]
}

@test "the file holds the header and every array formats/calib-stats.md lists" {
    tm-calib "$WS" --dataset "$SHARED/text/calib.txt" --samples 2 --seqlen 128 -o "$T/s.stats"
    run python3 - "$T/s.stats" "$WS/manifest.json" <<'EOF'
import json, subprocess, sys
raw = subprocess.run(["zstd", "-dc", sys.argv[1]], capture_output=True, check=True).stdout
nl = raw.index(b"\n")
h = json.loads(raw[:nl])
assert h["format"] == "tm-calib-stats" and h["version"] == 1
assert h["layers"] == 8 and h["kv_heads"] == 2 and h["head_dim"] == 64 and h["intermediate"] == 1024
assert h["samples"] == 2 and h["seqlen"] == 128 and h["tokens"] == 256
assert len(h["workspace_id"]) == 16
names = [a["name"] for a in h["arrays"]]
assert "layers.0.k.absmax" in names and "layers.7.feed_forward.w2.input.absmean" in names
n = 1
total = sum(__import__("math").prod(a["shape"]) for a in h["arrays"])
assert len(raw) - nl - 1 == 4 * total, (len(raw), total)
import struct
# K absmax is at least max(|min|, |max|) of the same channel, and positive.
vals = {}
off = nl + 1
for a in h["arrays"]:
    k = __import__("math").prod(a["shape"])
    vals[a["name"]] = struct.unpack_from(f"<{k}f", raw, off)
    off += 4 * k
for l in range(8):
    mn, mx, am = vals[f"layers.{l}.k.min"], vals[f"layers.{l}.k.max"], vals[f"layers.{l}.k.absmax"]
    assert all(abs(a - max(abs(x), abs(y))) < 1e-6 for x, y, a in zip(mn, mx, am))
    assert all(x <= y for x, y in zip(mn, mx))
EOF
    assert_success
}

@test "JSON-lines datasets, and bad input" {
    python3 -c 'import json
for p in open("'"$SHARED"'/text/calib.txt").read().split("\n\n")[:200]:
    print(json.dumps({"text": p}))' > "$T/calib.jsonl"
    run tm-calib "$WS" --dataset "$T/calib.jsonl" --samples 2 --seqlen 128 -o "$T/j.stats"
    assert_success
    echo '{"txt": 1}' > "$T/bad.jsonl"
    run tm-calib "$WS" --dataset "$T/bad.jsonl" -o "$T/x.stats"
    assert_failure 1
    assert_output --partial 'line 1: expected a JSON object with a "text" string'
    echo "too short" > "$T/short.txt"
    run tm-calib "$WS" --dataset "$T/short.txt" -o "$T/x.stats"
    assert_failure 1
    assert_output --partial 'fewer than one sample'
    [ ! -e "$T/x.stats" ]
    run tm-calib "$WS" --dataset "$T/nope.txt" -o "$T/x.stats"
    assert_failure 1
    run tm-calib "$WS" -o "$T/x.stats"
    assert_failure 2
    assert_output --partial 'missing --dataset'
    run tm-calib "$WS" --dataset "$T/short.txt" --samples 0
    assert_failure 2
}
