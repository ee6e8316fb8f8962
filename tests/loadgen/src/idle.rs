//! `idle`: N authenticated connections that stay idle, opened from
//! 127.0.0.x source addresses (one address has ~28k ephemeral ports), a
//! fixed number of handshakes in flight: connects per second, each
//! handshake's time (TCP connect to the `connected` frame), and the
//! server's resident memory per connection (from `/proc/<pid>/status`, read
//! before and after, each time once the server has settled).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::{Value, json};

use crate::peer::{self, Target};
use crate::server::rss_kib;
use crate::stats::Latencies;
use crate::{Tokens, source_address};
/// How long the server gets to settle before its memory is read: our host
/// listens while it still compiles its plugins (its RSS grows by ~17 MB in
/// its first second), which is no connection's memory.
const SETTLE: Duration = Duration::from_secs(3);

pub struct Options {
    pub target: Target,
    pub server: SocketAddr,
    pub connections: usize,
    /// Handshakes in flight at once.
    pub in_flight: usize,
    pub server_pid: u32,
}

pub async fn run(options: Options, tokens: &Tokens) -> anyhow::Result<Value> {
    tokio::time::sleep(SETTLE).await;
    let before = rss_kib(options.server_pid)?;
    let started = Instant::now();
    let mut sockets = Vec::with_capacity(options.connections);
    let mut connecting = FuturesUnordered::new();
    let mut failed = 0usize;
    let mut handshakes = Latencies::default();
    let mut settle = |result: (anyhow::Result<peer::Socket>, Duration)| match result {
        (Ok(socket), took) => {
            sockets.push(socket);
            handshakes.push(took.as_micros() as u64);
        }
        (Err(_), _) => failed += 1,
    };
    for n in 0..options.connections {
        if connecting.len() >= options.in_flight.max(1)
            && let Some(result) = connecting.next().await
        {
            settle(result);
        }
        let token = tokens.mint(&format!("idle_{n}"), "student");
        connecting.push(async move {
            let began = Instant::now();
            let socket =
                peer::connect(options.target, options.server, source_address(n), &token).await;
            (socket, began.elapsed())
        });
    }
    while let Some(result) = connecting.next().await {
        settle(result);
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
        "in_flight": options.in_flight,
        "connects_per_s": open as f64 / connect_seconds,
        "handshake": handshakes.summary(),
        "server_rss_before_kib": before,
        "server_rss_after_kib": after,
        "server_bytes_per_connection": per_connection.round(),
    }))
}
