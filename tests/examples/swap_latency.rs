//! Measures a hot swap on a running server: the time from writing a new
//! chat plugin into the plugins folder to the first push handled by it, and
//! the delivery latency (send → push received) in steady state and in the
//! second around the swap. Prints one JSON object.
//!
//! ```sh
//! SOCKETS_RATE_LIMIT=0 scripts/run.sh            # in one terminal
//! cargo run --release -p sockets-tests --example swap_latency -- \
//!     target/plugins/wasm32-wasip2/release target/test-plugins/wasm32-wasip2/release/chat_v2.wasm
//! ```
//!
//! (`chat_v2.wasm` is built by the test suite or by
//! `cargo build --release --target wasm32-wasip2 -p chat-v2`.) Bounded: one
//! pair of clients, 64 messages in flight, 6 s in all.

use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const WINDOW: usize = 64;
const STEADY: Duration = Duration::from_secs(3);
const AFTER_SWAP: Duration = Duration::from_secs(3);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let plugins_dir = std::path::PathBuf::from(
        args.next()
            .context("usage: swap_latency PLUGINS_DIR NEW_CHAT.wasm")?,
    );
    let new_plugin = std::fs::read(
        args.next()
            .context("usage: swap_latency PLUGINS_DIR NEW_CHAT.wasm")?,
    )?;
    let addr = std::env::var("SOCKETS_URL").unwrap_or_else(|_| "127.0.0.1:8080".to_owned());
    let secret = match std::env::var("SOCKETS_JWT_SECRET") {
        Ok(secret) => secret,
        Err(_) => std::fs::read_to_string("data/dev-jwt-secret")?
            .trim()
            .to_owned(),
    };
    let token = |sub: &str, role: &str| {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &json!({"sub": sub, "role": role, "exp": exp}),
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let (mut sender, _) = tokio_tungstenite::connect_async(format!(
        "ws://{addr}/ws?access_token={}",
        token("s_1", "student")
    ))
    .await?;
    let (mut receiver, _) = tokio_tungstenite::connect_async(format!(
        "ws://{addr}/ws?access_token={}",
        token("c_1", "consultant")
    ))
    .await?;
    next(&mut sender).await?;
    next(&mut receiver).await?;

    let started = Instant::now();
    let mut sent_at: Vec<Instant> = Vec::new();
    let mut in_flight = 0usize;
    let mut steady = Vec::new();
    let mut around_swap = Vec::new();
    let mut swapped_at = None;
    let mut first_new_push = None;
    while started.elapsed() < STEADY + AFTER_SWAP {
        while in_flight < WINDOW {
            let seq = sent_at.len();
            sender
                .send(Message::text(
                    json!({"event": "sendMessage", "data": {"to": "c_1", "text": seq.to_string()}})
                        .to_string(),
                ))
                .await?;
            sent_at.push(Instant::now());
            in_flight += 1;
        }
        let push = next(&mut receiver).await?;
        in_flight -= 1;
        let seq: usize = push["data"]["text"].as_str().context("text")?.parse()?;
        let latency = sent_at[seq].elapsed();
        match swapped_at {
            None => steady.push(latency),
            Some(at)
                if sent_at[seq] >= at - Duration::from_millis(500)
                    && sent_at[seq] <= at + Duration::from_millis(1500) =>
            {
                around_swap.push(latency)
            }
            Some(_) => {}
        }
        if first_new_push.is_none() && push["data"]["edition"] == 2 {
            first_new_push = Some(Instant::now());
        }
        if swapped_at.is_none() && started.elapsed() >= STEADY {
            let temporary = plugins_dir.join("chat.wasm.part");
            std::fs::write(&temporary, &new_plugin)?;
            std::fs::rename(&temporary, plugins_dir.join("chat.wasm"))?;
            swapped_at = Some(Instant::now());
        }
    }
    let p99 = |samples: &mut Vec<Duration>| {
        samples.sort();
        samples
            .get(samples.len() * 99 / 100)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let swap_ms = match (swapped_at, first_new_push) {
        (Some(swapped), Some(first)) => Some(first.duration_since(swapped).as_secs_f64() * 1000.0),
        _ => None,
    };
    let steady_p99 = p99(&mut steady);
    let swap_p99 = p99(&mut around_swap);
    println!(
        "{}",
        json!({
            "messages": sent_at.len() - in_flight,
            "msgPerSec": (sent_at.len() - in_flight) as f64 / started.elapsed().as_secs_f64(),
            "fileWriteToNewVersionMs": swap_ms,
            "steadyP99Ms": steady_p99,
            "aroundSwapP99Ms": swap_p99,
            "swapOverSteadyP99": swap_p99 / steady_p99,
        })
    );
    Ok(())
}

async fn next(socket: &mut Socket) -> anyhow::Result<Value> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .context("no frame within 5 s")?;
        match message {
            Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text)?),
            Some(Ok(_)) => continue,
            Some(Err(err)) => return Err(err.into()),
            None => anyhow::bail!("closed"),
        }
    }
}
