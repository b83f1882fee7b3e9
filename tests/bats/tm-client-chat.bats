#!/usr/bin/env bats
# tm-client's terminal chat against tm-serve, on a real terminal (tmux): the
# answer streams, turns share the server's session cache, /reset, Ctrl-C
# stops an answer (the server cancels it), Ctrl-D quits.

load helpers
load tmux_helpers

setup_file() {
    tm-convert "$SHARED/models/tinytech-25m" -o "$BATS_FILE_TMPDIR/ws" > /dev/null 2>&1
    # --ignore-eos: answers run to max_tokens, so Ctrl-C has something to stop.
    tm-serve "$BATS_FILE_TMPDIR/ws" --port 0 --device cpu --threads 2 --ignore-eos 2> "$BATS_FILE_TMPDIR/serve.log" 3>&- &
    echo $! > "$BATS_FILE_TMPDIR/pid"
    for _ in $(seq 1 200); do
        grep -q '"event": "listening"' "$BATS_FILE_TMPDIR/serve.log" && break
        sleep 0.05
    done
}

teardown_file() { kill "$(cat "$BATS_FILE_TMPDIR/pid")" 2> /dev/null || true; }

setup() {
    T="$BATS_TEST_TMPDIR"
    SOCK="tm-cchat-$$-$BATS_TEST_NUMBER"
    URL=$(sed -n 's/.*"url": "\(http:[^"]*\)".*/\1/p' "$BATS_FILE_TMPDIR/serve.log" | head -1)
    LOG="$BATS_FILE_TMPDIR/serve.log"
}

teardown() { tmux -L "$SOCK" kill-server 2> /dev/null || true; }

start() { tmux_start "'$TM_BIN/tm-client' '$URL' $*"; }

# The cached_tokens of the server's n-th chat completion.
cached_of() { grep '"path": "/v1/chat/completions"' "$LOG" | sed -n "${1}p" | sed 's/.*"cached_tokens": \([0-9]*\).*/\1/'; }

@test "two turns over HTTP: the second is served from the session cache; /reset; /exit" {
    before=$(grep -c '"path": "/v1/chat/completions"' "$LOG" || true)
    start --temperature 0 --max-tokens 12
    wait_for '^>>>'
    type_line "What is a pipe?"
    wait_for '^>>> *$'
    type_line "Show an example."
    for _ in $(seq 1 100); do
        [ "$(grep -c '"path": "/v1/chat/completions"' "$LOG")" -ge $((before + 2)) ] && break
        sleep 0.1
    done
    # The conversation is a server session: the second turn's prompt (the
    # whole conversation) comes mostly from the cache.
    first=$(cached_of $((before + 1)))
    second=$(cached_of $((before + 2)))
    [ "$first" = 0 ]
    [ "$second" -gt 10 ]
    screen | grep -q 'Show an example.'
    type_line "/reset"
    wait_for 'new conversation'
    type_line "/bogus"
    wait_for 'commands: /reset' err
    type_line "/exit"
    wait_for 'EXIT=0' exit
}

@test "Ctrl-C stops the answer and the server cancels it; Ctrl-D quits" {
    start --max-tokens 1900
    wait_for '^>>>'
    type_line "Tell me everything about the Linux kernel."
    sleep 1
    tmux -L "$SOCK" send-keys -t chat C-c
    wait_for '(stopped)'
    wait_for '"status": 499' "$LOG"
    [ ! -e "$T/exit" ]
    wait_for '^>>> *$'
    discard_line_and_quit
}

@test "an unreachable server: one error line per turn, the chat goes on" {
    URL=http://127.0.0.1:1
    start
    wait_for '^>>>'
    type_line "Hello"
    wait_for 'cannot connect' err
    tmux -L "$SOCK" send-keys -t chat C-d
    wait_for 'EXIT=0' exit
}
