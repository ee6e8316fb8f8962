//! Broker events per second, publish to client, through the gateway versus
//! a plain lapin consume-and-ack loop on the same broker (issue #5). Both
//! run in one process, alternating, so the ratio is measured side by side.
//! Prints one JSON object.
//!
//! ```sh
//! scripts/services.sh     # RabbitMQ on 127.0.0.1
//! SOCKETS_TEST_HOST_PROFILE=release \
//!     cargo run --release -p sockets-tests --example broker_throughput -- 20000 2
//! ```
//!
//! Bounded: EVENTS per run (default 20,000), ROUNDS of each (default 2),
//! every run given at most 120 s. The gateway runs (clustered, the default,
//! and `SOCKETS_AMQP_CLUSTER=false`) each start one `sockets-host`
//! on fresh exchanges and queues, with 8 students connected; every event is
//! a `PAYMENT_PROCESSED` for one of them, published with confirms (1,000 in
//! flight), and counted when its push reaches the student's socket.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::json;
use sockets_tests::broker::{Names, amqp_url, consuming};
use sockets_tests::client::Client;
use sockets_tests::server::token;

const STUDENTS: usize = 8;
const IN_FLIGHT: usize = 1_000;
const RUN_LIMIT: Duration = Duration::from_secs(120);
/// The intake's default prefetch, used by the plain loop too.
const PREFETCH: u16 = 64;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let events: usize = args.next().map_or(Ok(20_000), |n| n.parse())?;
    let rounds: usize = args.next().map_or(Ok(2), |n| n.parse())?;
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .with_context(|| format!("RabbitMQ at {}", amqp_url()))?;

    let mut plain = Vec::new();
    let mut clustered = Vec::new();
    let mut single = Vec::new();
    for _ in 0..rounds {
        plain.push(plain_loop(&connection, events).await?);
        clustered.push(through_gateway(&connection, events, true).await?);
        single.push(through_gateway(&connection, events, false).await?);
    }
    let best = |runs: &[f64]| runs.iter().copied().fold(0.0, f64::max);
    let summary = json!({
        "events": events,
        "rounds": rounds,
        "plain_lapin_events_per_s": plain,
        "gateway_clustered_events_per_s": clustered,
        "gateway_single_node_events_per_s": single,
        "ratio_clustered_best_of_each": best(&clustered) / best(&plain),
        "ratio_single_node_best_of_each": best(&single) / best(&plain),
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

fn payment(n: usize) -> Vec<u8> {
    json!({"paymentId": format!("p_{n}"), "studentId": format!("s_{}", n % STUDENTS),
           "amount": 4900, "currency": "USD", "status": "succeeded"})
    .to_string()
    .into_bytes()
}

/// Publishes `events` payments with publisher confirms, `IN_FLIGHT` at a
/// time.
async fn publish_all(channel: &Channel, exchange: &str, events: usize) -> anyhow::Result<()> {
    let mut confirms = FuturesUnordered::new();
    for n in 0..events {
        if confirms.len() >= IN_FLIGHT
            && let Some(confirm) = confirms.next().await
        {
            let confirm: lapin::Confirmation = confirm?;
            if !confirm.is_ack() {
                bail!("the broker refused a message");
            }
        }
        let confirm = channel
            .basic_publish(
                exchange.into(),
                "PAYMENT_PROCESSED".into(),
                BasicPublishOptions::default(),
                &payment(n),
                BasicProperties::default().with_message_id(format!("bench-{n}").into()),
            )
            .await?;
        confirms.push(confirm);
    }
    while let Some(confirm) = confirms.next().await {
        if !confirm?.is_ack() {
            bail!("the broker refused a message");
        }
    }
    Ok(())
}

async fn publisher(connection: &Connection) -> anyhow::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// The reference: a consumer that acks every message, nothing else.
async fn plain_loop(connection: &Connection, events: usize) -> anyhow::Result<f64> {
    let names = Names::unique();
    let channel = connection.create_channel().await?;
    channel
        .exchange_declare(
            names.exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            names.queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            quorum,
        )
        .await?;
    channel
        .queue_bind(
            names.queue.as_str().into(),
            names.exchange.as_str().into(),
            "PAYMENT_PROCESSED".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            names.queue.as_str().into(),
            "plain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let publish_channel = publisher(connection).await?;

    let started = Instant::now();
    let consume = async {
        for _ in 0..events {
            let delivery = consumer.next().await.context("consumer ended")??;
            delivery.ack(BasicAckOptions::default()).await?;
        }
        anyhow::Ok(())
    };
    let (published, consumed) = tokio::time::timeout(RUN_LIMIT, async {
        tokio::join!(
            publish_all(&publish_channel, &names.exchange, events),
            consume
        )
    })
    .await
    .context("the plain loop took too long")?;
    published?;
    consumed?;
    let rate = events as f64 / started.elapsed().as_secs_f64();
    channel
        .queue_delete(names.queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    Ok(rate)
}

/// The gateway: broker → intake → plugin → log → WebSocket push; with
/// `cluster`, every delivery is also published for other nodes (there are
/// none: the measure is of the cost).
async fn through_gateway(
    connection: &Connection,
    events: usize,
    cluster: bool,
) -> anyhow::Result<f64> {
    let names = Names::unique();
    let config = names
        .server_config()
        .env("SOCKETS_LOG", "warn")
        .env("SOCKETS_AMQP_CLUSTER", cluster.to_string());
    let server = consuming(config).await;
    let mut readers = Vec::new();
    for student in 0..STUDENTS {
        let (client, _) =
            Client::connect(&server, &token(&format!("s_{student}"), "student")).await;
        let expected = (0..events).filter(|n| n % STUDENTS == student).count();
        readers.push(tokio::spawn(async move {
            let mut client = client;
            for _ in 0..expected {
                let push = client.recv().await;
                anyhow::ensure!(push["event"] == "paymentProcessed", "unexpected {push}");
            }
            anyhow::Ok(())
        }));
    }
    let publish_channel = publisher(connection).await?;

    let started = Instant::now();
    let received = async {
        for reader in readers {
            reader.await??;
        }
        anyhow::Ok(())
    };
    let (published, received) = tokio::time::timeout(RUN_LIMIT, async {
        tokio::join!(
            publish_all(&publish_channel, &names.exchange, events),
            received
        )
    })
    .await
    .context("the gateway run took too long")?;
    published?;
    received?;
    let rate = events as f64 / started.elapsed().as_secs_f64();
    server.stop().await;
    Ok(rate)
}
