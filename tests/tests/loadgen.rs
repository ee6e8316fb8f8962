//! The benchmark's load generator against the real server, in short runs:
//! it keeps speaking PROTOCOL.md, and its summaries count what they claim.

use serde_json::Value;
use sockets_tests::broker::{Names, amqp_url, consuming};
use sockets_tests::loadgen_binary;
use sockets_tests::server::{SECRET, Server, ServerConfig, scratch_dir};

/// Runs `loadgen <command line>` (split at spaces) against the server.
fn loadgen(server: &Server, command_line: &str) -> Value {
    let addr = server.addr.to_string();
    let mut args = vec!["--target", "sockets", "--server", &addr];
    args.extend(command_line.split_whitespace());
    run_loadgen(&args)
}

/// Runs `loadgen <args>`; its JSON summary.
fn run_loadgen(args: &[&str]) -> Value {
    let output = std::process::Command::new(loadgen_binary())
        .args(args)
        .env("SOCKETS_JWT_SECRET", SECRET)
        .output()
        .expect("loadgen runs");
    assert!(
        output.status.success(),
        "loadgen {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("loadgen prints JSON")
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_fanout_and_idle_runs_report_what_happened() {
    let users = std::process::Command::new(loadgen_binary())
        .args(["users-file", "--pairs", "2"])
        .output()
        .expect("loadgen runs");
    let users_file = scratch_dir("loadgen").join("users.json");
    std::fs::write(&users_file, &users.stdout).unwrap();
    let server = Server::start_with(
        ServerConfig::default()
            .env("SOCKETS_USERS_FILE", users_file.to_string_lossy())
            .env("SOCKETS_RATE_LIMIT", "0"),
    )
    .await;

    let pid = server.pid();
    let chat = loadgen(
        &server,
        &format!("chat --pairs 2 --window 4 --duration 1 --server-pid {pid}"),
    );
    assert!(chat["acked"].as_u64().unwrap() > 0, "{chat}");
    // The server did work for those messages, on at most the machine's cores.
    let cpu = &chat["server_cpu"];
    assert!(cpu["us_per_delivered"].as_f64().unwrap() > 0.0, "{chat}");
    let share = cpu["share_of_one_core"].as_f64().unwrap();
    let cores = std::thread::available_parallelism().unwrap().get() as f64;
    assert!(share > 0.0 && share <= cores * 1.1, "{chat}");
    // …and so did the load generator.
    let own = chat["loadgen_cpu"]["share_of_one_core"].as_f64().unwrap();
    assert!(own > 0.0 && own <= cores * 1.1, "{chat}");
    assert_eq!(chat["delivered"], chat["acked"], "{chat}");
    assert_eq!(chat["failed"], 0, "{chat}");
    assert_eq!(chat["lost"], 0, "{chat}");
    assert_eq!(chat["duplicated"], 0, "{chat}");
    assert!(chat["delivery_latency"]["p99_ms"].as_f64().unwrap() > 0.0);

    // Paced: 200 messages/s over 2 pairs for 1 s sends about 200, not as
    // many as the acks allow.
    let paced = loadgen(&server, "chat --pairs 2 --window 4 --duration 1 --rate 200");
    let acked = paced["acked"].as_u64().unwrap();
    assert!((150..=250).contains(&acked), "{paced}");
    assert_eq!(paced["rate_per_s"], 200.0, "{paced}");
    assert_eq!(paced["lost"], 0, "{paced}");
    assert_eq!(paced["duplicated"], 0, "{paced}");

    let fanout = loadgen(&server, "fanout --users 5 --events 200");
    assert_eq!(fanout["received"], 200, "{fanout}");
    assert_eq!(fanout["lost"], 0, "{fanout}");
    assert_eq!(fanout["duplicated"], 0, "{fanout}");

    // Paced: 100 events at 200/s take about half a second.
    let paced = loadgen(&server, "fanout --users 5 --events 100 --rate 200");
    assert_eq!(paced["received"], 100, "{paced}");
    assert_eq!(paced["rate_per_s"], 200.0, "{paced}");
    let per_second = paced["events_per_s"].as_f64().unwrap();
    assert!((150.0..=250.0).contains(&per_second), "{paced}");

    let idle = loadgen(
        &server,
        &format!("idle --connections 200 --server-pid {pid}"),
    );
    assert_eq!(idle["connections"], 200, "{idle}");
    assert_eq!(idle["failed"], 0, "{idle}");
    assert!(idle["server_rss_after_kib"].as_u64().unwrap() > 0, "{idle}");
}

#[tokio::test(flavor = "multi_thread")]
async fn fanout_through_rabbitmq_reaches_every_user_once() {
    let names = Names::unique();
    let server = consuming(names.server_config()).await;
    let fanout = loadgen(
        &server,
        &format!(
            "fanout --users 5 --events 200 --amqp {} --exchange {}",
            amqp_url(),
            names.exchange
        ),
    );
    assert_eq!(fanout["via"], "rabbitmq", "{fanout}");
    assert_eq!(fanout["refused"], 0, "{fanout}");
    assert_eq!(fanout["received"], 200, "{fanout}");
    assert_eq!(fanout["lost"], 0, "{fanout}");
    assert_eq!(fanout["duplicated"], 0, "{fanout}");
}

#[test]
fn broker_baseline_consumes_every_event_once_at_its_pace() {
    // No server: RabbitMQ alone, the floor under the RabbitMQ fanout.
    let url = amqp_url();
    let broker = run_loadgen(&["broker", "--amqp", &url, "--events", "200", "--rate", "400"]);
    assert_eq!(broker["run"], "broker", "{broker}");
    assert_eq!(broker["refused"], 0, "{broker}");
    assert_eq!(broker["received"], 200, "{broker}");
    assert_eq!(broker["lost"], 0, "{broker}");
    assert_eq!(broker["duplicated"], 0, "{broker}");
    // Paced: 200 events at 400/s take about half a second.
    let per_second = broker["events_per_s"].as_f64().unwrap();
    assert!((300.0..=500.0).contains(&per_second), "{broker}");
    let latency = &broker["publish_to_consume_latency"];
    assert!(latency["p99_ms"].as_f64().unwrap() > 0.0, "{broker}");
}
