#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need,
# then runs formatting, lints and every test. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
# A one-shot build gains nothing from incremental caches, which would
# double the size of target/ (CI shares its disk).
export CARGO_INCREMENTAL=0

step() { printf '\n==> %s\n' "$*"; }

step "Rust toolchain and the wasm32-wasip2 target (from rust-toolchain.toml)"
rustup toolchain install --no-self-update
rustup target add wasm32-wasip2
rustup component add rustfmt clippy
cargo --version

step "Services the tests need (RabbitMQ, FerretDB)"
scripts/services.sh

step "Test tools from Debian's packages (faketime: a node whose clock runs ahead; chromium: the demo page's browser test)"
missing=()
command -v faketime >/dev/null || missing+=(faketime)
# The fonts too: a recommends-less install would screenshot empty boxes.
command -v chromium >/dev/null || missing+=(chromium fonts-liberation)
if [ ${#missing[@]} -gt 0 ]; then
    as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi
faketime --version | head -1
chromium --version

step "Exchanges earlier test runs left on the broker"
# Each test declares exchanges and queues of its own, named
# test.<kind>.<test id>[...]. Queues expire a minute after last use (see
# services.sh); RabbitMQ never expires exchanges, so those of tests whose
# queues are all gone are deleted here, sparing any test running now.
if ! deleted=$(rabbitmqctl -q eval '
    TestId = fun(Name) ->
        case binary:split(Name, <<".">>, [global]) of
            [<<"test">>, _Kind, Id | _] -> Id;
            _ -> none
        end
    end,
    Live = [TestId(Q) || {resource, _, queue, Q} <- rabbit_amqqueue:list_names()],
    length([R || {resource, _, exchange, <<"test.", _/binary>> = X} = R <- rabbit_exchange:list_names(),
                 not lists:member(TestId(X), Live),
                 rabbit_exchange:delete(R, false, <<"scripts/test.sh">>) =:= ok]).' 2>&1); then
    echo "warning: could not delete leftover test.* exchanges: $deleted" >&2
else
    echo "deleted $deleted leftover test.* exchanges"
fi

step "Formatting"
cargo fmt --all --check

step "Lints"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "API documentation (rustdoc warnings are errors: broken or private links)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

step "Bundled plugins for wasm32-wasip2"
scripts/build-plugins.sh

step "The Socket.IO peer of the benchmark (Node.js, packages from npm)"
# tests/tests/loadgen.rs checks that the peer does the jobs the host does.
node --version
(cd tests/loadgen/socketio && npm ci --no-audit --no-fund)

step "Tests"
# Test servers keep their folders (data, log) under target/test-scratch for
# a look after a failure; the previous run's are dropped here.
rm -rf target/test-scratch
cargo test --workspace --locked

step "The TypeScript client: build, API docs, tests against the host (packages from npm)"
# clients/typescript/test starts the debug host with the bundled plugins.
cargo build -p sockets-host --locked
(cd clients/typescript && npm ci --no-audit --no-fund && npm run docs && npm test)

step "The /demo page in a real headless browser (Debian's Chromium, puppeteer-core from npm)"
# Two pages chat, one loses its network and gets what it missed once;
# screenshots of both are kept in target/artifacts.
(cd tests/browser && npm ci --no-audit --no-fund && npm test)

step "Schema-driven fuzzing of the live HTTP API (schemathesis from PyPI, bounded in time)"
FUZZ_TIME=45 scripts/fuzz-api.sh

step "The benchmark scripts end to end (debug build, tiny load: the figures mean nothing)"
# What a user runs to reproduce the figures of docs/benchmarks.md, at a size that takes
# a few minutes: every run against both servers (scripts/bench.sh fails if
# any lost, duplicated, failed or refused something) and the profile
# (perf record, summed by loadgen profile-shares). Results: target/bench-smoke.
smoke=(BUILD=dev OUT=target/bench-smoke)
env "${smoke[@]}" PAIRS=2 WIDE_PAIRS=4 WINDOW=2 BIG_PAIRS=6 BIG_WINDOW=1 DURATION=2 FAN_USERS=5 FAN_EVENTS=200 IDLE=50 ROUNDS=1 scripts/bench.sh
env "${smoke[@]}" PAIRS=4 WINDOW=2 DURATION=3 SAMPLE=1 scripts/profile.sh
BUILD=dev EVENTS=200 MONGO_EVENTS=100 ROUNDS=1 scripts/bench-keys.sh > target/bench-smoke/keys.jsonl
BUILD=dev CONNECTIONS=200 ROUNDS=1 scripts/bench-storm.sh > target/bench-smoke/storm.jsonl
target/debug/loadgen check-results target/bench-smoke/keys.jsonl
