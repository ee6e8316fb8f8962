//! The RabbitMQ intake (PROTOCOL.md §5): backend events from the
//! `sockets.events` topic exchange into the dispatcher, acknowledged only after
//! their deliveries were queued and logged; what can never be processed is
//! dead-lettered with the reason, never dropped and never requeued forever.
//! With `cluster`, the only modules that know lapin.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::{oneshot, watch};

use super::{Accepted, Idempotency};
use crate::backoff::Backoff;
use crate::dispatch::{Dispatcher, Inbound, RouteError};
use crate::health::Health;
use crate::plugin::{Event, Origin, PluginRegistry};
use crate::protocol::{is_valid_event_name, new_id, rfc3339};
use crate::store::{Source, StoreError};

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
    pub dispatcher: Arc<Dispatcher>,
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
/// A plugin failure is retried after this times the failures so far.
const PLUGIN_RETRY: Duration = Duration::from_millis(100);
/// Retrying an event the store did not take: 0.2 s doubling to 5 s.
const STORE_RETRY: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5), 100);
/// Deliveries of one message the broker allows before it dead-letters it
/// (the host never requeues; these are returns of a host that stopped or
/// lost its connection mid-message, e.g. a message that crashes it).
const DELIVERY_LIMIT: i64 = 20;
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
        declare(&connection, &channel, settings).await?;
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
        let stopping = shutdown.clone();
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
                        in_flight.push(self.process(&channel, &stopping, delivery?, mine, next));
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
        shutdown: &watch::Receiver<bool>,
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
        let depth = properties
            .headers()
            .as_ref()
            .and_then(|headers| headers.inner().get(DEPTH_HEADER))
            .and_then(|value| match value {
                AMQPValue::ShortShortUInt(depth) => Some(*depth),
                other => other.as_long_long_int().and_then(|n| u8::try_from(n).ok()),
            })
            .unwrap_or(0);
        let from = properties
            .app_id()
            .as_ref()
            .map_or_else(|| "broker".to_owned(), |app| app.as_str().to_owned());
        // An event a plugin emitted (`publish_emitted`) stays a plugin's:
        // plugins that trust only backends (`require_backend`) refuse it.
        let origin = match from.strip_prefix("plugin:") {
            Some(plugin) => Origin::Plugin(plugin.to_owned()),
            None => Origin::Broker,
        };

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

        // Retried here, never requeued: a requeued message comes straight
        // back (no delay), and whether the broker counts the requeue
        // toward its delivery limit depends on its version (see
        // `declare`). Waiting here keeps queue order: the next message's
        // turn comes once this one's deliveries are pushed, or once it is
        // given up.
        let next = Mutex::new(Some(next));
        // One event id for every attempt: an attempt that failed after its
        // deliveries were pushed is repeated under the same delivery ids.
        let event_id = key.clone().unwrap_or_else(new_id);
        let mut plugin_failures = 0;
        let mut store_wait = STORE_RETRY;
        let routed = loop {
            let attempt = self
                .idempotency
                .run(key.as_deref(), || {
                    let inbound = Inbound {
                        event: Event {
                            id: event_id.clone(),
                            name: name.clone(),
                            origin: origin.clone(),
                            data: data.clone(),
                            received_at: rfc3339(SystemTime::now()),
                        },
                        source: Source::Broker,
                        from: from.clone(),
                        depth,
                    };
                    let next = &next;
                    async move {
                        let delivered = self.dispatcher.deliver(&inbound).await?;
                        next.lock().unwrap_or_else(PoisonError::into_inner).take();
                        let routed = self.dispatcher.record(delivered).await?;
                        Ok::<_, RouteError>(Accepted {
                            event_id: inbound.event.id,
                            recipients: routed.recipients,
                        })
                    }
                })
                .await;
            match attempt {
                Err(err @ RouteError::PluginFailed { .. }) => {
                    plugin_failures += 1;
                    if plugin_failures >= self.settings.max_attempts {
                        break Err(err);
                    }
                    tracing::warn!(event = %name, attempts = plugin_failures, "broker event failed, will retry: {err}");
                    tokio::time::sleep(PLUGIN_RETRY * plugin_failures).await;
                }
                Err(RouteError::Store(StoreError::Unavailable(err))) => {
                    // Not the message's fault: keep it, slow down, try
                    // again. At shutdown it stays unacknowledged and goes
                    // back to the queue with the connection.
                    tracing::warn!(event = %name, "broker event not logged, will retry: {err}");
                    if *shutdown.borrow() {
                        return Ok(());
                    }
                    tokio::time::sleep(store_wait.next_wait()).await;
                }
                other => break other,
            }
        };
        drop(next);

        match routed {
            Ok(_) => delivery.ack(BasicAckOptions::default()).await.map(drop),
            Err(
                err @ (RouteError::UnknownEvent(_)
                | RouteError::Refused { .. }
                | RouteError::Store(StoreError::Rejected(_))),
            ) => {
                tracing::info!(event = %name, "broker event rejected: {err}");
                self.dead_letter(channel, &delivery, &name, &err.to_string())
                    .await
            }
            Err(err) => {
                let reason = format!("failed {plugin_failures} times: {err}");
                self.dead_letter(channel, &delivery, &name, &reason).await
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

/// The AMQP header carrying how many emitted events led to this one, so
/// that the depth limit holds across the broker.
pub const DEPTH_HEADER: &str = "x-sockets-depth";

/// Publishes emitted events to the events exchange, in order, each
/// confirmed by the broker before the next; reconnects with backoff and
/// keeps the event it was publishing. Stops on shutdown: what is still
/// queued then is lost (emitted events are held in memory only).
pub async fn publish_emitted(
    settings: AmqpSettings,
    mut queue: tokio::sync::mpsc::Receiver<crate::dispatch::Inbound>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = RECONNECT;
    let mut pending: Option<crate::dispatch::Inbound> = None;
    loop {
        let session = async {
            let connection = Connection::connect(
                &settings.url,
                ConnectionProperties::default()
                    .with_connection_name("sockets-host emitted events".into()),
            )
            .await?;
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            backoff.reset();
            loop {
                let inbound = match pending.take() {
                    Some(inbound) => inbound,
                    None => match queue.recv().await {
                        Some(inbound) => inbound,
                        None => return Ok::<_, lapin::Error>(()),
                    },
                };
                let mut headers = FieldTable::default();
                headers.insert(
                    DEPTH_HEADER.into(),
                    AMQPValue::ShortShortUInt(inbound.depth),
                );
                let properties = BasicProperties::default()
                    .with_message_id(ShortString::from(inbound.event.id.as_str()))
                    .with_app_id(ShortString::from(inbound.from.as_str()))
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2)
                    .with_headers(headers);
                let published = async {
                    channel
                        .basic_publish(
                            settings.exchange.as_str().into(),
                            inbound.event.name.as_str().into(),
                            BasicPublishOptions::default(),
                            inbound.event.data.as_bytes(),
                            properties,
                        )
                        .await?
                        .await
                }
                .await;
                if let Err(err) = published {
                    pending = Some(inbound);
                    return Err(err);
                }
            }
        };
        let wait = tokio::select! {
            ended = session => match ended {
                Ok(()) => return,
                Err(err) => {
                    let wait = backoff.next_wait();
                    tracing::warn!("emitted events not published, retrying in {wait:?}: {err}");
                    wait
                }
            },
            _ = shutdown.wait_for(|stopped| *stopped) => return,
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|stopped| *stopped) => return,
        }
    }
}

/// Declares the exchanges, the intake queue and the dead-letter queue.
///
/// The intake queue is a quorum queue (it survives a broker node and counts
/// deliveries) with `sockets.dead` as its dead-letter exchange and a
/// delivery limit: the broker's own net under the host's, for a message
/// that keeps coming back because the host stops while holding it. The
/// host itself never requeues (it retries in place, then dead-letters with
/// its reason), so how brokers count requeues does not matter to it:
/// RabbitMQ before 4.3 counts every return toward `x-delivery-limit`
/// (3.x: no limit unless set; 4.0–4.2: 20 by default, and a queue without
/// a dead-letter exchange then drops the message); 4.3 counts
/// `basic.reject` but not `basic.nack` or a closed channel.
async fn declare(
    connection: &Connection,
    channel: &Channel,
    settings: &AmqpSettings,
) -> lapin::Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    for exchange in [&settings.exchange, &settings.dead_exchange] {
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
    }
    let queue = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
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

    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(settings.dead_exchange.as_str().into()),
    );
    arguments.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(DELIVERY_LIMIT),
    );
    // A queue declared by an older host lacks these arguments, and a
    // declaration that differs closes its channel: tried on a channel of
    // its own, then the queue is taken as it is.
    let probe = connection.create_channel().await?;
    match probe
        .queue_declare(settings.queue.as_str().into(), queue, arguments)
        .await
    {
        Ok(_) => {
            let _ = probe.close(200, "declared".into()).await;
            Ok(())
        }
        Err(err) if is_precondition_failed(&err) => {
            tracing::warn!(
                queue = %settings.queue,
                "the intake queue exists with other arguments (declared by an older host): \
                 keeping it, but the broker will not dead-letter a message that keeps \
                 coming back; add a policy with dead-letter-exchange={} and delivery-limit={DELIVERY_LIMIT}",
                settings.dead_exchange,
            );
            channel
                .queue_declare(
                    settings.queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..queue
                    },
                    FieldTable::default(),
                )
                .await
                .map(drop)
        }
        Err(err) => Err(err),
    }
}

/// Whether the broker refused a declaration because the entity exists with
/// other properties (`PRECONDITION_FAILED`, 406).
fn is_precondition_failed(err: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(
        err.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
    )
}

/// Resolves once the server shuts down (without holding the watch's lock).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
