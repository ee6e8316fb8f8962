#!/usr/bin/env bash
# Installs (Debian packages) and starts the services the tests talk to,
# bound to 127.0.0.1 only: RabbitMQ. Idempotent: a running service is left
# as it is. Fails loudly when a service cannot start.
set -euo pipefail

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v rabbitmq-server >/dev/null; then
    echo "installing rabbitmq-server"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq rabbitmq-server >/dev/null
fi

export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export ERL_EPMD_ADDRESS=127.0.0.1
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
if ! rabbitmqctl -q status >/dev/null 2>&1; then
    echo "starting RabbitMQ on 127.0.0.1:5672"
    as_root env RABBITMQ_NODE_IP_ADDRESS="$RABBITMQ_NODE_IP_ADDRESS" ERL_EPMD_ADDRESS="$ERL_EPMD_ADDRESS" \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="$RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS" rabbitmq-server -detached
fi
timeout 180 rabbitmqctl await_startup >/dev/null
echo "RabbitMQ is up: $(rabbitmqctl -q version 2>/dev/null || echo running)"
