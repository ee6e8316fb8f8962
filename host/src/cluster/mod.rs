//! Delivery across nodes (DESIGN.md "Horizontal scaling"; the choice, its
//! costs and failure cases are in ARCHITECTURE.md and docs/scaling.md).
//!
//! Every node owns a queue, bound once on the nodes exchange (direct) by
//! its instance id, and to the presence exchange (fanout). Nodes announce
//! which users they hold (module `presence`); a delivery for users held
//! elsewhere is published to those nodes' queues only, one message per
//! node with the copies for it. The broker keeps no per-user state, so a
//! connect costs it nothing but a share of a batched announcement.
//!
//! A new connection hears `connected` once every peer has applied its
//! announcement (module `joins`): from then on, every node routes the
//! user's deliveries here.
//!
//! Copies go through a bounded in-memory outbox: the dispatcher does not wait
//! for the broker, only for room ([`Cluster::reserve`], before it pushes
//! anything, so a full outbox fails the event cleanly instead of dropping
//! copies). Whatever is waiting when the link publishes goes out as one
//! message per node (module `batch`); unconfirmed batches are published
//! again after a reconnect, and receivers drop a delivery id they have
//! already pushed. At shutdown the link stops last: it publishes what is
//! left and waits for the broker's confirms before it closes.

mod batch;
mod joins;
mod link;
mod presence;
mod signing;

pub use presence::{Announcement, ClusterPresence, RemotePresence};
pub use signing::ClusterKey;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::delivery::recent::RecentDeliveries;
use crate::delivery::registry::{ConnectionRegistry, OutboundFrame};
use crate::health::Health;
use crate::intake::amqp::AmqpSettings;
use crate::metrics::Metrics;
use batch::DeliveryCopy;
use link::{Inboxes, Link};

/// Copies handed to the link and not yet in a batch.
const COPIES_QUEUED: usize = 4_096;
/// How long an event waits for room in a full outbox before it fails with
/// `unavailable` (nothing pushed).
const ROOM_WAIT: Duration = Duration::from_secs(5);
/// How long a new connection waits for the peers to know of it, at most.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A change of a user's connections on this node; `done` (a join) is
/// answered once the other nodes route the user's deliveries here.
struct Membership {
    user: Arc<str>,
    done: Option<oneshot::Sender<()>>,
}

/// No room for copies: the broker is away or does not keep up, or the
/// link is still discovering the other nodes.
#[derive(Debug, thiserror::Error)]
#[error(
    "the cluster link has no room for copies (the broker is unreachable or slow, or the link is still discovering the other nodes)"
)]
pub struct OutboxFull;

/// Room reserved in the outbox for an event's copies.
pub struct Room<'a> {
    permits: Option<mpsc::PermitIterator<'a, Outgoing>>,
    remote: &'a RemotePresence,
}

impl Room<'_> {
    /// Hands a delivery to the other nodes holding any of `users`, as this
    /// node knows them now. Returns what resolves once the broker confirmed
    /// the copy (an error if it was lost), or `None` when no other node
    /// needs one.
    pub fn forward(
        &mut self,
        delivery_id: String,
        frame: OutboundFrame,
        users: Vec<String>,
    ) -> Option<oneshot::Receiver<()>> {
        let nodes = self
            .remote
            .nodes_holding(users.iter().map(String::as_str), Instant::now());
        if nodes.is_empty() {
            return None;
        }
        let (confirmed, on_confirm) = oneshot::channel();
        let Some(permit) = self.permits.as_mut().and_then(Iterator::next) else {
            // More deliveries than reserved: a bug, said loudly (and the
            // dropped sender fails the waiter).
            tracing::error!("a delivery copy beyond the room reserved for its event");
            return Some(on_confirm);
        };
        permit.send(Outgoing {
            copy: DeliveryCopy {
                delivery_id,
                frame,
                users,
            },
            nodes,
            confirmed,
        });
        Some(on_confirm)
    }
}

/// A copy on its way to the broker, the nodes it goes to, and who waits
/// for its confirm.
struct Outgoing {
    copy: DeliveryCopy,
    nodes: Vec<Arc<str>>,
    confirmed: oneshot::Sender<()>,
}

/// This node's handle on the cluster.
pub struct Cluster {
    instance_id: Arc<str>,
    commands: mpsc::Sender<Membership>,
    copies: mpsc::Sender<Outgoing>,
    /// Closed while the link collects the other nodes' tables: routing by
    /// a partial view could miss a node.
    routing: watch::Receiver<bool>,
    status: Arc<Health>,
    remote: Arc<RemotePresence>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("instance_id", &self.instance_id)
            .finish_non_exhaustive()
    }
}

/// The parts of this node the cluster link works with.
pub struct LocalNode {
    /// This node's id.
    pub instance_id: Arc<str>,
    /// Its connections, which other nodes' copies are pushed to.
    pub connections: Arc<ConnectionRegistry>,
    /// The other nodes' connections per user, kept up to date by the link.
    pub remote: Arc<RemotePresence>,
    /// Where copies are counted.
    pub metrics: Arc<Metrics>,
    /// Delivery ids pushed on this node (shared with the dispatcher).
    pub recent: Arc<RecentDeliveries>,
}

impl Cluster {
    /// Starts the link to the broker; it keeps the node's `remote` presence
    /// up to date with the other nodes' announcements, and runs until
    /// `stop` flips, which the server does last (after the intake and the
    /// connections finished), then flushes its outbox.
    pub fn start(
        settings: AmqpSettings,
        key: ClusterKey,
        node: LocalNode,
        stop: watch::Receiver<bool>,
    ) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let (commands, inbox) = mpsc::channel(4096);
        let (copies, queued) = mpsc::channel(COPIES_QUEUED);
        let (open_routing, routing) = watch::channel(false);
        let status = Arc::new(Health::connecting());
        let cluster = Arc::new(Self {
            instance_id: Arc::clone(&node.instance_id),
            commands,
            copies,
            routing,
            status: Arc::clone(&status),
            remote: Arc::clone(&node.remote),
        });
        let link = Link::new(settings, key, node, status, open_routing);
        let task = tokio::spawn(link.run(Inboxes { inbox, queued }, stop));
        (cluster, task)
    }

    /// The link's health, for `/readyz`.
    pub fn status(&self) -> &Health {
        &self.status
    }

    /// The user's connections on the other nodes, as they last announced.
    pub fn remote_connections(&self, user: &str) -> u32 {
        self.remote.connections_of(user, Instant::now())
    }

    /// Called after a connection of `user` was registered: announces it
    /// and waits (bounded) until every other node routes the user's
    /// deliveries here, so that a client told `connected` misses nothing
    /// from other nodes. Waits for nothing when no other node is known or
    /// the broker is unreachable.
    pub async fn join(&self, user: &str) {
        let (done, known) = oneshot::channel();
        let command = Membership {
            user: user.into(),
            done: Some(done),
        };
        if self.commands.send(command).await.is_ok() {
            let _ = tokio::time::timeout(JOIN_TIMEOUT, known).await;
        }
    }

    /// Called after a connection of `user` was unregistered: announces the
    /// user's new count.
    pub async fn leave(&self, user: &str) {
        let command = Membership {
            user: user.into(),
            done: None,
        };
        let _ = self.commands.send(command).await;
    }

    /// Reserves room for `count` copies, waiting at most 5 s (also while
    /// the link collects the other nodes' tables): called before an
    /// event's deliveries are pushed, so an event whose copies could not be
    /// kept is not delivered at all.
    pub async fn reserve(&self, count: usize) -> Result<Room<'_>, OutboxFull> {
        let remote = &*self.remote;
        if count == 0 {
            return Ok(Room {
                permits: None,
                remote,
            });
        }
        let count = count.min(COPIES_QUEUED);
        let room = async {
            if !*self.routing.borrow() {
                let mut routing = self.routing.clone();
                let _ = routing.wait_for(|open| *open).await;
            }
            self.copies.reserve_many(count).await
        };
        match tokio::time::timeout(ROOM_WAIT, room).await {
            Ok(Ok(permits)) => Ok(Room {
                permits: Some(permits),
                remote,
            }),
            Ok(Err(_)) | Err(_) => Err(OutboxFull),
        }
    }
}
