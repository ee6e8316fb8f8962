#!/usr/bin/env bash
# Builds the bundled plugins and the host, then runs the server on its
# embedded default (127.0.0.1:8080, dev JWT secret, on-disk log in ./data).
# Extra arguments go to `sockets-host serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup toolchain install --no-self-update >/dev/null
scripts/build-plugins.sh >/dev/null
exec cargo run --locked -p sockets-host -- serve "$@"
