#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need,
# then runs formatting, lints and every test. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "Rust toolchain and the wasm32-wasip2 target (from rust-toolchain.toml)"
rustup toolchain install --no-self-update
rustup target add wasm32-wasip2
rustup component add rustfmt clippy
cargo --version

step "Services the tests need (RabbitMQ, FerretDB)"
scripts/services.sh

step "Formatting"
cargo fmt --all --check

step "Lints"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "Bundled plugins for wasm32-wasip2"
scripts/build-plugins.sh

step "Tests"
cargo test --workspace --locked
