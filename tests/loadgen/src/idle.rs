//! `idle`: N authenticated connections that stay idle, opened from
//! 127.0.0.x source addresses (one address has ~28k ephemeral ports):
//! connects per second, and the server's resident memory per connection
//! (from `/proc/<pid>/status`, read before and after, each time once the
//! server has settled).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::{Value, json};

use crate::peer::{self, Target};
use crate::server::rss_kib;
use crate::{Tokens, source_address};

/// Connects in flight at once.
const CONCURRENT_CONNECTS: usize = 64;
/// How long the server gets to settle before its memory is read: our host
/// listens while it still compiles its plugins (its RSS grows by ~17 MB in
/// its first second), which is no connection's memory.
const SETTLE: Duration = Duration::from_secs(3);

pub struct Options {
    pub target: Target,
    pub server: SocketAddr,
    pub connections: usize,
    pub server_pid: u32,
}

pub async fn run(options: Options, tokens: &Tokens) -> anyhow::Result<Value> {
    tokio::time::sleep(SETTLE).await;
    let before = rss_kib(options.server_pid)?;
    let started = Instant::now();
    let mut sockets = Vec::with_capacity(options.connections);
    let mut connecting = FuturesUnordered::new();
    let mut failed = 0usize;
    for n in 0..options.connections {
        if connecting.len() >= CONCURRENT_CONNECTS
            && let Some(result) = connecting.next().await
        {
            match result {
                Ok(socket) => sockets.push(socket),
                Err(_) => failed += 1,
            }
        }
        let token = tokens.mint(&format!("idle_{n}"), "student");
        connecting.push(async move {
            peer::connect(options.target, options.server, source_address(n), &token).await
        });
    }
    while let Some(result) = connecting.next().await {
        match result {
            Ok(socket) => sockets.push(socket),
            Err(_) => failed += 1,
        }
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(SETTLE).await;
    let after = rss_kib(options.server_pid)?;
    let open = sockets.len();
    let per_connection = (after.saturating_sub(before)) as f64 * 1024.0 / open.max(1) as f64;
    drop(sockets);
    Ok(json!({
        "run": "idle",
        "target": format!("{:?}", options.target).to_lowercase(),
        "connections": open,
        "failed": failed,
        "connects_per_s": open as f64 / connect_seconds,
        "server_rss_before_kib": before,
        "server_rss_after_kib": after,
        "server_bytes_per_connection": per_connection.round(),
    }))
}
