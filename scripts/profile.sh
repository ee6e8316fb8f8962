#!/usr/bin/env bash
# Where the host's CPU goes (docs/benchmarks.md, "Against Socket.IO"): a
# `perf record` of the host, pinned to CPU 0 as scripts/bench.sh pins it,
# in the middle of a CPU-bound chat run from the load generator on CPU 1,
# summed by `loadgen profile-shares` into shares of the samples by thread,
# by kind of code (kernel, plugin code, wasmtime, the rest of the host,
# libc) and for the WASM routing (plugin code + wasmtime: the cost of
# routing through plugins that no "no plugin" build shows).
#
# Prints the chat run's summary, then the profile's, and appends both to
# target/bench/profile.jsonl after a line naming the commit. The samples
# stay in target/bench/perf.data for `perf report -i`.
#
# Knobs (environment): PAIRS (64), WINDOW (8), DURATION seconds of chat
# (10), SAMPLE seconds recorded from the middle of it (4), FREQ samples
# per second (999), OUT (target/bench: where profile.jsonl and perf.data
# go), BUILD (release; dev: a smoke run of this script, see
# scripts/bench-build.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-host.sh

PAIRS=${PAIRS:-64}
WINDOW=${WINDOW:-8}
DURATION=${DURATION:-10}
SAMPLE=${SAMPLE:-4}
FREQ=${FREQ:-999}
if [ "$SAMPLE" -ge "$DURATION" ]; then
    echo "SAMPLE ($SAMPLE s) must be shorter than DURATION ($DURATION s)" >&2
    exit 1
fi
SECRET=profile-secret-$RANDOM$RANDOM
OURS=127.0.0.1:18080
server_cpu=(taskset -c 0)

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

step "perf (Debian's linux-perf)"
if ! command -v perf >/dev/null; then
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq linux-perf >/dev/null
fi
perf --version >&2
record=(perf record)
if [ "$(id -u)" != 0 ] && [ "$(cat /proc/sys/kernel/perf_event_paranoid)" -gt 1 ]; then
    # Recording another process takes root here: sudo, as for installing.
    record=(as_root perf record)
fi

build_for_bench

work=$(mktemp -d)
out=${OUT:-target/bench}
mkdir -p "$out"
loadgen=$bin_dir/loadgen
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

"$loadgen" users-file --pairs "$PAIRS" > "$work/users.json"
start_ours

step "Chat ($PAIRS pairs, window $WINDOW, ${DURATION}s); perf records ${SAMPLE}s of the host from its middle"
SOCKETS_JWT_SECRET=$SECRET taskset -c 1 "$loadgen" --target sockets --server "$OURS" \
    chat --pairs "$PAIRS" --window "$WINDOW" --duration "$DURATION" --server-pid "$server_pid" >"$work/chat.json" &
chat_pid=$!
pids+=("$chat_pid")
sleep $(((DURATION - SAMPLE) / 2))
"${record[@]}" -g -F "$FREQ" -p "$server_pid" -o "$out/perf.data" -- sleep "$SAMPLE" 2>"$work/perf.log" ||
    { cat "$work/perf.log" >&2; exit 1; }
[ "${record[0]}" = perf ] || as_root chown "$(id -u):$(id -g)" "$out/perf.data"
wait "$chat_pid"

{
    printf '{%s,"pairs":%s,"window":%s,"duration_s":%s,"sample_s":%s,"freq":%s}\n' \
        "$(sitting_fields)" "$PAIRS" "$WINDOW" "$DURATION" "$SAMPLE" "$FREQ"
    cat "$work/chat.json"
    perf report -i "$out/perf.data" --no-children --stdio -g none -t $'\t' -F overhead,sample,comm,dso,sym 2>/dev/null |
        "$loadgen" profile-shares
} | tee -a "$out/profile.jsonl"
if ours_left_workers; then
    echo "WARNING: a plugin ran off the async workers during the run: its figures are skewed" >&2
fi
