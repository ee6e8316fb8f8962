//! `fanout`: N connected users; E backend events (`PAYMENT_PROCESSED`, one
//! user each, round robin) published through the HTTP API, C requests at
//! once, or to RabbitMQ with C unconfirmed publishes at once: events per
//! second from first publish to last push, and publish-to-push latency.
//!
//! As fast as possible, a RabbitMQ run's latency is mostly queueing: the
//! broker confirms a publish once queued, so the publisher can run ahead
//! of the consumer and a backlog formed early stays. With a rate, events
//! are published on a fixed schedule (still at most C at once) and the
//! latency is the path's own.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::peer::{self, Incoming, Target};
use crate::stats::Latencies;
use crate::{Tokens, source_address};

const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Options {
    pub target: Target,
    pub server: SocketAddr,
    pub users: usize,
    pub schedule: Schedule,
    /// Publish through RabbitMQ instead of the HTTP API.
    pub amqp: Option<Amqp>,
    /// Idempotency keys `<prefix><n>`, when set.
    pub keys: Option<String>,
}

/// A key prefix no earlier run used (keys are remembered 15 minutes).
pub fn run_key_prefix() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis());
    format!("loadgen-{}-{millis}-", std::process::id())
}

/// How many events are published, how many at once, and how fast.
pub struct Schedule {
    pub events: usize,
    /// Publishes in flight (HTTP requests or unconfirmed AMQP publishes).
    pub concurrency: usize,
    /// Events per second; `None`: as fast as the concurrency allows.
    pub rate: Option<f64>,
}

impl Schedule {
    /// At least one publish in flight; a rate of 0 means unpaced.
    pub fn new(events: usize, concurrency: usize, rate: Option<f64>) -> Self {
        Self {
            events,
            concurrency: concurrency.max(1),
            rate: rate.filter(|rate| *rate > 0.0),
        }
    }
}

/// Where the host's broker intake consumes from.
pub struct Amqp {
    pub url: String,
    pub exchange: String,
}

pub async fn run(options: Options, tokens: &Tokens) -> anyhow::Result<Value> {
    let started = Instant::now();
    let schedule = &options.schedule;
    let mut receivers = Vec::new();
    for user in 0..options.users {
        let socket = peer::connect(
            options.target,
            options.server,
            source_address(user),
            &tokens.mint(&format!("fan_{user}"), "student"),
        )
        .await?;
        let expected = (0..schedule.events)
            .filter(|n| n % options.users == user)
            .count();
        receivers.push(tokio::spawn(receive(
            options.target,
            socket,
            expected,
            started,
        )));
    }
    let payment = |n: usize| payment(n, started, &format!("fan_{}", n % options.users));
    let (publishing, refused) = match &options.amqp {
        None => {
            let service = tokens.mint("bench-service", "service");
            let publishing = Instant::now();
            let refused = publish_http(&options, &service, payment).await;
            (publishing, refused)
        }
        Some(amqp) => {
            let (_connection, channel) = amqp_channel(&amqp.url).await?;
            let publishing = Instant::now();
            let refused = publish_amqp(
                schedule,
                &channel,
                &amqp.exchange,
                "PAYMENT_PROCESSED",
                options.keys.as_deref(),
                payment,
            )
            .await;
            (publishing, refused)
        }
    };
    let mut arrivals = Arrivals::default();
    for receiver in receivers {
        arrivals.merge(receiver.await??);
    }
    let seconds = publishing.elapsed().as_secs_f64();
    let mut summary = json!({
        "run": "fanout",
        "target": format!("{:?}", options.target).to_lowercase(),
        "via": if options.amqp.is_some() { "rabbitmq" } else { "http" },
        "users": options.users,
        "keyed": options.keys.is_some(),
    });
    arrivals.report(
        &mut summary,
        schedule,
        refused,
        seconds,
        "publish_to_push_latency",
    );
    Ok(summary)
}

/// The payments a run received: each distinct one's latency, and how many
/// came more than once.
#[derive(Default)]
pub struct Arrivals {
    /// Microseconds from publish to the first arrival, by payment id.
    latency_by_id: HashMap<String, u64>,
    duplicated: usize,
}

impl Arrivals {
    /// Counts a payment payload (`payment`) that arrived just now.
    pub fn note(&mut self, data: &str, started: Instant) -> anyhow::Result<()> {
        let (id, sent) = payment_id(data)?;
        let latency = (started.elapsed().as_micros() as u64).saturating_sub(sent);
        self.add(id, latency);
        Ok(())
    }

    fn add(&mut self, id: String, latency: u64) {
        match self.latency_by_id.entry(id) {
            Entry::Vacant(first) => {
                first.insert(latency);
            }
            Entry::Occupied(_) => self.duplicated += 1,
        }
    }

    /// How many distinct payments arrived.
    pub fn distinct(&self) -> usize {
        self.latency_by_id.len()
    }

    /// Adds another receiver's arrivals; a payment both saw (one of them
    /// was not its recipient) counts as duplicated.
    pub fn merge(&mut self, other: Arrivals) {
        for (id, latency) in other.latency_by_id {
            self.add(id, latency);
        }
        self.duplicated += other.duplicated;
    }

    /// Adds what every publishing run reports to its `summary` object: the
    /// schedule; how many events were refused, received, lost and
    /// duplicated; how fast they came over `seconds`; and their latency
    /// under `latency_key`.
    pub fn report(
        self,
        summary: &mut Value,
        schedule: &Schedule,
        refused: usize,
        seconds: f64,
        latency_key: &str,
    ) {
        let received = self.distinct();
        let counts = json!({
            "events": schedule.events,
            "concurrency": schedule.concurrency,
            "rate_per_s": schedule.rate,
            "refused": refused,
            "received": received,
            "lost": schedule.events.saturating_sub(received + refused),
            "duplicated": self.duplicated,
            "events_per_s": received as f64 / seconds,
        });
        if let (Value::Object(summary), Value::Object(counts)) = (&mut *summary, counts) {
            summary.extend(counts);
        }
        let mut latencies = Latencies::default();
        for latency in self.latency_by_id.into_values() {
            latencies.push(latency);
        }
        summary[latency_key] = latencies.summary();
    }
}

/// Reads pushes until `expected` distinct ones arrived (or none came for
/// a while).
async fn receive(
    target: Target,
    socket: peer::Socket,
    expected: usize,
    started: Instant,
) -> anyhow::Result<Arrivals> {
    let (mut writer, mut reader) = socket.split();
    let mut arrivals = Arrivals::default();
    while arrivals.distinct() < expected {
        let incoming = tokio::time::timeout(
            RECEIVE_TIMEOUT,
            peer::read(target, &mut reader, &mut writer),
        )
        .await;
        let Ok(incoming) = incoming else { break };
        if let Incoming::Push { data, .. } = incoming? {
            arrivals.note(data.get(), started)?;
        }
    }
    Ok(arrivals)
}

/// The `n`th `PAYMENT_PROCESSED` payload, for `student`; its `paymentId`
/// is `"<n>:<micros since started>"`.
pub fn payment(n: usize, started: Instant, student: &str) -> Value {
    json!({"paymentId": format!("{n}:{}", started.elapsed().as_micros()),
        "studentId": student, "amount": 4900})
}

/// A payment payload's `paymentId` and the send time it carries (micros
/// since the run started).
fn payment_id(data: &str) -> anyhow::Result<(String, u64)> {
    let id = serde_json::from_str::<Value>(data)?["paymentId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let sent = id
        .split_once(':')
        .and_then(|(_, micros)| micros.parse().ok())
        .unwrap_or(0);
    Ok((id, sent))
}

/// Publishes through `POST /api/events`, C requests in flight; how many
/// were not accepted.
async fn publish_http(options: &Options, service: &str, payment: impl Fn(usize) -> Value) -> usize {
    publish_bounded(&options.schedule, |n| {
        let mut body = json!({"event": "PAYMENT_PROCESSED", "data": payment(n)});
        if let Some(prefix) = &options.keys {
            body["id"] = Value::String(format!("{prefix}{n}"));
        }
        async move { matches!(post(options.server, service, &body).await, Ok(202)) }
    })
    .await
}

/// Runs `publish(n)` for every event, at most C at once and, with a rate,
/// not before its time; how many were not accepted (the future resolved to
/// `false`).
async fn publish_bounded<F>(schedule: &Schedule, publish: impl Fn(usize) -> F) -> usize
where
    F: Future<Output = bool>,
{
    let started = tokio::time::Instant::now();
    let interval = schedule
        .rate
        .map(|rate| Duration::from_secs_f64(1.0 / rate));
    let mut in_flight: FuturesUnordered<F> = FuturesUnordered::new();
    let mut refused = 0usize;
    for n in 0..schedule.events {
        let due = interval.map(|interval| started + interval.mul_f64(n as f64));
        // Publishes in flight are driven while this one waits.
        loop {
            let slot_free = in_flight.len() < schedule.concurrency;
            let due_now = due.is_none_or(|due| tokio::time::Instant::now() >= due);
            if slot_free && due_now {
                break;
            }
            tokio::select! {
                Some(accepted) = in_flight.next(), if !in_flight.is_empty() => {
                    if !accepted {
                        refused += 1;
                    }
                }
                () = tokio::time::sleep_until(due.unwrap_or(started)), if slot_free => {}
            }
        }
        in_flight.push(publish(n));
    }
    while let Some(accepted) = in_flight.next().await {
        if !accepted {
            refused += 1;
        }
    }
    refused
}

/// A connection and its channel with publisher confirms.
pub async fn amqp_channel(url: &str) -> anyhow::Result<(Connection, Channel)> {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|err| anyhow::anyhow!("RabbitMQ is not reachable at {url}: {err}"))?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((connection, channel))
}

/// Publishes to the exchange with the routing key, C unconfirmed at once;
/// how many the broker did not confirm.
pub async fn publish_amqp(
    schedule: &Schedule,
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    keys: Option<&str>,
    payment: impl Fn(usize) -> Value,
) -> usize {
    publish_bounded(schedule, |n| {
        let body = payment(n).to_string();
        let mut properties =
            BasicProperties::default().with_content_type("application/json".into());
        if let Some(prefix) = keys {
            properties = properties.with_message_id(format!("{prefix}{n}").into());
        }
        async move {
            let published = channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    properties,
                )
                .await;
            match published {
                Ok(confirm) => matches!(confirm.await, Ok(confirmation) if confirmation.is_ack()),
                Err(_) => false,
            }
        }
    })
    .await
}

/// One `POST /api/events` over its own connection; the status code.
async fn post(server: SocketAddr, token: &str, body: &Value) -> anyhow::Result<u16> {
    let body = body.to_string();
    let mut stream = TcpStream::connect(server).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "POST /api/events HTTP/1.1\r\nhost: {server}\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let status_line = String::from_utf8_lossy(&response);
    let status = status_line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("no HTTP status"))?
        .parse()?;
    Ok(status)
}
