//! The real MongoDB-protocol server the test command starts (FerretDB), a
//! fresh database per test, and private FerretDB processes for tests that
//! stop and restart the database. `SOCKETS_TEST_MONGO_URL` points the
//! shared tests at another server, e.g. a real MongoDB.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use mongodb::bson::{Document, doc};
use mongodb::{Client, Database};
use tokio::process::{Child, Command};

use crate::server::{ServerConfig, scratch_dir};

/// The FerretDB version `scripts/services.sh` builds.
pub const FERRETDB_VERSION: &str = "v1.24.0";

/// The server URL: `SOCKETS_TEST_MONGO_URL`, else the local FerretDB that
/// `scripts/test.sh` starts.
pub fn mongo_url() -> String {
    std::env::var("SOCKETS_TEST_MONGO_URL")
        .unwrap_or_else(|_| "mongodb://127.0.0.1:27017".to_owned())
}

/// A database of its own for one test.
pub struct TestDb {
    /// Its name.
    pub name: String,
    /// A client on it.
    pub db: Database,
}

impl TestDb {
    /// A fresh database on [`mongo_url`]; panics loudly when the server is
    /// not there (tests never skip).
    pub async fn unique() -> TestDb {
        Self::on(&mongo_url()).await
    }

    /// A fresh database on the server at `url`.
    pub async fn on(url: &str) -> TestDb {
        let client = Client::with_uri_str(url)
            .await
            .unwrap_or_else(|err| panic!("bad MongoDB URL {url}: {err}"));
        let name = format!("test_{}", sockets_host::protocol::new_id());
        let db = client.database(&name);
        db.run_command(doc! {"ping": 1})
            .await
            .unwrap_or_else(|err| panic!("MongoDB is not reachable at {url}: {err}"));
        TestDb { name, db }
    }

    /// `config` with this database as the server's store.
    pub fn server_config(&self, config: ServerConfig) -> ServerConfig {
        self.server_config_at(&mongo_url(), config)
    }

    /// `config` with this database, on the server at `url`, as the store.
    pub fn server_config_at(&self, url: &str, config: ServerConfig) -> ServerConfig {
        config
            .env("SOCKETS_MONGO_URL", url)
            .env("SOCKETS_MONGO_DB", &self.name)
    }

    /// Fills `users` with the demo users file (`s_1`, `c_1`, …), as the
    /// embedded default's directory has them.
    pub async fn seed_demo_users(&self) {
        let file = crate::workspace_root().join("host/demo/users.json");
        let users: Vec<serde_json::Value> =
            serde_json::from_slice(&std::fs::read(&file).expect("the demo users file"))
                .expect("the demo users file is JSON");
        let documents: Vec<Document> = users
            .iter()
            .map(|user| {
                let mut document = doc! {
                    "_id": user["id"].as_str().expect("id"),
                    "role": user["role"].as_str().expect("role"),
                };
                if let Some(name) = user["name"].as_str() {
                    document.insert("name", name);
                }
                document
            })
            .collect();
        self.db
            .collection::<Document>("users")
            .insert_many(documents)
            .await
            .expect("users are inserted");
    }

    /// The documents of `collection` matching `filter`.
    pub async fn find(&self, collection: &str, filter: Document) -> Vec<Document> {
        use futures_util::TryStreamExt;
        self.db
            .collection::<Document>(collection)
            .find(filter)
            .await
            .expect("find works")
            .try_collect()
            .await
            .expect("find works")
    }
}

/// The FerretDB binary `scripts/services.sh` builds:
/// `SOCKETS_TEST_FERRETDB`, else its place in the tools folder.
pub fn ferretdb_binary() -> PathBuf {
    let binary = std::env::var_os("SOCKETS_TEST_FERRETDB")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let tools = std::env::var_os("SOCKETS_TOOLS_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                        .join(".cache/sockets-tools")
                });
            tools.join(format!("bin/ferretdb-{FERRETDB_VERSION}"))
        });
    assert!(
        binary.exists(),
        "FerretDB is not built at {}: run scripts/services.sh",
        binary.display()
    );
    binary
}

/// A FerretDB process of one test (SQLite files in its own folder), which
/// the test may stop and start again on the same port and data.
pub struct FerretDb {
    child: Option<Child>,
    /// Where it listens (also while stopped).
    pub port: u16,
    state_dir: PathBuf,
}

impl FerretDb {
    /// A free port and a folder, nothing started yet.
    pub fn new() -> FerretDb {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        FerretDb {
            child: None,
            port,
            state_dir: scratch_dir("ferretdb"),
        }
    }

    /// `mongodb://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("mongodb://127.0.0.1:{}", self.port)
    }

    /// Starts it and waits until it accepts connections.
    pub async fn start(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.state_dir.join("ferretdb.log"))
            .expect("log file");
        let child = Command::new(ferretdb_binary())
            .arg("--handler=sqlite")
            .arg(format!("--sqlite-url=file:{}/", self.state_dir.display()))
            .arg(format!("--state-dir={}", self.state_dir.display()))
            .arg(format!("--listen-addr=127.0.0.1:{}", self.port))
            .args(["--debug-addr=-", "--telemetry=disable", "--log-level=warn"])
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("FerretDB starts");
        self.child = Some(child);
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "FerretDB did not listen on {}; its log:\n{}",
            self.port,
            std::fs::read_to_string(self.state_dir.join("ferretdb.log")).unwrap_or_default()
        );
    }

    /// Kills it (SIGKILL) and waits until it is gone.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("FerretDB can be killed");
        }
    }
}

impl Default for FerretDb {
    fn default() -> Self {
        Self::new()
    }
}
