//! The task that owns the cluster's broker connection: one session per
//! connection (set-up, then one loop over this node's copies and presence
//! changes, the consumer, the confirms and the timers), reconnecting with
//! backoff. What it does in each case lives beside it: `outbox` (copies
//! out), `gossip` (presence), `inbound` (what comes in), `topology` (what
//! it declares).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use lapin::options::{BasicConsumeOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::{mpsc, watch};

mod gossip;
mod inbound;
mod outbox;
mod topology;

use crate::backoff::Backoff;
use crate::cluster::joins::Joins;
use crate::cluster::presence::{self, Announcement};
use crate::cluster::signing::{self, ClusterKey};
use crate::cluster::{LocalNode, Membership, Outgoing, RemotePresence};
use crate::delivery::recent::RecentDeliveries;
use crate::delivery::registry::ConnectionRegistry;
use crate::health::Health;
use crate::intake::amqp::{AmqpSettings, RECONNECT, stopped};
use crate::metrics::Metrics;
use inbound::{message_type, sender};
use outbox::{Batch, BatchConfirm, OUTBOX_LIMIT};

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
    connections: Arc<ConnectionRegistry>,
    metrics: Arc<Metrics>,
    status: Arc<Health>,
    /// Signs what this node publishes and checks what it consumes.
    key: ClusterKey,
    /// Rejected messages so far, to log the first of a burst only.
    rejected: u64,
    /// Batches not yet confirmed by the broker, oldest first.
    outbox: VecDeque<Batch>,
    /// Delivery ids pushed on this node (shared with the dispatcher).
    recent: Arc<RecentDeliveries>,
    remote: Arc<RemotePresence>,
    /// This node's announcements and the joins waiting for answers.
    joins: Joins,
    /// Opens the dispatcher's way to the outbox once the link knows the others.
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

    /// `headers` with this node's signature of a message added.
    fn signed(&self, kind: &str, body: &[u8], mut headers: FieldTable) -> FieldTable {
        let signature = self.key.sign(kind, &self.instance_id, body);
        headers.insert(
            signing::SIGNATURE_HEADER.into(),
            AMQPValue::LongString(signature.into()),
        );
        headers
    }
}

/// Sleeps until `deadline` (`None`: never; the caller guards that case).
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}
