//! Event → plugins → outcome → deliveries → log: the path every event takes,
//! whatever its intake (WebSocket, HTTP, broker).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::value::RawValue;

use crate::cluster::Cluster;
use crate::delivery::fanout::{Reached, Sender, fan_out};
use crate::delivery::recent::RecentDeliveries;
use crate::delivery::registry::{ConnectionRegistry, OutboundFrame};
use crate::metrics::Metrics;
use crate::plugin::{
    CallError, ClientOrigin, DispatchError, Event, HostServices, Origin, PluginDelivery,
    PluginRegistry, Recipient, RefusalCode, lifecycle,
};
use crate::protocol::{
    ErrorBody, ErrorCode, delivery_id, ephemeral_push_frame, push_frame, rfc3339,
};
use crate::store::directory::{User, UserDirectory};
use crate::store::plugin_state::PluginState;
use crate::store::{NotificationLog, NotificationRecord, Presence, Source, StoreError};

/// How long a client or HTTP publisher waits for its log records.
pub const LOG_WAIT: Duration = Duration::from_secs(5);

/// What a publisher waiting longer than [`LOG_WAIT`] hears (`unavailable`).
pub const LOG_NOT_CONFIRMED: &str =
    "the notification log is not confirmed yet; the records stay queued";

/// An event entering the dispatcher, with what the log needs about its sender.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// The event handed to plugins.
    pub event: Event,
    /// Which intake it came through.
    pub source: Source,
    /// The sending user id or service name.
    pub from: String,
    /// How many emitted events led to this one (0: none; see [`MAX_EMIT_DEPTH`]).
    pub depth: u8,
}

/// How deep events emitted by plugins may chain: an event emitted while
/// handling an event at this depth is dropped, which cuts loops.
pub const MAX_EMIT_DEPTH: u8 = 4;

/// Emitted events waiting for the host's router, at most.
const EMITTED_QUEUE: usize = 1024;

/// What routing produced.
#[derive(Debug)]
pub struct Routed {
    /// The reply data for the sender (`null` when the plugins gave none),
    /// with the delivered count filled in when asked for.
    pub reply: Box<RawValue>,
    /// Distinct users the deliveries addressed, online or not.
    pub recipients: usize,
}

/// Deliveries pushed whose log records are not written yet.
#[derive(Debug)]
pub struct Delivered {
    records: Vec<NotificationRecord>,
    routed: Routed,
    source: Source,
    /// Resolve once the broker has the copies for other nodes.
    copies: Vec<tokio::sync::oneshot::Receiver<()>>,
}

/// Why an event was not routed.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// No plugin subscribes to the event.
    #[error("no handler for `{0}`")]
    UnknownEvent(String),
    /// A plugin refused the event.
    #[error("{message}")]
    Refused {
        /// The refusal's code.
        code: RefusalCode,
        /// The plugin's reason.
        message: String,
    },
    /// A plugin malfunctioned.
    #[error("plugin `{plugin}` {error}")]
    PluginFailed {
        /// `name@version`.
        plugin: Arc<str>,
        /// What went wrong.
        error: CallError,
    },
    /// The deliveries were made but could not be logged.
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl RouteError {
    /// The protocol error to report to the sender.
    pub fn to_error_body(&self) -> ErrorBody {
        let code = match self {
            Self::UnknownEvent(_) => ErrorCode::UnknownEvent,
            Self::Refused { code, .. } => match code {
                RefusalCode::BadRequest => ErrorCode::BadRequest,
                RefusalCode::Forbidden => ErrorCode::Forbidden,
                RefusalCode::NotFound => ErrorCode::NotFound,
                RefusalCode::Internal => ErrorCode::Internal,
            },
            Self::PluginFailed { .. } => ErrorCode::PluginFailed,
            // The store refused something of the event itself (its id):
            // sending it again cannot succeed.
            Self::Store(StoreError::Rejected(_)) => ErrorCode::BadRequest,
            Self::Store(StoreError::Unavailable(_)) => ErrorCode::Unavailable,
        };
        ErrorBody::new(code, self.to_string())
    }
}

/// Answers plugins' `get-user` and `connection-count`.
pub struct PluginServices {
    /// The user directory.
    pub directory: Arc<dyn UserDirectory>,
    /// Connections per user (the cluster's when the store knows them).
    pub presence: Arc<dyn Presence>,
    /// Where plugins keep state.
    pub state: Arc<dyn PluginState>,
    /// Longest user id; longer ones name no user and are not looked up
    /// (plugins pass on ids that clients chose).
    pub max_user_id_bytes: usize,
}

impl PluginServices {
    fn can_be_user_id(&self, id: &str) -> bool {
        !id.is_empty() && id.len() <= self.max_user_id_bytes
    }
}

impl HostServices for PluginServices {
    fn get_user(&self, id: &str) -> Option<User> {
        if !self.can_be_user_id(id) {
            return None;
        }
        self.directory.get_user(id)
    }

    fn connection_count(&self, user_id: &str) -> u32 {
        if !self.can_be_user_id(user_id) {
            return 0;
        }
        u32::try_from(self.presence.count_of_user(user_id)).unwrap_or(u32::MAX)
    }

    fn plugin_state(&self) -> &dyn PluginState {
        &*self.state
    }
}

/// Names under `sockets.` are the host's lifecycle events: sent by anyone
/// else (a client, a backend, a plugin's emit), they name no handler.
fn refuse_reserved(inbound: &Inbound) -> Result<(), RouteError> {
    let raised_by_host = matches!(inbound.event.origin, Origin::Lifecycle(_));
    if lifecycle::is_reserved(&inbound.event.name) && !raised_by_host {
        return Err(RouteError::UnknownEvent(inbound.event.name.clone()));
    }
    Ok(())
}

fn route_error(err: DispatchError) -> RouteError {
    match err {
        DispatchError::NoHandler(name) => RouteError::UnknownEvent(name),
        DispatchError::Plugin { plugin, error } => match error {
            CallError::Refused { code, message } => RouteError::Refused { code, message },
            error => RouteError::PluginFailed { plugin, error },
        },
    }
}

/// Routes events through the current plugins to connections and the log.
pub struct Dispatcher {
    plugins: Arc<PluginRegistry>,
    connections: Arc<ConnectionRegistry>,
    log: Arc<dyn NotificationLog>,
    metrics: Arc<Metrics>,
    /// The other nodes, when there are any (a broker is configured).
    cluster: Option<Arc<Cluster>>,
    /// Delivery ids pushed on this node, shared with the cluster link.
    recent: Arc<RecentDeliveries>,
    /// Events emitted by plugins, for the task that takes them (`take_emitted`).
    emitted: tokio::sync::mpsc::Sender<Inbound>,
    emitted_queue: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<Inbound>>>,
}

impl Dispatcher {
    /// A dispatcher over these parts.
    pub fn new(
        plugins: Arc<PluginRegistry>,
        connections: Arc<ConnectionRegistry>,
        log: Arc<dyn NotificationLog>,
        metrics: Arc<Metrics>,
        cluster: Option<Arc<Cluster>>,
        recent: Arc<RecentDeliveries>,
    ) -> Self {
        let (emitted, queue) = tokio::sync::mpsc::channel(EMITTED_QUEUE);
        Self {
            plugins,
            connections,
            log,
            metrics,
            cluster,
            recent,
            emitted,
            emitted_queue: std::sync::Mutex::new(Some(queue)),
        }
    }

    /// Hands a lifecycle event about a connection to the plugins
    /// (`crate::lifecycle` decides when): `connections` is the user's live
    /// connections after the change. Its deliveries are made and logged
    /// like any event's; a failure is logged, never the connection's
    /// concern.
    pub async fn raise(&self, name: &'static str, about: &ClientOrigin, connections: usize) {
        let inbound = Inbound {
            event: Event {
                id: format!("{}.{name}", about.connection_id),
                name: name.to_owned(),
                origin: Origin::Lifecycle(about.clone()),
                data: format!("{{\"connections\":{connections}}}"),
                received_at: rfc3339(SystemTime::now()),
            },
            source: Source::Client,
            from: about.user_id.clone(),
            depth: 0,
        };
        if let Err(err) = self.route(&inbound).await {
            tracing::warn!(event = name, user = %about.user_id, "lifecycle event not handled: {err}");
        }
    }

    /// The queue of events plugins emit, for the one task that takes it
    /// (`intake::emit`): `None` once taken.
    pub fn take_emitted(&self) -> Option<tokio::sync::mpsc::Receiver<Inbound>> {
        self.emitted_queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Queues the events a decision emits for the router.
    fn emit(&self, inbound: &Inbound, emitted: Vec<(Arc<str>, crate::plugin::Emitted)>) {
        for (position, (plugin, event)) in emitted.into_iter().enumerate() {
            let name = plugin.split_once('@').map_or(&*plugin, |(name, _)| name);
            if inbound.depth >= MAX_EMIT_DEPTH {
                self.metrics.emitted_dropped();
                tracing::warn!(plugin = %plugin, event = %event.name, depth = inbound.depth, "emitted event dropped: too deep a chain of emitted events");
                continue;
            }
            let next = Inbound {
                event: Event {
                    // Derived: handling the event again emits the same ids.
                    id: format!("{}.emit", delivery_id(&inbound.event.id, name, position)),
                    name: event.name,
                    origin: Origin::Plugin(name.to_owned()),
                    data: event.data.get().to_owned(),
                    received_at: rfc3339(SystemTime::now()),
                },
                source: Source::Broker,
                from: format!("plugin:{name}"),
                depth: inbound.depth + 1,
            };
            tracing::info!(plugin = %plugin, event = %next.event.name, id = %next.event.id, "event emitted");
            self.metrics.emitted();
            if self.emitted.try_send(next).is_err() {
                self.metrics.emitted_dropped();
                tracing::warn!(plugin = %plugin, "emitted event dropped: the router's queue is full");
            }
        }
    }

    /// Decides, delivers and logs one event. Returns once the deliveries are
    /// queued on their connections (and, in a cluster, handed to the other
    /// nodes) and the log records are durable.
    pub async fn route(&self, inbound: &Inbound) -> Result<Routed, RouteError> {
        let delivered = self.deliver(inbound).await?;
        self.record(delivered).await
    }

    /// Asks the plugins whether they accept the event, and delivers
    /// nothing: the validation of a repeated publication.
    pub fn check(&self, inbound: &Inbound) -> Result<(), RouteError> {
        refuse_reserved(inbound)?;
        self.plugins
            .snapshot()
            .dispatch(&inbound.event)
            .map(drop)
            .map_err(route_error)
    }

    /// The first half of [`Dispatcher::route`]: asks the plugins, pushes the
    /// deliveries and forwards them to the other nodes. Callers that must
    /// keep deliveries in order run this in order and may overlap the
    /// [`Dispatcher::record`] halves, so that log writes are committed together.
    pub async fn deliver(&self, inbound: &Inbound) -> Result<Delivered, RouteError> {
        refuse_reserved(inbound)?;
        let plugins = self.plugins.snapshot();
        let started = Instant::now();
        // Plugin calls are synchronous (bounded by their deadline) and run
        // on this worker unless the plugin must not (plugin/placement.rs).
        let decision = plugins.dispatch(&inbound.event);
        self.metrics.observe_dispatch(started.elapsed());
        let decision = decision.map_err(|err| {
            if let DispatchError::Plugin { plugin, error } = &err
                && !matches!(error, CallError::Refused { .. })
            {
                tracing::warn!(%plugin, event = %inbound.event.name, kind = error.kind(), "plugin failed: {error}");
            }
            route_error(err)
        })?;

        // Room for the copies of other nodes comes first: an event whose
        // copies cannot be kept is not delivered at all. Boxed: the
        // reservation's future would make every routed frame's future
        // (clustered or not) too large for the allocator's per-thread cache.
        let mut room = match &self.cluster {
            Some(cluster) => Some(
                Box::pin(cluster.reserve(decision.deliveries.len()))
                    .await
                    .map_err(|err| StoreError::Unavailable(err.to_string()))?,
            ),
            None => None,
        };
        let created_at = rfc3339(SystemTime::now());
        // One record per reached user; most deliveries reach one.
        let mut records = Vec::with_capacity(decision.deliveries.len());
        let mut delivered_to_users = 0u32;
        let mut copies = Vec::new();
        for (position, PluginDelivery { plugin, delivery }) in
            decision.deliveries.into_iter().enumerate()
        {
            // Derived, not random: processing the event again yields the
            // same ids (and log `_id`s).
            let plugin_name = plugin.split_once('@').map_or(&*plugin, |(name, _)| name);
            let delivery_id = delivery_id(&inbound.event.id, plugin_name, position);
            let frame: OutboundFrame = if delivery.ephemeral {
                ephemeral_push_frame(&delivery.event, &delivery.data, &delivery_id).into()
            } else {
                push_frame(&delivery.event, &delivery.data, &delivery_id).into()
            };
            // A backend event may be processed again (its node died before
            // acking it; the delivery ids repeat): pushed here once. Client
            // events have fresh ids every time.
            let pushed_before =
                inbound.source != Source::Client && !self.recent.first_time(&delivery_id);
            // Numbered before it is pushed: the log order follows the order
            // deliveries enter the connections' queues, which `resume` relies on.
            let seq = if delivery.ephemeral {
                0
            } else {
                self.log.next_seq()
            };
            let Reached {
                users: mut reached,
                queued,
            } = if pushed_before {
                Reached::nobody(&delivery.to)
            } else {
                fan_out(&self.connections, &delivery.to, sender(inbound), &frame)
            };
            self.metrics.add_deliveries(queued);
            if let (Some(cluster), Some(room)) = (&self.cluster, &mut room) {
                add_remote_connections(cluster, &delivery.to, &mut reached);
                let forwarded = room.forward(
                    delivery_id.clone(),
                    frame,
                    remote_users(inbound, &delivery.to),
                );
                // Nothing waits for an ephemeral push's copies.
                if !delivery.ephemeral {
                    copies.extend(forwarded);
                }
            }
            for (_, connections) in &reached {
                delivered_to_users = delivered_to_users.saturating_add(*connections);
            }
            if delivery.ephemeral {
                continue;
            }
            let template = NotificationRecord {
                id: String::new(),
                event_id: inbound.event.id.clone(),
                event: delivery.event,
                trigger: inbound.event.name.clone(),
                source: source_name(inbound.source).to_owned(),
                from: inbound.from.clone(),
                to: String::new(),
                plugin: plugin.to_string(),
                data: delivery.data,
                connections: 0,
                created_at: created_at.clone(),
                seq,
            };
            push_records(&mut records, template, &delivery_id, reached);
        }

        let reply = match decision.reply {
            None => RawValue::from_string("null".to_owned()).expect("null is JSON"),
            Some(reply) => match reply.delivered_field {
                None => reply.data,
                Some(field) => with_count(&reply.data, &field, delivered_to_users),
            },
        };
        self.emit(inbound, decision.emit);
        let recipients = distinct_users(&records);
        Ok(Delivered {
            records,
            routed: Routed { reply, recipients },
            source: inbound.source,
            copies,
        })
    }

    /// The second half of [`Dispatcher::route`]: makes the log records durable
    /// and, for a backend event, waits until the broker has its copies for
    /// other nodes (a node killed after acking must not take them along).
    /// A broker message waits as long as the log needs (its ack is the
    /// backpressure); a client or HTTP publisher waits at most
    /// [`LOG_WAIT`], then hears `unavailable` while its records stay queued
    /// for the log. Client events do not wait for their copies: a chat
    /// message's sender has nothing to retry them with.
    pub async fn record(&self, delivered: Delivered) -> Result<Routed, RouteError> {
        let wait_for_copies = delivered.source != Source::Client;
        let copies = delivered.copies;
        let durable = async {
            self.log.append(delivered.records).await?;
            if wait_for_copies {
                for copy in copies {
                    copy.await.map_err(|_| {
                        StoreError::Unavailable(
                            "a delivery copy for another node was lost".to_owned(),
                        )
                    })?;
                }
            }
            Ok::<_, StoreError>(())
        };
        if delivered.source == Source::Broker {
            durable.await?;
        } else {
            tokio::time::timeout(LOG_WAIT, durable)
                .await
                .map_err(|_| StoreError::Unavailable(LOG_NOT_CONFIRMED.to_owned()))??;
        }
        Ok(delivered.routed)
    }

    /// [`Dispatcher::record`] for a client's event, whose sender waits for
    /// its log records only (not for copies, nor longer than [`LOG_WAIT`]:
    /// the caller keeps that time): `then` gets the outcome from wherever
    /// the log write finishes, quick and not blocking, and no task waits.
    pub fn record_then(
        &self,
        delivered: Delivered,
        then: impl FnOnce(Result<Routed, RouteError>) + Send + 'static,
    ) {
        debug_assert!(delivered.source == Source::Client);
        let routed = delivered.routed;
        Arc::clone(&self.log).append_then(
            delivered.records,
            Box::new(move |written| then(written.map(|()| routed).map_err(RouteError::from))),
        );
    }
}

/// Adds to each user addressed by id the connections that other nodes
/// announced for it (the copies forwarded to them reach those), so that
/// counts are cluster-wide as far as this node knows. Connection-addressed
/// deliveries stay on this node.
fn add_remote_connections(
    cluster: &Cluster,
    recipients: &[Recipient],
    reached: &mut [(String, u32)],
) {
    let by_id: HashSet<&str> = recipients
        .iter()
        .filter_map(|recipient| match recipient {
            Recipient::User(user) => Some(user.as_str()),
            _ => None,
        })
        .collect();
    for (user, connections) in reached {
        if by_id.contains(user.as_str()) {
            *connections = connections.saturating_add(cluster.remote_connections(user));
        }
    }
}

/// The users whose connections on other nodes must get a delivery: the
/// addressed users, and the sender for `sender-others` (its sending
/// connection is on this node). Connection-addressed deliveries stay local:
/// plugins learn connection ids only from events this node received.
fn remote_users(inbound: &Inbound, recipients: &[Recipient]) -> Vec<String> {
    let mut users: Vec<String> = Vec::new();
    for recipient in recipients {
        let user = match recipient {
            Recipient::User(user) => user.as_str(),
            Recipient::SenderOthers => match &inbound.event.origin {
                Origin::Client(client) | Origin::Lifecycle(client) => client.user_id.as_str(),
                Origin::Broker | Origin::Api(_) | Origin::Plugin(_) => continue,
            },
            Recipient::Connection(_) => continue,
        };
        if !users.iter().any(|seen| seen == user) {
            users.push(user.to_owned());
        }
    }
    users
}

/// The sending client, for `sender-others` and to skip its connection.
fn sender(inbound: &Inbound) -> Option<Sender<'_>> {
    match &inbound.event.origin {
        // A lifecycle event's connection is treated as its sender: never
        // pushed to (it asked nothing); `sender-others` names the others.
        Origin::Client(client) | Origin::Lifecycle(client) => Some(Sender {
            user: &client.user_id,
            connection: &client.connection_id,
        }),
        Origin::Broker | Origin::Api(_) | Origin::Plugin(_) => None,
    }
}

/// Appends one log record per reached user, in order: `template` with the
/// record id, the user and its connection count filled in. The last record
/// takes `template` itself, so a delivery that reaches one user (most do)
/// copies none of its payload.
fn push_records(
    records: &mut Vec<NotificationRecord>,
    template: NotificationRecord,
    delivery_id: &str,
    mut reached: Vec<(String, u32)>,
) {
    let Some((last_user, last_connections)) = reached.pop() else {
        return;
    };
    let record = |template, user: String, connections| NotificationRecord {
        id: NotificationRecord::record_id(delivery_id, &user),
        to: user,
        connections,
        ..template
    };
    for (user, connections) in reached {
        records.push(record(template.clone(), user, connections));
    }
    records.push(record(template, last_user, last_connections));
}

/// How many users the records name: one delivery names each user once,
/// several deliveries may name one user each.
fn distinct_users(records: &[NotificationRecord]) -> usize {
    if records.len() < 2 {
        return records.len();
    }
    let mut users: Vec<&str> = records.iter().map(|record| record.to.as_str()).collect();
    users.sort_unstable();
    users.dedup();
    users.len()
}

fn source_name(source: Source) -> &'static str {
    match source {
        Source::Client => "client",
        Source::Broker => "broker",
        Source::Api => "api",
    }
}

/// The reply object with `field` set to `count` (validated to be an object
/// when the plugin's outcome was checked).
fn with_count(data: &RawValue, field: &str, count: u32) -> Box<RawValue> {
    let object = data.get().trim();
    // The common case, an object without that key, gets the key appended
    // to its text. Without a backslash in either, the key cannot be there
    // in an escaped spelling the search would miss.
    let field_is_plain = !field.contains(['"', '\\']) && !field.contains(char::is_control);
    let may_hold_field = object.contains('\\')
        || object.match_indices(field).any(|(at, _)| {
            object[..at].ends_with('"') && object[at + field.len()..].starts_with('"')
        });
    if let Some(members) = object
        .strip_prefix('{')
        .and_then(|object| object.strip_suffix('}'))
        .filter(|_| field_is_plain && !may_hold_field)
    {
        let members = members.trim();
        let comma = if members.is_empty() { "" } else { "," };
        // Sized exactly: `format!` grew its buffer several times, and a
        // `Box<str>` made from a larger buffer is one more reallocation.
        let digits = count.checked_ilog10().unwrap_or(0) as usize + 1;
        let mut appended =
            String::with_capacity(members.len() + comma.len() + field.len() + digits + 5);
        for part in ["{", members, comma, "\"", field, "\":"] {
            appended.push_str(part);
        }
        write!(appended, "{count}}}").expect("writing to a String cannot fail");
        return RawValue::from_string(appended).expect("an object with one more member");
    }
    let mut object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(data.get()).unwrap_or_default();
    object.insert(field.to_owned(), count.into());
    serde_json::value::to_raw_value(&object).expect("a JSON object serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counted(reply: &str, field: &str) -> String {
        let data = RawValue::from_string(reply.to_owned()).unwrap();
        with_count(&data, field, 2).get().to_owned()
    }

    #[test]
    fn the_delivered_count_is_added_to_the_reply() {
        assert_eq!(
            counted(r#"{"messageId":"m1"}"#, "delivered"),
            r#"{"messageId":"m1","delivered":2}"#
        );
        assert_eq!(counted("{ }", "delivered"), r#"{"delivered":2}"#);
        assert_eq!(
            counted("{\n  \"a\": [1, {}]\n}", "delivered"),
            "{\"a\": [1, {}],\"delivered\":2}"
        );
        // The field's name as a value is not the key.
        assert_eq!(
            counted(r#"{"a":"delivered!"}"#, "delivered"),
            r#"{"a":"delivered!","delivered":2}"#
        );
    }

    #[test]
    fn each_reached_user_gets_a_record_of_the_delivery() {
        let template = NotificationRecord {
            id: String::new(),
            event_id: "e1".to_owned(),
            event: "message".to_owned(),
            trigger: "sendMessage".to_owned(),
            source: "client".to_owned(),
            from: "s_1".to_owned(),
            to: String::new(),
            plugin: "chat@0.1.0".to_owned(),
            data: RawValue::from_string(r#"{"text":"hi"}"#.to_owned()).unwrap(),
            connections: 0,
            created_at: "2026-11-27T10:00:00Z".to_owned(),
            seq: 1,
        };
        let reached = vec![
            ("a".to_owned(), 2),
            ("b".to_owned(), 0),
            ("c".to_owned(), 1),
        ];
        let mut records = Vec::new();
        push_records(&mut records, template.clone(), "d1", reached);
        let summary: Vec<_> = records
            .iter()
            .map(|record| (record.id.as_str(), record.to.as_str(), record.connections))
            .collect();
        assert_eq!(
            summary,
            [("d1:a", "a", 2), ("d1:b", "b", 0), ("d1:c", "c", 1)]
        );
        for record in &records {
            assert_eq!(record.event, "message");
            assert_eq!(record.data.get(), r#"{"text":"hi"}"#);
            assert_eq!(record.plugin, "chat@0.1.0");
            assert_eq!(record.created_at, template.created_at);
        }

        push_records(&mut records, template, "d2", Vec::new());
        assert_eq!(records.len(), 3, "no user reached, no record");
    }

    #[test]
    fn counts_of_any_width_are_appended() {
        for count in [0, 9, 10, 99_999, u32::MAX] {
            let data = RawValue::from_string(r#"{"a":1}"#.to_owned()).unwrap();
            assert_eq!(
                with_count(&data, "n", count).get(),
                format!(r#"{{"a":1,"n":{count}}}"#)
            );
        }
    }

    #[test]
    fn a_key_already_there_is_replaced_however_it_is_spelled() {
        for reply in [
            r#"{"delivered":7,"a":1}"#,
            r#"{"a":{"delivered":1},"delivered":7}"#,
            r#"{"deliv\u0065red":7,"a":1}"#,
        ] {
            let object: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(&counted(reply, "delivered")).unwrap();
            assert_eq!(object.len(), 2, "{reply}");
            assert_eq!(object["delivered"], 2, "{reply}");
        }
        let object: serde_json::Value = serde_json::from_str(&counted("{}", "say \"hi\"")).unwrap();
        assert_eq!(object, serde_json::json!({"say \"hi\"": 2}));
    }
}
