//! The benchmark's load generator against the real server, in short runs:
//! it keeps speaking PROTOCOL.md, and its summaries count what they claim.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde_json::{Value, json};
use sockets_tests::broker::{Names, amqp_url, consuming};
use sockets_tests::client::{Client, Refused, http_at, publish_at};
use sockets_tests::loadgen_binary;
use sockets_tests::server::{
    SECRET, Server, ServerConfig, listening_addr, scratch_dir, token, token_with,
};
use sockets_tests::socketio::{SocketioClient, SocketioPeer};

/// Runs `loadgen <command line>` (split at spaces) against the server.
fn loadgen(server: &Server, command_line: &str) -> Value {
    loadgen_against("sockets", server.addr, command_line)
}

/// Runs `loadgen --target <target>` against the server at `addr`.
fn loadgen_against(target: &str, addr: SocketAddr, command_line: &str) -> Value {
    let addr = addr.to_string();
    let mut args = vec!["--target", target, "--server", &addr];
    args.extend(command_line.split_whitespace());
    run_loadgen(&args)
}

/// `loadgen users-file --pairs <pairs>`, written to a fresh file.
fn users_file(pairs: u32) -> PathBuf {
    let users = std::process::Command::new(loadgen_binary())
        .args(["users-file", "--pairs", &pairs.to_string()])
        .output()
        .expect("loadgen runs");
    assert!(users.status.success(), "loadgen users-file failed");
    let file = scratch_dir("loadgen").join("users.json");
    std::fs::write(&file, &users.stdout).unwrap();
    file
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
    let users_file = users_file(2);
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
    let per_message = cpu["us_per_delivered"].as_f64().unwrap();
    assert!(per_message > 0.0, "{chat}");
    // The user/kernel split adds up to the total (each rounded to 0.1 µs).
    let split = cpu["user_us_per_delivered"].as_f64().unwrap()
        + cpu["kernel_us_per_delivered"].as_f64().unwrap();
    assert!((split - per_message).abs() <= 0.15, "{chat}");
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

/// The benchmark compares against this peer: it must do the same jobs, or
/// the ratios mean nothing. It checks tokens and the chat rules, and the
/// load generator's Socket.IO side counts what it delivers.
#[tokio::test(flavor = "multi_thread")]
async fn the_socketio_peer_checks_what_the_host_checks_and_loses_nothing() {
    let users_file = users_file(2);
    let peer = SocketioPeer::start(&users_file).await;

    let (_, refused) = SocketioClient::connect(&peer, "not-a-token").await;
    assert!(refused.starts_with("44"), "{refused}");
    let expired = token_with(json!({"sub": "bench_s_0", "role": "student", "exp": 1}));
    let (_, refused) = SocketioClient::connect(&peer, &expired).await;
    assert!(refused.starts_with("44"), "{refused}");

    let (mut student, accepted) =
        SocketioClient::connect(&peer, &token("bench_s_0", "student")).await;
    assert!(accepted.starts_with("40"), "{accepted}");
    for (data, code) in [
        (json!({"to": "bench_c_0"}), "bad_request"),
        (json!({"to": "bench_s_0", "text": "hi"}), "bad_request"),
        (
            json!({"to": "bench_c_0", "text": "é".repeat(4001)}),
            "bad_request",
        ),
        (json!({"to": "nobody", "text": "hi"}), "not_found"),
        (json!({"to": "bench_s_1", "text": "hi"}), "forbidden"),
    ] {
        let reply = student.emit_with_ack("sendMessage", &data, 1).await;
        assert_eq!(reply["ok"], false, "{data}: {reply}");
        assert_eq!(reply["error"]["code"], code, "{data}: {reply}");
    }
    let longest = json!({"to": "bench_c_0", "text": "😀".repeat(4000)});
    let reply = student.emit_with_ack("sendMessage", &longest, 2).await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["data"]["delivered"], 0, "{reply}");

    // Its endpoint for backend events answers as the host's does.
    let service = token("billing", "service");
    for (bearer, body, status, code) in [
        (String::new(), json!({}), 401, "unauthorized"),
        (token("bench_s_0", "student"), json!({}), 403, "forbidden"),
        (
            service.clone(),
            json!({"event": "NOPE", "data": {}}),
            422,
            "unknown_event",
        ),
        (service.clone(), json!(null), 400, "bad_request"),
        (
            service.clone(),
            json!({"event": "bad name", "data": {}}),
            400,
            "bad_request",
        ),
        (
            service.clone(),
            json!({"event": "PAYMENT_PROCESSED", "id": 7,
                   "data": {"paymentId": "p", "studentId": "bench_s_0"}}),
            400,
            "bad_request",
        ),
        (
            service.clone(),
            json!({"event": "PAYMENT_PROCESSED", "data": {"paymentId": "p"}}),
            400,
            "bad_request",
        ),
        (
            service.clone(),
            json!({"event": "PAYMENT_PROCESSED",
                   "data": {"paymentId": "p", "studentId": "bench_s_0", "amount": "4900"}}),
            400,
            "bad_request",
        ),
    ] {
        publish_at(peer.addr, &bearer, &body)
            .await
            .assert_error(status, code);
    }
    let accepted = json!({"event": "PAYMENT_PROCESSED",
                          "data": {"paymentId": "p", "studentId": "bench_s_0", "amount": 4900}});
    let response = publish_at(peer.addr, &service, &accepted).await;
    assert_eq!(response.status, 202, "{}", response.body);
    http_at(peer.addr, "GET", "/api/events", &[], b"")
        .await
        .assert_error(405, "bad_request");
    let huge = format!(
        r#"{{"event":"PAYMENT_PROCESSED","data":"{}"}}"#,
        "x".repeat((1 << 20) + 10)
    );
    let headers = [("authorization", format!("Bearer {service}"))];
    http_at(peer.addr, "POST", "/api/events", &headers, huge.as_bytes())
        .await
        .assert_error(413, "too_large");

    // A repeated idempotency key is answered as the first call was, and
    // delivers nothing again: after the earlier event (`p`) the student
    // gets `pay-1` once, then `pay-2`.
    let payment = |id: &str| {
        json!({"event": "PAYMENT_PROCESSED", "id": id,
               "data": {"paymentId": id, "studentId": "bench_s_0"}})
    };
    let first = publish_at(peer.addr, &service, &payment("pay-1")).await;
    assert_eq!(first.status, 202, "{}", first.body);
    assert_eq!(first.json(), json!({"id": "pay-1", "recipients": 1}));
    let again = publish_at(peer.addr, &service, &payment("pay-1")).await;
    assert_eq!(again.status, 202, "{}", again.body);
    assert_eq!(
        again.json(),
        json!({"id": "pay-1", "recipients": 1, "duplicate": true})
    );
    let next = publish_at(peer.addr, &service, &payment("pay-2")).await;
    assert_eq!(next.status, 202, "{}", next.body);
    for id in ["p", "pay-1", "pay-2"] {
        let (name, data) = student.next_event().await;
        assert_eq!(name, "paymentProcessed");
        assert_eq!(data["paymentId"], id, "{data}");
    }

    let chat = loadgen_against(
        "socketio",
        peer.addr,
        "chat --pairs 2 --window 4 --duration 1",
    );
    assert!(chat["acked"].as_u64().unwrap() > 0, "{chat}");
    assert_eq!(chat["delivered"], chat["acked"], "{chat}");
    assert_eq!(chat["failed"], 0, "{chat}");
    assert_eq!(chat["lost"], 0, "{chat}");
    assert_eq!(chat["duplicated"], 0, "{chat}");

    let fanout = loadgen_against("socketio", peer.addr, "fanout --users 5 --events 200");
    assert_eq!(fanout["received"], 200, "{fanout}");
    assert_eq!(fanout["lost"], 0, "{fanout}");
    assert_eq!(fanout["duplicated"], 0, "{fanout}");

    let idle = loadgen_against(
        "socketio",
        peer.addr,
        &format!("idle --connections 100 --server-pid {}", peer.pid()),
    );
    assert_eq!(idle["connections"], 100, "{idle}");
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

/// The bare relay of the benchmark (`loadgen relay`): it speaks the chat
/// protocol as the host does, refuses what the chat plugin refuses, and
/// loses nothing, so its figures are a fair floor for the host's.
#[tokio::test(flavor = "multi_thread")]
async fn the_bare_relay_speaks_the_chat_protocol_and_loses_nothing() {
    let users = users_file(2);
    let root = scratch_dir("relay");
    let log = root.join("stderr.log");
    let mut child = tokio::process::Command::new(loadgen_binary())
        .args(["relay", "--listen", "127.0.0.1:0", "--users"])
        .arg(&users)
        .env("SOCKETS_JWT_SECRET", SECRET)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("loadgen relay starts");
    let addr = listening_addr(
        &mut child,
        "relay listening on http://",
        std::time::Duration::from_secs(30),
        &log,
    )
    .await;
    let relay = Server::adopt(child, addr, root.join("data"), root.join("plugins"), log);

    let chat = loadgen(&relay, "chat --pairs 2 --window 4 --duration 1");
    assert!(chat["acked"].as_u64().unwrap() > 0, "{chat}");
    assert_eq!(chat["acked"], chat["delivered"], "{chat}");
    assert_eq!(
        (chat["lost"].as_u64(), chat["duplicated"].as_u64()),
        (Some(0), Some(0)),
        "{chat}"
    );

    // What the host refuses, it refuses: a bad token, an unknown
    // recipient, a student writing to a student.
    match Client::try_connect(&relay, &[], "?access_token=forged").await {
        Err(Refused::Http(status, _)) => assert_eq!(status, 401),
        other => panic!(
            "a forged token was not refused: {:?}",
            other.map(|(_, frame)| frame)
        ),
    }
    let (mut student, connected) = Client::try_connect(
        &relay,
        &[],
        &format!("?access_token={}", token("bench_s_0", "student")),
    )
    .await
    .unwrap();
    assert_eq!(connected["event"], "connected", "{connected}");
    for (to, code) in [("nobody", "not_found"), ("bench_s_1", "forbidden")] {
        student
            .send(&json!({"event": "sendMessage", "data": {"to": to, "text": "hi"}, "ack": 1}))
            .await;
        let reply = student.recv().await;
        assert_eq!(reply["error"]["code"], code, "{reply}");
    }
    assert!(relay.stop().await, "SIGTERM ends the relay cleanly");
}
