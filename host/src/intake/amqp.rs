//! The RabbitMQ intake (PROTOCOL.md §5): backend events from the
//! `sockets.events` topic exchange into the router, acknowledged only after
//! their deliveries were queued and logged; what can never be processed is
//! dead-lettered with the reason, never dropped and never requeued forever.
//! With `cluster`, the only modules that know lapin.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::{oneshot, watch};

use super::{Accepted, Idempotency};
use crate::backoff::Backoff;
use crate::health::Health;
use crate::plugin::{Event, Origin, PluginRegistry};
use crate::protocol::{is_valid_event_name, new_id, rfc3339};
use crate::router::{Inbound, RouteError, Router};
use crate::store::Source;

/// The header that carries why a message was dead-lettered.
pub const REASON_HEADER: &str = "x-sockets-reason";
/// Largest event body taken from the broker (PROTOCOL §5: 1 MiB).
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// The dead-letter reason of a body over [`MAX_BODY_BYTES`].
pub const TOO_LARGE: &str = "too_large";

/// Where and how to consume.
#[derive(Debug, Clone)]
pub struct AmqpSettings {
    /// The broker URL.
    pub url: String,
    /// Topic exchange events are published to.
    pub exchange: String,
    /// Exchange dead letters go to (with a queue of the same name bound to
    /// everything, so they are kept).
    pub dead_exchange: String,
    /// The durable intake queue all nodes share.
    pub queue: String,
    /// Direct exchange carrying deliveries between nodes; each node's queue
    /// is named after it (`<exchange>.<instance id>`).
    pub nodes_exchange: String,
    /// Whether deliveries cross nodes (off: this node is the only one).
    pub cluster: bool,
    /// The key every cluster message is signed with (HMAC-SHA256); required
    /// when `cluster` is on.
    pub cluster_key: Option<String>,
    /// Unacknowledged messages in flight per node.
    pub prefetch: u16,
    /// Attempts for an event whose plugin malfunctions before it is
    /// dead-lettered.
    pub max_attempts: u32,
}

/// What the intake needs from the rest of the host.
pub struct AmqpIntake {
    /// Where and how.
    pub settings: AmqpSettings,
    /// Event routing.
    pub router: Arc<Router>,
    /// The loaded plugins (their subscriptions decide the bindings).
    pub plugins: Arc<PluginRegistry>,
    /// Shared with the HTTP API: one idempotency namespace.
    pub idempotency: Arc<Idempotency>,
    /// Reported by `/readyz`.
    pub status: Arc<Health>,
}

/// Reconnecting to the broker: 0.2 s doubling to 10 s, plus up to 250 ms.
pub(crate) const RECONNECT: Backoff =
    Backoff::new(Duration::from_millis(200), Duration::from_secs(10), 250);
/// How long shutdown waits for the messages being processed.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);
/// How often bindings are brought in step with the plugins' subscriptions.
const BINDINGS_EVERY: Duration = Duration::from_millis(500);

impl AmqpIntake {
    /// Consumes until `shutdown` flips, reconnecting with backoff and jitter
    /// whenever the broker is unreachable or the connection drops.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = RECONNECT;
        loop {
            let session = self.session(&mut shutdown, &mut backoff);
            let wait = match session.await {
                Ok(()) => return,
                Err(err) => {
                    let wait = backoff.next_wait();
                    tracing::warn!("broker unavailable, retrying in {wait:?}: {err}");
                    self.status.set(Some(err.to_string()));
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stopped(&mut shutdown) => return,
            }
        }
    }

    /// One connection: declare, bind, consume. `Ok` only on shutdown.
    async fn session(
        &self,
        shutdown: &mut watch::Receiver<bool>,
        backoff: &mut Backoff,
    ) -> lapin::Result<()> {
        let settings = &self.settings;
        let connection = Connection::connect(
            &settings.url,
            ConnectionProperties::default().with_connection_name("sockets-host".into()),
        )
        .await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channel
            .basic_qos(settings.prefetch, BasicQosOptions::default())
            .await?;
        declare(&channel, settings).await?;
        let mut bound = BTreeSet::new();
        self.sync_bindings(&channel, &mut bound).await?;

        let mut consumer = channel
            .basic_consume(
                settings.queue.as_str().into(),
                format!("sockets-host-{}", new_id()).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.status.set(None);
        // Connected: the next outage starts again from the shortest wait.
        backoff.reset();
        tracing::info!(queue = %settings.queue, exchange = %settings.exchange, "consuming broker events");

        let mut bindings = tokio::time::interval(BINDINGS_EVERY);
        // Messages are processed concurrently (up to the prefetch) so that
        // their log writes commit together, but each waits for its
        // predecessor's turn before delivering: pushes keep queue order.
        let mut in_flight = FuturesUnordered::new();
        let (first_turn, mut turn) = oneshot::channel();
        let _ = first_turn.send(());
        loop {
            tokio::select! {
                _ = stopped(shutdown) => break,
                _ = bindings.tick() => self.sync_bindings(&channel, &mut bound).await?,
                Some(processed) = in_flight.next(), if !in_flight.is_empty() => processed?,
                delivery = consumer.next() => match delivery {
                    Some(delivery) => {
                        let (next, next_turn) = oneshot::channel();
                        let mine = std::mem::replace(&mut turn, next_turn);
                        in_flight.push(self.process(&channel, delivery?, mine, next));
                    }
                    None => return Err(lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(
                        lapin::ConnectionState::Closed,
                    ))),
                },
            }
        }
        // Let what was being processed finish (acks included), for a while:
        // an event waiting for an unreachable database is left unacked and
        // goes back to the queue.
        let drained = tokio::time::timeout(SHUTDOWN_DRAIN, async {
            while let Some(processed) = in_flight.next().await {
                processed?;
            }
            Ok::<(), lapin::Error>(())
        })
        .await;
        if let Ok(drained) = drained {
            drained?;
        }
        let _ = connection.close(200, "shutting down".into()).await;
        Ok(())
    }

    /// Binds the queue to every event some plugin subscribes to, and unbinds
    /// the ones no plugin takes any more.
    async fn sync_bindings(
        &self,
        channel: &Channel,
        bound: &mut BTreeSet<String>,
    ) -> lapin::Result<()> {
        let wanted: BTreeSet<String> = self
            .plugins
            .snapshot()
            .events()
            .map(str::to_owned)
            .collect();
        let settings = &self.settings;
        for event in wanted.difference(bound) {
            channel
                .queue_bind(
                    settings.queue.as_str().into(),
                    settings.exchange.as_str().into(),
                    event.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        for event in bound.difference(&wanted) {
            channel
                .queue_unbind(
                    settings.queue.as_str().into(),
                    settings.exchange.as_str().into(),
                    event.as_str().into(),
                    FieldTable::default(),
                )
                .await?;
        }
        *bound = wanted;
        Ok(())
    }

    /// Routes one message, then acks, retries or dead-letters it. Delivers
    /// once `turn` resolves (the previous message delivered), and lets the
    /// next one go by dropping `next` after delivering.
    async fn process(
        &self,
        channel: &Channel,
        delivery: Delivery,
        turn: oneshot::Receiver<()>,
        next: oneshot::Sender<()>,
    ) -> lapin::Result<()> {
        let _ = turn.await;
        let properties = &delivery.properties;
        let name = properties
            .kind()
            .as_ref()
            .map(ShortString::as_str)
            .unwrap_or(delivery.routing_key.as_str())
            .to_owned();
        let key = properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned());
        let from = properties
            .app_id()
            .as_ref()
            .map_or_else(|| "broker".to_owned(), |app| app.as_str().to_owned());

        // PROTOCOL §5 (v1.1): refused before it is parsed or shown to a
        // plugin, with the reason a dead-letter consumer can match on.
        if delivery.data.len() > MAX_BODY_BYTES {
            return self.dead_letter(channel, &delivery, &name, TOO_LARGE).await;
        }
        let data = match std::str::from_utf8(&delivery.data)
            .ok()
            .filter(|text| serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok())
        {
            Some(text) => text.to_owned(),
            None => {
                return self
                    .dead_letter(channel, &delivery, &name, "the body is not JSON")
                    .await;
            }
        };
        if !is_valid_event_name(&name) {
            return self
                .dead_letter(channel, &delivery, &name, "invalid event name")
                .await;
        }

        let routed = self
            .idempotency
            .run(key.as_deref(), || {
                let event_id = key.clone().unwrap_or_else(new_id);
                let name = name.clone();
                async move {
                    let inbound = Inbound {
                        event: Event {
                            id: event_id.clone(),
                            name,
                            origin: Origin::Broker,
                            data: data.clone(),
                            received_at: rfc3339(SystemTime::now()),
                        },
                        source: Source::Broker,
                        from: from.clone(),
                    };
                    let delivered = self.router.deliver(&inbound).await;
                    drop(next);
                    let routed = self.router.record(delivered?).await?;
                    Ok::<_, RouteError>(Accepted {
                        event_id,
                        recipients: routed.recipients,
                    })
                }
            })
            .await;

        match routed {
            Ok(_) => delivery.ack(BasicAckOptions::default()).await.map(drop),
            Err(err @ (RouteError::UnknownEvent(_) | RouteError::Refused { .. })) => {
                tracing::info!(event = %name, "broker event rejected: {err}");
                self.dead_letter(channel, &delivery, &name, &err.to_string())
                    .await
            }
            Err(err @ RouteError::PluginFailed { .. }) => {
                let attempts = delivery_count(&delivery) + 1;
                if attempts >= self.settings.max_attempts {
                    let reason = format!("failed {attempts} times: {err}");
                    self.dead_letter(channel, &delivery, &name, &reason).await
                } else {
                    tracing::warn!(event = %name, attempts, "broker event failed, will retry: {err}");
                    requeue(&delivery).await
                }
            }
            Err(err @ RouteError::Store(_)) => {
                // Not the message's fault: keep it, slow down, try again.
                tracing::warn!(event = %name, "broker event not logged, will retry: {err}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                requeue(&delivery).await
            }
        }
    }

    /// Publishes the message to the dead-letter exchange with the reason,
    /// waits for the broker's confirmation, then acks the original.
    async fn dead_letter(
        &self,
        channel: &Channel,
        delivery: &Delivery,
        name: &str,
        reason: &str,
    ) -> lapin::Result<()> {
        tracing::warn!(event = %name, "dead-lettering broker event: {reason}");
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
        let properties = delivery.properties.clone().with_headers(headers);
        channel
            .basic_publish(
                self.settings.dead_exchange.as_str().into(),
                delivery.routing_key.clone(),
                BasicPublishOptions::default(),
                &delivery.data,
                properties,
            )
            .await?
            .await?;
        delivery.ack(BasicAckOptions::default()).await.map(drop)
    }
}

async fn requeue(delivery: &Delivery) -> lapin::Result<()> {
    let options = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    delivery.nack(options).await.map(drop)
}

/// Earlier deliveries of this message: quorum queues count them in
/// `x-delivery-count`; a classic queue only says `redelivered`.
fn delivery_count(delivery: &Delivery) -> u32 {
    let counted = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get("x-delivery-count").cloned())
        .and_then(|value| match value {
            AMQPValue::LongLongInt(n) => u32::try_from(n).ok(),
            AMQPValue::LongInt(n) => u32::try_from(n).ok(),
            AMQPValue::LongUInt(n) => Some(n),
            AMQPValue::ShortInt(n) => u32::try_from(n).ok(),
            AMQPValue::ShortUInt(n) => Some(u32::from(n)),
            _ => None,
        });
    counted.unwrap_or(u32::from(delivery.redelivered))
}

/// Declares the exchanges, the intake queue (quorum, so it survives a
/// broker node and counts redeliveries) and the dead-letter queue.
async fn declare(channel: &Channel, settings: &AmqpSettings) -> lapin::Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            settings.exchange.as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            settings.dead_exchange.as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
    let queue = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(settings.queue.as_str().into(), queue, quorum)
        .await?;
    channel
        .queue_declare(
            settings.dead_exchange.as_str().into(),
            queue,
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            settings.dead_exchange.as_str().into(),
            settings.dead_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Resolves once the server shuts down (without holding the watch's lock).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
