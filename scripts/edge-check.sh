#!/usr/bin/env bash
# The edge under attack, measured (docs/limits.md, "Measured"): one host as
# the benchmarks run it, 8 normal clients' round trips and the host's
# memory for DURATION seconds alone, then as long again while UPLOADS
# unauthenticated 16 MiB plugin uploads and SLOW sockets that never finish
# their request headers keep coming. Prints the load generator's JSON.
#
#   UPLOADS=40 SLOW=300 DURATION=10 scripts/edge-check.sh
#
# BUILD=dev for a smoke run (figures then mean nothing). The slow sockets
# count against the open-file limit of both processes (20,000 here).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-host.sh

UPLOADS=${UPLOADS:-40}
SLOW=${SLOW:-300}
DURATION=${DURATION:-10}
OURS=${OURS:-127.0.0.1:18181}
SECRET=edge-check-secret
server_cpu=()
pids=()
work=$(mktemp -d)
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT

build_for_bench
echo '[]' >"$work/users.json"
# The default header deadline (10 s) and connection cap (100000).
start_ours
step "Attack: $UPLOADS uploads, $SLOW slow sockets, ${DURATION}s per phase ($BUILD build)"
"$bin_dir/loadgen" --server "$OURS" --secret "$SECRET" edge \
    --uploads "$UPLOADS" --slow "$SLOW" --duration "$DURATION" --server-pid "$server_pid"
