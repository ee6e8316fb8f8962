#!/usr/bin/env bash
# Schema-driven fuzzing of the live HTTP API: schemathesis (from PyPI)
# generates requests from docs/openapi.yaml, as served by a running
# sockets-host, and checks every answer: no 5xx, every status, content type
# and body as documented, malformed input refused. Bounded in time (FUZZ_TIME
# seconds per run, 60 by default). Expects the debug host and the bundled
# plugins to be built (scripts/test.sh builds them first).
#
# Excluded check: positive_data_acceptance. Whether a schema-valid event is
# accepted depends on the plugins loaded (422 with no handler, 400 when a
# plugin refuses its data), which the schema cannot say.
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_TIME=${FUZZ_TIME:-60}
SCHEMATHESIS_VERSION=4.32.5
TOOLS_DIR=${SOCKETS_TOOLS_DIR:-$HOME/.cache/sockets-tools}
venv=$TOOLS_DIR/schemathesis-$SCHEMATHESIS_VERSION
# A venv's scripts name its path: it is made in place, and counts as
# installed once its stamp is written.
if [ ! -e "$venv/installed" ]; then
    rm -rf "$venv"
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
        echo "installing python3-venv"
        as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq python3-venv >/dev/null
        rm -rf "$venv"
        python3 -m venv "$venv"
    fi
    "$venv/bin/pip" install -q "schemathesis==$SCHEMATHESIS_VERSION"
    touch "$venv/installed"
fi

work=$(mktemp -d)
cleanup() {
    [ -n "${server_pid:-}" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
# A plugins folder of its own: the fuzzer deletes and uploads plugins.
mkdir -p "$work/plugins"
cp target/plugins/wasm32-wasip2/release/*.wasm "$work/plugins/"
secret=fuzz-secret-not-secret
export SOCKETS_JWT_SECRET=$secret SOCKETS_DATA_DIR=$work/data SOCKETS_PLUGINS_DIR=$work/plugins \
    SOCKETS_LISTEN=127.0.0.1:0 SOCKETS_LOG=warn
target/debug/sockets-host serve >"$work/stdout" 2>"$work/stderr" &
server_pid=$!
addr=
for _ in $(seq 1 100); do
    addr=$(sed -n 's|^sockets-host listening on http://||p' "$work/stdout")
    [ -n "$addr" ] && break
    sleep 0.2
done
if [ -z "$addr" ]; then
    echo "sockets-host did not start:" >&2
    cat "$work/stderr" >&2
    exit 1
fi
token() { target/debug/sockets-host token --sub "$1" --role "$2"; }

fuzz() {
    local role=$1 token
    shift
    token=$(token "fuzz-$role" "$role")
    echo "schemathesis as a token with role $role: $*"
    # From the scratch folder: schemathesis keeps a cache where it runs.
    (cd "$work" && "$venv/bin/schemathesis" run "http://$addr/openapi.yaml" \
        -H "Authorization: Bearer $token" \
        --checks all --exclude-checks positive_data_acceptance \
        --max-time "$FUZZ_TIME" --max-examples 200 --seed 1 "$@")
}
# Reads before the admin API's deletes can leave the server with no
# plugin (then /readyz is 503, as documented, but a 5xx all the same).
fuzz service --include-path /api/events
fuzz admin --include-method GET
fuzz admin --include-path-regex '^/admin/' --exclude-method GET

# The fuzzer's worst must not have taken the server down.
kill -0 "$server_pid"
if grep -q "panicked" "$work/stderr"; then
    echo "the server panicked while fuzzed:" >&2
    grep -B2 -A5 "panicked" "$work/stderr" >&2
    exit 1
fi
echo "fuzzing: no failure"
