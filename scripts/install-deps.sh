#!/bin/sh
# Installs every Debian package that tm's build and tests need.
# Usage: scripts/install-deps.sh   (as root, or with sudo available)
set -eu
PKGS="build-essential make pkg-config
libcxxopts-dev libsimdjson-dev libzstd-dev zstd libxxhash-dev
libboost-dev libboost-system-dev
libgtest-dev googletest
bats bats-assert bats-support
libpcre2-dev libutf8proc-dev
mandoc man-db python3 tmux bc curl
nodejs chromium chromium-driver prometheus"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
# The JavaScript clients of the server tests (openai, playwright-core), from npm.
npm_deps() {
    if ! command -v npm > /dev/null; then  # Debian's nodejs comes without npm (NodeSource's has it)
        $SUDO apt-get install -y -qq --no-install-recommends npm || { echo "install-deps: no npm" >&2; return 0; }
    fi
    here=$(cd "$(dirname "$0")/.." && pwd)
    if [ ! -d "$here/tests/node/node_modules/openai" ] || [ ! -d "$here/tests/node/node_modules/playwright-core" ]; then
        npm install --prefix "$here/tests/node" --no-audit --no-fund --loglevel=error >&2
    fi
}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if [ -z "$missing" ]; then
    echo "install-deps: all packages present" >&2
    npm_deps
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing
npm_deps
