#!/usr/bin/env bash
# A reconnect storm: CONNECTIONS (19500) idle connections of distinct users,
# IN_FLIGHT (200) handshakes at once, against a fresh host per run, three
# ways alternated in each of ROUNDS (3) rounds:
#   embedded  — the default, no broker;
#   clustered — one node with the cluster link on (SOCKETS_AMQP_URL);
#   with-peer — the same while a second node is up, so every connect waits
#               for the peer's answer to its announcement.
# The host is pinned to CPU 0 and the load generator to CPU 1 (the peer and
# RabbitMQ share what is left). One JSON line per run, then the medians of
# connects/s and handshake p99 relative to the embedded default's.
# BEFORE=path/to/another/sockets-host adds a fourth way, that binary as a
# clustered node (an earlier commit's build, for before/after in one run).
# BUILD=release (default) or dev. Needs RabbitMQ on 127.0.0.1
# (scripts/services.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

CONNECTIONS=${CONNECTIONS:-19500}
IN_FLIGHT=${IN_FLIGHT:-200}
ROUNDS=${ROUNDS:-3}
. scripts/bench-build.sh
build_bench_binaries

SECRET=bench-storm-secret-not-secret
ADDR=127.0.0.1:18082
PEER_ADDR=127.0.0.1:18083
AMQP=${SOCKETS_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
pin() { if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then echo "taskset -c $1"; fi; }
work=$(mktemp -d)
pids=()
servers=0
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done; rm -rf "$work"' EXIT

failed() {
    echo "$1; the hosts' log:" >&2
    cat "$work/host.log" >&2
    exit 1
}
# `/readyz` at $1 answers 200 (bash's /dev/tcp: no curl needed).
ready() {
    { exec 3<>"/dev/tcp/${1%:*}/${1#*:}"; } 2>/dev/null || return 1
    printf 'GET /readyz HTTP/1.0\r\n\r\n' >&3
    local status=
    read -r _ status _ <&3 || true
    exec 3<&-
    [ "$status" = 200 ]
}
# start ADDR CPU VAR=value...: a fresh host ($host, else ours); sets `pid`.
start() {
    local addr=$1 cpu=$2
    shift 2
    local binary=${host:-$bin_dir/sockets-host}
    servers=$((servers + 1))
    env "$@" SOCKETS_LISTEN="$addr" SOCKETS_JWT_SECRET=$SECRET SOCKETS_DATA_DIR="$work/data-$servers" \
        SOCKETS_PLUGINS_DIR=target/plugins/wasm32-wasip2/release SOCKETS_LOG=warn \
        $(pin "$cpu") "$binary" serve >/dev/null 2>>"$work/host.log" &
    pid=$!
    pids+=("$pid")
    for _ in $(seq 1 200); do
        kill -0 "$pid" 2>/dev/null || failed "a host exited at start"
        ready "$addr" && return
        sleep 0.1
    done
    failed "a host never got ready"
}
stop_all() {
    for p in "${pids[@]}"; do
        kill -TERM "$p" 2>/dev/null || failed "a host was gone before its stop"
        local status=0
        wait "$p" || status=$?
        [ "$status" = 0 ] || failed "a host exited with $status at its stop"
    done
    pids=()
}
# metric ADDR NAME: a counter of the host at ADDR (0 when absent).
metric() {
    { exec 4<>"/dev/tcp/${1%:*}/${1#*:}"; } 2>/dev/null || { echo 0; return; }
    printf 'GET /metrics HTTP/1.0\r\n\r\n' >&4
    local value
    value=$(awk -v name="$2" '$1 == name { print $2 }' <&4)
    exec 4<&-
    echo "${value:-0}"
}
storm() {
    SOCKETS_JWT_SECRET=$SECRET $(pin 1) "$bin_dir/loadgen" --target sockets --server $ADDR \
        idle --connections "$CONNECTIONS" --in-flight "$IN_FLIGHT" --server-pid "$1" | tail -1 | cut -c2-
}

results=$work/results.jsonl
ways=(embedded clustered with-peer)
[ -z "${BEFORE:-}" ] || ways+=(clustered-before)
for round in $(seq 1 "$ROUNDS"); do
    for node in "${ways[@]}"; do
        # Each run on exchanges of its own: no queue of an earlier run's
        # node is taken for a peer.
        cluster=(SOCKETS_AMQP_URL="$AMQP" SOCKETS_CLUSTER_KEY=bench-storm-cluster-key-not-a-secret-0123456789 SOCKETS_AMQP_EXCHANGE="bench-storm.$round.$node.events"
            SOCKETS_AMQP_QUEUE="bench-storm.$round.$node.intake" SOCKETS_AMQP_DEAD_EXCHANGE="bench-storm.$round.$node.dead"
            SOCKETS_AMQP_NODES_EXCHANGE="bench-storm.$round.$node.nodes")
        case $node in
            embedded) start $ADDR 0 ;;
            clustered) start $ADDR 0 "${cluster[@]}" ;;
            with-peer)
                start $PEER_ADDR 1 "${cluster[@]}"
                start $ADDR 0 "${cluster[@]}" ;;
            clustered-before) host=$BEFORE start $ADDR 0 "${cluster[@]}" ;;
        esac
        line=$(storm "$pid")
        # What the presence cost the broker over the storm and its
        # disconnects (loadgen drops its connections before it prints).
        traffic=
        if [ "$node" = with-peer ]; then
            sleep 1
            traffic=$(printf '"presence_sent_by_node":%s,"presence_sent_by_peer":%s,' \
                "$(metric $ADDR sockets_cluster_presence_sent_total)" "$(metric $PEER_ADDR sockets_cluster_presence_sent_total)")
        fi
        printf '{"round":%s,"node":"%s",%s%s\n' "$round" "$node" "$traffic" "$line" | tee -a "$results"
        stop_all
    done
done

# Medians over the rounds, and each way's ratio to the embedded default.
python3 - "$results" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
for run in runs:
    if run["failed"] or run["connections"] == 0:
        sys.exit(f"a storm lost connections: {run}")
def median(node, key):
    values = [key(run) for run in runs if run["node"] == node]
    return statistics.median(values)
rate = lambda run: run["connects_per_s"]
p99 = lambda run: run["handshake"]["p99_ms"]
base_rate, base_p99 = median("embedded", rate), median("embedded", p99)
for node in dict.fromkeys(run["node"] for run in runs):
    print(json.dumps({"summary": node, "connects_per_s": round(median(node, rate)),
        "handshake_p99_ms": median(node, p99), "connects_vs_embedded": round(median(node, rate) / base_rate, 2),
        "p99_vs_embedded": round(median(node, p99) / base_p99, 2)}))
PY
