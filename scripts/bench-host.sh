# Sourced by scripts/bench.sh and scripts/profile.sh (not run on its own):
# how the benchmarks build and start our host, so that a profile is taken
# of the host exactly as the benchmark runs it.
#
# start_ours reads OURS (listen address), SECRET, work (scratch directory
# holding users.json) and server_cpu (a command prefix such as
# `taskset -c 0`, or empty), appends the host's pid to pids and sets
# server_pid. Its log is $work/ours.log.

step() { printf '\n==> %s\n' "$*" >&2; }

. scripts/bench-build.sh

# A JSON string of $1.
json_string() { local s=${1//\\/\\\\}; printf '"%s"' "${s//\"/\\\"}"; }

# The sitting's fields every results file starts with (no braces): when,
# the commit and whether the tree was dirty, the machine, the compiler.
sitting_fields() {
    local commit dirty=false cpu
    commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
    [ -z "$(git status --porcelain 2>/dev/null)" ] || dirty=true
    cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
    printf '"run":"sitting","at":%s,"commit":%s,"dirty":%s,"build":%s,"cpu":%s,"cores":%s,"kernel":%s,"rustc":%s' \
        "$(json_string "$(date -u +%Y-%m-%dT%H:%M:%SZ)")" "$(json_string "$commit")" "$dirty" "$(json_string "$BUILD")" \
        "$(json_string "$cpu")" "$(nproc)" "$(json_string "$(uname -sr)")" "$(json_string "$(rustc --version)")"
}

build_for_bench() {
    step "Building the host ($BUILD), the plugins and the load generator"
    build_bench_binaries
}

# Until something listens on $1 (host:port).
wait_for() {
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on $1" >&2
    exit 1
}

# Starts our host as every benchmark runs it: embedded store in a fresh
# data directory, no rate limit (the default 100 frames/s per connection
# would be the limit), warnings only. Arguments are extra VAR=value pairs.
start_ours() {
    env "$@" SOCKETS_LISTEN=$OURS SOCKETS_JWT_SECRET=$SECRET SOCKETS_DATA_DIR="$work/data-$RANDOM" \
        SOCKETS_PLUGINS_DIR=target/plugins/wasm32-wasip2/release SOCKETS_USERS_FILE="$work/users.json" \
        SOCKETS_RATE_LIMIT=0 SOCKETS_LOG=warn \
        "${server_cpu[@]}" "$bin_dir/sockets-host" serve >"$work/ours.log" 2>&1 &
    pids+=($!)
    server_pid=$!
    wait_for "$OURS"
}

# True, printing the host's lines that say so, when it moved a plugin off
# its async workers ("Slow plugins" in docs/operations.md): that run's figures are
# skewed.
ours_left_workers() { grep -h "off the async workers" "$work/ours.log" >&2 2>/dev/null; }
