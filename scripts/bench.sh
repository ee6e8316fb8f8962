#!/usr/bin/env bash
# The benchmark suite (docs/benchmarks.md, "Against Socket.IO"): builds the
# host (release), the plugins and the load generator, installs the
# Socket.IO peer from npm, starts both servers on 127.0.0.1 and runs the
# same bounded load against each, side by side. Prints one JSON object per
# run and writes them all to target/bench/results.jsonl, after a first
# line that says where they come from (commit, machine, versions, knobs).
#
# Runs per server: idle connections; chat as fast as acks come (peak),
# then paced at half of that peak, then with WIDE_PAIRS pairs (enough
# messages in flight that the server's CPU, not the wait for acks, sets
# the pace); backend events over HTTP; and for our host also through
# RabbitMQ (started by scripts/services.sh), which the Socket.IO peer has
# no counterpart for. Event runs too go as fast as they can, then paced at
# half of that: at full speed a RabbitMQ run's latency is mostly the
# backlog the publisher ran ahead by (confirms come once queued). The
# paced RabbitMQ run is followed by RabbitMQ alone at the same pace
# (`loadgen broker`: a plain consumer on a quorum queue), the broker's own
# share of that latency.
#
# The same chat runs against a bare relay (`loadgen relay`: the chat
# protocol with no plugins and no log, built like the host), the limit the
# host's figures are read against, and all three at BIG_PAIRS x BIG_WINDOW
# (many connections, few messages each in flight).
#
# Last, chat again at each shape, ROUNDS times each server, the three
# alternated run by run: this VM's speed drifts over minutes, so the
# throughput ratios are taken as medians of ratios measured side by side
# (a "chat-alternated" summary line per shape), not from runs minutes
# apart.
#
# Knobs (environment): PAIRS (16), WIDE_PAIRS (64), WINDOW (8), BIG_PAIRS
# (200), BIG_WINDOW (4), DURATION
# seconds (10), FAN_USERS (100), FAN_EVENTS (10000), IDLE (5000; ~19000
# is the most this machine's 20,000 open files allow), ROUNDS (3; 0:
# none), PIN (1: the server runs on CPU 0 and the load generator on CPU 1,
# so each server gets one core whatever its threading -- Socket.IO's Node
# is single-threaded -- and neither competes with the load generator; 0:
# no pinning), OUT (target/bench: where results.jsonl goes), BUILD
# (release; dev: a smoke run of this script, see scripts/bench-build.sh).
#
# Ends with `loadgen check-results`: the script fails, naming the runs,
# when any run lost, duplicated, failed or refused something.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-host.sh

PAIRS=${PAIRS:-16}
WIDE_PAIRS=${WIDE_PAIRS:-64}
WINDOW=${WINDOW:-8}
BIG_PAIRS=${BIG_PAIRS:-200}
BIG_WINDOW=${BIG_WINDOW:-4}
DURATION=${DURATION:-10}
FAN_USERS=${FAN_USERS:-100}
FAN_EVENTS=${FAN_EVENTS:-10000}
IDLE=${IDLE:-5000}
ROUNDS=${ROUNDS:-3}
PIN=${PIN:-1}
server_cpu=() loadgen_cpu=()
if [ "$PIN" = 1 ]; then
    server_cpu=(taskset -c 0) loadgen_cpu=(taskset -c 1)
fi
SECRET=bench-secret-$RANDOM$RANDOM
OURS=127.0.0.1:18080
PEER=127.0.0.1:18090
RELAY=127.0.0.1:18095

step "Starting RabbitMQ"
scripts/services.sh >&2
build_for_bench
step "Installing the Socket.IO peer (npm ci)"
(cd tests/loadgen/socketio && npm ci --no-audit --no-fund --silent >&2)

work=$(mktemp -d)
out=${OUT:-target/bench}
mkdir -p "$out"
# Where the figures come from: the code, the machine, the versions, the knobs.
sitting() {
    local socketio
    socketio=$(node -p "require('./tests/loadgen/socketio/node_modules/socket.io/package.json').version")
    printf '{%s,"node":%s,"socketio":%s,' "$(sitting_fields)" "$(json_string "$(node --version)")" "$(json_string "$socketio")"
    printf '"pairs":%s,"wide_pairs":%s,"window":%s,"big_pairs":%s,"big_window":%s,"duration_s":%s,"fan_users":%s,"fan_events":%s,"idle":%s,"rounds":%s,"pin":%s}\n' \
        "$PAIRS" "$WIDE_PAIRS" "$WINDOW" "$BIG_PAIRS" "$BIG_WINDOW" "$DURATION" "$FAN_USERS" "$FAN_EVENTS" "$IDLE" "$ROUNDS" "$PIN"
}
sitting | tee "$out/results.jsonl"
loadgen=$bin_dir/loadgen
most_pairs=$(printf '%s\n' "$PAIRS" "$WIDE_PAIRS" "$BIG_PAIRS" | sort -n | tail -1)
"$loadgen" users-file --pairs "$most_pairs" > "$work/users.json"

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

# Until GET /readyz answers 200 (the broker intake consumes).
wait_ready() {
    for _ in $(seq 1 100); do
        # Braces: a redirection on `exec` itself would send the script's
        # stderr to /dev/null for good.
        if { exec 3<>"/dev/tcp/${1%:*}/${1#*:}"; } 2>/dev/null; then
            printf 'GET /readyz HTTP/1.0\r\n\r\n' >&3
            read -r _ status _ <&3 || true
            exec 3<&-
            [ "$status" = 200 ] && return 0
        fi
        sleep 0.1
    done
    echo "$1 never became ready" >&2
    exit 1
}

start_peer() {
    SOCKETS_LISTEN=$PEER SOCKETS_JWT_SECRET=$SECRET SOCKETS_USERS_FILE="$work/users.json" \
        "${server_cpu[@]}" node tests/loadgen/socketio/server.js >"$work/peer.log" 2>&1 &
    pids+=($!)
    server_pid=$!
    wait_for "$PEER"
}

# Stops the server; says so when our host moved a plugin off its async
# workers during the run (slower for a while: the figures are skewed).
stop_server() {
    kill "$server_pid"
    wait "$server_pid" 2>/dev/null || true
    if ours_left_workers; then
        echo "WARNING: in the run above a plugin ran off the async workers" >&2
        echo '{"run":"warning","text":"in the run above a plugin ran off the async workers: its figures are skewed"}' >>"$out/results.jsonl"
    fi
    : > "$work/ours.log"
}

start_relay() {
    SOCKETS_JWT_SECRET=$SECRET "${server_cpu[@]}" "$loadgen" relay --listen "$RELAY" --users "$work/users.json" \
        >"$work/relay.log" 2>&1 &
    pids+=($!)
    server_pid=$!
    wait_for "$RELAY"
}

# A loadgen run against a target (sockets, socketio, or relay: the relay
# speaks the sockets protocol; its lines say "relay").
run() {
    local target=$1 addr=$2 protocol=$1
    shift 2
    [ "$target" != relay ] || protocol=sockets
    SOCKETS_JWT_SECRET=$SECRET "${loadgen_cpu[@]}" "$loadgen" --target "$protocol" --server "$addr" "$@" |
        sed "s/\"target\":\"$protocol\"/\"target\":\"$target\"/" | tee -a "$out/results.jsonl"
}

# How to start each target and where it listens.
start_of() { case $1 in sockets) echo start_ours ;; socketio) echo start_peer ;; relay) echo start_relay ;; esac; }
addr_of() { case $1 in sockets) echo "$OURS" ;; socketio) echo "$PEER" ;; relay) echo "$RELAY" ;; esac; }

# Half of a figure of the run whose summary is on stdin (shown on stderr):
# the rate of the paced run that follows it.
half_of() { value_of "$1" | awk '{ printf "%d", $1 / 2 }'; }
# A figure of the run whose summary is on stdin (shown on stderr, written to
# the inherited descriptor: `tee /dev/stderr` would open a log file that
# stderr is redirected to anew, truncating it or writing over it).
value_of() {
    local summary
    summary=$(cat)
    printf '%s\n' "$summary" >&2
    grep -o "\"$1\":[0-9.]*" <<<"$summary" | cut -d: -f2
}
# The numbers given as a JSON array.
json_list() { local IFS=,; echo "[$*]"; }
# The median of the numbers given.
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }

# The broker intake of our host, on exchanges and a queue of its own.
AMQP_URL=${SOCKETS_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
with_broker=(SOCKETS_AMQP_URL="$AMQP_URL" SOCKETS_AMQP_EXCHANGE=bench.events SOCKETS_AMQP_QUEUE=bench.intake
    SOCKETS_AMQP_DEAD_EXCHANGE=bench.dead SOCKETS_AMQP_NODES_EXCHANGE=bench.nodes
    SOCKETS_CLUSTER_KEY=bench-cluster-key-not-secret)

for target in sockets socketio; do
    if [ "$target" = sockets ]; then start=start_ours addr=$OURS; else start=start_peer addr=$PEER; fi
    # A fresh server per run, so one run's memory and queues do not carry over.
    step "$target: idle ($IDLE connections)"
    $start; run "$target" "$addr" idle --connections "$IDLE" --server-pid "$server_pid"; stop_server
    step "$target: chat ($PAIRS pairs, window $WINDOW, ${DURATION}s)"
    $start
    half=$(run "$target" "$addr" chat --pairs "$PAIRS" --window "$WINDOW" --duration "$DURATION" --server-pid "$server_pid" |
        half_of delivered_per_s)
    stop_server
    step "$target: chat paced at half its peak ($half msg/s)"
    $start; run "$target" "$addr" chat --pairs "$PAIRS" --window "$WINDOW" --duration "$DURATION" --server-pid "$server_pid" --rate "$half"; stop_server
    step "$target: chat ($WIDE_PAIRS pairs, window $WINDOW, ${DURATION}s)"
    $start; run "$target" "$addr" chat --pairs "$WIDE_PAIRS" --window "$WINDOW" --duration "$DURATION" --server-pid "$server_pid"; stop_server
    step "$target: fanout ($FAN_USERS users, $FAN_EVENTS events over HTTP)"
    $start
    half=$(run "$target" "$addr" fanout --users "$FAN_USERS" --events "$FAN_EVENTS" | half_of events_per_s)
    stop_server
    step "$target: fanout over HTTP paced at half its peak ($half events/s)"
    $start; run "$target" "$addr" fanout --users "$FAN_USERS" --events "$FAN_EVENTS" --rate "$half"; stop_server
done

# What exactly once costs: the same fanout with an idempotency key on
# every event (claimed and completed in the embedded keys journal).
step "relay (no plugins, no log): chat ($PAIRS pairs, window $WINDOW, ${DURATION}s)"
start_relay; run relay "$RELAY" chat --pairs "$PAIRS" --window "$WINDOW" --duration "$DURATION" --server-pid "$server_pid"; stop_server
step "relay: chat ($WIDE_PAIRS pairs, window $WINDOW, ${DURATION}s)"
start_relay; run relay "$RELAY" chat --pairs "$WIDE_PAIRS" --window "$WINDOW" --duration "$DURATION" --server-pid "$server_pid"; stop_server
for target in sockets socketio relay; do
    step "$target: chat ($BIG_PAIRS pairs, window $BIG_WINDOW, ${DURATION}s)"
    "$(start_of "$target")"
    run "$target" "$(addr_of "$target")" chat --pairs "$BIG_PAIRS" --window "$BIG_WINDOW" --duration "$DURATION" --server-pid "$server_pid"
    stop_server
done

step "sockets: fanout over HTTP, every event with an idempotency key"
start_ours; run sockets "$OURS" fanout --users "$FAN_USERS" --events "$FAN_EVENTS" --keyed; stop_server

# Our host with its broker intake, once it consumes.
start_broker_host() {
    start_ours "${with_broker[@]}"
    wait_ready "$OURS"
}
# One fanout run through RabbitMQ (extra loadgen arguments: "$@").
broker_fanout() {
    run sockets "$OURS" fanout --users "$FAN_USERS" --events "$FAN_EVENTS" --amqp "$AMQP_URL" --exchange bench.events "$@"
}
step "sockets: fanout ($FAN_USERS users, $FAN_EVENTS events through RabbitMQ)"
start_broker_host
half=$(broker_fanout | half_of events_per_s)
stop_server
step "sockets: fanout through RabbitMQ paced at half its peak ($half events/s)"
start_broker_host; broker_fanout --rate "$half"; stop_server
step "sockets: fanout through RabbitMQ, every event with a message_id"
start_broker_host; broker_fanout --keyed; stop_server
step "RabbitMQ alone at that pace: the same publishes to a quorum queue, a plain consumer (no server)"
SOCKETS_JWT_SECRET=$SECRET "${loadgen_cpu[@]}" "$loadgen" broker --amqp "$AMQP_URL" --events "$FAN_EVENTS" --rate "$half" |
    tee -a "$out/results.jsonl"
# Shapes as "pairs:window".
shapes=("$PAIRS:$WINDOW" "$WIDE_PAIRS:$WINDOW" "$BIG_PAIRS:$BIG_WINDOW")
[ "$ROUNDS" -gt 0 ] || shapes=()
for shape in "${shapes[@]}"; do
    pairs=${shape%:*} window=${shape#*:}
    ours=() peer=() relay=() ratios=() of_relay=()
    for round in $(seq 1 "$ROUNDS"); do
        step "chat alternated, round $round of $ROUNDS ($pairs pairs, window $window): sockets, socketio, relay"
        for target in sockets socketio relay; do
            "$(start_of "$target")"
            rate=$(run "$target" "$(addr_of "$target")" chat --pairs "$pairs" --window "$window" --duration "$DURATION" --server-pid "$server_pid" |
                value_of delivered_per_s)
            stop_server
            case $target in sockets) ours+=("$rate") ;; socketio) peer+=("$rate") ;; relay) relay+=("$rate") ;; esac
        done
        ratios+=("$(awk -v a="${ours[-1]}" -v b="${peer[-1]}" 'BEGIN { printf "%.3f", a / b }')")
        of_relay+=("$(awk -v a="${ours[-1]}" -v b="${relay[-1]}" 'BEGIN { printf "%.3f", a / b }')")
    done
    printf '{"run":"chat-alternated","pairs":%s,"window":%s,"duration_s":%s,"sockets_per_s":%s,"socketio_per_s":%s,"relay_per_s":%s,"ratios":%s,"median_ratio":%s,"of_relay":%s,"median_of_relay":%s}\n' \
        "$pairs" "$window" "$DURATION" "$(json_list "${ours[@]}")" "$(json_list "${peer[@]}")" "$(json_list "${relay[@]}")" \
        "$(json_list "${ratios[@]}")" "$(median "${ratios[@]}")" "$(json_list "${of_relay[@]}")" "$(median "${of_relay[@]}")" |
        tee -a "$out/results.jsonl"
done
step "Results in $out/results.jsonl; machine: $(nproc) cores, $(uname -sr), PIN=$PIN, BUILD=$BUILD"
step "Nothing lost, duplicated, failed or refused in any run?"
"$loadgen" check-results "$out/results.jsonl"
