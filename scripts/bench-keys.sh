#!/usr/bin/env bash
# What exactly once costs: the fanout of backend events with and without an
# idempotency key per event, alternated on fresh servers, for each store
# (the embedded default over HTTP and through RabbitMQ; MongoDB over HTTP).
# One line per run; the ratio to compare is keyed / unkeyed events/s within
# a round. Sizes: EVENTS (10000), MONGO_EVENTS (3000), ROUNDS (3);
# BUILD=release (default) or dev. Needs RabbitMQ and a MongoDB-protocol
# server on 127.0.0.1 (scripts/services.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

EVENTS=${EVENTS:-10000}
MONGO_EVENTS=${MONGO_EVENTS:-3000}
ROUNDS=${ROUNDS:-3}
. scripts/bench-build.sh
build_bench_binaries

SECRET=bench-keys-secret-not-secret
ADDR=127.0.0.1:18081
AMQP=${SOCKETS_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
MONGO=${SOCKETS_MONGO_URL:-mongodb://127.0.0.1:27017}
work=$(mktemp -d)
pid=
servers=0
trap '[ -z "$pid" ] || { kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; }; rm -rf "$work"' EXIT

failed() {
    echo "$1; the host's log:" >&2
    cat "$work/host.log" >&2
    exit 1
}
# `/readyz` answers 200 (bash's /dev/tcp: no curl needed).
ready() {
    { exec 3<>"/dev/tcp/${ADDR%:*}/${ADDR#*:}"; } 2>/dev/null || return 1
    printf 'GET /readyz HTTP/1.0\r\n\r\n' >&3
    local status=
    read -r _ status _ <&3 || true
    exec 3<&-
    [ "$status" = 200 ]
}
start() {
    servers=$((servers + 1))
    env "$@" SOCKETS_LISTEN=$ADDR SOCKETS_JWT_SECRET=$SECRET SOCKETS_DATA_DIR="$work/data-$servers" \
        SOCKETS_PLUGINS_DIR=target/plugins/wasm32-wasip2/release SOCKETS_LOG=warn \
        "$bin_dir/sockets-host" serve >/dev/null 2>>"$work/host.log" &
    pid=$!
    for _ in $(seq 1 200); do
        kill -0 "$pid" 2>/dev/null || failed "the host exited at start"
        ready && return
        sleep 0.1
    done
    failed "the host never got ready"
}
stop() {
    kill -TERM "$pid" 2>/dev/null || failed "the host was gone before its stop"
    local status=0
    wait "$pid" || status=$?
    pid=
    [ "$status" = 0 ] || failed "the host exited with $status at its stop"
}
fanout() {
    SOCKETS_JWT_SECRET=$SECRET "$bin_dir/loadgen" --target sockets --server $ADDR fanout --users 100 "$@"
}
broker=(SOCKETS_AMQP_URL="$AMQP" SOCKETS_AMQP_EXCHANGE=bench-keys.events SOCKETS_AMQP_QUEUE=bench-keys.intake
    SOCKETS_AMQP_DEAD_EXCHANGE=bench-keys.dead SOCKETS_AMQP_NODES_EXCHANGE=bench-keys.nodes
    SOCKETS_AMQP_CLUSTER=false)

for round in $(seq 1 "$ROUNDS"); do
    for keyed in "" --keyed; do
        printf '{"round":%s,"store":"embedded",' "$round"
        start; fanout --events "$EVENTS" $keyed | tail -1 | cut -c2-; stop
        printf '{"round":%s,"store":"mongodb",' "$round"
        start SOCKETS_MONGO_URL="$MONGO" SOCKETS_MONGO_DB=bench_keys
        fanout --events "$MONGO_EVENTS" $keyed | tail -1 | cut -c2-; stop
        printf '{"round":%s,"store":"embedded",' "$round"
        start "${broker[@]}"
        fanout --events "$EVENTS" --amqp "$AMQP" --exchange bench-keys.events $keyed | tail -1 | cut -c2-; stop
    done
done
