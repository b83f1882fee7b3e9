#!/usr/bin/env bats
# tm-serve with tinytech on a free loopback port, driven by curl, tm-client,
# the openai npm package and headless Chromium.

load helpers

# start_server NAME [options]: starts tm-serve, exports NAME_URL / NAME_PID / NAME_LOG.
start_server() {
    local name=$1; shift
    local log="$BATS_FILE_TMPDIR/$name.log"
    tm-serve "$BATS_FILE_TMPDIR/ws" --port 0 --device cpu --threads 2 "$@" 2> "$log" 3>&- &
    local pid=$! port=""
    for _ in $(seq 1 200); do
        port=$(sed -n 's/.*"url": "http:\/\/127\.0\.0\.1:\([0-9]*\)".*/\1/p' "$log" | head -1)
        [ -n "$port" ] && break
        kill -0 "$pid" 2> /dev/null || break
        sleep 0.05
    done
    [ -n "$port" ] || { cat "$log" >&2; return 1; }
    export "${name}_URL=http://127.0.0.1:$port" "${name}_PID=$pid" "${name}_LOG=$log"
}

setup_file() {
    tm-convert "$SHARED/models/tinytech-25m" -o "$BATS_FILE_TMPDIR/ws" > /dev/null 2>&1
    start_server S --max-body-mib 1
}

teardown_file() {
    kill "$S_PID" 2> /dev/null || true
}

setup() {
    T="$BATS_TEST_TMPDIR"
}

# metric NAME: the value of an unlabelled metric.
metric() { curl -sf "$S_URL/metrics" | awk -v n="$1" '$1 == n { print $2 }'; }

# The server is up after every test.
teardown() {
    curl -sf "$S_URL/health" > /dev/null
}

@test "chat and completions, with and without streaming" {
    run curl -sf "$S_URL/v1/chat/completions" -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0}'
    assert_success
    echo "$output" | python3 -c 'import json, sys
r = json.load(sys.stdin)
assert r["object"] == "chat.completion" and r["choices"][0]["message"]["role"] == "assistant"
assert r["choices"][0]["finish_reason"] in ("stop", "length") and r["usage"]["completion_tokens"] > 0
open("'"$T"'/chat.txt", "w").write(r["choices"][0]["message"]["content"])'
    run curl -sfN "$S_URL/v1/chat/completions" -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}'
    assert_success
    echo "$output" > "$T/sse.txt"
    python3 - "$T/sse.txt" "$T/chat.txt" <<'EOF'
import json, sys
lines = [l for l in open(sys.argv[1]).read().split("\n") if l]
assert all(l.startswith("data: ") for l in lines), lines
assert lines[-1] == "data: [DONE]"
chunks = [json.loads(l[6:]) for l in lines[:-1]]
assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
assert text == open(sys.argv[2]).read(), (text,)
assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
EOF
    run curl -sf "$S_URL/v1/completions" -d '{"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}'
    assert_success
    assert_output --partial '"object": "text_completion"'
    run curl -sfN "$S_URL/v1/completions" -d '{"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "stream": true}'
    assert_success
    assert_output --partial 'data: [DONE]'
    run curl -sf "$S_URL/v1/models"
    assert_output --partial '"id": "tinytech-25m"'
    run curl -sf "$S_URL/v1/encode" -d '{"input": "hello world"}'
    assert_output --partial '"length": 4'
}

@test "the interactive endpoint keeps a session: the second call prefills only the new turn" {
    run curl -sf "$S_URL/v1/chat/interactive" -d '{"prompt": "Hello there", "session_id": 7, "interactive_mode": true, "request_output_len": 12, "temperature": 0}'
    assert_success
    first=$output
    before=$(metric tm_prefill_tokens_total)
    run curl -sf "$S_URL/v1/chat/interactive" -d '{"prompt": "And then?", "session_id": 7, "interactive_mode": true, "request_output_len": 12, "temperature": 0}'
    assert_success
    second=$output
    after=$(metric tm_prefill_tokens_total)
    python3 - "$first" "$second" "$before" "$after" <<'EOF'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
before, after = float(sys.argv[3]), float(sys.argv[4])
# The second prompt holds the first turn (prompt and answer): all of it but
# the answer's end-of-turn text comes from the session's cache.
assert b["history_tokens"] >= a["input_tokens"] + a["tokens"] - 2, (a, b)
prefilled = after - before
assert prefilled == b["input_tokens"] - b["history_tokens"], (prefilled, b)
assert prefilled < b["input_tokens"] / 2, (prefilled, b)
EOF
    # Ending the session frees its blocks.
    run curl -sf "$S_URL/v1/chat/interactive" -d '{"session_id": 7, "end_session": true}'
    assert_success
    for _ in $(seq 1 50); do [ "$(metric tm_sessions)" = 0 ] && break; sleep 0.05; done
    [ "$(metric tm_sessions)" = 0 ]
    [ "$(metric tm_kv_blocks_used)" = 0 ]
}

@test "32 concurrent streaming requests all complete and equal their solo greedy outputs" {
    for i in $(seq 1 32); do
        echo "{\"id\": $i, \"prompt\": \"Story number $i: once upon a time\", \"max_tokens\": $((8 + i)), \"temperature\": 0}"
    done > "$T/req.jsonl"
    tm-run "$BATS_FILE_TMPDIR/ws" --device cpu --jsonl < "$T/req.jsonl" > "$T/solo.jsonl"
    run tm-client "$S_URL" --jsonl --concurrency 32 --stream < "$T/req.jsonl"
    assert_success
    echo "$output" > "$T/served.jsonl"
    python3 - "$T/solo.jsonl" "$T/served.jsonl" <<'EOF'
import json, sys
solo = {j["id"]: j for j in map(json.loads, open(sys.argv[1]))}
finals, deltas = {}, {}
for l in open(sys.argv[2]):
    j = json.loads(l)
    if "delta" in j: deltas[j["id"]] = deltas.get(j["id"], "") + j["delta"]
    else: finals[j["id"]] = j
assert len(finals) == 32
for i, j in finals.items():
    assert j["text"] == solo[i]["text"], (i, j["text"], solo[i]["text"])
    assert deltas.get(i, "") == j["text"]
    assert j["usage"]["completion_tokens"] == solo[i]["usage"]["completion_tokens"]
EOF
}

@test "a client killed mid-stream: its request is cancelled and the KV block count returns" {
    free0=$(metric tm_kv_blocks_free)
    curl -sN "$S_URL/v1/completions" -d '{"prompt": "Once", "max_tokens": 1900, "ignore_eos": true, "stream": true}' > "$T/partial.txt" 3>&- &
    pid=$!
    for _ in $(seq 1 100); do [ -s "$T/partial.txt" ] && break; sleep 0.05; done
    [ "$(metric tm_requests_running)" = 1 ]
    kill "$pid"
    wait "$pid" || true
    for _ in $(seq 1 100); do [ "$(metric tm_requests_running)" = 0 ] && break; sleep 0.05; done
    [ "$(metric tm_requests_running)" = 0 ]
    [ "$(metric tm_kv_blocks_free)" = "$free0" ]
    grep -q '"status": 499.*"finish_reason": "client_disconnected"' "$S_LOG"
}

@test "bad input: status and OpenAI error body for each, and the server stays up" {
    # status BODY PATH: prints the status code, keeps the body in $T/body.
    req() { curl -s -o "$T/body" -w '%{http_code}' "$S_URL$2" --data-binary "$1"; }
    [ "$(req '{"messages": [' /v1/chat/completions)" = 400 ]
    grep -q '"type": "invalid_request_error"' "$T/body"
    [ "$(req '[1, 2]' /v1/chat/completions)" = 400 ]
    [ "$(req '{"messages": "hi"}' /v1/chat/completions)" = 400 ]
    grep -q '"param": "messages"' "$T/body"
    [ "$(req '{"prompt": "x", "max_tokens": -5}' /v1/completions)" = 400 ]
    grep -q '"param": "max_tokens"' "$T/body"
    [ "$(req '{"prompt": "x", "temperature": "hot"}' /v1/completions)" = 400 ]
    [ "$(req '{"prompt": "x", "max_tokens": 1e300}' /v1/completions)" = 400 ]
    [ "$(req '{"prompt": "x", "n": 3}' /v1/completions)" = 400 ]
    grep -q '"param": "n"' "$T/body"
    [ "$(req '{"prompt": "x", "frobnicate": 1}' /v1/completions)" = 400 ]
    grep -q 'unrecognized request argument supplied: frobnicate' "$T/body"
    [ "$(req '{"prompt": [99999999]}' /v1/completions)" = 400 ]
    [ "$(req '{"model": "gpt-4", "prompt": "x"}' /v1/completions)" = 404 ]
    grep -q '"code": "model_not_found"' "$T/body"
    printf '{"prompt": "\xff\xfe"}' > "$T/bad-utf8.json"
    [ "$(curl -s -o "$T/body" -w '%{http_code}' "$S_URL/v1/completions" --data-binary @"$T/bad-utf8.json")" = 400 ]
    grep -q 'UTF-8' "$T/body"
    python3 -c 'print("{\"prompt\": \"" + "word " * 3000 + "\"}")' > "$T/long.json"
    [ "$(curl -s -o "$T/body" -w '%{http_code}' "$S_URL/v1/completions" --data-binary @"$T/long.json")" = 400 ]
    grep -q '"code": "context_length_exceeded"' "$T/body"
    head -c 2000000 /dev/zero | tr '\0' 'a' > "$T/huge.json"
    [ "$(curl -s -o "$T/body" -w '%{http_code}' "$S_URL/v1/completions" --data-binary @"$T/huge.json")" = 413 ]
    grep -q '"code": "request_too_large"' "$T/body"
    [ "$(curl -s -o "$T/body" -w '%{http_code}' "$S_URL/v1/nothing")" = 404 ]
    [ "$(curl -s -o "$T/body" -w '%{http_code}' -X DELETE "$S_URL/v1/models")" = 405 ]
    # Not HTTP at all.
    printf 'HELLO\r\n\r\n' | timeout 5 python3 -c '
import socket, sys
host, port = sys.argv[1].split("//")[1].split(":")
s = socket.create_connection((host, int(port))); s.sendall(sys.stdin.buffer.read())
print(s.recv(200).decode().split("\r\n")[0])' "$S_URL" | grep -q '400'
    [ "$(metric tm_requests_running)" = 0 ]
}

@test "API keys: missing or wrong key 401, right key 200; health needs none" {
    printf '# keys\nsecret-1\n  secret-2  \n' > "$T/keys"
    start_server K --api-keys "$T/keys"
    [ "$(curl -s -o "$T/body" -w '%{http_code}' "$K_URL/v1/models")" = 401 ]
    grep -q '"code": "invalid_api_key"' "$T/body"
    [ "$(curl -s -o "$T/body" -w '%{http_code}' -H 'Authorization: Bearer nope' "$K_URL/v1/models")" = 401 ]
    [ "$(curl -s -o "$T/body" -w '%{http_code}' -H 'Authorization: Bearer secret-2' "$K_URL/v1/models")" = 200 ]
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$K_URL/health")" = 200 ]
    run tm-client "$K_URL" --jsonl --api-key secret-1 <<< '{"prompt": "Hi", "max_tokens": 2}'
    assert_success
    run tm-client "$K_URL" --jsonl --api-key wrong <<< '{"prompt": "Hi", "max_tokens": 2}'
    assert_failure 1
    assert_output --partial 'HTTP 401'
    kill -TERM "$K_PID"
    wait "$K_PID"
}

@test "/metrics passes promtool check metrics" {
    command -v promtool || skip "promtool (Debian package prometheus) is not installed"
    curl -sf "$S_URL/metrics" > "$T/metrics.txt"
    run promtool check metrics < "$T/metrics.txt"
    assert_success
    grep -q '^tm_time_to_first_token_seconds_bucket{le="+Inf"}' "$T/metrics.txt"
    grep -q '^tm_inter_token_latency_seconds_count' "$T/metrics.txt"
}

# term_while_streaming URL MAX_TOKENS OUT SERVER_PID: starts a streamed
# completion, sends SIGTERM to the server once tokens flow, and checks that the
# server exits 0 and the client gets its response's end.
term_while_streaming() {
    curl -sN "$1/v1/completions" -d "{\"prompt\": \"Once\", \"max_tokens\": $2, \"ignore_eos\": true, \"stream\": true}" \
        > "$3" 3>&- &
    local cpid=$! rc=0
    for _ in $(seq 1 100); do [ -s "$3" ] && break; sleep 0.05; done
    kill -TERM "$4"
    wait "$4" || rc=$?
    [ "$rc" = 0 ]
    wait "$cpid" || true
}

@test "SIGTERM: running requests finish within the grace period, then exit 0" {
    start_server G --grace 30
    term_while_streaming "$G_URL" 200 "$T/out.txt" "$G_PID"
    grep -q 'data: \[DONE\]' "$T/out.txt"
    grep -q '"finish_reason": "length"' "$T/out.txt"
    grep -q '"event": "stopped"' "$G_LOG"
    # A short grace period cancels what runs longer.
    start_server H --grace 0.2
    term_while_streaming "$H_URL" 1900 "$T/out2.txt" "$H_PID"
    grep -q '"finish_reason": "abort"' "$T/out2.txt"
}

@test "a client that stalls mid-request is closed after --idle-timeout; others are served meanwhile" {
    start_server I --idle-timeout 1
    host_port=${I_URL#http://}
    python3 - "${host_port%:*}" "${host_port#*:}" "$I_URL" <<'PY'
import socket, sys, time, urllib.request
host, port, url = sys.argv[1], int(sys.argv[2]), sys.argv[3]
stalled = socket.create_connection((host, port))
stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
idle = socket.create_connection((host, port))  # connects, sends nothing
# Others are served while those two hang.
assert urllib.request.urlopen(url + "/health", timeout=5).status == 200
t = time.time()
stalled.settimeout(10)
idle.settimeout(10)
assert stalled.recv(100) == b"" and idle.recv(100) == b"", "closed by the server"
assert 0.5 < time.time() - t < 5, time.time() - t
assert urllib.request.urlopen(url + "/health", timeout=5).status == 200
PY
    kill "$I_PID"
}

@test "out of file descriptors: connections wait, the server neither spins nor dies" {
    # A low descriptor limit: more clients than the server can accept at once.
    (ulimit -n 48; exec tm-serve "$BATS_FILE_TMPDIR/ws" --port 0 --device cpu --threads 1 2> "$T/fd.log" 3>&-) &
    pid=$!
    for _ in $(seq 1 200); do grep -q '"event": "listening"' "$T/fd.log" && break; sleep 0.05; done
    url=$(sed -n 's/.*"url": "\(http:[^"]*\)".*/\1/p' "$T/fd.log")
    python3 - "$url" "$pid" <<'PY'
import socket, sys, time, urllib.request
url, pid = sys.argv[1], sys.argv[2]
host, port = url[7:].split(":")
socks = [socket.create_connection((host, int(port))) for _ in range(80)]
time.sleep(1)
# CPU time of the server over one second while descriptors are exhausted.
def cpu():
    f = open(f"/proc/{pid}/stat").read().split(")")[1].split()
    return int(f[11]) + int(f[12])
c0 = cpu(); time.sleep(1); used = cpu() - c0
assert used < 50, f"the server spins: {used} ticks in 1 s"
for s in socks: s.close()
time.sleep(0.5)
assert urllib.request.urlopen(url + "/health", timeout=5).status == 200
PY
    grep -q '"event": "accept_failed"' "$T/fd.log"
    kill "$pid"
}

@test "tm-client --bench reports throughput and latency figures" {
    run tm-client "$S_URL" --bench --num-prompts 8 --input-len 32 --output-len 16
    assert_success
    echo "$output" | grep '^{' | python3 -c 'import json, sys
r = json.loads(sys.stdin.readline())
assert r["completed"] == 8 and r["failed"] == 0 and r["total_output_tokens"] == 128, r
assert r["total_input_tokens"] == 8 * 32, r
for k in ("request_throughput", "output_throughput", "mean_ttft_ms", "p99_itl_ms", "median_tpot_ms"):
    assert r[k] > 0, k'
    run tm-client "$S_URL" --bench --dataset "$SHARED/bench/sharegpt-like-1000.jsonl" --num-prompts 4 --request-rate 20
    assert_success
    run tm-client "$S_URL" --bench --request-rate 0
    assert_failure 2
    run tm-client "$S_URL" --bench --dataset "$T/none.jsonl"
    assert_failure 1
}

@test "tm-client --jsonl as a coprocess: each answer comes before the next request is sent" {
    coproc CLIENT { tm-client "$S_URL" --jsonl 2> /dev/null; }
    local pid=$CLIENT_PID  # (bash unsets CLIENT_PID once the coprocess has exited)
    for i in 1 2 3; do
        echo "{\"id\": $i, \"prompt\": \"Once upon a time\", \"max_tokens\": 4, \"temperature\": 0}" >&"${CLIENT[1]}"
        read -r -t 30 answer <&"${CLIENT[0]}"
        echo "$answer" | grep -q "\"id\": $i, \"text\""
    done
    exec {CLIENT[1]}>&-
    wait "$pid"
}

@test "tm-client: unreachable server and bad URLs" {
    run tm-client http://127.0.0.1:1 --jsonl <<< '{"prompt": "Hi"}'
    assert_failure 1
    assert_output --partial 'cannot connect'
    run tm-client ftp://x --jsonl <<< '{"prompt": "Hi"}'
    assert_failure 2
    run tm-serve "$BATS_FILE_TMPDIR/ws" --port 70000
    assert_failure 2
    run tm-serve "$BATS_FILE_TMPDIR/ws" --api-keys "$T/missing-keys"
    assert_failure 1
}

@test "the openai npm package as a client" {
    [ -d "$ROOT/tests/node/node_modules/openai" ] || skip "npm packages not installed (make deps)"
    run node "$ROOT/tests/node/openai_client.mjs" "$S_URL" tinytech-25m
    echo "$output"
    assert_success
}

@test "the chat page in headless Chromium: streamed answer, second turn, stop, screenshot" {
    [ -d "$ROOT/tests/node/node_modules/playwright-core" ] || skip "npm packages not installed (make deps)"
    [ -x /usr/bin/chromium ] || skip "chromium is not installed"
    start_server P --ignore-eos
    # TM_SCREENSHOT_DIR keeps the screenshot (default: the test's scratch directory).
    shots="${TM_SCREENSHOT_DIR:-$T}"
    mkdir -p "$shots"
    run node "$ROOT/tests/node/chat_page.mjs" "$P_URL" "$shots/chat-page.png"
    echo "$output"
    kill "$P_PID"
    assert_success
    [ -s "$shots/chat-page.png" ]
}
