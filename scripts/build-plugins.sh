#!/usr/bin/env bash
# Builds the bundled plugins (chat, payments, reviews) into
# target/plugins/wasm32-wasip2/release/, the server's default plugins folder.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 >/dev/null
# The release profile (Cargo.toml) links each plugin with fat LTO.
cargo build --release --locked --target wasm32-wasip2 --target-dir target/plugins \
    -p chat -p payments -p reviews
ls -l target/plugins/wasm32-wasip2/release/*.wasm
