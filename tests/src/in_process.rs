//! The host's library run inside the test process: the same `Config` from
//! the same command line, `server::start` and `serve` on a runtime of its
//! own (on a thread of its own, so the server outlives the test's runtime
//! for its shutdown), and its log written to a file as the binary writes
//! its stderr. No process to spawn and no binary to build: what the tests
//! of HTTP and WebSocket behaviour need. Tests of the command line, of
//! signals, clusters and faults spawn the binary, and so does a test that
//! asserts what the log lacks: here only the server's runtime threads log
//! to its file (not the log's own writer threads, not `log`-crate records,
//! not a panic's message).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sockets_host::cli::Cli;
use sockets_host::config::Config;
use sockets_host::server;
use tokio::sync::oneshot;
use tracing_subscriber::EnvFilter;

/// A server running in this process.
pub struct InProcess {
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl InProcess {
    /// Starts the host with this command line (`serve` and its flags), its
    /// log going to `log_file`; returns once it listens.
    pub fn start(args: Vec<OsString>, log_file: &Path) -> (InProcess, SocketAddr) {
        // The binary's settings also come from the environment; a server in
        // this process would read the test's, which only the command line
        // should set.
        let inherited: Vec<String> = std::env::vars()
            .map(|(name, _)| name)
            .filter(|name| name.starts_with("SOCKETS_") && !name.starts_with("SOCKETS_TEST_"))
            .collect();
        assert!(
            inherited.is_empty(),
            "unset {inherited:?}: in-process test servers take their settings from the command line"
        );
        let config = config_from(args).unwrap_or_else(|err| panic!("the settings: {err:#}"));
        let log = log_dispatch(&config.log, log_file);
        let (listening, addr) = std::sync::mpsc::channel();
        let (shutdown, stop) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("in-process-host".into())
            .spawn(move || {
                // As the binary's `Runtime::new()`: a worker per core.
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .on_thread_start({
                        let log = log.clone();
                        // Every thread of this server logs to its file.
                        move || std::mem::forget(tracing::dispatcher::set_default(&log))
                    })
                    .build()?;
                let _log = tracing::dispatcher::set_default(&log);
                runtime.block_on(async move {
                    let listener = server::bind(config.listen)?;
                    let bound = listener.local_addr()?;
                    let server = server::start(config, listener).await?;
                    let _ = listening.send(bound);
                    server
                        .serve(async move {
                            let _ = stop.await;
                        })
                        .await
                })
            })
            .expect("a thread for the server");
        let addr = match addr.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr,
            Err(waited) => {
                // A server still starting after a minute is not joined: it
                // would hold the test forever. One that gave up is ending.
                let failure = match waited {
                    RecvTimeoutError::Timeout => "still starting after 60 s".to_owned(),
                    RecvTimeoutError::Disconnected => match thread.join() {
                        Ok(Err(err)) => format!("{err:#}"),
                        Ok(Ok(())) => "it stopped".to_owned(),
                        Err(_) => "it panicked".to_owned(),
                    },
                };
                panic!(
                    "the in-process server did not start: {failure}; its log:\n{}",
                    std::fs::read_to_string(log_file).unwrap_or_default()
                );
            }
        };
        let server = InProcess {
            shutdown: Some(shutdown),
            thread: Some(thread),
        };
        (server, addr)
    }

    /// Asks the server to stop, as SIGTERM asks the binary.
    pub fn begin_stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    /// Waits (30 s at most) for the server to end; whether it ended
    /// cleanly.
    pub async fn stopped(mut self) -> bool {
        self.begin_stop();
        let thread = self.thread.take().expect("stopped once");
        let ended = tokio::task::spawn_blocking(move || thread.join());
        match tokio::time::timeout(Duration::from_secs(30), ended).await {
            Ok(Ok(Ok(result))) => result.is_ok(),
            Ok(_) => false,
            Err(_) => panic!("the server did not stop within 30 s"),
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        // The server shuts down on its own thread; nobody waits for it.
        self.begin_stop();
    }
}

/// The `Config` the binary would build from this command line (flags only:
/// the test process's environment has no `SOCKETS_*` setting).
fn config_from(args: Vec<OsString>) -> anyhow::Result<Config> {
    let mut config = Cli::try_parse_from(args)?.config()?;
    server::apply_dev_mode(&mut config).context("dev mode")?;
    Ok(config)
}

/// A log like the binary's (its `SOCKETS_LOG` filter, no colours) into
/// `file`.
fn log_dispatch(filter: &str, file: &Path) -> tracing::Dispatch {
    let file = std::fs::File::create(file).expect("the log file");
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(Mutex::new(file))
        .with_ansi(false)
        .finish();
    tracing::Dispatch::new(subscriber)
}

/// `SOCKETS_FOO_BAR` → `--foo-bar`: every setting's flag is its variable's
/// name (PROTOCOL §9).
pub fn flag_of(variable: &str) -> String {
    let name = variable
        .strip_prefix("SOCKETS_")
        .unwrap_or_else(|| panic!("{variable} is not a setting"));
    format!("--{}", name.to_ascii_lowercase().replace('_', "-"))
}
