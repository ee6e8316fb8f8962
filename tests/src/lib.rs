//! Support for the end-to-end tests: real plugins and the real binary, built
//! from source on first use.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// The plugins shipped with the service: every crate in `plugins/` (each
/// folder named after its crate), sorted. The one list: the workspace and
/// `scripts/build-plugins.sh` read the same folder.
pub fn bundled_plugins() -> &'static [&'static str] {
    static BUNDLED: OnceLock<Vec<&'static str>> = OnceLock::new();
    BUNDLED.get_or_init(|| crates_in("plugins"))
}

/// Every plugin crate the tests load, built for `wasm32-wasip2`: the
/// bundled ones and the tests' own (`tests/plugins/`).
pub fn test_plugins() -> &'static [&'static str] {
    static ALL: OnceLock<Vec<&'static str>> = OnceLock::new();
    ALL.get_or_init(|| {
        let mut all = bundled_plugins().to_vec();
        all.extend(crates_in("tests/plugins"));
        all
    })
}

/// The names of the crate folders in `folder` of the workspace, sorted.
fn crates_in(folder: &str) -> Vec<&'static str> {
    let dir = workspace_root().join(folder);
    let mut names: Vec<&'static str> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            path.join("Cargo.toml").is_file().then(|| {
                let name = path.file_name()?.to_str()?.to_owned();
                Some(&*Box::leak(name.into_boxed_str()))
            })?
        })
        .collect();
    names.sort_unstable();
    names
}

/// This process's resident memory, KiB (Linux), for the memory examples.
pub fn rss_kib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow::anyhow!("no VmRSS"))?;
    Ok(line.split_whitespace().nth(1).unwrap_or("0").parse()?)
}

/// The repository root.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace root")
}

/// A `cargo` command in the workspace root, for a build or run nested in a
/// test.
pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace_root());
    without_test_env(&mut command);
    command
}

/// Removes what cargo tells a test binary about itself from `command`'s
/// environment. A nested build must not see it: some build scripts (ring's)
/// rerun when `CARGO_MANIFEST_DIR` changes, which would rebuild half the
/// dependencies on every alternation with the outer `cargo test`.
pub fn without_test_env(command: &mut Command) {
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_CRATE_")
            || name.starts_with("CARGO_MANIFEST_")
            || name.starts_with("CARGO_BIN_")
            || name == "CARGO_PRIMARY_PACKAGE"
            || name == "CARGO_TARGET_TMPDIR"
        {
            command.env_remove(name.as_ref());
        }
    }
}

/// A command run the way a newcomer runs it: no `SOCKETS_*` setting, no
/// backtrace request, nothing cargo tells a test about itself.
pub fn as_newcomer(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    without_test_env(&mut command);
    for (name, _) in std::env::vars_os() {
        let text = name.to_string_lossy();
        if text.starts_with("SOCKETS_") || text.starts_with("RUST_BACKTRACE") {
            command.env_remove(&name);
        }
    }
    command
}

fn run(mut command: Command, what: &str) {
    let status = command
        .status()
        .unwrap_or_else(|err| panic!("cannot start cargo to build {what}: {err}"));
    assert!(status.success(), "building {what} failed: {status}");
}

/// The compiled component of plugin crate `name` (one of [`test_plugins`]).
///
/// Plugins are built once per test process, in their own target directory
/// (the outer `cargo test` holds the lock of the main one), with the release
/// profile's LTO like `scripts/build-plugins.sh` builds them.
pub fn plugin_wasm(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let target_dir = workspace_root().join("target/test-plugins");
        let mut command = cargo();
        command
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip2",
                "--target-dir",
            ])
            .arg(&target_dir);
        for plugin in test_plugins() {
            command.args(["-p", plugin]);
        }
        run(command, "the test plugins");
        target_dir.join("wasm32-wasip2/release")
    });
    let file = dir.join(format!("{}.wasm", name.replace('-', "_")));
    assert!(file.exists(), "{} was not built", file.display());
    file
}

/// The `sockets-host` binary, built from this checkout in the workspace's
/// own target directory (cargo releases its lock while tests run): the
/// debug profile, or release when `SOCKETS_TEST_HOST_PROFILE=release`
/// (benchmarks).
pub fn host_binary() -> PathBuf {
    if std::env::var("SOCKETS_TEST_HOST_PROFILE").as_deref() != Ok("release") {
        return debug_binaries().join("sockets-host");
    }
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let mut command = cargo();
            command.args([
                "build",
                "--release",
                "-p",
                "sockets-host",
                "--bin",
                "sockets-host",
            ]);
            run(command, "sockets-host");
            target_dir().join("release/sockets-host")
        })
        .clone()
}

/// The `loadgen` binary (`tests/loadgen`), built from this checkout.
pub fn loadgen_binary() -> PathBuf {
    debug_binaries().join("loadgen")
}

/// The debug profile's folder, once the host's and the load generator's
/// binaries are built in it. One cargo call builds both: built apart,
/// tokio has fewer features for the load generator alone, and everything
/// above tokio was compiled twice (~3 minutes of a CI run).
fn debug_binaries() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let mut command = cargo();
        command.args(["build", "-p", "sockets-host", "-p", "loadgen", "--bins"]);
        run(command, "sockets-host and loadgen");
        target_dir().join("debug")
    })
}

/// The workspace's target folder (`CARGO_TARGET_DIR` if set).
pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `wait`;
/// panics with `what` otherwise.
pub async fn eventually<T, F, Fut>(wait: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {wait:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub mod broker;
pub mod client;
pub mod in_process;
pub mod ledger;
pub mod mongo;
pub mod server;
pub mod socketio;
