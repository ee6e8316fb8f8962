//! PROTOCOL.md §5 over a real RabbitMQ: events from the `sockets.events`
//! exchange reach the right clients; what cannot be processed is
//! dead-lettered with the reason; a repeated `message_id` is delivered once.

use std::time::Duration;

use lapin::BasicProperties;
use serde_json::{Value, json};
use sockets_tests::broker::{Names, Publisher, consuming, with_message_id};
use sockets_tests::client::{Client, http, student_and_consultant};
use sockets_tests::server::{Server, ServerConfig, token};

/// Starts a server consuming from fresh names and waits until it consumes.
async fn server_with_broker() -> (Server, Names) {
    let names = Names::unique();
    let server = consuming(names.server_config()).await;
    (server, names)
}

/// Publishes the default payment (to `s_1`) and waits for its confirm.
async fn publish_payment(publisher: &Publisher, names: &Names) {
    let body = payment().to_string();
    let properties = BasicProperties::default();
    publisher
        .publish(
            &names.exchange,
            "PAYMENT_PROCESSED",
            body.as_bytes(),
            properties,
        )
        .await;
}

fn payment() -> Value {
    json!({"paymentId":"p_1","studentId":"s_1","consultantId":"c_1","amount":4900,"currency":"USD","status":"succeeded"})
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_events_reach_the_right_clients_with_the_protocol_frames() {
    let (server, names) = server_with_broker().await;
    let publisher = Publisher::connect().await;
    let (mut student, mut consultant) = student_and_consultant(&server).await;

    publish_payment(&publisher, &names).await;
    let push = student.recv().await;
    assert_eq!(push["event"], "paymentProcessed");
    assert_eq!(
        push["data"],
        json!({"paymentId":"p_1","amount":4900,"currency":"USD","status":"succeeded","consultantId":"c_1"})
    );
    assert!(push["id"].is_string());

    let review = json!({"reviewId":"r_1","consultantId":"c_1","studentId":"s_1","rating":5,"comment":"Great session"});
    publisher
        .publish(
            &names.exchange,
            "REVIEW_ADDED",
            review.to_string().as_bytes(),
            BasicProperties::default(),
        )
        .await;
    let push = consultant.recv().await;
    assert_eq!(push["event"], "reviewAdded");
    assert_eq!(
        push["data"],
        json!({"reviewId":"r_1","studentId":"s_1","rating":5,"comment":"Great session"})
    );
    assert_eq!(
        student.try_recv(Duration::from_millis(300)).await,
        None,
        "only the addressed user receives it"
    );

    // The AMQP `type` property names the event instead of the routing key.
    let typed = BasicProperties::default().with_type("REVIEW_ADDED".into());
    publisher
        .publish(
            &names.exchange,
            "PAYMENT_PROCESSED",
            review.to_string().as_bytes(),
            typed,
        )
        .await;
    assert_eq!(consultant.recv().await["event"], "reviewAdded");
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_events_for_one_user_arrive_in_queue_order() {
    let (server, names) = server_with_broker().await;
    let publisher = Publisher::connect().await;
    let mut student = Client::connect_as(&server, "s_1", "student").await;
    // Back to back, so that up to the prefetch (64) are taken at once and
    // their log writes overlap: the pushes must still keep queue order.
    const EVENTS: usize = 300;
    let bodies: Vec<Vec<u8>> = (0..EVENTS)
        .map(|n| {
            let mut body = payment();
            body["paymentId"] = json!(format!("p_{n}"));
            body.to_string().into_bytes()
        })
        .collect();
    publisher
        .publish_all(&names.exchange, "PAYMENT_PROCESSED", &bodies)
        .await;
    for n in 0..EVENTS {
        let push = student.recv().await;
        assert_eq!(push["data"]["paymentId"], format!("p_{n}"), "{push}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_are_dead_lettered_with_the_reason_and_consumption_continues() {
    let (server, names) = server_with_broker().await;
    let publisher = Publisher::connect().await;
    let mut student = Client::connect_as(&server, "s_1", "student").await;

    publisher
        .publish(
            &names.exchange,
            "PAYMENT_PROCESSED",
            b"{not json",
            BasicProperties::default(),
        )
        .await;
    let (key, body, reason) = publisher.dead_letter(&names.dead).await;
    assert_eq!(
        (key.as_str(), body.as_slice()),
        ("PAYMENT_PROCESSED", &b"{not json"[..])
    );
    assert!(reason.contains("not JSON"), "{reason}");

    publisher
        .publish(
            &names.exchange,
            "PAYMENT_PROCESSED",
            br#"{"paymentId":"p_1"}"#,
            BasicProperties::default(),
        )
        .await;
    let (_, _, reason) = publisher.dead_letter(&names.dead).await;
    assert!(reason.contains("studentId"), "{reason}");

    // A body over 1 MiB (valid JSON, a valid event): too_large, unread.
    let large = format!(
        r#"{{"paymentId":"p_1","studentId":"s_1","pad":"{}"}}"#,
        "x".repeat(1 << 20)
    );
    publisher
        .publish(
            &names.exchange,
            "PAYMENT_PROCESSED",
            large.as_bytes(),
            BasicProperties::default(),
        )
        .await;
    let (_, body, reason) = publisher.dead_letter(&names.dead).await;
    assert_eq!(reason, "too_large");
    assert_eq!(body.len(), large.len(), "the message is kept whole");

    // A plugin that does not take the event: here a type nobody handles.
    let unknown = BasicProperties::default().with_type("NOBODY_HANDLES".into());
    publisher
        .publish(&names.exchange, "PAYMENT_PROCESSED", b"{}", unknown)
        .await;
    let (_, _, reason) = publisher.dead_letter(&names.dead).await;
    assert!(reason.contains("no handler"), "{reason}");

    publish_payment(&publisher, &names).await;
    assert_eq!(
        student.recv().await["event"],
        "paymentProcessed",
        "consumption continues"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_message_id_twice_is_delivered_once_and_shares_the_http_namespace() {
    let (server, names) = server_with_broker().await;
    let publisher = Publisher::connect().await;
    let mut student = Client::connect_as(&server, "s_1", "student").await;
    for _ in 0..2 {
        publisher
            .publish(
                &names.exchange,
                "PAYMENT_PROCESSED",
                payment().to_string().as_bytes(),
                with_message_id("pay-42"),
            )
            .await;
    }
    assert_eq!(student.recv().await["event"], "paymentProcessed");
    assert_eq!(
        student.try_recv(Duration::from_millis(700)).await,
        None,
        "no second delivery"
    );

    let again = sockets_tests::client::publish(
        &server,
        &token("billing", "service"),
        &json!({"event": "PAYMENT_PROCESSED", "data": payment(), "id": "pay-42"}),
    )
    .await;
    assert_eq!(again.json()["duplicate"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_broker_degrades_readiness_but_not_the_service() {
    let config =
        ServerConfig::default().env("SOCKETS_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f");
    let server = Server::start_with(config).await;
    let ready = http(&server, "GET", "/readyz", &[], b"").await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["checks"]["broker"]["status"], "degraded");
    let (mut student, mut consultant) = student_and_consultant(&server).await;
    student
        .send(
            &json!({"event": "sendMessage", "data": {"to": "c_1", "text": "still here"}, "ack": 1}),
        )
        .await;
    assert_eq!(student.recv().await["ok"], true);
    assert_eq!(consultant.recv().await["data"]["text"], "still here");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_whose_plugin_keeps_failing_is_retried_then_dead_lettered() {
    let names = Names::unique();
    let config = ServerConfig {
        plugins: vec!["misbehaving", "payments"],
        ..names.server_config()
    };
    let server = consuming(config).await;
    let publisher = Publisher::connect().await;
    publisher
        .publish(&names.exchange, "panic", b"{}", BasicProperties::default())
        .await;
    let (key, _, reason) = publisher.dead_letter(&names.dead).await;
    assert_eq!(key, "panic");
    assert!(reason.contains("failed 3 times"), "{reason}");
    assert!(reason.contains("trapped"), "{reason}");
    // Still consuming afterwards.
    let mut student = Client::connect_as(&server, "s_1", "student").await;
    publish_payment(&publisher, &names).await;
    assert_eq!(student.recv().await["event"], "paymentProcessed");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_intake_queue_declared_by_an_older_host_is_kept_and_consumed() {
    // An older host declared the intake queue as a plain quorum queue,
    // without the dead-letter exchange and delivery limit declared now: the
    // new declaration differs, the broker refuses it (406), and the host
    // keeps the queue as it is, says what policy to add, and consumes.
    let names = Names::unique();
    let connection = lapin::Connection::connect(
        &sockets_tests::broker::amqp_url(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("RabbitMQ is reachable");
    let channel = connection.create_channel().await.unwrap();
    let mut quorum = lapin::types::FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            names.queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            quorum,
        )
        .await
        .unwrap();

    let server = consuming(names.server_config()).await;
    assert!(
        server
            .log()
            .contains("the intake queue exists with other arguments"),
        "{}",
        server.log()
    );
    let mut student = Client::connect_as(&server, "s_1", "student").await;
    Publisher::connect()
        .await
        .publish(
            &names.exchange,
            "PAYMENT_PROCESSED",
            payment().to_string().as_bytes(),
            BasicProperties::default(),
        )
        .await;
    let push = student.recv().await;
    assert_eq!(push["event"], "paymentProcessed", "{push}");
    assert!(server.stop().await);
}

/// With RabbitMQ, an emitted event goes to the events exchange: another
/// service bound to it receives it (with the emitting plugin as app id),
/// and the host's own intake routes it to the plugins subscribed — with
/// the depth limit carried across the broker, so a loop still ends.
#[tokio::test(flavor = "multi_thread")]
async fn emitted_events_are_published_to_the_events_exchange() {
    let names = Names::unique();
    let dir = sockets_tests::server::scratch_dir("emit-broker");
    let file = dir.join("sockets.toml");
    std::fs::write(&file, "[plugins.chat]\nofflineNotify = true\n").unwrap();
    let mut config = names.server_config();
    config.plugins.push("emitter");
    config.args = vec!["--config".into(), file.display().to_string()];
    let server = consuming(config).await;
    let publisher = Publisher::connect().await;
    let notifications = publisher
        .listen(&names.exchange, "NOTIFICATION_REQUESTED")
        .await;
    let mut observer = Client::connect_as(&server, "observer", "user").await;
    let mut student = Client::connect_as(&server, "s_1", "student").await;

    student
        .send(&json!({"event": "sendMessage", "data": {"to": "c_1", "text": "ping"}, "ack": 1}))
        .await;
    let sent = student.recv().await;
    assert_eq!(sent["ok"], true, "{sent}");
    let message = publisher.next_message(&notifications).await;
    let body: Value = serde_json::from_slice(&message.data).unwrap();
    assert_eq!(body["userId"], "c_1");
    assert_eq!(body["ids"]["messageId"], sent["data"]["messageId"]);
    assert_eq!(
        message.properties.app_id().as_ref().map(|id| id.as_str()),
        Some("plugin:chat")
    );
    assert!(
        message.properties.message_id().is_some(),
        "deduplicated by id"
    );

    let requested = observer.next_push("notificationRequested").await;
    assert_eq!(requested["data"]["origin"], "plugin:chat", "{requested}");
    assert_eq!(requested["data"]["data"], body);

    // A loop through the broker stops at the depth limit too.
    publisher
        .publish(
            &names.exchange,
            "PING_LOOP",
            br#"{"n":1}"#,
            BasicProperties::default(),
        )
        .await;
    let depth = usize::from(sockets_host::dispatch::MAX_EMIT_DEPTH);
    let mut loops = 0;
    while let Some(frame) = observer.try_recv(Duration::from_secs(3)).await {
        if frame["event"] == "loop" {
            loops += 1;
        }
    }
    assert_eq!(loops, depth + 1, "the original and {depth} emitted levels");
    server.stop().await;
}
