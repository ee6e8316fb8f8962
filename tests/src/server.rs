//! A test server on a free port with its own data and plugins folders: the
//! real `sockets-host` binary (stopped with SIGTERM, killed on drop), or
//! the host's library inside the test process (`src/in_process.rs`).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::in_process::InProcess;
use crate::{host_binary, plugin_wasm, workspace_root};

/// The HS256 secret every test server uses.
pub const SECRET: &str = "test-secret-please-change";

/// The cluster key every test server uses (it signs messages between
/// nodes; only read when a broker is configured).
pub const CLUSTER_KEY: &str = "test-cluster-key-please-change";

/// How a test server is started.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Plugin crates whose components go into the plugins folder.
    pub plugins: Vec<&'static str>,
    /// Extra environment (`SOCKETS_*`).
    pub env: Vec<(String, String)>,
    /// Reuse a data folder (restart tests); a fresh one otherwise.
    pub data_dir: Option<PathBuf>,
    /// Extra command-line arguments (e.g. `--config FILE`).
    pub args: Vec<String>,
    /// No JWT secret: the server runs in dev mode (its own secret in the
    /// data folder, the demo's sign-in on).
    pub dev_mode: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            plugins: crate::bundled_plugins().to_vec(),
            env: Vec::new(),
            data_dir: None,
            args: Vec::new(),
            dev_mode: false,
        }
    }
}

impl ServerConfig {
    /// Adds an environment variable.
    pub fn env(mut self, name: &str, value: impl Into<String>) -> Self {
        self.env.push((name.to_owned(), value.into()));
        self
    }

    /// Starts the server without a JWT secret: dev mode.
    pub fn dev_mode(mut self) -> Self {
        self.dev_mode = true;
        self
    }

    /// Adds the `whois` test plugin (`whoIs` answers with a user's connection
    /// count) to the plugins folder.
    pub fn with_whois(mut self) -> Self {
        self.plugins.push("whois");
        self
    }
}

/// A running server.
pub struct Server {
    process: Process,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its data folder (kept after stop for inspection).
    pub data_dir: PathBuf,
    /// Its plugins folder.
    pub plugins_dir: PathBuf,
    stderr_log: PathBuf,
}

/// How a server runs.
enum Process {
    /// The binary, as operators run it.
    Spawned(Child),
    /// The library, inside the test process.
    InProcess(InProcess),
}

/// Reads `child`'s stdout until the line `<prefix><address>`, for at most
/// `wait`; panics with the log at `stderr_log` if it does not come. The
/// rest of stdout is drained, so the child never blocks on a full pipe.
pub async fn listening_addr(
    child: &mut Child,
    prefix: &str,
    wait: Duration,
    stderr_log: &Path,
) -> SocketAddr {
    let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
    let addr = tokio::time::timeout(wait, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(addr) = line.strip_prefix(prefix) {
                return Some(addr.parse::<SocketAddr>().unwrap());
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_else(|| {
        panic!(
            "no `{prefix}…` line: it did not start; its log:\n{}",
            std::fs::read_to_string(stderr_log).unwrap_or_default()
        )
    });
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    addr
}

/// A test server's folders: data, plugins (with `config.plugins` copied
/// in) and its log.
struct Folders {
    data_dir: PathBuf,
    plugins_dir: PathBuf,
    stderr_log: PathBuf,
}

impl Folders {
    fn new(config: &ServerConfig) -> Folders {
        let root = scratch_dir("server");
        let data_dir = match config.data_dir.clone() {
            Some(dir) => dir,
            None => fresh_data_dir_sharing_compiled_plugins(&root),
        };
        let plugins_dir = root.join("plugins");
        std::fs::create_dir_all(&plugins_dir).unwrap();
        for plugin in &config.plugins {
            let file = format!("{}.wasm", plugin.replace('-', "_"));
            std::fs::copy(plugin_wasm(plugin), plugins_dir.join(file)).unwrap();
        }
        Folders {
            data_dir,
            plugins_dir,
            stderr_log: root.join("stderr.log"),
        }
    }
}

/// A fresh data folder whose artifact cache (`plugin-cache`) is the one all
/// test servers share: each would otherwise compile the same plugins again
/// (a second or so of every start). wasmtime writes cache entries
/// atomically, so servers sharing it concurrently is safe; tests of the
/// cache itself pass their own data folder.
pub fn fresh_data_dir_sharing_compiled_plugins(root: &Path) -> PathBuf {
    let data_dir = root.join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    // Absolute: a relative link would resolve against `data/`.
    let shared = std::path::absolute(crate::target_dir().join("test-plugin-cache")).unwrap();
    std::fs::create_dir_all(&shared).unwrap();
    std::os::unix::fs::symlink(&shared, data_dir.join("plugin-cache")).unwrap();
    data_dir
}

/// A fresh, unique folder under `target/`.
pub fn scratch_dir(label: &str) -> PathBuf {
    let dir = workspace_root()
        .join("target/test-scratch")
        .join(format!("{label}-{}", sockets_host::protocol::new_id()));
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

impl Server {
    /// Starts the default server (every plugin in plugins/).
    pub async fn start() -> Server {
        Self::start_with(ServerConfig::default()).await
    }

    /// Starts a server and waits until it listens; panics (with its log) if
    /// it does not come up.
    pub async fn start_with(config: ServerConfig) -> Server {
        let Folders {
            data_dir,
            plugins_dir,
            stderr_log,
        } = Folders::new(&config);
        // The binary itself, never under a wrapper: killing a wrapper (e.g.
        // `faketime`, which forks) left its server running after the test.
        let mut command = Command::new(host_binary());
        command
            .arg("serve")
            .args(&config.args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("SOCKETS_LISTEN", "127.0.0.1:0")
            .envs((!config.dev_mode).then_some(("SOCKETS_JWT_SECRET", SECRET)))
            .env("SOCKETS_CLUSTER_KEY", CLUSTER_KEY)
            .env("SOCKETS_DATA_DIR", &data_dir)
            .env("SOCKETS_PLUGINS_DIR", &plugins_dir)
            .env("SOCKETS_LOG", "info,sockets_host=debug")
            .envs(config.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_log).unwrap())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("sockets-host starts");
        let addr = listening_addr(
            &mut child,
            "sockets-host listening on http://",
            Duration::from_secs(60),
            &stderr_log,
        )
        .await;
        Server::adopt(child, addr, data_dir, plugins_dir, stderr_log)
    }

    /// Starts the default server (every plugin in plugins/) inside the test
    /// process: for tests of HTTP and WebSocket behaviour, which need no
    /// process of their own.
    pub async fn in_process() -> Server {
        Self::in_process_with(ServerConfig::default()).await
    }

    /// Starts a server inside the test process with the command line the
    /// binary would get (`config.env` as flags); panics (with its log) if
    /// it does not come up. `kill`, `signal` and `pid` need a spawned one.
    pub async fn in_process_with(config: ServerConfig) -> Server {
        let Folders {
            data_dir,
            plugins_dir,
            stderr_log,
        } = Folders::new(&config);
        let mut settings: Vec<(String, OsString)> = vec![
            ("SOCKETS_LISTEN".into(), "127.0.0.1:0".into()),
            ("SOCKETS_JWT_SECRET".into(), SECRET.into()),
            ("SOCKETS_CLUSTER_KEY".into(), CLUSTER_KEY.into()),
            ("SOCKETS_DATA_DIR".into(), data_dir.clone().into()),
            ("SOCKETS_PLUGINS_DIR".into(), plugins_dir.clone().into()),
            ("SOCKETS_LOG".into(), "info,sockets_host=debug".into()),
        ];
        if config.dev_mode {
            settings.retain(|(set, _)| set != "SOCKETS_JWT_SECRET");
        }
        for (name, value) in &config.env {
            settings.retain(|(set, _)| set != name);
            settings.push((name.clone(), value.into()));
        }
        let mut args: Vec<OsString> = vec!["sockets-host".into(), "serve".into()];
        args.extend(config.args.iter().map(OsString::from));
        for (name, value) in settings {
            args.push(crate::in_process::flag_of(&name).into());
            args.push(value);
        }
        let (process, addr) = tokio::task::spawn_blocking({
            let stderr_log = stderr_log.clone();
            move || InProcess::start(args, &stderr_log)
        })
        .await
        .expect("the server starts or says why");
        Server {
            process: Process::InProcess(process),
            addr,
            data_dir,
            plugins_dir,
            stderr_log,
        }
    }

    /// A server started some other way (a script, the binary with no
    /// settings), once it printed its listening line; stopped like any
    /// other.
    pub fn adopt(
        child: Child,
        addr: SocketAddr,
        data_dir: PathBuf,
        plugins_dir: PathBuf,
        stderr_log: PathBuf,
    ) -> Server {
        Server {
            process: Process::Spawned(child),
            addr,
            data_dir,
            plugins_dir,
            stderr_log,
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child().id().expect("the server runs")
    }

    fn child(&self) -> &Child {
        match &self.process {
            Process::Spawned(child) => child,
            Process::InProcess(_) => panic!("this test needs a spawned server"),
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// `ws://…/ws`
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Kills the process with SIGKILL (no shutdown of any kind) and waits
    /// until it is gone.
    pub async fn kill(self) {
        let Process::Spawned(mut child) = self.process else {
            panic!("this test needs a spawned server");
        };
        child.start_kill().expect("the server can be killed");
        tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("a killed server exits")
            .expect("wait works");
    }

    /// Sends SIGTERM and waits for the process to exit; returns whether it
    /// exited successfully.
    pub async fn stop(mut self) -> bool {
        self.begin_stop();
        self.stopped().await
    }

    /// Sends SIGTERM (or its in-process equivalent), without waiting.
    pub fn begin_stop(&mut self) {
        match &mut self.process {
            Process::Spawned(_) => self.signal("TERM"),
            Process::InProcess(process) => process.begin_stop(),
        }
    }

    /// Sends the signal (`TERM`, `STOP`, `CONT`, …) to the process.
    pub fn signal(&self, name: &str) {
        let pid = self.child().id().expect("running");
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} {pid}");
    }

    /// Like [`Server::stopped`], with the whole log once it exited.
    pub async fn stopped_with_log(self) -> (bool, String) {
        let log = self.stderr_log.clone();
        let clean = self.stopped().await;
        (clean, std::fs::read_to_string(log).unwrap_or_default())
    }

    /// Waits (30 s at most) for the process to exit after [`Server::begin_stop`];
    /// returns whether it exited successfully.
    pub async fn stopped(self) -> bool {
        match self.process {
            Process::Spawned(mut child) => {
                let exit = tokio::time::timeout(Duration::from_secs(30), child.wait())
                    .await
                    .expect("the server stops within 30 s after SIGTERM")
                    .expect("wait works");
                exit.success()
            }
            Process::InProcess(process) => process.stopped().await,
        }
    }
}

/// An HS256 token for `sub`/`role` valid for an hour.
pub fn token(sub: &str, role: &str) -> String {
    token_with(json!({"sub": sub, "role": role, "exp": now() + 3600}))
}

/// An HS256 token with exactly these claims, signed with [`SECRET`].
pub fn token_with(claims: Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        &claims,
    )
}

/// A token signed with any algorithm and key.
pub fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).expect("token encodes")
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A test fixture file.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}
