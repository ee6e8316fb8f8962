//! PROTOCOL.md §6: size, rate, slow consumers, idle, token expiry.

use std::time::{Duration, Instant};

use serde_json::json;
use sockets_tests::client::{Client, counter, student_and_consultant};
use sockets_tests::eventually;
use sockets_tests::server::{Server, ServerConfig, now, token, token_with};

#[tokio::test(flavor = "multi_thread")]
async fn a_message_over_64_kib_closes_with_1009() {
    let server = Server::in_process().await;
    let mut client = Client::connect_as(&server, "s_1", "student").await;
    // Exactly at the limit is fine (answered, not closed).
    let at_limit = format!(r#"{{"event":"x","data":"{}"}}"#, "a".repeat(65536 - 23));
    assert_eq!(at_limit.len(), 65536);
    client.send_text(&at_limit).await;
    assert_eq!(client.recv().await["data"]["code"], "unknown_event");

    client.send_text(&format!("{at_limit} ")).await;
    let (code, reason, _) = client.closed(Duration::from_secs(5)).await;
    assert_eq!((code, reason.as_str()), (1009, "message too big"));
}

#[tokio::test(flavor = "multi_thread")]
async fn frames_over_the_rate_get_rate_limited() {
    let server =
        Server::in_process_with(ServerConfig::default().env("SOCKETS_RATE_LIMIT", "5")).await;
    let mut client = Client::connect_as(&server, "s_1", "student").await;
    for ack in 0..30u64 {
        client
            .send(&json!({"event": "setConnection", "data": {}, "ack": ack}))
            .await;
    }
    let mut limited = 0;
    let mut ok = 0;
    for _ in 0..30 {
        let reply = client.recv().await;
        match reply["ok"].as_bool() {
            Some(true) => ok += 1,
            _ => {
                assert_eq!(reply["error"]["code"], "rate_limited", "{reply}");
                limited += 1;
            }
        }
    }
    // A burst of twice the rate passes; a little refills while sending.
    assert!((10..=13).contains(&ok), "ok {ok}, limited {limited}");
    assert_eq!(ok + limited, 30);
}

#[tokio::test(flavor = "multi_thread")]
async fn persistent_abuse_closes_with_1008() {
    let server =
        Server::in_process_with(ServerConfig::default().env("SOCKETS_RATE_LIMIT", "1")).await;
    let mut client = Client::connect_as(&server, "s_1", "student").await;
    let started = Instant::now();
    // Bounded: 20 frames/s for at most 15 s; the server closes after 10 s.
    let sender = async {
        for _ in 0..300 {
            if !client
                .try_send(&json!({"event": "setConnection", "data": {}}))
                .await
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(15), sender).await;
    let (code, _, frames) = client.closed(Duration::from_secs(5)).await;
    assert_eq!(code, 1008);
    assert!(started.elapsed() >= Duration::from_secs(10));
    assert!(
        frames
            .iter()
            .any(|frame| frame["data"]["code"] == "rate_limited")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_connection_is_closed_with_4002() {
    let config = ServerConfig::default().env("SOCKETS_IDLE_TIMEOUT", "1");
    let server = Server::in_process_with(config).await;
    let mut client = Client::connect_as(&server, "s_1", "student").await;
    let (code, reason, _) = client.closed(Duration::from_secs(5)).await;
    assert_eq!((code, reason.as_str()), (4002, "idle timeout"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_that_keeps_talking_outlives_the_idle_timeout() {
    let config = ServerConfig::default().env("SOCKETS_IDLE_TIMEOUT", "1");
    let server = Server::in_process_with(config).await;
    let mut client = Client::connect_as(&server, "s_1", "student").await;
    // A frame every 300 ms for 3 s: three times the timeout, never 1 s quiet.
    for ack in 0..10u64 {
        client
            .send(&json!({"event": "setConnection", "data": {}, "ack": ack}))
            .await;
        assert_eq!(client.recv().await["ack"], ack, "closed while talking");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (code, reason, _) = client.closed(Duration::from_secs(5)).await;
    assert_eq!((code, reason.as_str()), (4002, "idle timeout"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_token_closes_with_4001_unless_refreshed() {
    let config = ServerConfig::default().env("SOCKETS_JWT_LEEWAY", "0");
    let server = Server::in_process_with(config).await;
    // Seconds, not less: `now()` is whole seconds, and on a loaded machine
    // the connect alone has taken over one (401: token expired).
    let short = || token_with(json!({"sub": "s_1", "role": "student", "exp": now() + 5}));

    let mut expiring = Client::connect(&server, &short()).await.0;
    let (code, reason, _) = expiring.closed(Duration::from_secs(9)).await;
    assert_eq!((code, reason.as_str()), (4001, "token expired"));

    let mut refreshed = Client::connect(&server, &short()).await.0;
    refreshed
        .send(
            &json!({"event": "refreshToken", "data": {"token": token("s_1", "student")}, "ack": 1}),
        )
        .await;
    assert_eq!(refreshed.recv().await["ok"], true);
    assert_eq!(
        refreshed.try_recv(Duration::from_secs(7)).await,
        None,
        "still open after the old expiry"
    );
    refreshed
        .send(&json!({"event": "setConnection", "data": {}, "ack": 2}))
        .await;
    assert_eq!(refreshed.recv().await["ack"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_does_not_read_is_closed_with_1013_and_memory_stays_bounded() {
    let server =
        Server::in_process_with(ServerConfig::default().env("SOCKETS_RATE_LIMIT", "0")).await;
    let (mut sender, mut stalled) = student_and_consultant(&server).await;
    let text = "x".repeat(3900);
    // Bounded: at most 6000 messages of ~4 KB (~24 MB), more than the
    // outbound queue (1024 frames) plus the socket buffers can hold.
    let mut acked = 0;
    for ack in 0..6000u64 {
        sender
            .send(&json!({"event": "sendMessage", "data": {"to": "c_1", "text": text}, "ack": ack}))
            .await;
        let reply = sender.recv().await;
        acked += 1;
        if reply["data"]["delivered"] == 0 {
            break;
        }
    }
    assert!(acked < 6000, "the stalled client was never dropped");
    // Its connection ends while it still reads nothing: the writer, stuck
    // behind the full socket, hears the close request too.
    eventually(
        Duration::from_secs(10),
        "the stalled connection's task ends",
        || async {
            (counter(&server, "sockets_connections_closed_total").await == 1).then_some(())
        },
    )
    .await;
    let (code, reason, _) = stalled.closed(Duration::from_secs(30)).await;
    // The close frame goes out when the socket still takes it.
    assert!(code == 1013 || code == 0, "closed with {code} {reason}");
    assert!(
        server.log().contains("too slow"),
        "the server logs why it closed the connection"
    );
}
