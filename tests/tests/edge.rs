//! The edge as an attacker tries it (PROTOCOL §6 v1.1): bodies sent to
//! unauthenticated requests, sockets that never finish their headers,
//! more connections than allowed, claims at the extremes of their types,
//! frames that break the WebSocket protocol, plugins that flood the log,
//! and forged cluster traffic. Each test reproduces a reported attack and
//! checks the documented answer.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};
use sockets_tests::broker::{Names, Publisher, consuming};
use sockets_tests::client::{Client, Refused, counter, http, publish, student_and_consultant};
use sockets_tests::eventually;
use sockets_tests::server::{Server, ServerConfig, now, token, token_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `head` (a request's line and headers, no body) and returns what
/// the server answers within 5 s without a byte of the body being sent.
async fn answer_without_body(server: &Server, head: &str) -> String {
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .expect("the server answers before the body is sent")
        .unwrap();
    String::from_utf8_lossy(&answer[..read]).into_owned()
}

fn status_of(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
}

#[tokio::test]
async fn no_body_is_read_before_the_token_and_role_are_checked() {
    let server = Server::in_process().await;
    let sixteen_mib = 16 << 20;
    let upload = |auth: &str| {
        format!(
            "PUT /admin/plugins/x HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {sixteen_mib}\r\n\r\n"
        )
    };
    let answer = answer_without_body(&server, &upload("")).await;
    assert_eq!(status_of(&answer), 401, "{answer}");
    assert!(answer.contains(r#""code":"unauthorized""#), "{answer}");

    let student = format!("Authorization: Bearer {}\r\n", token("s_1", "student"));
    let answer = answer_without_body(&server, &upload(&student)).await;
    assert_eq!(status_of(&answer), 403, "{answer}");

    let publish_head = format!(
        "POST /api/events HTTP/1.1\r\nHost: x\r\n{student}Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
    );
    let answer = answer_without_body(&server, &publish_head).await;
    assert_eq!(status_of(&answer), 403, "{answer}");

    // An admin may upload, but not more than 16 MiB: refused from the
    // announced length, before the body.
    let admin = format!("Authorization: Bearer {}\r\n", token("ops", "admin"));
    let too_big = format!(
        "PUT /admin/plugins/x HTTP/1.1\r\nHost: x\r\n{admin}Content-Length: {}\r\n\r\n",
        sixteen_mib + 1
    );
    let answer = answer_without_body(&server, &too_big).await;
    assert_eq!(status_of(&answer), 413, "{answer}");
    assert!(answer.contains(r#""code":"too_large""#), "{answer}");
}

#[tokio::test]
async fn a_socket_that_never_finishes_its_headers_is_closed() {
    let server =
        Server::in_process_with(ServerConfig::default().env("SOCKETS_HEADER_TIMEOUT", "1")).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the connection is still open 5 s after a 1 s header deadline"
    );

    // A socket that sends nothing at all is closed too.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "a silent socket is still open after 5 s");
}

#[tokio::test]
async fn connections_beyond_the_cap_get_503_and_the_cap_frees_up() {
    let server =
        Server::in_process_with(ServerConfig::default().env("SOCKETS_MAX_CONNECTIONS", "3")).await;
    let mut clients = Vec::new();
    for user in ["s_1", "s_2", "s_3"] {
        clients.push(Client::connect(&server, &token(user, "student")).await.0);
    }
    let bearer = [(
        "authorization",
        format!("Bearer {}", token("c_1", "consultant")),
    )];
    match Client::try_connect(&server, &bearer, "").await {
        Err(Refused::Http(503, body)) => assert_eq!(body["error"]["code"], "unavailable"),
        Err(other) => panic!("a fourth connection was not refused with 503: {other:?}"),
        Ok((_, connected)) => panic!("a fourth connection was accepted: {connected}"),
    }
    // Beyond the cap a node still says it is alive (a liveness probe must
    // not restart a full node); everything else is refused.
    let health = http(&server, "GET", "/healthz", &[], b"").await;
    assert_eq!(health.status, 200, "{}", health.body);
    let publish_at_cap = publish(
        &server,
        &token("billing", "service"),
        &json!({"event": "PAYMENT_PROCESSED", "data": {"paymentId": "p", "studentId": "s_1"}}),
    )
    .await;
    publish_at_cap.assert_error(503, "unavailable");

    // Connected clients still work while the cap holds.
    clients[0]
        .send(&json!({"event": "setConnection", "data": {}, "ack": 1}))
        .await;
    assert_eq!(clients[0].recv().await["ok"], true);

    clients.pop().unwrap().close().await;
    eventually(Duration::from_secs(10), "a slot frees up", || async {
        Client::try_connect(&server, &bearer, "").await.ok()
    })
    .await;
}

#[tokio::test]
async fn extreme_claim_values_never_break_a_connection() {
    let server = Server::in_process().await;
    // `exp` at i64::MAX panicked the connection's task on its first frame.
    let forever = token_with(json!({"sub": "s_1", "role": "student", "exp": i64::MAX}));
    let (mut client, connected) = Client::connect(&server, &forever).await;
    assert_eq!(connected["event"], "connected");
    client
        .send(&json!({"event": "setConnection", "data": {"device": "x"}, "ack": 1}))
        .await;
    let reply = client.recv().await;
    assert_eq!(reply["ok"], true, "{reply}");

    // A refresh to 10^15 s (year ~31.7 million) panicked in std's time.
    let far = token_with(json!({"sub": "s_1", "role": "student", "exp": 1_000_000_000_000_000u64}));
    client
        .send(&json!({"event": "refreshToken", "data": {"token": far}, "ack": 2}))
        .await;
    let reply = client.recv().await;
    assert_eq!(reply["ok"], true, "{reply}");
    let expires_at = reply["data"]["expiresAt"].as_str().unwrap();
    assert!(expires_at.starts_with("9999-12-31T23:59:59"), "{reply}");

    // A float `exp` of 1e300 is refused cleanly.
    let bearer = [(
        "authorization",
        format!(
            "Bearer {}",
            token_with(json!({"sub": "s_2", "role": "student", "exp": 1e300}))
        ),
    )];
    match Client::try_connect(&server, &bearer, "").await {
        Err(Refused::Http(401, body)) => assert_eq!(body["error"]["code"], "unauthorized"),
        Err(other) => panic!("exp 1e300 was not refused with 401: {other:?}"),
        Ok((_, connected)) => panic!("exp 1e300 connected: {connected}"),
    }
    let (mut other, _) = Client::connect(&server, &token("s_2", "student")).await;
    other
        .send(&json!({"event": "setConnection", "data": {}, "ack": 1}))
        .await;
    assert_eq!(other.recv().await["ok"], true);

    client.close().await;
    other.close().await;
    eventually(
        Duration::from_secs(10),
        "both connections are unregistered",
        || async { (counter(&server, "sockets_connections").await == 0).then_some(()) },
    )
    .await;
    assert_eq!(counter(&server, "sockets_connection_panics_total").await, 0);
}

#[tokio::test]
async fn user_ids_are_at_most_256_bytes() {
    let server = Server::in_process().await;
    let long = "s".repeat(257);
    let bearer = [(
        "authorization",
        format!("Bearer {}", token(&long, "student")),
    )];
    match Client::try_connect(&server, &bearer, "").await {
        Err(Refused::Http(401, body)) => assert_eq!(body["error"]["code"], "unauthorized"),
        Err(other) => panic!("a 257-byte sub was not refused with 401: {other:?}"),
        Ok((_, connected)) => panic!("a 257-byte sub connected: {connected}"),
    }
    let longest = "s".repeat(256);
    let (mut client, connected) = Client::connect(&server, &token(&longest, "student")).await;
    assert_eq!(connected["data"]["userId"], longest);

    let to = "c".repeat(257);
    client
        .send(&json!({"event": "sendMessage", "data": {"to": to, "text": "hi"}, "ack": 1}))
        .await;
    let reply = client.recv().await;
    assert_eq!(reply["error"]["code"], "bad_request", "{reply}");
}

#[tokio::test]
async fn data_that_is_an_array_is_a_bad_request_not_a_message() {
    let server = Server::in_process().await;
    let (mut student, mut consultant) = student_and_consultant(&server).await;
    student
        .send(&json!({"event": "sendMessage", "data": ["c_1", "hi"], "ack": 1}))
        .await;
    let reply = student.recv().await;
    assert_eq!(reply["error"]["code"], "bad_request", "{reply}");
    assert!(
        consultant
            .try_recv(Duration::from_millis(500))
            .await
            .is_none(),
        "the array was delivered as a message"
    );

    let service = token("billing", "service");
    let event =
        |data: Value| json!({"event": "PAYMENT_PROCESSED", "id": "pay-edge-1", "data": data});
    let first = publish(
        &server,
        &service,
        &event(json!({"paymentId": "p", "studentId": "s_1"})),
    )
    .await;
    assert_eq!(first.status, 202, "{}", first.body);
    // The same id with a body the plugin refuses: validated first (400),
    // not answered as a duplicate.
    let repeated = publish(&server, &service, &event(json!(["p", "s_1"]))).await;
    repeated.assert_error(400, "bad_request");
    let again = publish(
        &server,
        &service,
        &event(json!({"paymentId": "p", "studentId": "s_1"})),
    )
    .await;
    assert_eq!(again.status, 202);
    assert_eq!(again.json()["duplicate"], true);
}

#[tokio::test]
async fn storable_connection_details_only() {
    let server = Server::in_process().await;
    let (mut client, _) = Client::connect(&server, &token("s_1", "student")).await;
    for (n, details) in [
        json!({"bad\u{0}key": 1}),
        json!({"$where": "1"}),
        json!({"app.version": "3"}),
        json!({"nested": {"deeper": {"$gt": 1}}}),
    ]
    .into_iter()
    .enumerate()
    {
        client
            .send(&json!({"event": "setConnection", "data": details, "ack": n}))
            .await;
        let reply = client.recv().await;
        assert_eq!(reply["error"]["code"], "bad_request", "{details}: {reply}");
    }
    let mut deep = json!(1);
    for _ in 0..20 {
        deep = json!({ "d": deep });
    }
    client
        .send(&json!({"event": "setConnection", "data": deep, "ack": 9}))
        .await;
    assert_eq!(client.recv().await["error"]["code"], "bad_request");
}

/// Completes a WebSocket handshake by hand and reads the `connected`
/// frame, so that frames the client libraries refuse to write can be sent.
async fn raw_websocket(server: &Server, token: &str) -> TcpStream {
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0];
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let (opcode, _) = read_frame(&mut stream).await.expect("the connected frame");
    assert_eq!(opcode, 1);
    stream
}

/// One server frame (unmasked, short): opcode and payload; `None` at EOF.
async fn read_frame(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut header = [0; 2];
    stream.read_exact(&mut header).await.ok()?;
    let mut len = u64::from(header[1] & 0x7f);
    if len == 126 {
        let mut ext = [0; 2];
        stream.read_exact(&mut ext).await.ok()?;
        len = u64::from(u16::from_be_bytes(ext));
    } else if len == 127 {
        let mut ext = [0; 8];
        stream.read_exact(&mut ext).await.ok()?;
        len = u64::from_be_bytes(ext);
    }
    let mut payload = vec![0; usize::try_from(len).unwrap()];
    stream.read_exact(&mut payload).await.ok()?;
    Some((header[0] & 0x0f, payload))
}

/// The close code the server sends after `frame`, within 5 s.
async fn close_code_after(server: &Server, frame: &[u8]) -> u16 {
    let mut stream = raw_websocket(server, &token("s_1", "student")).await;
    stream.write_all(frame).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match read_frame(&mut stream).await {
                Some((8, payload)) => {
                    return u16::from_be_bytes([payload[0], payload[1]]);
                }
                Some(_) => continue,
                None => panic!("the connection ended without a close frame"),
            }
        }
    })
    .await
    .expect("a close frame within 5 s")
}

/// A masked client frame (mask 0: the payload travels as is).
fn masked(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![
        first_byte,
        0x80 | u8::try_from(payload.len()).unwrap(),
        0,
        0,
        0,
        0,
    ];
    frame.extend_from_slice(payload);
    frame
}

#[tokio::test]
async fn broken_frames_get_the_close_codes_of_rfc_6455() {
    let server = Server::in_process().await;
    // A text frame that is not UTF-8: 1007.
    assert_eq!(
        close_code_after(&server, &masked(0x81, &[0xff, 0xfe, 0xfd])).await,
        1007
    );
    // An unmasked client frame: 1002.
    assert_eq!(
        close_code_after(&server, &[0x81, 0x02, b'{', b'}']).await,
        1002
    );
    // Reserved bits set: 1002.
    assert_eq!(close_code_after(&server, &masked(0xc1, b"{}")).await, 1002);
    // A reserved opcode: 1002.
    assert_eq!(close_code_after(&server, &masked(0x83, b"{}")).await, 1002);
    // None of it took the server down.
    let (mut client, _) = Client::connect(&server, &token("s_1", "student")).await;
    client
        .send(&json!({"event": "setConnection", "data": {}, "ack": 1}))
        .await;
    assert_eq!(client.recv().await["ok"], true);
}

#[tokio::test]
async fn readiness_details_are_for_admins_only() {
    // A MongoDB that is not there: the store is degraded, and its error
    // (which names hosts) is shown to admin tokens alone.
    let server = Server::in_process_with(ServerConfig::default().env(
        "SOCKETS_MONGO_URL",
        "mongodb://127.0.0.1:1/?directConnection=true",
    ))
    .await;
    let anonymous = eventually(Duration::from_secs(20), "the store is degraded", || async {
        let answer = http(&server, "GET", "/readyz", &[], b"").await;
        (answer.status == 503 && answer.json()["checks"]["store"]["status"] == "degraded")
            .then_some(answer)
    })
    .await;
    assert!(
        !anonymous.body.contains("error") && !anonymous.body.contains("127.0.0.1"),
        "anonymous callers see no dependency errors: {}",
        anonymous.body
    );
    let admin = [("authorization", format!("Bearer {}", token("ops", "admin")))];
    let detailed = http(&server, "GET", "/readyz", &admin, b"").await;
    assert!(
        detailed.json()["checks"]["store"]["error"].is_string(),
        "{}",
        detailed.body
    );
}

#[tokio::test]
async fn a_plugin_cannot_forge_log_lines_or_flood_the_log() {
    let server = Server::start_with(ServerConfig {
        plugins: vec!["misbehaving"],
        ..ServerConfig::default()
    })
    .await;
    let (mut client, _) = Client::connect(&server, &token("u_1", "student")).await;
    client
        .send(&json!({"event": "logFlood", "data": {}, "ack": 1}))
        .await;
    let reply = client.recv().await;
    assert_eq!(reply["ok"], true, "{reply}");
    let log = server.log();
    assert!(
        !log.lines().any(|line| line.starts_with("FORGED")),
        "a plugin wrote a line of its own"
    );
    assert!(!log.contains('\u{1b}'), "a plugin wrote a terminal escape");
    let written = log.matches("flood ").count();
    assert!(
        (1..=200).contains(&written),
        "{written} of 1000 flood lines reached the log"
    );
    let dropped = http(&server, "GET", "/metrics", &[], b"").await.body;
    let dropped: u64 = dropped
        .lines()
        .find(|line| {
            line.starts_with("sockets_plugin_log_lines_dropped_total{plugin=\"misbehaving@")
        })
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .expect("a dropped-lines metric for the plugin");
    assert_eq!(dropped, 1000 - written as u64);
}

/// A batch in the cluster's wire format (`cluster/batch.rs`): one copy of
/// `frame` for `user`.
fn forged_batch(user: &str, frame: &str) -> Vec<u8> {
    let mut body = vec![1];
    body.extend_from_slice(&1u32.to_be_bytes());
    let put = |body: &mut Vec<u8>, text: &str| {
        body.extend_from_slice(&u32::try_from(text.len()).unwrap().to_be_bytes());
        body.extend_from_slice(text.as_bytes());
    };
    put(&mut body, &format!("forged-{}", now()));
    body.extend_from_slice(&1u16.to_be_bytes());
    put(&mut body, user);
    put(&mut body, frame);
    body
}

#[tokio::test]
async fn forged_cluster_messages_are_ignored() {
    let names = Names::unique();
    let server = consuming(names.server_config()).await;
    let (mut student, _) = Client::connect(&server, &token("s_1", "student")).await;
    let publisher = Publisher::connect().await;
    let frame = r#"{"event":"paymentProcessed","data":{"paymentId":"FORGED"},"id":"x"}"#;
    let signed_with = |signature: &str| {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-sockets-signature".into(),
            AMQPValue::LongString(signature.into()),
        );
        BasicProperties::default()
            .with_app_id("intruder".into())
            .with_headers(headers)
    };
    // Copies are routed by node id: the node's queue, from its log.
    let queue_prefix = format!("{}.", names.nodes);
    let node_id = eventually(
        Duration::from_secs(10),
        "the node logs its queue",
        || async {
            server.log().split_whitespace().find_map(|word| {
                let queue = word.strip_prefix("queue=")?;
                Some(queue.strip_prefix(&queue_prefix)?.to_owned())
            })
        },
    )
    .await;
    // No signature, a wrong one, and a well-formed one under another key.
    for properties in [
        BasicProperties::default().with_app_id("intruder".into()),
        signed_with("00"),
        signed_with(&"ab".repeat(32)),
    ] {
        publisher
            .publish(
                &names.nodes,
                &node_id,
                &forged_batch("s_1", frame),
                properties,
            )
            .await;
    }
    // Forged presence: a node claiming 5 connections of c_1.
    publisher
        .publish(
            &format!("{}.presence", names.nodes),
            "",
            b"anything",
            BasicProperties::default()
                .with_app_id("intruder".into())
                .with_type("presence".into()),
        )
        .await;
    eventually(Duration::from_secs(10), "all four are rejected", || async {
        (counter(&server, "sockets_cluster_messages_rejected_total").await >= 4).then_some(())
    })
    .await;
    assert!(
        student.try_recv(Duration::from_millis(500)).await.is_none(),
        "a forged push reached the client"
    );
}

#[tokio::test]
async fn a_clustered_node_without_a_cluster_key_refuses_to_start() {
    let names = Names::unique();
    let config = names.server_config().env("SOCKETS_CLUSTER_KEY", "");
    let output = tokio::process::Command::new(sockets_tests::host_binary())
        .arg("serve")
        .env_remove("RUST_BACKTRACE")
        .env("SOCKETS_LISTEN", "127.0.0.1:0")
        .env("SOCKETS_JWT_SECRET", "x")
        .envs(config.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("SOCKETS_CLUSTER_KEY"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(!String::from_utf8_lossy(&output.stdout).contains("listening"));
}

/// A plugin that sleeps inside a host call (out of the epoch deadline's
/// reach) once held a tokio worker for as long as it slept, and panicked
/// workers: now the call fails at once and the host keeps serving.
#[tokio::test]
async fn a_plugin_that_sleeps_fails_at_once_and_holds_no_thread() {
    let server = Server::start_with(ServerConfig {
        plugins: vec!["misbehaving"],
        ..ServerConfig::default()
    })
    .await;
    let (mut client, _) = Client::connect(&server, &token("u_1", "student")).await;
    for ack in 1..=4 {
        let started = std::time::Instant::now();
        client
            .send(&json!({"event": "sleep", "data": {}, "ack": ack}))
            .await;
        let reply = client.recv().await;
        assert_eq!(reply["error"]["code"], "plugin_failed", "{reply}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the sleeping plugin answered after {:?}",
            started.elapsed()
        );
    }
    client
        .send(&json!({"event": "ok", "data": {}, "ack": 9}))
        .await;
    let mut reply = client.recv().await;
    if reply.get("ack").is_none() {
        reply = client.recv().await;
    }
    assert_eq!(reply["ok"], true, "{reply}");
    assert!(
        !server.log().contains("panicked"),
        "a worker panicked:\n{}",
        server.log()
    );
}
