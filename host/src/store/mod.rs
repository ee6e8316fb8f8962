//! Persistence behind traits (PROTOCOL.md §7): connection records, the
//! notification log, published idempotency keys and presence. The embedded
//! default keeps connection records in memory and the log and keys on disk
//! (journals of JSON lines); MongoDB implements the same traits for a
//! cluster.

pub mod directory;
mod embedded_keys;
mod embedded_log;
mod memory_connections;
pub mod mongo;
pub mod plugin_state;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::Serialize;
use serde_json::value::RawValue;

pub use embedded_keys::EmbeddedKeys;
pub use embedded_log::EmbeddedLog;
pub use memory_connections::MemoryConnections;

/// Where an event came from, as recorded in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A WebSocket client.
    Client,
    /// RabbitMQ.
    Broker,
    /// The HTTP publish API.
    Api,
}

/// One live connection (`userConnections`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionRecord {
    /// The connection id.
    #[serde(rename = "_id")]
    pub id: String,
    /// The user.
    pub user_id: String,
    /// The user's role.
    pub role: String,
    /// The node holding the connection.
    pub instance_id: String,
    /// RFC 3339 connect time.
    pub connected_at: String,
    /// RFC 3339 time of the last frame seen.
    pub last_seen_at: String,
    /// Details from `setConnection` (a JSON object).
    pub details: serde_json::Map<String, serde_json::Value>,
    /// The peer address.
    pub remote_addr: Option<String>,
    /// The `User-Agent` header.
    pub user_agent: Option<String>,
}

/// One delivery to one user (`notificationLogs`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NotificationRecord {
    /// `<delivery id>:<user id>`: deterministic, so a retried write is
    /// idempotent.
    #[serde(rename = "_id")]
    pub id: String,
    /// The event that caused the delivery.
    pub event_id: String,
    /// The pushed event name (e.g. `message`).
    pub event: String,
    /// The incoming event name (e.g. `sendMessage`).
    pub trigger: String,
    /// `client`, `broker` or `api`.
    pub source: String,
    /// The sending user id or service.
    pub from: String,
    /// The receiving user.
    pub to: String,
    /// `name@version` of the deciding plugin.
    pub plugin: String,
    /// The pushed data.
    pub data: Box<RawValue>,
    /// How many connections the delivery reached.
    pub connections: u32,
    /// RFC 3339 time of the delivery.
    pub created_at: String,
    /// The record's place in the log order ([`LogClock`]), taken when the
    /// delivery is pushed; 0: numbered when appended. Records of older
    /// versions have none.
    #[serde(default)]
    pub seq: i64,
}

impl NotificationRecord {
    /// The delivery's id: the push's `id`.
    pub fn delivery_id(&self) -> &str {
        Self::delivery_of(&self.id, &self.to)
    }

    /// The delivery id in the record id `record_id` of a record to `to`.
    pub fn delivery_of<'a>(record_id: &'a str, to: &str) -> &'a str {
        record_id
            .strip_suffix(to)
            .and_then(|id| id.strip_suffix(':'))
            .unwrap_or(record_id)
    }

    /// The deterministic record id of a delivery to a user.
    pub fn record_id(delivery_id: &str, user_id: &str) -> String {
        // Sized up front: one per delivered message, and `format!` grew its
        // buffer twice on the way.
        let mut id = String::with_capacity(delivery_id.len() + 1 + user_id.len());
        id.push_str(delivery_id);
        id.push(':');
        id.push_str(user_id);
        id
    }
}

/// A store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The backing store cannot be reached or written.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store refused this record for what it holds; retrying it cannot
    /// succeed.
    #[error("record refused by the store: {0}")]
    Rejected(String),
}

/// Live connection records.
#[async_trait]
pub trait ConnectionStore: Send + Sync {
    /// Records a new connection.
    async fn insert(&self, record: ConnectionRecord) -> Result<(), StoreError>;
    /// Replaces a connection's details.
    async fn set_details(
        &self,
        id: &str,
        details: serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), StoreError>;
    /// Refreshes `lastSeenAt`.
    async fn touch(&self, id: &str, at: SystemTime) -> Result<(), StoreError>;
    /// Removes a connection's record.
    async fn remove(&self, id: &str) -> Result<(), StoreError>;
    /// A connection's record.
    async fn get(&self, id: &str) -> Result<Option<ConnectionRecord>, StoreError>;
}

/// What [`NotificationLog::append_then`] calls with the write's result.
pub type Appended = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// The audit log of deliveries.
#[async_trait]
pub trait NotificationLog: Send + Sync + 'static {
    /// Writes records; when it returns `Ok` they are durable. Records
    /// without a `seq` get one.
    async fn append(&self, records: Vec<NotificationRecord>) -> Result<(), StoreError>;
    /// [`NotificationLog::append`] with no task waiting: `then` gets the
    /// result from wherever the write finishes. The embedded log calls it
    /// on its writer thread, which spares a task wake-up per append (a
    /// chat message's ack); `then` must be quick and must not block. By
    /// default a task awaits `append`. Must be called within a runtime.
    fn append_then(self: Arc<Self>, records: Vec<NotificationRecord>, then: Appended) {
        tokio::spawn(async move { then(self.append(records).await) });
    }
    /// The next number of the log order, for a delivery pushed now.
    fn next_seq(&self) -> i64;
    /// Deliveries to a user, newest first.
    async fn for_user(
        &self,
        user_id: &str,
        limit: usize,
    ) -> Result<Vec<NotificationRecord>, StoreError>;
    /// Deliveries caused by an event.
    async fn for_event(&self, event_id: &str) -> Result<Vec<NotificationRecord>, StoreError>;
    /// Returns once every append made before the call is durable, including
    /// those whose callers stopped waiting (shutdown calls it, so that
    /// queued records are not lost with the process).
    async fn flush(&self) -> Result<(), StoreError>;
    /// Deliveries to `user_id` logged after `from`, in log order, at most
    /// `limit` (PROTOCOL §3 `resume`); `Ok(None)` when `from` names a
    /// delivery that is not one to this user the log still holds. Costs
    /// what it returns, not the size of the log.
    async fn replay(
        &self,
        user_id: &str,
        from: &ReplayFrom,
        limit: usize,
    ) -> Result<Option<ReplayPage>, StoreError>;
}

/// How much of the notification log is kept: records older than
/// `max_age`, and on the embedded store the oldest segments beyond
/// `max_bytes`, are deleted; a replay never reaches past either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRetention {
    /// Records older than this go; `None`: kept for ever.
    pub max_age: Option<Duration>,
    /// The most disk the embedded log takes; `None`: no cap.
    pub max_bytes: Option<u64>,
}

impl LogRetention {
    /// A week: a client back from a holiday still recovers.
    pub const DEFAULT_AGE: Duration = Duration::from_secs(7 * 86_400);
    /// 2 GiB: a small server's disk, about 4.5 M chat records.
    pub const DEFAULT_BYTES: u64 = 2 << 30;
    /// Everything, for ever (tools and tests that read a log).
    pub const FOREVER: LogRetention = LogRetention {
        max_age: None,
        max_bytes: None,
    };

    /// The oldest `seq` a replay may return at `now`.
    pub fn first_kept(&self, now: SystemTime) -> i64 {
        first_kept(self.max_age, now)
    }
}

/// The oldest `seq` a replay may return at `now` when records older than
/// `max_age` are not kept.
pub fn first_kept(max_age: Option<Duration>, now: SystemTime) -> i64 {
    max_age
        .and_then(|age| now.checked_sub(age))
        .map_or(i64::MIN, LogClock::first_at)
}

impl Default for LogRetention {
    fn default() -> Self {
        Self {
            max_age: Some(Self::DEFAULT_AGE),
            max_bytes: Some(Self::DEFAULT_BYTES),
        }
    }
}

/// Where a replay starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayFrom {
    /// After the delivery with this id (a push's `id`).
    After(String),
    /// At or after this time.
    Since(SystemTime),
}

/// One page of a replay.
#[derive(Debug)]
pub struct ReplayPage {
    /// The records, in log order.
    pub records: Vec<NotificationRecord>,
    /// Whether the limit stopped the page before the end of the log.
    pub more: bool,
}

/// Numbers a node's deliveries in the order it pushes them (the `seq` of
/// a stored record, taken before the push): each above the last and at
/// least the time in milliseconds shifted left by [`LogClock::TICK_BITS`],
/// so that a time maps onto the order ([`LogClock::first_at`]) and a
/// replay `since` a time is a range of it. More than 2^20 in one
/// millisecond borrow from the next one; a clock that goes back does not
/// take the order with it.
#[derive(Debug, Default)]
pub struct LogClock {
    last: AtomicI64,
}

impl LogClock {
    /// Bits of a `seq` below the milliseconds.
    pub const TICK_BITS: u32 = 20;

    /// A clock that continues after `last` (what a reopened log holds).
    pub fn after(last: i64) -> Self {
        Self {
            last: AtomicI64::new(last),
        }
    }

    /// The last number given.
    pub fn last(&self) -> i64 {
        self.last.load(Ordering::Relaxed)
    }

    /// The next number, at `now`.
    pub fn next(&self, now: SystemTime) -> i64 {
        let floor = Self::first_at(now);
        let previous = self
            .last
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                Some(last.saturating_add(1).max(floor))
            })
            .unwrap_or_else(|last| last);
        previous.saturating_add(1).max(floor)
    }

    /// Numbers the records that have no `seq` yet (tools and tests append
    /// records the dispatcher did not number).
    pub fn number(&self, records: &mut [NotificationRecord]) {
        for record in records.iter_mut().filter(|record| record.seq == 0) {
            record.seq = self.next(SystemTime::now());
        }
    }

    /// The lowest number a record written at or after `at` can have.
    pub fn first_at(at: SystemTime) -> i64 {
        let millis = match at.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(since_epoch) => i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX),
            Err(_) => 0,
        };
        millis.saturating_mul(1 << Self::TICK_BITS)
    }
}

/// How long a published idempotency key is remembered (PROTOCOL §5: at
/// least 10 minutes).
pub const PUBLISHED_KEY_RETENTION: Duration = Duration::from_secs(15 * 60);

/// What the first publication of an idempotency key produced: a repeat
/// answers the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Accepted {
    /// The event id.
    pub event_id: String,
    /// Distinct users addressed.
    pub recipients: usize,
}

/// Who may publish an idempotency key now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This node: nobody published it within the retention, or the node
    /// that claimed it stopped (its claim is older than the lease).
    Ours,
    /// It was published; the first publication's answer.
    Done(Accepted),
    /// Another node is publishing it right now.
    Elsewhere,
}

/// Idempotency keys of published events (the HTTP `id`, the AMQP
/// `message_id`), shared by every node that shares the store, kept across
/// restarts for the retention. A key is claimed before its event is
/// routed and completed once its deliveries are logged, so that a repeat on
/// any node, before or after a restart, delivers nothing again.
#[async_trait]
pub trait PublishedKeys: Send + Sync {
    /// Claims `key` for this node unless it was published or is being
    /// published elsewhere.
    async fn claim(&self, key: &str) -> Result<Claim, StoreError>;
    /// Records what the publication of a claimed key produced; when it
    /// returns `Ok`, a repeat anywhere gets this answer.
    async fn complete(&self, key: &str, accepted: &Accepted) -> Result<(), StoreError>;
    /// Gives up this node's claim on `key` (its publication failed), so
    /// that a retry on another node need not wait for the lease.
    async fn release(&self, key: &str);
    /// How often a claim being published must be renewed so that other
    /// nodes do not take it for a dead node's; `None`: never.
    fn renew_every(&self) -> Option<Duration> {
        None
    }
    /// Renews this node's claim on `key` (best effort).
    async fn renew(&self, _key: &str) {}
}

/// How many connections a user has, as far as this store knows: this
/// node's for the embedded default, the cluster's with MongoDB. Answers
/// synchronously: plugins ask mid-`handle`.
pub trait Presence: Send + Sync {
    /// The user's live connections.
    fn count_of_user(&self, user_id: &str) -> usize;
}

impl Presence for crate::delivery::registry::ConnectionRegistry {
    fn count_of_user(&self, user_id: &str) -> usize {
        crate::delivery::registry::ConnectionRegistry::count_of_user(self, user_id)
    }
}
