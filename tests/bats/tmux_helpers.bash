# Driving a program on a real terminal (tmux), for the chat tests. The test
# sets SOCK (a tmux server name) and T (its scratch directory); the program
# runs in session "chat" with stderr in $T/err and its exit status in $T/exit.

# tmux_start COMMAND...: runs the command (a string for the shell) in the pane.
tmux_start() {
    tmux -L "$SOCK" new-session -d -x 200 -y 60 -s chat "$* 2> '$T/err'; echo EXIT=\$? > '$T/exit'; sleep 30"
}

screen() { tmux -L "$SOCK" capture-pane -p -t chat -S -; }

# wait_for PATTERN [screen | NAME in $T | /a/path]: up to 30 s.
wait_for() {
    local src=${2:-screen} file
    case $src in /*) file=$src ;; *) file="$T/$src" ;; esac
    for _ in $(seq 1 300); do
        case $src in
            screen) screen | grep -q -- "$1" && return 0 ;;
            *) grep -q -- "$1" "$file" 2> /dev/null && return 0 ;;
        esac
        sleep 0.1
    done
    echo "timed out waiting for $1 in $src" >&2
    screen >&2
    cat "$T/err" >&2 || true
    return 1
}

type_line() { tmux -L "$SOCK" send-keys -t chat -l "$1"; tmux -L "$SOCK" send-keys -t chat Enter; }

# At the prompt: a half-typed line dropped by Ctrl-C, then Ctrl-D quits with status 0.
discard_line_and_quit() {
    tmux -L "$SOCK" send-keys -t chat -l "half a line"
    tmux -L "$SOCK" send-keys -t chat C-c
    tmux -L "$SOCK" send-keys -t chat C-d
    wait_for 'EXIT=0' exit
}
