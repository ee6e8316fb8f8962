//! The benchmark's Socket.IO peer (`tests/loadgen/socketio`), started on a
//! free port with Node and killed on drop, and a minimal Socket.IO 4 client
//! (Engine.IO v4 over a WebSocket) for checking what it refuses.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::client::FRAME_TIMEOUT;
use crate::server::{SECRET, listening_addr, scratch_dir};
use crate::workspace_root;

/// A running Socket.IO peer.
pub struct SocketioPeer {
    child: Child,
    /// Where it listens (Socket.IO and `POST /api/events`).
    pub addr: SocketAddr,
}

impl SocketioPeer {
    /// Starts the peer with the users in `users_file` (`loadgen users-file`)
    /// and waits until it listens; panics, with its log, if it does not.
    pub async fn start(users_file: &Path) -> SocketioPeer {
        let dir = peer_dir();
        let log = scratch_dir("socketio").join("peer.log");
        let mut child = Command::new("node")
            .arg(dir.join("server.js"))
            .current_dir(&dir)
            .env("SOCKETS_LISTEN", "127.0.0.1:0")
            .env("SOCKETS_JWT_SECRET", SECRET)
            .env("SOCKETS_USERS_FILE", users_file)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start node (Node.js 20 or later): {err}"));
        let addr = listening_addr(
            &mut child,
            "socket.io listening on http://",
            Duration::from_secs(30),
            &log,
        )
        .await;
        SocketioPeer { child, addr }
    }

    /// Its process id (for the load generator's `--server-pid`).
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the peer runs")
    }
}

/// The peer's folder, once its npm packages are installed there (by
/// `scripts/test.sh` and `scripts/bench.sh`: `npm ci`).
fn peer_dir() -> PathBuf {
    let dir = workspace_root().join("tests/loadgen/socketio");
    assert!(
        dir.join("node_modules/socket.io").is_dir(),
        "the Socket.IO peer's packages are not installed: run `npm ci` in {} \
         (scripts/test.sh does)",
        dir.display()
    );
    dir
}

/// A Socket.IO client connection, past the Engine.IO handshake.
pub struct SocketioClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl SocketioClient {
    /// Opens the WebSocket transport and sends the Socket.IO connect packet
    /// with `{"token": token}`; returns the client and the server's answer
    /// to it (`40{…}` accepted, `44{…}` refused).
    pub async fn connect(peer: &SocketioPeer, token: &str) -> (SocketioClient, String) {
        let url = format!("ws://{}/socket.io/?EIO=4&transport=websocket", peer.addr);
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("the Socket.IO peer accepts the WebSocket");
        let mut client = SocketioClient { ws };
        let open = client.recv().await;
        assert!(
            open.starts_with('0'),
            "expected Engine.IO's open packet, got {open}"
        );
        client
            .send(format!("40{}", json!({ "token": token })))
            .await;
        let answer = client.recv().await;
        (client, answer)
    }

    /// Emits `event` with `data` asking for an ack; returns the ack's first
    /// argument.
    pub async fn emit_with_ack(&mut self, event: &str, data: &Value, id: u64) -> Value {
        self.send(format!("42{id}{}", json!([event, data]))).await;
        let prefix = format!("43{id}");
        loop {
            let packet = self.recv().await;
            if let Some(args) = packet.strip_prefix(&prefix) {
                let args: Vec<Value> = serde_json::from_str(args).unwrap();
                return args.into_iter().next().unwrap_or(Value::Null);
            }
        }
    }

    /// The next event the server pushed: its name and data (acks and other
    /// packets on the way are skipped).
    pub async fn next_event(&mut self) -> (String, Value) {
        loop {
            let packet = self.recv().await;
            if let Some(event) = packet.strip_prefix("42") {
                let (name, data): (String, Value) = serde_json::from_str(event).unwrap();
                return (name, data);
            }
        }
    }

    async fn send(&mut self, packet: String) {
        self.ws.send(Message::text(packet)).await.unwrap();
    }

    /// The next packet, pings answered on the way.
    async fn recv(&mut self) -> String {
        loop {
            let message = tokio::time::timeout(FRAME_TIMEOUT, self.ws.next())
                .await
                .expect("a Socket.IO packet in time")
                .expect("the connection is open")
                .unwrap();
            match message {
                Message::Text(text) if text.as_str() == "2" => self.send("3".to_owned()).await,
                Message::Text(text) => return text.to_string(),
                _ => {}
            }
        }
    }
}
