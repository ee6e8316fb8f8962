#!/usr/bin/env bash
# Builds every plugin crate in plugins/ (each folder is named after its
# crate, as `sockets-host plugin new` makes them) into
# target/plugins/wasm32-wasip2/release/, the server's default plugins folder.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 >/dev/null
# The release profile (Cargo.toml) links each plugin with fat LTO.
shopt -s nullglob
packages=()
for manifest in plugins/*/Cargo.toml; do
    folder=$(basename "$(dirname "$manifest")")
    if ! grep -q "^name = \"$folder\"$" "$manifest"; then
        echo "error: $manifest: the package must be named after its folder ($folder)" >&2
        exit 1
    fi
    packages+=(-p "$folder")
done
if [ ${#packages[@]} -eq 0 ]; then
    echo "error: no plugin crate in plugins/" >&2
    exit 1
fi
# Not --locked: a plugin just made adds itself to Cargo.lock.
cargo build --release --target wasm32-wasip2 --target-dir target/plugins "${packages[@]}"
ls -l target/plugins/wasm32-wasip2/release/*.wasm
