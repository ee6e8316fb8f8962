//! Resilience of the RabbitMQ intake: the broker restarts while events are
//! being published with publisher confirms; every confirmed event reaches
//! its client exactly once. In a test binary of its own, because it
//! restarts the shared broker.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::json;
use sockets_tests::broker::{Names, amqp_url};
use sockets_tests::client::{Client, http};
use sockets_tests::server::{Server, token};

const EVENTS: usize = 1000;

async fn channel() -> Option<(Connection, Channel)> {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .ok()?;
    let channel = connection.create_channel().await.ok()?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .ok()?;
    Some((connection, channel))
}

/// Publishes event `i` until the broker confirms it (at-least-once: a lost
/// confirmation means a republish with the same `message_id`).
async fn publish_confirmed(link: &mut Option<(Connection, Channel)>, exchange: &str, i: usize) {
    let body = json!({"paymentId": format!("p_{i}"), "studentId": "s_1", "amount": i}).to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if link.is_none() {
            *link = channel().await;
        }
        if let Some((_, channel)) = link.as_ref() {
            let properties = BasicProperties::default()
                .with_message_id(format!("restart-{i}").as_str().into())
                .with_content_type("application/json".into());
            let sent = channel
                .basic_publish(
                    exchange.into(),
                    "PAYMENT_PROCESSED".into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    properties,
                )
                .await;
            if let Ok(confirm) = sent
                && let Ok(confirmation) = confirm.await
                && confirmation.is_ack()
            {
                return;
            }
            *link = None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("event {i} was never confirmed by the broker");
}

fn rabbitmqctl(args: &[&str]) {
    let status = std::process::Command::new("rabbitmqctl")
        .args(args)
        .status()
        .expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_restart_loses_and_duplicates_no_confirmed_event() {
    let names = Names::unique();
    let server = Server::start_with(names.server_config()).await;
    let ready = async {
        for _ in 0..200 {
            if http(&server, "GET", "/readyz", &[], b"").await.status == 200 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    assert!(ready.await, "the server never consumed: {}", server.log());
    let mut student = Client::connect(&server, &token("s_1", "student")).await.0;

    let exchange = names.exchange.clone();
    let publisher = tokio::spawn(async move {
        let mut link = channel().await;
        for i in 0..EVENTS {
            if i == EVENTS / 3 {
                // Restart the broker's application: every connection drops.
                tokio::task::spawn_blocking(|| {
                    rabbitmqctl(&["stop_app"]);
                    rabbitmqctl(&["start_app"]);
                    rabbitmqctl(&["await_startup"]);
                })
                .await
                .unwrap();
            }
            publish_confirmed(&mut link, &exchange, i).await;
        }
    });

    let mut seen: HashMap<String, u32> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.len() < EVENTS && Instant::now() < deadline {
        if let Some(push) = student.try_recv(Duration::from_millis(500)).await {
            let payment = push["data"]["paymentId"].as_str().unwrap().to_owned();
            *seen.entry(payment).or_default() += 1;
        }
    }
    publisher.await.unwrap();
    // Anything late would show up as a duplicate now.
    while let Some(push) = student.try_recv(Duration::from_secs(2)).await {
        *seen
            .entry(push["data"]["paymentId"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let missing: Vec<usize> = (0..EVENTS)
        .filter(|i| !seen.contains_key(&format!("p_{i}")))
        .collect();
    assert!(
        missing.is_empty(),
        "lost {} events, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let duplicated: Vec<_> = seen.iter().filter(|(_, count)| **count > 1).collect();
    assert!(duplicated.is_empty(), "duplicated: {duplicated:?}");
    let ready = http(&server, "GET", "/readyz", &[], b"").await;
    assert_eq!(ready.status, 200, "the intake recovered: {}", ready.body);
}
