#!/usr/bin/env bash
# The benchmark suite (README, "Benchmarks against Socket.IO"): builds the
# host (release), the plugins and the load generator, installs the
# Socket.IO peer from npm, starts both servers on 127.0.0.1 and runs the
# same bounded load against each, side by side. Prints one JSON object per
# run and writes them all to target/bench/results.jsonl.
#
# Knobs (environment): PAIRS (16), WINDOW (8), DURATION seconds (10),
# FAN_USERS (100), FAN_EVENTS (10000), IDLE (5000; ~19000 is the most this
# machine's 20,000 open files allow).
set -euo pipefail
cd "$(dirname "$0")/.."

PAIRS=${PAIRS:-16}
WINDOW=${WINDOW:-8}
DURATION=${DURATION:-10}
FAN_USERS=${FAN_USERS:-100}
FAN_EVENTS=${FAN_EVENTS:-10000}
IDLE=${IDLE:-5000}
SECRET=bench-secret-$RANDOM$RANDOM
OURS=127.0.0.1:18080
PEER=127.0.0.1:18090

step() { printf '\n==> %s\n' "$*" >&2; }

step "Building the host (release), the plugins and the load generator"
scripts/build-plugins.sh >&2
cargo build --release --locked -p sockets-host -p loadgen >&2
step "Installing the Socket.IO peer (npm ci)"
(cd tests/loadgen/socketio && npm ci --no-audit --no-fund --silent >&2)

work=$(mktemp -d)
out=target/bench
mkdir -p "$out"
: > "$out/results.jsonl"
loadgen=target/release/loadgen
"$loadgen" users-file --pairs "$PAIRS" > "$work/users.json"

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

wait_for() {
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on $1" >&2
    exit 1
}

start_ours() {
    SOCKETS_LISTEN=$OURS SOCKETS_JWT_SECRET=$SECRET SOCKETS_DATA_DIR="$work/data-$RANDOM" \
        SOCKETS_PLUGINS_DIR=target/plugins/wasm32-wasip2/release SOCKETS_USERS_FILE="$work/users.json" \
        SOCKETS_RATE_LIMIT=0 SOCKETS_LOG=warn \
        target/release/sockets-host serve >"$work/ours.log" 2>&1 &
    pids+=($!)
    server_pid=$!
    wait_for "$OURS"
}

start_peer() {
    SOCKETS_LISTEN=$PEER SOCKETS_JWT_SECRET=$SECRET SOCKETS_USERS_FILE="$work/users.json" \
        node tests/loadgen/socketio/server.js >"$work/peer.log" 2>&1 &
    pids+=($!)
    server_pid=$!
    wait_for "$PEER"
}

stop_server() { kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; }

run() {
    local target=$1 addr=$2
    shift 2
    SOCKETS_JWT_SECRET=$SECRET "$loadgen" --target "$target" --server "$addr" "$@" | tee -a "$out/results.jsonl"
}

for target in sockets socketio; do
    if [ "$target" = sockets ]; then start=start_ours addr=$OURS; else start=start_peer addr=$PEER; fi
    # A fresh server per run, so one run's memory and queues do not carry over.
    step "$target: idle ($IDLE connections)"
    $start; run "$target" "$addr" idle --connections "$IDLE" --server-pid "$server_pid"; stop_server
    step "$target: chat ($PAIRS pairs, window $WINDOW, ${DURATION}s)"
    $start; run "$target" "$addr" chat --pairs "$PAIRS" --window "$WINDOW" --duration "$DURATION"; stop_server
    step "$target: fanout ($FAN_USERS users, $FAN_EVENTS events)"
    $start; run "$target" "$addr" fanout --users "$FAN_USERS" --events "$FAN_EVENTS"; stop_server
done
step "Results in $out/results.jsonl; machine: $(nproc) cores, $(uname -sr)"
