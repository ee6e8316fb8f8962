# Sourced by the benchmark scripts, from the repository root. BUILD is the
# cargo profile of the host and the load generator: `release` (the default)
# is what figures are taken with; `dev` skips the minutes of fat LTO for a
# smoke run of a script (scripts/test.sh), whose figures mean nothing.
# Sets bin_dir to where their binaries are; build_bench_binaries builds
# them and the plugins (always for release).
BUILD=${BUILD:-release}
case $BUILD in
    release) bin_dir=target/release ;;
    dev) bin_dir=target/debug ;;
    *) echo "BUILD must be release or dev, not '$BUILD'" >&2; exit 1 ;;
esac

build_bench_binaries() {
    scripts/build-plugins.sh >&2
    cargo build --profile "$BUILD" --locked -p sockets-host -p loadgen >&2
}
