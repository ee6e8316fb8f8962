//! Delivery across nodes (DESIGN.md "Horizontal scaling"). Every node owns
//! a queue on the nodes exchange (direct), bound to the ids of the users
//! connected to it. A delivery is published once, routed by its users (the
//! routing key plus RabbitMQ's `CC` header), so the broker hands one copy to
//! each node that holds at least one of them and none to the others. The
//! receiving node pushes the frame to its connections of those users; the
//! node that made the delivery ignores its own copy (it pushed locally).
//!
//! Each node also announces its per-user connection counts to the others
//! (module `presence`), so that `delivered` counts connections cluster-wide.
//!
//! Copies go through a bounded in-memory outbox: the router does not wait
//! for the broker, only for room ([`Cluster::reserve`], before it pushes
//! anything, so a full outbox fails the event cleanly instead of dropping
//! copies). Whatever is waiting when the link publishes goes out as one
//! message (module `batch`); unconfirmed batches are published again after a
//! reconnect, and receivers drop a delivery id they have already pushed. At
//! shutdown the link stops last: it publishes what is left and waits for the
//! broker's confirms before it closes.

mod batch;
mod presence;
mod signing;

pub use signing::ClusterKey;

pub use presence::{ClusterPresence, RemotePresence};

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    PublisherConfirm,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::backoff::Backoff;
use crate::connections::{Connections, OutboundFrame, Push};
use crate::health::Health;
use crate::intake::amqp::{AmqpSettings, RECONNECT, stopped};
use crate::metrics::Metrics;
use crate::recent::RecentDeliveries;
use batch::DeliveryCopy;
use presence::Announcement;

/// Most copies published in one message.
const MAX_BATCH: usize = 256;
/// A batch takes no more copies once its body passes this: far below
/// RabbitMQ's message size limit (16 MiB by default from 4.0), so that
/// a batch of large frames is never refused again and again.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// A node queue nobody consumes from is deleted after this long: a node
/// that died leaves no queue and no bindings behind for longer.
const NODE_QUEUE_EXPIRES_MS: i64 = 30_000;
/// Batches waiting for the broker's confirm (or for the broker) beyond this
/// stop the link from taking copies: their senders wait for room.
const OUTBOX_LIMIT: usize = 1_024;
/// Copies handed to the link and not yet in a batch.
const COPIES_QUEUED: usize = 4_096;
/// How long an event waits for room in a full outbox before it fails with
/// `unavailable` (nothing pushed).
const ROOM_WAIT: Duration = Duration::from_secs(5);
/// How long a stopping link waits for the broker to confirm what is left;
/// copies still unconfirmed then are counted as dropped.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new connection waits for its user's binding.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest routing key AMQP allows, in bytes.
const MAX_ROUTING_KEY: usize = 255;

/// The signed kind of a batch of delivery copies (which has no AMQP type).
const BATCH_KIND: &str = "batch";

/// Bind or unbind the user as its local connections say; answer when done.
struct Membership {
    user: Arc<str>,
    done: Option<oneshot::Sender<()>>,
}

/// The outbox is full: the broker is away or does not keep up.
#[derive(Debug, thiserror::Error)]
#[error("the cluster link's outbox is full (the broker is unreachable or slow)")]
pub struct OutboxFull;

/// Room reserved in the outbox for an event's copies.
pub struct Room<'a> {
    permits: Option<mpsc::PermitIterator<'a, Outgoing>>,
}

impl Room<'_> {
    /// Hands a delivery to the nodes holding any of `users` (this node's
    /// own copy is ignored when it comes back). Returns what resolves once
    /// the broker confirmed the copy (an error if it was lost), or `None`
    /// when no other node needs one.
    pub fn forward(
        &mut self,
        delivery_id: String,
        frame: OutboundFrame,
        users: Vec<String>,
    ) -> Option<oneshot::Receiver<()>> {
        let users: Vec<String> = users.into_iter().filter(|user| routable(user)).collect();
        if users.is_empty() {
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
            confirmed,
        });
        Some(on_confirm)
    }
}

/// A copy on its way to the broker, and who waits for its confirm.
struct Outgoing {
    copy: DeliveryCopy,
    confirmed: oneshot::Sender<()>,
}

/// Copies published as one message.
#[derive(Default)]
struct Batch {
    copies: Vec<DeliveryCopy>,
    confirmed: Vec<oneshot::Sender<()>>,
    /// The size of the encoded body, but for its 5-byte header.
    bytes: usize,
}

impl Batch {
    fn len(&self) -> usize {
        self.copies.len()
    }

    /// Whether it takes another copy.
    fn has_room(&self) -> bool {
        self.len() < MAX_BATCH && self.bytes < MAX_BATCH_BYTES
    }

    fn push(&mut self, outgoing: Outgoing) {
        self.bytes += batch::encoded_len(&outgoing.copy);
        self.copies.push(outgoing.copy);
        self.confirmed.push(outgoing.confirmed);
    }

    /// The copies waiting in `queued` (after `first`), up to a batch.
    fn gather(first: Outgoing, queued: &mut mpsc::Receiver<Outgoing>) -> Self {
        let mut batch = Batch::default();
        batch.push(first);
        while batch.has_room() {
            match queued.try_recv() {
                Ok(outgoing) => batch.push(outgoing),
                Err(_) => break,
            }
        }
        batch
    }

    /// Tells the waiters: the broker has the copies.
    fn confirm(self) {
        for confirmed in self.confirmed {
            let _ = confirmed.send(());
        }
    }
}

/// This node's handle on the cluster.
pub struct Cluster {
    instance_id: Arc<str>,
    commands: mpsc::Sender<Membership>,
    copies: mpsc::Sender<Outgoing>,
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
    pub connections: Arc<Connections>,
    /// The other nodes' connections per user, kept up to date by the link.
    pub remote: Arc<RemotePresence>,
    /// Where copies are counted.
    pub metrics: Arc<Metrics>,
    /// Delivery ids pushed on this node (shared with the router).
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
        let LocalNode {
            instance_id,
            connections,
            remote,
            metrics,
            recent,
        } = node;
        let (commands, inbox) = mpsc::channel(4096);
        let (copies, queued) = mpsc::channel(COPIES_QUEUED);
        let status = Arc::new(Health::connecting());
        let link = Link {
            queue: format!("{}.{instance_id}", settings.nodes_exchange),
            presence_exchange: format!("{}.presence", settings.nodes_exchange),
            settings,
            instance_id: Arc::clone(&instance_id),
            connections,
            metrics,
            status: Arc::clone(&status),
            key,
            rejected: 0,
            outbox: VecDeque::new(),
            recent,
            remote: Arc::clone(&remote),
            announced: 0,
            waiting_joins: Vec::new(),
        };
        let task = tokio::spawn(link.run(Inboxes { inbox, queued }, stop));
        let cluster = Arc::new(Self {
            instance_id,
            commands,
            copies,
            status,
            remote,
        });
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

    /// Called after a connection of `user` was registered: routes the
    /// user's deliveries to this node, and waits (bounded) until the broker
    /// does, so that a client told `connected` misses nothing from other
    /// nodes. Does not wait while the broker is unreachable.
    pub async fn join(&self, user: &str) {
        let (done, bound) = oneshot::channel();
        let command = Membership {
            user: user.into(),
            done: Some(done),
        };
        if self.commands.send(command).await.is_ok() {
            let _ = tokio::time::timeout(JOIN_TIMEOUT, bound).await;
        }
    }

    /// Called after a connection of `user` was unregistered: stops routing
    /// the user here once it has no connection left.
    pub async fn leave(&self, user: &str) {
        let command = Membership {
            user: user.into(),
            done: None,
        };
        let _ = self.commands.send(command).await;
    }

    /// Reserves room for `count` copies, waiting at most 5 s:
    /// called before an event's deliveries are pushed, so an event whose
    /// copies could not be kept is not delivered at all.
    pub async fn reserve(&self, count: usize) -> Result<Room<'_>, OutboxFull> {
        if count == 0 {
            return Ok(Room { permits: None });
        }
        let count = count.min(COPIES_QUEUED);
        match tokio::time::timeout(ROOM_WAIT, self.copies.reserve_many(count)).await {
            Ok(Ok(permits)) => Ok(Room {
                permits: Some(permits),
            }),
            Ok(Err(_)) | Err(_) => Err(OutboxFull),
        }
    }
}

/// The task that owns the broker connection of the cluster.
struct Link {
    settings: AmqpSettings,
    instance_id: Arc<str>,
    /// This node's queue: `<nodes exchange>.<instance id>`.
    queue: String,
    /// The fanout exchange of presence announcements:
    /// `<nodes exchange>.presence`.
    presence_exchange: String,
    connections: Arc<Connections>,
    metrics: Arc<Metrics>,
    status: Arc<Health>,
    /// Signs what this node publishes and checks what it consumes.
    key: ClusterKey,
    /// Rejected messages so far, to log the first of a burst only.
    rejected: u64,
    /// Batches not yet confirmed by the broker, oldest first.
    outbox: VecDeque<Batch>,
    /// Delivery ids pushed on this node (shared with the router).
    recent: Arc<RecentDeliveries>,
    remote: Arc<RemotePresence>,
    /// The sequence number of this node's last announcement that asked the
    /// peers to answer.
    announced: u64,
    /// Joins waiting for the peers' answers to their announcement.
    waiting_joins: Vec<WaitingJoin>,
}

/// A new connection's `join`, answered once every peer has applied its
/// announcement (or did not answer in time).
struct WaitingJoin {
    seq: u64,
    peers: HashSet<String>,
    done: oneshot::Sender<()>,
    deadline: Instant,
}

/// What the link takes in: membership changes and copies to publish.
struct Inboxes {
    inbox: mpsc::Receiver<Membership>,
    queued: mpsc::Receiver<Outgoing>,
}

impl Link {
    async fn run(mut self, mut inboxes: Inboxes, mut stop: watch::Receiver<bool>) {
        let mut backoff = RECONNECT;
        loop {
            let wait = match self.session(&mut inboxes, &mut stop, &mut backoff).await {
                Ok(()) => return,
                Err(err) => {
                    // Their joiners go on (a reconnect binds every user).
                    self.waiting_joins.clear();
                    let wait = backoff.next_wait();
                    tracing::warn!("cluster link down, retrying in {wait:?}: {err}");
                    self.status.set(Some(err.to_string()));
                    wait
                }
            };
            let retry = tokio::time::sleep(wait);
            tokio::pin!(retry);
            // Meanwhile: keep copies for later while there is room (then
            // their senders wait), let joiners go (a reconnect binds every
            // connected user anyway).
            loop {
                tokio::select! {
                    () = &mut retry => break,
                    () = stopped(&mut stop) => {
                        inboxes.queued.close();
                        while let Ok(outgoing) = inboxes.queued.try_recv() {
                            self.keep(outgoing);
                        }
                        self.drop_outbox("the broker is unreachable at shutdown");
                        return;
                    }
                    Some(copy) = inboxes.queued.recv(), if self.outbox_has_room() => self.keep(copy),
                    command = inboxes.inbox.recv() => if command.is_none() {
                        return;
                    },
                }
            }
        }
    }

    fn outbox_has_room(&self) -> bool {
        self.outbox.len() < OUTBOX_LIMIT || self.outbox.back().is_some_and(Batch::has_room)
    }

    /// Keeps a copy for when the broker is back.
    fn keep(&mut self, outgoing: Outgoing) {
        match self.outbox.back_mut() {
            Some(batch) if batch.has_room() => batch.push(outgoing),
            _ => {
                let mut batch = Batch::default();
                batch.push(outgoing);
                self.outbox.push_back(batch);
            }
        }
    }

    /// Gives up the copies still in the outbox, counted and said.
    fn drop_outbox(&mut self, why: &str) {
        // Their waiters hear of it when the senders drop.
        let dropped: usize = self.outbox.drain(..).map(|batch| batch.len()).sum();
        if dropped > 0 {
            self.metrics.cluster_copies_dropped(dropped);
            tracing::error!(dropped, "delivery copies for other nodes lost: {why}");
        }
    }

    /// One broker connection. `Ok` only on shutdown.
    async fn session(
        &mut self,
        inboxes: &mut Inboxes,
        stop: &mut watch::Receiver<bool>,
        backoff: &mut Backoff,
    ) -> lapin::Result<()> {
        let connection = Connection::connect(
            &self.settings.url,
            ConnectionProperties::default().with_connection_name("sockets-host cluster".into()),
        )
        .await?;
        let publisher = connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let channel = connection.create_channel().await?;
        // Presence announcements are published here, confirmed: a join
        // answers only once the broker has routed its announcement.
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        self.declare(&channel).await?;
        let mut bound = HashSet::new();
        for user in self.connections.users() {
            self.bind(&channel, &user).await?;
            bound.insert(user);
        }
        let mut incoming = channel
            .basic_consume(
                self.queue.as_str().into(),
                format!("sockets-host-{}", self.instance_id).into(),
                BasicConsumeOptions {
                    no_ack: true,
                    exclusive: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;

        // Copies published and waiting for their confirms, in order: the
        // front of `self.outbox` matches the front of `confirms`.
        let mut confirms: FuturesOrdered<PublisherConfirm> = FuturesOrdered::new();
        for batch in &self.outbox {
            confirms.push_back(self.publish(&publisher, &batch.copies).await?);
        }
        self.status.set(None);
        backoff.reset();
        tracing::info!(queue = %self.queue, exchange = %self.settings.nodes_exchange, "cluster link up");

        // The first tick, at once, tells the others this node's table.
        let mut snapshots = tokio::time::interval(presence::SNAPSHOT_EVERY);
        snapshots.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first_deadline = self.waiting_joins.iter().map(|join| join.deadline).min();
            tokio::select! {
                () = stopped(stop) => break,
                _ = snapshots.tick() => self.announce(&channel, self.local_table()).await?,
                () = sleep_until(first_deadline), if first_deadline.is_some() => {
                    self.release_joins(Instant::now());
                }
                Some(first) = inboxes.queued.recv(), if self.outbox.len() < OUTBOX_LIMIT => {
                    // Everything already waiting goes out with it.
                    let batch = Batch::gather(first, &mut inboxes.queued);
                    self.send(&publisher, &mut confirms, batch).await?;
                }
                command = inboxes.inbox.recv() => match command {
                    None => break,
                    Some(Membership { user, done }) => {
                        self.sync(&channel, &mut bound, user, done).await?;
                    }
                },
                Some(confirmed) = confirms.next(), if !confirms.is_empty() => {
                    self.settle(&publisher, &mut confirms, confirmed).await?;
                }
                delivery = incoming.next() => match delivery {
                    Some(delivery) => {
                        let delivery = delivery?;
                        if !self.authentic(&delivery) {
                            continue;
                        }
                        match message_type(&delivery) {
                            Some(presence::MESSAGE_TYPE) => self.hear(&channel, &delivery).await?,
                            Some(presence::ACK_TYPE) => self.answered(&delivery),
                            _ => self.receive(delivery),
                        }
                    }
                    None => return Err(lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(
                        lapin::ConnectionState::Closed,
                    ))),
                },
            }
        }
        self.flush(&publisher, &mut inboxes.queued, &mut confirms)
            .await;
        // The others stop counting this node's connections now rather than
        // after `FORGET_AFTER`.
        let _ = self.announce(&channel, Announcement::leaving()).await;
        let _ = connection.close(200, "shutting down".into()).await;
        Ok(())
    }

    /// Keeps `batch` in the outbox, then publishes it: should publishing
    /// fail, it is still there to be published after the reconnect.
    async fn send(
        &mut self,
        publisher: &Channel,
        confirms: &mut FuturesOrdered<PublisherConfirm>,
        batch: Batch,
    ) -> lapin::Result<()> {
        self.outbox.push_back(batch);
        let batch = self.outbox.back().expect("just pushed");
        confirms.push_back(self.publish(publisher, &batch.copies).await?);
        Ok(())
    }

    /// Takes the broker's answer for the oldest batch in the outbox: an
    /// ack releases it (and its waiters), a nack publishes it again, an
    /// error leaves it for the reconnect.
    async fn settle(
        &mut self,
        publisher: &Channel,
        confirms: &mut FuturesOrdered<PublisherConfirm>,
        confirmed: lapin::Result<Confirmation>,
    ) -> lapin::Result<()> {
        let confirmation = confirmed?;
        let batch = self.outbox.pop_front().unwrap_or_default();
        match confirmation {
            Confirmation::Nack(_) => self.send(publisher, confirms, batch).await,
            Confirmation::Ack(_) | Confirmation::NotRequested => {
                self.metrics.cluster_copies_sent(batch.len());
                batch.confirm();
                Ok(())
            }
        }
    }

    /// At shutdown: publishes the copies still queued and waits (bounded)
    /// for the broker to confirm every batch; what it did not confirm is
    /// counted as dropped.
    async fn flush(
        &mut self,
        publisher: &Channel,
        queued: &mut mpsc::Receiver<Outgoing>,
        confirms: &mut FuturesOrdered<PublisherConfirm>,
    ) {
        queued.close();
        let flushed = tokio::time::timeout(FLUSH_TIMEOUT, async {
            while let Some(first) = queued.recv().await {
                let batch = Batch::gather(first, queued);
                self.send(publisher, confirms, batch).await?;
            }
            while let Some(confirmed) = confirms.next().await {
                self.settle(publisher, confirms, confirmed).await?;
            }
            Ok::<(), lapin::Error>(())
        })
        .await;
        let why = match flushed {
            Ok(Ok(())) => return,
            Ok(Err(err)) => format!("the broker failed at shutdown: {err}"),
            Err(_) => "the broker did not confirm them in time at shutdown".to_owned(),
        };
        while let Ok(outgoing) = queued.try_recv() {
            self.keep(outgoing);
        }
        self.drop_outbox(&why);
    }

    /// The nodes exchange and this node's queue. The queue is not exclusive
    /// so that it (and what was routed to it) survives a short broker
    /// outage; it expires once unused.
    async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                self.settings.nodes_exchange.as_str().into(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await?;
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(NODE_QUEUE_EXPIRES_MS),
        );
        channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions::default(),
                arguments,
            )
            .await?;
        channel
            .exchange_declare(
                self.presence_exchange.as_str().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.presence_exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    }

    /// Announces `user`'s connection count and binds or unbinds the user as
    /// this node's connections say; answers `done` (a join) once the broker
    /// has bound and every known peer has applied the announcement.
    async fn sync(
        &mut self,
        channel: &Channel,
        bound: &mut HashSet<Arc<str>>,
        user: Arc<str>,
        done: Option<oneshot::Sender<()>>,
    ) -> lapin::Result<()> {
        let count = self.connections.count_of_user(&user);
        let mut peers = HashSet::new();
        let mut seq = None;
        if routable(&user) {
            if done.is_some() && count > 0 {
                peers.extend(self.remote.nodes(Instant::now()));
                if !peers.is_empty() {
                    self.announced += 1;
                    seq = Some(self.announced);
                }
            }
            let change = Announcement {
                full: false,
                users: [(user.to_string(), u32::try_from(count).unwrap_or(u32::MAX))].into(),
                seq,
                leaving: false,
            };
            self.announce(channel, change).await?;
        }
        let wanted = count > 0;
        if wanted && !bound.contains(&user) {
            self.bind(channel, &user).await?;
            bound.insert(user);
        } else if !wanted && bound.contains(&user) {
            self.unbind(channel, &user).await?;
            bound.remove(&user);
        }
        match (done, seq) {
            (Some(done), Some(seq)) => self.waiting_joins.push(WaitingJoin {
                seq,
                peers,
                done,
                deadline: Instant::now() + presence::ACK_TIMEOUT,
            }),
            (Some(done), None) => {
                let _ = done.send(());
            }
            (None, _) => {}
        }
        Ok(())
    }

    /// A peer has applied this node's announcements up to the answered one
    /// (a node's messages arrive in order).
    fn answered(&mut self, delivery: &lapin::message::Delivery) {
        let Some(node) = sender(delivery) else {
            return;
        };
        let Some(seq) = std::str::from_utf8(&delivery.data)
            .ok()
            .and_then(|body| body.parse::<u64>().ok())
        else {
            tracing::warn!("dropping a malformed presence answer from {node}");
            return;
        };
        for join in &mut self.waiting_joins {
            if join.seq <= seq {
                join.peers.remove(node);
            }
        }
        self.release_joins(Instant::now());
    }

    /// Answers the joins that every peer has answered, and those whose time
    /// is up: their silent peers are forgotten until heard from again (a
    /// node killed moments ago should not slow every connect down).
    fn release_joins(&mut self, now: Instant) {
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting_joins)
            .into_iter()
            .partition(|join| join.peers.is_empty() || join.deadline <= now);
        self.waiting_joins = waiting;
        let silent: HashSet<&String> = ready.iter().flat_map(|join| &join.peers).collect();
        for peer in silent {
            tracing::warn!(%peer, "a node did not answer a presence announcement in time; its connections are not counted until it is heard from");
            self.remote.forget(peer);
        }
        for join in ready {
            let _ = join.done.send(());
        }
    }

    /// This node's connections per user (those its queue can be bound for).
    fn local_table(&self) -> Announcement {
        let users = self
            .connections
            .users()
            .iter()
            .filter(|user| routable(user))
            .map(|user| {
                let count = self.connections.count_of_user(user);
                (user.to_string(), u32::try_from(count).unwrap_or(u32::MAX))
            })
            .collect();
        Announcement {
            full: true,
            users,
            ..Announcement::default()
        }
    }

    /// Publishes a presence announcement to every node (this one ignores
    /// its own) and waits until the broker has routed it. A nack is not
    /// retried: the next snapshot makes up for it.
    async fn announce(&self, channel: &Channel, announcement: Announcement) -> lapin::Result<()> {
        let body = announcement.encode();
        let properties = BasicProperties::default()
            .with_app_id(self.instance_id.as_ref().into())
            .with_type(presence::MESSAGE_TYPE.into())
            .with_headers(self.signed(presence::MESSAGE_TYPE, &body, FieldTable::default()));
        channel
            .basic_publish(
                self.presence_exchange.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await?
            .await?;
        Ok(())
    }

    /// Takes another node's announcement; a node heard of for the first
    /// time is told this node's table at once instead of at the next
    /// snapshot.
    async fn hear(
        &self,
        channel: &Channel,
        delivery: &lapin::message::Delivery,
    ) -> lapin::Result<()> {
        let Some(node) = sender(delivery).filter(|node| *node != &*self.instance_id) else {
            return Ok(());
        };
        self.metrics.presence_announcement_received();
        match Announcement::decode(&delivery.data) {
            Ok(announcement) => {
                let seq = announcement.seq;
                if self.remote.apply(node, announcement, Instant::now()) {
                    self.announce(channel, self.local_table()).await?;
                }
                if let Some(seq) = seq {
                    self.answer(channel, node, seq).await?;
                }
            }
            Err(err) => tracing::warn!("dropping a presence message from {node}: {err}"),
        }
        Ok(())
    }

    /// Tells `node` that its announcements up to `seq` are applied: straight
    /// to its queue, through the default exchange.
    async fn answer(&self, channel: &Channel, node: &str, seq: u64) -> lapin::Result<()> {
        let body = seq.to_string().into_bytes();
        let properties = BasicProperties::default()
            .with_app_id(self.instance_id.as_ref().into())
            .with_type(presence::ACK_TYPE.into())
            .with_headers(self.signed(&ack_kind(node), &body, FieldTable::default()));
        channel
            .basic_publish(
                "".into(),
                format!("{}.{node}", self.settings.nodes_exchange).into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await?
            .await?;
        Ok(())
    }

    async fn bind(&self, channel: &Channel, user: &str) -> lapin::Result<()> {
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.settings.nodes_exchange.as_str().into(),
                routing_key(user).as_ref().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    }

    async fn unbind(&self, channel: &Channel, user: &str) -> lapin::Result<()> {
        channel
            .queue_unbind(
                self.queue.as_str().into(),
                self.settings.nodes_exchange.as_str().into(),
                routing_key(user).as_ref().into(),
                FieldTable::default(),
            )
            .await
    }

    /// Publishes a batch addressed to the union of its users: each node
    /// holding at least one of them gets it once.
    async fn publish(
        &self,
        channel: &Channel,
        batch: &[DeliveryCopy],
    ) -> lapin::Result<PublisherConfirm> {
        let mut keys: Vec<std::borrow::Cow<'_, str>> = batch
            .iter()
            .flat_map(|copy| copy.users.iter().map(|user| routing_key(user)))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let (first, others) = keys.split_first().expect("forward skips no users");
        let mut headers = FieldTable::default();
        if !others.is_empty() {
            let cc: Vec<AMQPValue> = others
                .iter()
                .map(|key| AMQPValue::LongString(key.as_ref().into()))
                .collect();
            headers.insert("CC".into(), AMQPValue::FieldArray(FieldArray::from(cc)));
        }
        let body = batch::encode(batch);
        let properties = BasicProperties::default()
            .with_app_id(self.instance_id.as_ref().into())
            .with_headers(self.signed(BATCH_KIND, &body, headers));
        channel
            .basic_publish(
                self.settings.nodes_exchange.as_str().into(),
                first.as_ref().into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await
    }

    /// `headers` with this node's signature of a message added.
    fn signed(&self, kind: &str, body: &[u8], mut headers: FieldTable) -> FieldTable {
        let signature = self.key.sign(kind, &self.instance_id, body);
        headers.insert(
            signing::SIGNATURE_HEADER.into(),
            AMQPValue::LongString(signature.into()),
        );
        headers
    }

    /// Whether a consumed message was signed with the cluster key by the
    /// node it names; others are dropped, counted and (the first of a
    /// burst) logged.
    fn authentic(&mut self, delivery: &lapin::message::Delivery) -> bool {
        // An answer is signed for the node it answers: replayed into
        // another node's queue it does not verify there.
        let kind = match message_type(delivery) {
            Some(presence::ACK_TYPE) => std::borrow::Cow::Owned(ack_kind(&self.instance_id)),
            Some(kind) => std::borrow::Cow::Borrowed(kind),
            None => std::borrow::Cow::Borrowed(BATCH_KIND),
        };
        let signature = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|headers| headers.inner().get(signing::SIGNATURE_HEADER))
            .and_then(|value| match value {
                AMQPValue::LongString(text) => std::str::from_utf8(text.as_bytes()).ok(),
                _ => None,
            });
        let valid = match (sender(delivery), signature) {
            (Some(sender), Some(signature)) => {
                self.key.verify(&kind, sender, &delivery.data, signature)
            }
            _ => false,
        };
        if !valid {
            self.metrics.cluster_message_rejected();
            if self.rejected.is_power_of_two() || self.rejected == 0 {
                tracing::warn!(
                    rejected = self.rejected + 1,
                    "ignoring a cluster message without a valid signature (another \
                     SOCKETS_CLUSTER_KEY, or not from a node)"
                );
            }
            self.rejected += 1;
        }
        valid
    }

    /// Pushes the copies of another node's batch to this node's connections
    /// of their users, each connection once per delivery.
    fn receive(&mut self, delivery: lapin::message::Delivery) {
        if sender(&delivery) == Some(&*self.instance_id) {
            return;
        }
        let copies = match batch::decode(&delivery.data) {
            Ok(copies) => copies,
            Err(err) => {
                tracing::warn!("dropping a cluster message: {err}");
                return;
            }
        };
        let mut queued = 0;
        for copy in copies {
            if !self.recent.first_time(&copy.delivery_id) {
                continue;
            }
            let mut users = copy.users;
            users.sort_unstable();
            users.dedup();
            for user in &users {
                for connection in self.connections.of_user(user) {
                    if connection.push(copy.frame.clone()) == Push::Queued {
                        queued += 1;
                    }
                }
            }
            self.metrics.cluster_copy_received();
        }
        self.metrics.add_deliveries(queued);
    }
}

/// The node that published a cluster message (its `app_id`).
fn sender(delivery: &lapin::message::Delivery) -> Option<&str> {
    delivery
        .properties
        .app_id()
        .as_ref()
        .map(ShortString::as_str)
}

/// A cluster message's AMQP `type`: presence messages have one, batches of
/// copies none.
fn message_type(delivery: &lapin::message::Delivery) -> Option<&str> {
    delivery.properties.kind().as_ref().map(ShortString::as_str)
}

/// Sleeps until `deadline` (`None`: never; the caller guards that case).
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// The signed kind of an answer to `node`'s announcement.
fn ack_kind(node: &str) -> String {
    format!("{}:{node}", presence::ACK_TYPE)
}

/// Whether copies can be routed to the user (every non-empty id can).
fn routable(user: &str) -> bool {
    !user.is_empty()
}

/// The binding and routing key of a user's copies: the id itself, or, for
/// an id longer than an AMQP short string holds (255 bytes; user ids go to
/// 256), a digest of it. Receivers take the users from the signed body, so
/// a key shared by two ids costs a message, never a misdelivery.
fn routing_key(user: &str) -> std::borrow::Cow<'_, str> {
    use sha2::Digest;
    if user.len() <= MAX_ROUTING_KEY {
        return std::borrow::Cow::Borrowed(user);
    }
    let digest = sha2::Sha256::digest(user.as_bytes());
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    std::borrow::Cow::Owned(format!("sha256:{hex}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outgoing(n: usize, frame_bytes: usize) -> Outgoing {
        Outgoing {
            copy: DeliveryCopy {
                delivery_id: format!("d{n}"),
                frame: "x".repeat(frame_bytes).into(),
                users: vec!["u_1".to_owned()],
            },
            confirmed: oneshot::channel().0,
        }
    }

    #[test]
    fn a_batch_stops_at_its_byte_budget_or_its_count() {
        let (copies, mut queued) = mpsc::channel(1024);
        for n in 0..300 {
            copies.try_send(outgoing(n, 16 << 10)).unwrap();
        }
        let first = queued.try_recv().unwrap();
        let batch = Batch::gather(first, &mut queued);
        // 16 KiB frames: the byte budget (1 MiB) ends it after 64.
        assert_eq!(batch.len(), 64);
        assert!(batch.bytes >= MAX_BATCH_BYTES, "{}", batch.bytes);

        let (copies, mut queued) = mpsc::channel(1024);
        for n in 0..300 {
            copies.try_send(outgoing(n, 10)).unwrap();
        }
        let first = queued.try_recv().unwrap();
        assert_eq!(Batch::gather(first, &mut queued).len(), MAX_BATCH);
    }
}
