#!/usr/bin/env bats
# tm-run's interactive chat, driven on a real terminal (tmux): turns stream,
# a session keeps the KV cache between turns, /reset, /system, Ctrl-C stops
# an answer but not the program, /exit and Ctrl-D quit.

load helpers
load tmux_helpers

setup_file() {
    tm-convert "$SHARED/models/tinytech-25m" -o "$BATS_FILE_TMPDIR/ws" > /dev/null 2>&1
}

setup() {
    T="$BATS_TEST_TMPDIR"
    WS="$BATS_FILE_TMPDIR/ws"
    SOCK="tm-chat-$$-$BATS_TEST_NUMBER"
}

teardown() { tmux -L "$SOCK" kill-server 2> /dev/null || true; }

start() {  # start [tm-run options...]  (MODEL: default the tinytech workspace)
    tmux_start "'$TM_BIN/tm-run' '${MODEL:-$WS}' $*"
}

@test "two turns share a session; /reset and /system start over; /exit quits" {
    start --temperature 0 --max-tokens 12 -v
    wait_for '^>>>'
    type_line "What is a pipe?"
    wait_for 'prompt [0-9]* tokens, 0 cached' err
    type_line "Show an example."
    # The second turn reuses the first: many cached tokens, few prefilled.
    wait_for 'prompt [0-9]* tokens, [1-9][0-9]* cached' err
    type_line "/system You answer in one word."
    wait_for 'system prompt set'
    type_line "What is git?"
    for _ in $(seq 1 300); do
        [ "$(grep -c 'prompt [0-9]* tokens' "$T/err")" -lt 3 ] || break
        sleep 0.1
    done
    # A new conversation: nothing cached.
    tail -1 "$T/err" | grep -q 'prompt [0-9]* tokens, 0 cached, '
    screen | grep -q 'What is git?' 
    type_line "/reset"
    wait_for 'new conversation'
    type_line "/bogus"
    wait_for 'commands: /reset' err
    type_line "/exit"
    wait_for 'EXIT=0' exit
}

@test "Ctrl-C stops the answer, not the program; Ctrl-D quits" {
    start --temperature 0 --max-tokens 100000 --ignore-eos
    wait_for '^>>>'
    type_line "Tell me everything about the Linux kernel."
    sleep 1
    tmux -L "$SOCK" send-keys -t chat C-c
    wait_for '(stopped)'
    [ ! -e "$T/exit" ]
    type_line "Thanks."
    sleep 1
    tmux -L "$SOCK" send-keys -t chat C-c
    for _ in $(seq 1 300); do
        [ "$(screen | grep -c '(stopped)')" -lt 2 ] || break
        sleep 0.1
    done
    [ "$(screen | grep -c '(stopped)')" -eq 2 ]
    # Ctrl-C at the prompt discards the line; Ctrl-D quits.
    wait_for '^>>>$'
    discard_line_and_quit
}

@test "a model without a chat template is refused clearly, and --chat-template fixes it" {
    # random-mistral's tokenizer_config.json has no chat_template.
    run script -qec "'$TM_BIN/tm-run' '$SHARED/models/random-mistral'" /dev/null < /dev/null
    assert_failure 1
    assert_output --partial 'tm-run: error: the model has no chat template; choose one (--chat-template)'
    MODEL="$SHARED/models/random-mistral" start --chat-template llama2 --max-tokens 4
    wait_for '^>>>'
    type_line "Hello"
    wait_for '^>>> *Hello'
    tmux -L "$SOCK" send-keys -t chat C-d
    wait_for 'EXIT=0' exit
}
