//! The task that owns the cluster's broker connection: it publishes this
//! node's copies and presence, consumes the other nodes', and reconnects.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::{mpsc, oneshot, watch};

use super::batch::{self, DeliveryCopy};
use super::joins::Joins;
use super::presence::{self, Announcement};
use super::signing::{self, ClusterKey};
use super::{LocalNode, Membership, Outgoing, RemotePresence};
use crate::backoff::Backoff;
use crate::connections::{Connections, Push};
use crate::health::Health;
use crate::intake::amqp::{AmqpSettings, RECONNECT, stopped};
use crate::metrics::Metrics;
use crate::recent::RecentDeliveries;

/// Most copies published in one batch.
const MAX_BATCH: usize = 256;
/// A batch takes no more copies once its body passes this: far below
/// RabbitMQ's message size limit (16 MiB by default from 4.0), so that
/// a batch of large frames is never refused again and again.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// A node queue nobody consumes from is deleted after this long: a node
/// that died leaves no queue behind for longer.
const NODE_QUEUE_EXPIRES_MS: i64 = 30_000;
/// Batches waiting for the broker's confirm (or for the broker) beyond this
/// stop the link from taking copies: their senders wait for room.
const OUTBOX_LIMIT: usize = 1_024;
/// How long a stopping link waits for the broker to confirm what is left;
/// copies still unconfirmed then are counted as dropped.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest routing key AMQP allows, in bytes.
const MAX_ROUTING_KEY: usize = 255;
/// The signed kind of a batch of delivery copies (which has no AMQP type).
const BATCH_KIND: &str = "batch";

/// The broker's answer for every message of a batch: a nack if any was
/// nacked.
type BatchConfirm = Pin<Box<dyn Future<Output = lapin::Result<Confirmation>> + Send>>;

/// Copies gathered to be published together (one message per node).
#[derive(Default)]
struct Batch {
    copies: Vec<DeliveryCopy>,
    /// The nodes each copy goes to.
    nodes: Vec<Vec<Arc<str>>>,
    confirmed: Vec<oneshot::Sender<()>>,
    /// The size of the encoded body of all the copies, but for its header.
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
        self.nodes.push(outgoing.nodes);
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

    /// Each node the batch goes to, with its copies.
    fn by_node(&self) -> Vec<(&Arc<str>, Vec<&DeliveryCopy>)> {
        let mut targets: Vec<(&Arc<str>, Vec<&DeliveryCopy>)> = Vec::new();
        for (copy, nodes) in self.copies.iter().zip(&self.nodes) {
            for node in nodes {
                match targets.iter_mut().find(|(target, _)| *target == node) {
                    Some((_, copies)) => copies.push(copy),
                    None => targets.push((node, vec![copy])),
                }
            }
        }
        targets
    }

    /// Tells the waiters: the broker has the copies.
    fn confirm(self) {
        for confirmed in self.confirmed {
            let _ = confirmed.send(());
        }
    }
}

/// What the link takes in: membership changes and copies to publish.
pub(super) struct Inboxes {
    pub inbox: mpsc::Receiver<Membership>,
    pub queued: mpsc::Receiver<Outgoing>,
}

/// The task that owns the broker connection of the cluster.
pub(super) struct Link {
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
    /// This node's announcements and the joins waiting for answers.
    joins: Joins,
    /// Opens the router's way to the outbox once the link knows the others.
    routing: watch::Sender<bool>,
}

impl Link {
    pub(super) fn new(
        settings: AmqpSettings,
        key: ClusterKey,
        node: LocalNode,
        status: Arc<Health>,
        routing: watch::Sender<bool>,
    ) -> Self {
        let LocalNode {
            instance_id,
            connections,
            remote,
            metrics,
            recent,
        } = node;
        Self {
            queue: format!("{}.{instance_id}", settings.nodes_exchange),
            presence_exchange: format!("{}.presence", settings.nodes_exchange),
            settings,
            instance_id,
            connections,
            metrics,
            status,
            key,
            rejected: 0,
            outbox: VecDeque::new(),
            recent,
            remote,
            joins: Joins::new(),
            routing,
        }
    }

    pub(super) async fn run(mut self, mut inboxes: Inboxes, mut stop: watch::Receiver<bool>) {
        let mut backoff = RECONNECT;
        loop {
            let wait = match self.session(&mut inboxes, &mut stop, &mut backoff).await {
                Ok(()) => {
                    self.routing.send_replace(true);
                    return;
                }
                Err(err) => {
                    // Joiners go on; the next session's table has their users.
                    self.joins.link_down();
                    // Copies wait in the outbox, routed as last known.
                    self.routing.send_replace(true);
                    let wait = backoff.next_wait();
                    tracing::warn!("cluster link down, retrying in {wait:?}: {err}");
                    self.status.set(Some(err.to_string()));
                    wait
                }
            };
            let retry = tokio::time::sleep(wait);
            tokio::pin!(retry);
            // Meanwhile: keep copies for later while there is room (then
            // their senders wait), let joiners go.
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
        // Presence goes out unconfirmed: a join waits for the peers'
        // answers, which imply the broker routed it, and a lost
        // announcement shows as a gap in the sequence numbers.
        let channel = connection.create_channel().await?;
        self.declare(&channel).await?;
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
        let mut confirms: FuturesOrdered<BatchConfirm> = FuturesOrdered::new();
        for batch in &self.outbox {
            confirms.push_back(self.publish(&publisher, batch).await?);
        }
        backoff.reset();

        // Hello: this node's table, and a request for the others'.
        self.routing.send_replace(false);
        self.joins
            .start_session(uuid::Uuid::now_v7().to_string(), Instant::now());
        let mut table = self.local_table();
        table[0].hello = true;
        table[0].answer = true;
        for part in &table {
            self.announce(&channel, part).await?;
        }
        tracing::info!(queue = %self.queue, exchange = %self.settings.nodes_exchange, "cluster link up, discovering the other nodes");

        let mut heartbeats = tokio::time::interval(presence::HEARTBEAT_EVERY);
        heartbeats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeats.tick().await;
        loop {
            let next = self.joins.next_deadline();
            tokio::select! {
                () = stopped(stop) => break,
                _ = heartbeats.tick() => {
                    let heartbeat = Announcement {
                        session: self.joins.session().to_owned(),
                        seq: self.joins.seq(),
                        ..Announcement::default()
                    };
                    self.announce(&channel, &heartbeat).await?;
                }
                () = sleep_until(next), if next.is_some() => {
                    self.on_time(&channel).await?;
                }
                Some(first) = inboxes.queued.recv(), if self.outbox.len() < OUTBOX_LIMIT => {
                    // Everything already waiting goes out with it.
                    let batch = Batch::gather(first, &mut inboxes.queued);
                    self.send(&publisher, &mut confirms, batch).await?;
                }
                command = inboxes.inbox.recv() => match command {
                    None => break,
                    Some(Membership { user, done }) => {
                        let now = Instant::now();
                        let alone = !self.remote.has_live_node(now, self.joins.unresponsive());
                        self.joins.change(user, done, alone, now);
                        if self.joins.changes_due(now) {
                            self.announce_changes(&channel).await?;
                        }
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
                            Some(presence::REQUEST_TYPE) => {
                                if let Some(node) = sender(&delivery) {
                                    let node = node.to_owned();
                                    self.send_table(&channel, &node).await?;
                                }
                            }
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
        let _ = self.announce(&channel, &Announcement::leaving()).await;
        let _ = connection.close(200, "shutting down".into()).await;
        Ok(())
    }

    /// What is due now: gathered changes announced, the discovery ended,
    /// joins answered or timed out.
    async fn on_time(&mut self, channel: &Channel) -> lapin::Result<()> {
        let now = Instant::now();
        if self.joins.changes_due(now) {
            self.announce_changes(channel).await?;
        }
        if self.joins.end_discovery(&self.remote.nodes(now), now) {
            tracing::info!(
                nodes = self.remote.nodes(now).len(),
                "cluster link ready: the other nodes' tables are in"
            );
            self.status.set(None);
            self.routing.send_replace(true);
        }
        self.release_joins(now);
        Ok(())
    }

    /// Publishes the gathered changes: each user's count now.
    async fn announce_changes(&mut self, channel: &Channel) -> lapin::Result<()> {
        let now = Instant::now();
        let Some(changes) = self.joins.take_changes(self.remote.nodes(now), now) else {
            return Ok(());
        };
        let users = changes
            .users
            .iter()
            .map(|user| (user.to_string(), self.count_of(user)))
            .collect();
        let announcement = Announcement {
            session: self.joins.session().to_owned(),
            seq: changes.seq,
            users,
            answer: changes.answer,
            ..Announcement::default()
        };
        self.announce(channel, &announcement).await?;
        // Peers may all have left meanwhile: nobody to wait for.
        self.release_joins(now);
        Ok(())
    }

    fn count_of(&self, user: &str) -> u32 {
        u32::try_from(self.connections.count_of_user(user)).unwrap_or(u32::MAX)
    }

    /// Answers the joins that are done. The peers that did not answer in
    /// time are not waited for until they answer again (a node killed
    /// moments ago should not slow every connect down), but still routed
    /// to: a slow node keeps its users' deliveries.
    fn release_joins(&mut self, now: Instant) {
        for peer in self.joins.release(now) {
            tracing::warn!(%peer, "a node did not answer a presence announcement in time; joins do not wait for it until it answers again");
        }
    }

    /// Keeps `batch` in the outbox, then publishes it: should publishing
    /// fail, it is still there to be published after the reconnect.
    async fn send(
        &mut self,
        publisher: &Channel,
        confirms: &mut FuturesOrdered<BatchConfirm>,
        batch: Batch,
    ) -> lapin::Result<()> {
        self.outbox.push_back(batch);
        let batch = self.outbox.back().expect("just pushed");
        confirms.push_back(self.publish(publisher, batch).await?);
        Ok(())
    }

    /// Takes the broker's answer for the oldest batch in the outbox: an
    /// ack releases it (and its waiters), a nack publishes it again, an
    /// error leaves it for the reconnect.
    async fn settle(
        &mut self,
        publisher: &Channel,
        confirms: &mut FuturesOrdered<BatchConfirm>,
        confirmed: lapin::Result<Confirmation>,
    ) -> lapin::Result<()> {
        let confirmation = confirmed?;
        let batch = self
            .outbox
            .pop_front()
            .expect("every confirm awaited has its batch in the outbox");
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
        confirms: &mut FuturesOrdered<BatchConfirm>,
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

    /// The nodes exchange and this node's queue, bound to it once by the
    /// node's id and to the presence exchange. The queue is durable and not
    /// exclusive, so that it (and what was routed to it) survives a short
    /// outage of the link or the broker; it expires once unused.
    async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(NODE_QUEUE_EXPIRES_MS),
        );
        // Durable, so that a broker restart keeps it (and its bindings):
        // copies republished after the restart must find it.
        channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await?;
        let exchanges = [
            (&self.settings.nodes_exchange, ExchangeKind::Direct),
            (&self.presence_exchange, ExchangeKind::Fanout),
        ];
        for (exchange, kind) in exchanges {
            channel
                .exchange_declare(
                    exchange.as_str().into(),
                    kind.clone(),
                    durable,
                    FieldTable::default(),
                )
                .await?;
            let routing_key = match kind {
                ExchangeKind::Direct => routing_key(&self.instance_id),
                _ => Cow::Borrowed(""),
            };
            channel
                .queue_bind(
                    self.queue.as_str().into(),
                    exchange.as_str().into(),
                    routing_key.as_ref().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }

    /// This node's whole table (users with connections), under the last
    /// sequence number announced (the changes after it follow), in parts
    /// of at most [`presence::TABLE_PART`] bytes of user ids: the first
    /// `full`, the others `more`.
    fn local_table(&self) -> Vec<Announcement> {
        let part = || Announcement {
            session: self.joins.session().to_owned(),
            seq: self.joins.seq(),
            ..Announcement::default()
        };
        let mut parts = vec![Announcement {
            full: true,
            ..part()
        }];
        let mut bytes = 0;
        for user in self.connections.users().iter() {
            let count = self.count_of(user);
            if count == 0 {
                continue;
            }
            if bytes >= presence::TABLE_PART {
                parts.push(Announcement {
                    more: true,
                    ..part()
                });
                bytes = 0;
            }
            // The id as JSON escapes it at worst (6 bytes a byte), the count.
            bytes += 6 * user.len() + 16;
            let last = parts.last_mut().expect("one part at least");
            last.users.insert(user.to_string(), count);
        }
        parts
    }

    /// Publishes a presence message to every node (this one ignores its
    /// own). Not confirmed: see [`Link::session`].
    async fn announce(&self, channel: &Channel, announcement: &Announcement) -> lapin::Result<()> {
        self.publish_presence(
            channel,
            self.presence_exchange.as_str(),
            "",
            presence::MESSAGE_TYPE,
            presence::MESSAGE_TYPE.to_owned(),
            announcement.encode(),
        )
        .await
    }

    /// Sends this node's table to `node` alone (it said hello, or noticed a
    /// gap), through the default exchange: on the presence channel, so it
    /// reaches `node` before any later announcement.
    async fn send_table(&self, channel: &Channel, node: &str) -> lapin::Result<()> {
        let queue = self.queue_of(node);
        for part in self.local_table() {
            self.publish_presence(
                channel,
                "",
                &queue,
                presence::MESSAGE_TYPE,
                presence::MESSAGE_TYPE.to_owned(),
                part.encode(),
            )
            .await?;
        }
        Ok(())
    }

    async fn publish_presence(
        &self,
        channel: &Channel,
        exchange: &str,
        routing_key: &str,
        message_type: &str,
        signed_kind: String,
        body: Vec<u8>,
    ) -> lapin::Result<()> {
        let properties = BasicProperties::default()
            .with_app_id(self.instance_id.as_ref().into())
            .with_type(message_type.into())
            .with_headers(self.signed(&signed_kind, &body, FieldTable::default()));
        channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await?;
        self.metrics.presence_message_sent();
        Ok(())
    }

    fn queue_of(&self, node: &str) -> String {
        format!("{}.{node}", self.settings.nodes_exchange)
    }

    /// Takes a presence message. Another node that said hello gets this
    /// node's table; one whose table is incomplete here is asked for it;
    /// one that waits for an answer gets it. This node's own hello, back
    /// through its queue, says the backlog before it has been read.
    async fn hear(
        &mut self,
        channel: &Channel,
        delivery: &lapin::message::Delivery,
    ) -> lapin::Result<()> {
        let Some(node) = sender(delivery) else {
            return Ok(());
        };
        let node = node.to_owned();
        let announcement = match Announcement::decode(&delivery.data) {
            Ok(announcement) => announcement,
            Err(err) => {
                tracing::warn!("dropping a presence message from {node}: {err}");
                return Ok(());
            }
        };
        if node == *self.instance_id {
            // This node's own, back through the fanout.
            if announcement.hello && announcement.session == self.joins.session() {
                self.joins.hello_returned(Instant::now());
            }
            return Ok(());
        }
        self.metrics.presence_announcement_received();
        if announcement.leaving {
            self.joins.peer_left(&node);
        }
        let (seq, hello, answer) = (announcement.seq, announcement.hello, announcement.answer);
        let session = announcement.session.clone();
        let applied = self.remote.apply(&node, announcement, Instant::now());
        if hello {
            self.send_table(channel, &node).await?;
        } else if applied.wants_table {
            self.publish_presence(
                channel,
                "",
                &self.queue_of(&node),
                presence::REQUEST_TYPE,
                addressed_kind(presence::REQUEST_TYPE, &node),
                Vec::new(),
            )
            .await?;
        }
        if answer {
            self.publish_presence(
                channel,
                "",
                &self.queue_of(&node),
                presence::ACK_TYPE,
                addressed_kind(presence::ACK_TYPE, &node),
                format!("{seq} {session}").into_bytes(),
            )
            .await?;
        }
        Ok(())
    }

    /// A peer has applied this node's announcements up to the answered one
    /// (body: `<seq> <session>`).
    fn answered(&mut self, delivery: &lapin::message::Delivery) {
        let Some(node) = sender(delivery) else {
            return;
        };
        let answer = std::str::from_utf8(&delivery.data)
            .ok()
            .and_then(|body| body.split_once(' '))
            .and_then(|(seq, session)| Some((seq.parse::<u64>().ok()?, session)));
        let Some((seq, session)) = answer else {
            tracing::warn!("dropping a malformed presence answer from {node}");
            return;
        };
        self.joins.answered(node, session, seq);
        self.release_joins(Instant::now());
    }

    /// Publishes a batch: one message per node it goes to, with the copies
    /// for that node. Resolves once the broker answered every message.
    async fn publish(&self, channel: &Channel, batch: &Batch) -> lapin::Result<BatchConfirm> {
        let mut confirms = Vec::new();
        for (node, copies) in batch.by_node() {
            let body = batch::encode(&copies);
            let properties = BasicProperties::default()
                .with_app_id(self.instance_id.as_ref().into())
                .with_headers(self.signed(BATCH_KIND, &body, FieldTable::default()));
            // Mandatory: a copy for a node whose queue is gone comes back
            // and is counted, not silently dropped by the broker.
            let confirm = channel
                .basic_publish(
                    self.settings.nodes_exchange.as_str().into(),
                    routing_key(node).as_ref().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &body,
                    properties,
                )
                .await?;
            confirms.push((copies.len(), confirm));
        }
        let metrics = Arc::clone(&self.metrics);
        Ok(Box::pin(async move {
            let mut answer = Confirmation::NotRequested;
            for (copies, confirm) in confirms {
                match confirm.await? {
                    nack @ Confirmation::Nack(_) => answer = nack,
                    Confirmation::Ack(Some(_)) => {
                        // Its node is gone (its users are not connected
                        // there any more): nobody to push them to.
                        metrics.cluster_copies_unroutable(copies);
                        tracing::warn!(copies, "delivery copies for a node whose queue is gone");
                    }
                    ack if !matches!(answer, Confirmation::Nack(_)) => answer = ack,
                    _ => {}
                }
            }
            Ok(answer)
        }))
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
        // Answers and requests are signed for the node they address:
        // replayed into another node's queue they do not verify there.
        let kind = match message_type(delivery) {
            Some(kind @ (presence::ACK_TYPE | presence::REQUEST_TYPE)) => {
                Cow::Owned(addressed_kind(kind, &self.instance_id))
            }
            Some(kind) => Cow::Borrowed(kind),
            None => Cow::Borrowed(BATCH_KIND),
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

/// The signed kind of a message for `node` alone (an answer, a request).
fn addressed_kind(kind: &str, node: &str) -> String {
    format!("{kind}:{node}")
}

/// The binding and routing key of a node's copies: its id, or, for an id
/// longer than an AMQP short string holds, a digest of it.
fn routing_key(node: &str) -> Cow<'_, str> {
    use sha2::Digest;
    if node.len() <= MAX_ROUTING_KEY {
        return Cow::Borrowed(node);
    }
    let digest = sha2::Sha256::digest(node.as_bytes());
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    Cow::Owned(format!("sha256:{hex}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outgoing(n: usize, frame_bytes: usize, nodes: &[&str]) -> Outgoing {
        Outgoing {
            copy: DeliveryCopy {
                delivery_id: format!("d{n}"),
                frame: "x".repeat(frame_bytes).into(),
                users: vec!["u_1".to_owned()],
            },
            nodes: nodes.iter().map(|node| Arc::from(*node)).collect(),
            confirmed: oneshot::channel().0,
        }
    }

    #[test]
    fn a_batch_stops_at_its_byte_budget_or_its_count() {
        let (copies, mut queued) = mpsc::channel(1024);
        for n in 0..300 {
            copies.try_send(outgoing(n, 16 << 10, &["a"])).unwrap();
        }
        let first = queued.try_recv().unwrap();
        let batch = Batch::gather(first, &mut queued);
        // 16 KiB frames: the byte budget (1 MiB) ends it after 64.
        assert_eq!(batch.len(), 64);
        assert!(batch.bytes >= MAX_BATCH_BYTES, "{}", batch.bytes);

        let (copies, mut queued) = mpsc::channel(1024);
        for n in 0..300 {
            copies.try_send(outgoing(n, 10, &["a"])).unwrap();
        }
        let first = queued.try_recv().unwrap();
        assert_eq!(Batch::gather(first, &mut queued).len(), MAX_BATCH);
    }

    #[test]
    fn each_node_gets_the_copies_for_it_and_no_others() {
        let mut batch = Batch::default();
        batch.push(outgoing(1, 10, &["a"]));
        batch.push(outgoing(2, 10, &["a", "b"]));
        batch.push(outgoing(3, 10, &["c"]));
        let by_node: Vec<(String, Vec<String>)> = batch
            .by_node()
            .into_iter()
            .map(|(node, copies)| {
                let ids = copies.iter().map(|copy| copy.delivery_id.clone()).collect();
                (node.to_string(), ids)
            })
            .collect();
        let expected = [
            ("a", vec!["d1", "d2"]),
            ("b", vec!["d2"]),
            ("c", vec!["d3"]),
        ]
        .map(|(node, ids)| {
            (
                node.to_owned(),
                ids.into_iter().map(str::to_owned).collect(),
            )
        });
        assert_eq!(by_node, expected);
    }
}
