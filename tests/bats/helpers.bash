# Shared set-up for the bats suite: binaries from $TM_BIN (default build/bin),
# data from $TM_SHARED (default ../shared), scratch space in $BATS_TEST_TMPDIR.
load '/usr/lib/bats/bats-support/load'
load '/usr/lib/bats/bats-assert/load'

ROOT="$(cd "$BATS_TEST_DIRNAME/../.." && pwd)"
TM_BIN="${TM_BIN:-$ROOT/build/bin}"
SHARED="${TM_SHARED:-$ROOT/../shared}"
MODELS="$SHARED/models"
export PATH="$TM_BIN:$PATH"

# Lists what is in a directory besides the names given (to prove nothing was left behind).
leftovers() {
    local dir=$1; shift
    local keep=" $* "
    for f in "$dir"/* "$dir"/.[!.]*; do
        [ -e "$f" ] || continue
        case "$keep" in *" $(basename "$f") "*) ;; *) echo "$(basename "$f")" ;; esac
    done
}
