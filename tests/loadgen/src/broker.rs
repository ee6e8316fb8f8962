//! `broker`: RabbitMQ alone, the floor under `fanout --amqp`. The same
//! publishes (confirms, C in flight, optionally paced) go to a quorum queue
//! of the run's own, declared as the host declares its intake queue, and a
//! plain lapin consumer with the host's default prefetch acks each as it
//! arrives: events/s and publish-to-consume latency. What `fanout --amqp`
//! measures beyond this is the gateway's part (its consumer, the plugin
//! call, the WebSocket push and its read).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Consumer};
use serde_json::{Value, json};

use crate::fanout::{Arrivals, Schedule, amqp_channel, payment, publish_amqp};

/// How long the consumer waits for a next message before giving up.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Options {
    pub url: String,
    pub schedule: Schedule,
    /// Unacknowledged messages the consumer may hold (the host's
    /// `SOCKETS_AMQP_PREFETCH`, 64 by default).
    pub prefetch: u16,
}

pub async fn run(options: Options) -> anyhow::Result<Value> {
    let started = Instant::now();
    let schedule = &options.schedule;
    let (connection, channel) = amqp_channel(&options.url).await?;
    // One queue per run: nothing left from an earlier run is counted.
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH)?;
    let queue = format!(
        "loadgen.broker.{}.{}",
        std::process::id(),
        since_epoch.as_nanos()
    );
    declare_quorum_queue(&channel, &queue).await?;

    let consuming = connection.create_channel().await?;
    consuming
        .basic_qos(options.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = consuming
        .basic_consume(
            queue.as_str().into(),
            "loadgen".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let events = schedule.events;
    let consumed = tokio::spawn(async move {
        let arrivals = consume(&mut consumer, events, started).await;
        (arrivals, consumer)
    });

    let publishing = Instant::now();
    let refused = publish_amqp(schedule, &channel, "", &queue, None, |n| {
        payment(n, started, "broker")
    })
    .await;
    let (arrivals, consumer) = consumed.await?;
    let arrivals = arrivals?;
    let seconds = publishing.elapsed().as_secs_f64();
    // Cancelled and confirmed before the queue goes: a consumer dropped
    // while its queue is deleted makes lapin fail the connection.
    consuming
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await?;
    drop(consumer);
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    let mut summary = json!({
        "run": "broker",
        "via": "rabbitmq",
        "prefetch": options.prefetch,
    });
    arrivals.report(
        &mut summary,
        schedule,
        refused,
        seconds,
        "publish_to_consume_latency",
    );
    Ok(summary)
}

/// A durable quorum queue, as the host's intake queue is. The broker
/// deletes it a minute after its last use, should the run fail before
/// deleting it.
async fn declare_quorum_queue(channel: &Channel, queue: &str) -> lapin::Result<()> {
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    quorum.insert("x-expires".into(), AMQPValue::LongInt(60_000));
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel.queue_declare(queue.into(), options, quorum).await?;
    Ok(())
}

/// Acks messages until `expected` distinct ones arrived (or none came for
/// a while).
async fn consume(
    consumer: &mut Consumer,
    expected: usize,
    started: Instant,
) -> anyhow::Result<Arrivals> {
    let mut arrivals = Arrivals::default();
    while arrivals.distinct() < expected {
        let Ok(next) = tokio::time::timeout(RECEIVE_TIMEOUT, consumer.next()).await else {
            break;
        };
        let Some(delivery) = next else { break };
        let delivery = delivery?;
        arrivals.note(std::str::from_utf8(&delivery.data)?, started)?;
        delivery.ack(BasicAckOptions::default()).await?;
    }
    Ok(arrivals)
}
