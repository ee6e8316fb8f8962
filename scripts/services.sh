#!/usr/bin/env bash
# Installs and starts the services the tests talk to, bound to 127.0.0.1
# only: RabbitMQ (Debian's package) and FerretDB (MongoDB wire protocol,
# SQLite backend, built from the Go module proxy). Idempotent: a running
# service is left as it is. Fails loudly when a service cannot start.
set -euo pipefail

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

installed_now=false
if ! command -v rabbitmq-server >/dev/null; then
    echo "installing rabbitmq-server"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq rabbitmq-server >/dev/null
    installed_now=true
fi

# Loopback only, also for a node the package's own service scripts start.
if ! grep -q '^NODE_IP_ADDRESS=127.0.0.1' /etc/rabbitmq/rabbitmq-env.conf 2>/dev/null; then
    as_root mkdir -p /etc/rabbitmq
    printf 'NODE_IP_ADDRESS=127.0.0.1\nERL_EPMD_ADDRESS=127.0.0.1\n' | as_root tee -a /etc/rabbitmq/rabbitmq-env.conf >/dev/null
fi
if $installed_now && rabbitmqctl -q ping >/dev/null 2>&1; then
    # The package started a node with its defaults: restart it ours.
    as_root rabbitmqctl -q stop >/dev/null
fi

export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export ERL_EPMD_ADDRESS=127.0.0.1
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
if ! rabbitmqctl -q status >/dev/null 2>&1; then
    echo "starting RabbitMQ on 127.0.0.1:5672"
    as_root env RABBITMQ_NODE_IP_ADDRESS="$RABBITMQ_NODE_IP_ADDRESS" ERL_EPMD_ADDRESS="$ERL_EPMD_ADDRESS" \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="$RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS" rabbitmq-server -detached
fi
# The node registers with epmd a few seconds after -detached returns;
# await_startup only waits for a node it can already reach.
for _ in $(seq 1 90); do
    rabbitmqctl -q ping >/dev/null 2>&1 && break
    sleep 2
done
if ! timeout 180 rabbitmqctl await_startup >/dev/null; then
    echo "RabbitMQ did not start; its logs are in /var/log/rabbitmq" >&2
    exit 1
fi
echo "RabbitMQ is up: $(rabbitmqctl -q version 2>/dev/null || echo running)"
# Every test declares queues of its own, named test.* (the intake queue is a
# durable quorum queue). Those a run leaves behind (servers killed by the
# tests, an interrupted run) go after a minute without use; otherwise they
# pile up over runs and slow the broker down until it stops answering.
rabbitmqctl -q set_policy --apply-to queues test-queues-expire '^test\.' '{"expires":60000}' >/dev/null

# FerretDB: `go install` leaves its version file empty, which the binary
# refuses at start, so it is built from the module's source with the file
# written. Kept outside the checkout, so a new clone reuses it.
FERRETDB_VERSION=v1.24.0
TOOLS_DIR=${SOCKETS_TOOLS_DIR:-$HOME/.cache/sockets-tools}
FERRETDB=$TOOLS_DIR/bin/ferretdb-$FERRETDB_VERSION
if [ ! -x "$FERRETDB" ]; then
    if ! command -v go >/dev/null; then
        echo "installing Go"
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq golang-go >/dev/null
    fi
    echo "building FerretDB $FERRETDB_VERSION from the Go module proxy"
    source_dir=$(go mod download -json "github.com/FerretDB/FerretDB@$FERRETDB_VERSION" |
        sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
    build_dir=$(mktemp -d)
    cp -r "$source_dir"/. "$build_dir"
    chmod -R u+w "$build_dir"
    echo "$FERRETDB_VERSION" > "$build_dir/build/version/version.txt"
    mkdir -p "$TOOLS_DIR/bin"
    (cd "$build_dir" && go build -o "$FERRETDB.part" ./cmd/ferretdb)
    mv "$FERRETDB.part" "$FERRETDB"
    rm -rf "$build_dir"
fi
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if ! listening 27017; then
    echo "starting FerretDB on 127.0.0.1:27017"
    state_dir=$TOOLS_DIR/ferretdb-state
    mkdir -p "$state_dir"
    nohup "$FERRETDB" --handler=sqlite --sqlite-url="file:$state_dir/" --state-dir="$state_dir" \
        --listen-addr=127.0.0.1:27017 --debug-addr=- --telemetry=disable --log-level=warn \
        >"$TOOLS_DIR/ferretdb.log" 2>&1 &
    for _ in $(seq 1 60); do
        listening 27017 && break
        sleep 0.5
    done
fi
if ! listening 27017; then
    echo "FerretDB did not start; its log: $TOOLS_DIR/ferretdb.log" >&2
    cat "$TOOLS_DIR/ferretdb.log" >&2 || true
    exit 1
fi
echo "FerretDB is up: $FERRETDB_VERSION on 127.0.0.1:27017 ($FERRETDB)"
