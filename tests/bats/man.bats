#!/usr/bin/env bats
# Every man page renders and is mandoc -Tlint clean (warnings and above);
# every tool has one.

load helpers

@test "man pages are mandoc -Tlint clean" {
    run mandoc -Tlint -Wwarning "$ROOT"/man/*.[0-9]
    assert_success
    assert_output ""
}

@test "every tool has a man page and --help" {
    for src in "$ROOT"/tools/tm-*.cpp; do
        t=$(basename "$src" .cpp)
        [ -f "$ROOT/man/$t.1" ]
        run "$TM_BIN/$t" --help
        assert_success
    done
}
