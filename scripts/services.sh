#!/usr/bin/env bash
# Installs (Debian packages) and starts the services the tests talk to,
# bound to 127.0.0.1 only: RabbitMQ. Idempotent: a running service is left
# as it is. Fails loudly when a service cannot start.
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
