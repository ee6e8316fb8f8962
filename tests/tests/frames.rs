//! PROTOCOL.md §2–§3: frames, error codes, and the built-in events.

use std::time::Duration;

use serde_json::json;
use sockets_tests::client::{Client, counter};
use sockets_tests::server::{Server, now, token, token_with};

async fn student(server: &Server) -> Client {
    Client::connect(server, &token("s_1", "student")).await.0
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_frames_get_bad_request_and_the_connection_stays_open() {
    let server = Server::in_process().await;
    let mut client = student(&server).await;

    let error_event = |frame: &serde_json::Value| {
        assert_eq!(frame["event"], "error", "{frame}");
        assert_eq!(frame["data"]["code"], "bad_request", "{frame}");
        assert!(
            frame.get("id").is_none() && frame.get("ack").is_none(),
            "{frame}"
        );
    };
    for text in [
        "not json",
        "[1,2]",
        "\"string\"",
        r#"{"event":"sendMessage","ack":-1}"#,
        r#"{"event":"sendMessage","ack":5.0}"#,
        r#"{"event":"sendMessage","ack":"5"}"#,
        r#"{"data":{}}"#,
        r#"{"event":"has space"}"#,
    ] {
        client.send_text(text).await;
        error_event(&client.recv().await);
    }
    client.send_binary(vec![1, 2, 3]).await;
    error_event(&client.recv().await);

    // With a readable ack, errors come back as the reply.
    for frame in [
        json!({"ack": 11}),
        json!({"event": 5, "ack": 11}),
        json!({"event": "x".repeat(65), "ack": 11}),
    ] {
        client.send(&frame).await;
        let reply = client.recv().await;
        assert_eq!(
            reply,
            json!({"ack": 11, "ok": false, "error": {"code": "bad_request", "message": reply["error"]["message"]}})
        );
    }

    // Still open and working.
    client
        .send(&json!({"event": "setConnection", "data": {}, "ack": 12}))
        .await;
    assert_eq!(client.recv().await["ok"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_nobody_handles_is_unknown_event() {
    let server = Server::in_process().await;
    let mut client = student(&server).await;
    client
        .send(&json!({"event": "doesNotExist", "data": 1, "ack": 1}))
        .await;
    let reply = client.recv().await;
    assert_eq!(
        (reply["ack"].as_u64(), reply["ok"].as_bool()),
        (Some(1), Some(false)),
        "{reply}"
    );
    assert_eq!(reply["error"]["code"], "unknown_event");
    client.send(&json!({"event": "doesNotExist"})).await;
    let error = client.recv().await;
    assert_eq!(
        (error["event"].as_str(), error["data"]["code"].as_str()),
        (Some("error"), Some("unknown_event"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_null_ack_counts_as_absent_and_success_without_ack_is_silent() {
    let server = Server::in_process().await;
    let mut client = student(&server).await;
    client
        .send(&json!({"event": "setConnection", "data": {"device": "ios"}, "ack": null}))
        .await;
    assert_eq!(client.try_recv(Duration::from_millis(500)).await, None);
    client.send(&json!({"event": "setConnection", "data": {"device": "web"}, "ack": 18446744073709551615u64})).await;
    let reply = client.recv().await;
    assert_eq!(reply["ack"].as_u64(), Some(u64::MAX));
}

#[tokio::test(flavor = "multi_thread")]
async fn set_connection_stores_details_up_to_4096_bytes() {
    let server = Server::in_process().await;
    let (mut client, connected) = Client::connect(&server, &token("s_1", "student")).await;
    client.send(&json!({"event": "setConnection", "data": {"device": "ios", "appVersion": "3.2.1"}, "ack": 1})).await;
    assert_eq!(
        client.recv().await,
        json!({"ack": 1, "ok": true, "data": {"connectionId": connected["data"]["connectionId"]}})
    );

    for data in [json!([1]), json!("ios"), json!(null)] {
        client
            .send(&json!({"event": "setConnection", "data": data, "ack": 2}))
            .await;
        assert_eq!(
            client.recv().await["error"]["code"],
            "bad_request",
            "data {data}"
        );
    }

    // {"k":"…"} is 8 bytes plus the value; é is two bytes in UTF-8.
    let exactly = json!({"k": "é".repeat(2044)});
    assert_eq!(exactly.to_string().len(), 4096);
    client
        .send(&json!({"event": "setConnection", "data": exactly, "ack": 3}))
        .await;
    assert_eq!(client.recv().await["ok"], true);
    let over = json!({"k": format!("{}x", "é".repeat(2044))});
    client
        .send(&json!({"event": "setConnection", "data": over, "ack": 4}))
        .await;
    assert_eq!(client.recv().await["error"]["code"], "too_large");
}

#[tokio::test(flavor = "multi_thread")]
async fn refresh_token_accepts_only_a_valid_token_of_the_same_user() {
    let server = Server::in_process().await;
    let mut client = student(&server).await;
    let exp = now() + 7200;
    client
        .send(&json!({"event": "refreshToken", "data": {"token": token_with(json!({"sub": "s_1", "role": "student", "exp": exp}))}, "ack": 1}))
        .await;
    let reply = client.recv().await;
    assert_eq!(reply["ok"], true, "{reply}");
    let expires_at = reply["data"]["expiresAt"].as_str().unwrap();
    assert!(
        expires_at.ends_with('Z') && expires_at.contains('T'),
        "{expires_at}"
    );

    for (data, code) in [
        (json!({}), "bad_request"),
        (json!({"token": 5}), "bad_request"),
        (json!({"token": ""}), "bad_request"),
        (json!("token"), "bad_request"),
        (json!({"token": "garbage"}), "unauthorized"),
        (json!({"token": token("c_1", "consultant")}), "unauthorized"),
        (
            json!({"token": token_with(json!({"sub": "s_1", "exp": now() - 600}))}),
            "unauthorized",
        ),
    ] {
        client
            .send(&json!({"event": "refreshToken", "data": data, "ack": 2}))
            .await;
        let reply = client.recv().await;
        assert_eq!(reply["error"]["code"], code, "data {data}: {reply}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_misbehaving_plugin_gets_plugin_failed_and_the_connection_and_server_live_on() {
    let config = sockets_tests::server::ServerConfig {
        plugins: vec!["misbehaving"],
        ..Default::default()
    };
    let server = Server::in_process_with(config).await;
    let mut client = student(&server).await;
    let off_workers = "sockets_plugin_off_workers{plugin=\"misbehaving@0.1.0\"}";
    // Spinning first: a panic prints, which moves the calls off the async
    // workers at once.
    let calls = [
        ("spin", 1),
        ("spin", 2),
        ("spin", 3),
        ("spin", 4),
        ("panic", 5),
        ("grow", 6),
        ("notJson", 7),
    ];
    for (event, ack) in calls {
        client.send(&json!({"event": event, "ack": ack})).await;
        let reply = client.recv().await;
        assert_eq!(reply["ack"], ack);
        assert_eq!(reply["error"]["code"], "plugin_failed", "{event}: {reply}");
        // The first spinning call put the plugin version under watch; the
        // third measured slow in CPU time moved its calls off the async
        // workers (one or two could be an interrupt's doing).
        let expected = u64::from(ack >= 4);
        assert_eq!(counter(&server, off_workers).await, expected, "after {ack}");
    }
    // scripts/bench.sh greps the log for "off the async workers" to warn
    // that a run's figures are skewed; this is the line it must find.
    assert!(
        server
            .log()
            .lines()
            .any(|line| line.contains("off the async workers")
                && line.contains("calls used more than 2 ms of CPU")),
        "{}",
        server.log()
    );
    client.send(&json!({"event": "refuse", "ack": 8})).await;
    assert_eq!(client.recv().await["error"]["code"], "forbidden");
    client
        .send(&json!({"event": "ok", "data": {"n": 1}, "ack": 9}))
        .await;
    assert_eq!(
        client.recv().await,
        json!({"ack": 9, "ok": true, "data": null})
    );
    let health = sockets_tests::client::http(&server, "GET", "/healthz", &[], b"").await;
    assert_eq!(health.status, 200);
}

#[tokio::test]
async fn a_plugin_that_prints_is_served_and_its_deliveries_arrive() {
    let config = sockets_tests::server::ServerConfig {
        plugins: vec!["misbehaving"],
        ..Default::default()
    };
    let server = Server::in_process_with(config).await;
    let mut recipient = Client::connect_as(&server, "u_1", "student").await;
    let mut client = student(&server).await;
    for ack in 1..=3 {
        // The first print is abandoned on the async worker and made again
        // off it; later ones go there at once. Each is delivered once.
        client
            .send(&json!({"event": "print", "data": {"n": ack}, "ack": ack}))
            .await;
        let reply = client.recv().await;
        assert_eq!(reply["ack"], ack, "{reply}");
        assert_eq!(reply["ok"], true, "{reply}");
        let push = recipient.recv().await;
        assert_eq!(push["event"], "echo");
        assert_eq!(push["data"], json!({"n": ack}));
    }
    assert!(
        server.log().contains("it uses WASI's blocking I/O"),
        "{}",
        server.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connected_is_the_first_frame_even_while_pushes_stream_in() {
    let server = std::sync::Arc::new(Server::in_process().await);
    let service = token("billing", "service");
    // Pushes to s_1 without pause while s_1 connects again and again: a
    // push registered before `connected` was queued would come first.
    let publishing = {
        let server = std::sync::Arc::clone(&server);
        tokio::spawn(async move {
            for n in 0..5_000 {
                let body = json!({"event": "PAYMENT_PROCESSED", "data": {
                    "paymentId": format!("p_{n}"), "studentId": "s_1",
                    "amount": 100, "currency": "USD"}});
                let answer = sockets_tests::client::publish(&server, &service, &body).await;
                assert_eq!(answer.status, 202, "{}", answer.json());
            }
        })
    };
    let mut pushed_to_a_connection = false;
    for _ in 0..40 {
        let (mut client, first) = Client::connect(&server, &token("s_1", "student")).await;
        assert_eq!(first["event"], "connected", "{first}");
        pushed_to_a_connection |= client.try_recv(Duration::from_millis(50)).await.is_some();
    }
    publishing.abort();
    assert!(
        pushed_to_a_connection,
        "the pushes reached the connections, so they raced the connects"
    );
}
