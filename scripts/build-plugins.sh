#!/usr/bin/env bash
# Builds the bundled plugins (chat, payments, reviews) into
# target/plugins/wasm32-wasip2/release/, the server's default plugins folder.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 >/dev/null
cargo build --release --locked --target wasm32-wasip2 --target-dir target/plugins \
    --config profile.release.lto=true --config profile.release.codegen-units=1 \
    -p chat -p payments -p reviews
ls -l target/plugins/wasm32-wasip2/release/*.wasm
