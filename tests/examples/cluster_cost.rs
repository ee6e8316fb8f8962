//! What routing across nodes costs (issue #5, ARCHITECTURE.md "Decisions"):
//! two `sockets-host` processes on one RabbitMQ, measured side by side in
//! one run. Prints one JSON object with
//! - connect time (upgrade to `connected`) of new users on a single node
//!   without a broker vs on a clustered node with a peer, where
//!   `connected` waits for the peer's answer to the user's announcement;
//! - `sendMessage` latency (send to push received, one message in flight)
//!   with both users on one clustered node vs on two nodes.
//!
//! ```sh
//! scripts/services.sh     # RabbitMQ on 127.0.0.1
//! SOCKETS_TEST_HOST_PROFILE=release \
//!     cargo run --release -p sockets-tests --example cluster_cost -- 300 2000
//! ```
//!
//! Bounded: USERS connects per setup (default 300), MESSAGES per pair
//! (default 2,000), each `recv` at most 10 s.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sockets_tests::broker::{Names, consuming};
use sockets_tests::client::Client;
use sockets_tests::server::{Server, ServerConfig, token};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let users: usize = args.next().map_or(Ok(300), |n| n.parse())?;
    let messages: usize = args.next().map_or(Ok(2_000), |n| n.parse())?;
    let quiet = |config: ServerConfig| {
        config
            .env("SOCKETS_LOG", "warn")
            .env("SOCKETS_RATE_LIMIT", "0")
    };

    let single = Server::start_with(quiet(ServerConfig::default())).await;
    let names = Names::unique();
    let a = consuming(quiet(names.server_config())).await;
    let b = consuming(quiet(names.server_config())).await;

    let connect_single = connect_times(&single, users, "single").await;
    let connect_clustered = connect_times(&a, users, "clustered").await;
    let same_node = message_latencies(&a, &a, messages).await;
    let across_nodes = message_latencies(&a, &b, messages).await;

    let summary = json!({
        "users": users,
        "messages": messages,
        "connect_ms": {
            "single_node": summarize(connect_single),
            "clustered": summarize(connect_clustered),
        },
        "send_to_push_ms": {
            "same_node": summarize(same_node),
            "across_nodes": summarize(across_nodes),
        },
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    for server in [single, a, b] {
        server.stop().await;
    }
    Ok(())
}

/// Connects `users` distinct users one after another and keeps them
/// connected; returns each connect's duration.
async fn connect_times(server: &Server, users: usize, label: &str) -> Vec<Duration> {
    let mut clients = Vec::new();
    let mut times = Vec::new();
    for n in 0..users {
        let token = token(&format!("{label}_{n}"), "student");
        let started = Instant::now();
        let (client, _) = Client::connect(server, &token).await;
        times.push(started.elapsed());
        clients.push(client);
    }
    times
}

/// A student on `from` sends `messages` to a consultant on `to`, one at a
/// time; returns each send-to-push latency.
async fn message_latencies(from: &Server, to: &Server, messages: usize) -> Vec<Duration> {
    let student = format!("s_{}", sockets_host::protocol::new_id());
    let (mut sender, _) = Client::connect(from, &token(&student, "student")).await;
    let (mut receiver, _) = Client::connect(to, &token("c_1", "consultant")).await;
    let mut latencies = Vec::new();
    for n in 0..messages {
        let started = Instant::now();
        sender
            .send(&json!({"event": "sendMessage", "data": {"to": "c_1", "text": n.to_string()}}))
            .await;
        let push: Value = receiver.recv().await;
        assert_eq!(
            push["data"]["text"],
            n.to_string(),
            "pushes arrive in order"
        );
        latencies.push(started.elapsed());
    }
    latencies
}

fn summarize(mut samples: Vec<Duration>) -> Value {
    samples.sort();
    let at = |q: usize| samples[(samples.len() * q / 100).min(samples.len() - 1)];
    let ms = |d: Duration| (d.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0;
    json!({"p50": ms(at(50)), "p99": ms(at(99)), "max": ms(samples[samples.len() - 1])})
}
