//! The edge under attack, measured: normal clients' round trips and the
//! server's memory, first alone, then while `uploads` unauthenticated
//! 16 MiB plugin uploads and `slow` sockets that never finish their request
//! headers keep coming. Both phases last `duration`; every loop stops at
//! its end.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::peer::{self, Target};
use crate::stats::Latencies;
use crate::{Tokens, server, source_address};

/// How the run is shaped.
pub struct Options {
    pub server: SocketAddr,
    pub server_pid: u32,
    /// Concurrent unauthenticated uploads during the attack.
    pub uploads: usize,
    /// Sockets held with unfinished request headers during the attack.
    pub slow: usize,
    /// Normal clients measuring round trips, in both phases.
    pub clients: usize,
    pub duration: Duration,
}

/// The size each upload announces (the admin API's limit).
const UPLOAD_BYTES: u64 = 16 << 20;
const CHUNK: usize = 64 << 10;

pub async fn run(options: Options, tokens: &Tokens) -> anyhow::Result<Value> {
    let mut clients = Vec::with_capacity(options.clients);
    for n in 0..options.clients {
        let token = tokens.mint(&format!("edge_probe_{n}"), "student");
        clients
            .push(peer::connect(Target::Sockets, options.server, source_address(n), &token).await?);
    }
    let baseline = phase(&options, &mut clients, false).await?;
    let attack = phase(&options, &mut clients, true).await?;
    Ok(json!({
        "run": "edge",
        "uploads": options.uploads,
        "slow_sockets": options.slow,
        "clients": options.clients,
        "duration_s": options.duration.as_secs_f64(),
        "baseline": baseline,
        "attack": attack,
    }))
}

/// One phase: the clients' round trips (`setConnection` with an ack, every
/// 10 ms each) and the server's peak memory, with or without the attack.
async fn phase(
    options: &Options,
    clients: &mut [peer::Socket],
    attack: bool,
) -> anyhow::Result<Value> {
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let body_bytes_sent = Arc::new(AtomicU64::new(0));
    let slow_closed = Arc::new(AtomicU64::new(0));
    let mut attackers = Vec::new();
    if attack {
        for _ in 0..options.uploads {
            attackers.push(tokio::spawn(upload_loop(
                options.server,
                Arc::clone(&stop),
                Arc::clone(&answered),
                Arc::clone(&body_bytes_sent),
            )));
        }
        for _ in 0..options.slow {
            attackers.push(tokio::spawn(slow_loop(
                options.server,
                Arc::clone(&stop),
                Arc::clone(&slow_closed),
            )));
        }
    }
    let rss_before = server::rss_kib(options.server_pid)?;
    let mut peak = rss_before;
    let mut latencies = Latencies::default();
    let mut failures = 0u64;
    let started = Instant::now();
    let mut ack = 0;
    while started.elapsed() < options.duration {
        for client in clients.iter_mut() {
            ack += 1;
            let frame = json!({"event": "setConnection", "data": {}, "ack": ack}).to_string();
            let sent = Instant::now();
            client.send(Message::text(frame)).await?;
            match tokio::time::timeout(Duration::from_secs(5), reply(client)).await {
                Ok(Ok(())) => latencies.push(sent.elapsed().as_micros() as u64),
                _ => failures += 1,
            }
        }
        peak = peak.max(server::rss_kib(options.server_pid)?);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for attacker in attackers {
        let _ = attacker.await;
    }
    let mut summary = json!({
        "round_trips": latencies.summary(),
        "failed_round_trips": failures,
        "server_rss_mib": {
            "before": rss_before as f64 / 1024.0,
            "peak": peak as f64 / 1024.0,
        },
    });
    if attack {
        summary["uploads_answered"] = json!(answered.load(Ordering::Relaxed));
        summary["upload_body_mib_written_by_the_attackers"] =
            json!(body_bytes_sent.load(Ordering::Relaxed) as f64 / (1 << 20) as f64);
        summary["slow_sockets_closed_by_the_server"] = json!(slow_closed.load(Ordering::Relaxed));
    }
    Ok(summary)
}

async fn reply(client: &mut peer::Socket) -> anyhow::Result<()> {
    loop {
        match client.next().await {
            Some(Ok(Message::Text(text))) if text.contains("\"ack\"") => return Ok(()),
            Some(Ok(_)) => {}
            Some(Err(err)) => return Err(err.into()),
            None => anyhow::bail!("closed"),
        }
    }
}

/// Unauthenticated 16 MiB uploads, one after the other: the headers, then
/// the body as fast as the socket takes it, until the server answers.
async fn upload_loop(
    server: SocketAddr,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    body_bytes_sent: Arc<AtomicU64>,
) {
    let chunk = vec![0u8; CHUNK];
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut stream) = TcpStream::connect(server).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let head = format!(
            "PUT /admin/plugins/attack HTTP/1.1\r\nHost: x\r\nContent-Length: {UPLOAD_BYTES}\r\n\r\n"
        );
        if stream.write_all(head.as_bytes()).await.is_err() {
            continue;
        }
        let (mut read, mut write) = stream.into_split();
        let sender = {
            let body_bytes_sent = Arc::clone(&body_bytes_sent);
            let chunk = chunk.clone();
            tokio::spawn(async move {
                let mut sent = 0;
                while sent < UPLOAD_BYTES {
                    if write.write_all(&chunk).await.is_err() {
                        break;
                    }
                    sent += CHUNK as u64;
                    body_bytes_sent.fetch_add(CHUNK as u64, Ordering::Relaxed);
                }
            })
        };
        let mut answer = [0u8; 512];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_secs(5), read.read(&mut answer)).await
            && n > 0
        {
            answered.fetch_add(1, Ordering::Relaxed);
        }
        sender.abort();
    }
}

/// Sockets that send half a request and wait; reconnect when the server
/// closes them (its header deadline), so `slow` are held all along.
async fn slow_loop(server: SocketAddr, stop: Arc<AtomicBool>, closed: Arc<AtomicU64>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut stream) = TcpStream::connect(server).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if stream
            .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
            .await
            .is_err()
        {
            continue;
        }
        let mut rest = [0u8; 512];
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let read =
                tokio::time::timeout(Duration::from_millis(200), stream.read(&mut rest)).await;
            if let Ok(Ok(0) | Err(_)) = read {
                closed.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
}
