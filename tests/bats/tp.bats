#!/usr/bin/env bats
# Tensor parallelism with in-process ranks on the CPU: --tp 2 workspaces give
# the greedy tokens of --tp 1 through tm-run and tm-serve; a workspace run
# with another --tp is refused.

load helpers

setup_file() {
    tm-convert "$SHARED/models/tinytech-25m" -o "$BATS_FILE_TMPDIR/tp1" > /dev/null 2>&1
    tm-convert "$SHARED/models/tinytech-25m" -o "$BATS_FILE_TMPDIR/tp2" --tp 2 > /dev/null 2>&1
    tm-convert "$SHARED/models/random-qwen3" -o "$BATS_FILE_TMPDIR/q1" > /dev/null 2>&1
    tm-convert "$SHARED/models/random-qwen3" -o "$BATS_FILE_TMPDIR/q4" --tp 4 > /dev/null 2>&1
}

setup() { T="$BATS_TEST_TMPDIR"; }

# same_tokens A B: the two JSON-lines outputs have equal token ids per id.
same_tokens() {
    python3 - "$1" "$2" <<'PY'
import json, sys
a = {j["id"]: j["token_ids"] for j in map(json.loads, open(sys.argv[1]))}
b = {j["id"]: j["token_ids"] for j in map(json.loads, open(sys.argv[2]))}
assert a.keys() == b.keys() and len(a) > 0
bad = [k for k in a if a[k] != b[k]]
assert not bad, bad
PY
}

@test "tm-run --jsonl on a --tp 2 workspace: the golden prompts' greedy tokens equal --tp 1" {
    python3 -c '
import json
for i, l in enumerate(open("'"$SHARED"'/golden/tinytech/greedy-fp32.jsonl")):
    g = json.loads(l)
    if "prompt" in g:
        print(json.dumps({"id": i, "prompt": g["prompt"], "temperature": 0, "max_tokens": 32, "return_token_ids": True}))
' > "$T/req.jsonl"
    tm-run "$BATS_FILE_TMPDIR/tp1" --device cpu --jsonl < "$T/req.jsonl" > "$T/one.jsonl"
    run tm-run "$BATS_FILE_TMPDIR/tp2" --device cpu --tp 2 --jsonl < "$T/req.jsonl"
    assert_success
    echo "$output" > "$T/two.jsonl"
    same_tokens "$T/one.jsonl" "$T/two.jsonl"
}

@test "--tp 4 with replicated KV heads (random Qwen3: 4 heads, 2 KV heads)" {
    for i in 1 2 3 4 5 6; do
        echo "{\"id\": $i, \"prompt\": \"Sentence $i of the test\", \"temperature\": 0, \"max_tokens\": 16, \"ignore_eos\": true, \"return_token_ids\": true}"
    done > "$T/req.jsonl"
    tm-run "$BATS_FILE_TMPDIR/q1" --device cpu --jsonl < "$T/req.jsonl" > "$T/one.jsonl"
    tm-run "$BATS_FILE_TMPDIR/q4" --device cpu --jsonl < "$T/req.jsonl" > "$T/four.jsonl"
    same_tokens "$T/one.jsonl" "$T/four.jsonl"
}

@test "a two-turn session through tm-serve with --tp 2" {
    tm-serve "$BATS_FILE_TMPDIR/tp2" --port 0 --device cpu 2> "$T/serve.log" 3>&- &
    pid=$!
    for _ in $(seq 1 200); do
        port=$(sed -n 's/.*"url": "http:\/\/127\.0\.0\.1:\([0-9]*\)".*/\1/p' "$T/serve.log" | head -1)
        [ -n "$port" ] && break
        sleep 0.05
    done
    u="http://127.0.0.1:$port/v1/chat/interactive"
    a=$(curl -sf "$u" -d '{"prompt": "Hello there", "session_id": 3, "interactive_mode": true, "request_output_len": 10, "temperature": 0}')
    b=$(curl -sf "$u" -d '{"prompt": "And then?", "session_id": 3, "interactive_mode": true, "request_output_len": 10, "temperature": 0}')
    kill "$pid"
    python3 -c 'import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
assert a["tokens"] == 10 and b["history_tokens"] >= a["input_tokens"] + a["tokens"] - 2, (a, b)' "$a" "$b"
    grep -q 'tensor-parallel ranks' "$T/serve.log" || grep -q '"backend": "cpu' "$T/serve.log"
}

@test "a workspace run with another --tp is refused with a clear error" {
    run tm-run "$BATS_FILE_TMPDIR/tp2" --device cpu --tp 1 --jsonl <<< '{"prompt": "Hi"}'
    assert_failure 1
    assert_output --partial 'converted for --tp 2, asked to run with --tp 1'
    run tm-run "$BATS_FILE_TMPDIR/tp1" --device cpu --tp 2 --jsonl <<< '{"prompt": "Hi"}'
    assert_failure 1
    assert_output --partial 'converted for --tp 1, asked to run with --tp 2'
    run tm-run "$BATS_FILE_TMPDIR/tp1" --tp -1 --jsonl <<< '{"prompt": "Hi"}'
    assert_failure 2
}

@test "tm-calib | tm-qparams on a --tp 2 workspace: the statistics of --tp 1, scales per rank, same greedy tokens" {
    cp -r "$BATS_FILE_TMPDIR/tp1" "$T/one"
    cp -r "$BATS_FILE_TMPDIR/tp2" "$T/two"
    for w in one two; do
        tm-calib "$T/$w" --dataset "$SHARED/text/calib.txt" --samples 2 --seqlen 256 -o "$T/$w.stats" 2> /dev/null
    done
    python3 - "$T/one.stats" "$T/two.stats" <<'PY'
import json, struct, subprocess, sys
def load(p):
    raw = subprocess.run(["zstd", "-dc", p], capture_output=True, check=True).stdout
    nl = raw.index(b"\n"); h = json.loads(raw[:nl]); off = nl + 1; v = {}
    for a in h["arrays"]:
        k = 1
        for d in a["shape"]: k *= d
        v[a["name"]] = struct.unpack_from(f"<{k}f", raw, off); off += 4 * k
    return h, v
(h1, v1), (h2, v2) = load(sys.argv[1]), load(sys.argv[2])
assert h1["tokens"] == h2["tokens"] and h1["workspace_id"] != h2["workspace_id"]
for k in v1:
    m = max(abs(x) for x in v1[k]) or 1
    assert max(abs(x - y) for x, y in zip(v1[k], v2[k])) <= 1e-4 * m, k
PY
    # Statistics of the --tp 1 workspace are another model's for the --tp 2 one.
    run tm-qparams "$T/two" --kv int8 --stats "$T/one.stats"
    assert_failure 1
    tm-qparams "$T/one" --kv int8 --stats "$T/one.stats" 2> /dev/null
    tm-qparams "$T/two" --kv int8 --stats "$T/two.stats" 2> /dev/null
    [ "$(stat -c %s "$T/two/quant/rank0/kv_int8.bin")" = $((8 * 4 * 1 * 4)) ]
    [ "$(stat -c %s "$T/two/quant/rank1/kv_int8.bin")" = $((8 * 4 * 1 * 4)) ]
    for i in 1 2 3 4; do
        echo "{\"id\": $i, \"prompt\": \"Question $i: what is a kernel?\", \"temperature\": 0, \"max_tokens\": 16, \"return_token_ids\": true}"
    done > "$T/req.jsonl"
    tm-run "$T/one" --device cpu --jsonl < "$T/req.jsonl" > "$T/one.jsonl"
    tm-run "$T/two" --device cpu --jsonl < "$T/req.jsonl" > "$T/two.jsonl"
    same_tokens "$T/one.jsonl" "$T/two.jsonl"
}
