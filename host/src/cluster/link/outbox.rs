//! The link's outbox: copies gathered into batches (one message per node),
//! published with confirms, republished after a reconnect, flushed at
//! shutdown.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use lapin::options::BasicPublishOptions;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::sync::{mpsc, oneshot};

use super::Link;
use super::topology::routing_key;
use crate::cluster::Outgoing;
use crate::cluster::batch::{self, DeliveryCopy};

/// Most copies published in one batch.
pub(super) const MAX_BATCH: usize = 256;

/// A batch takes no more copies once its body passes this: far below
/// RabbitMQ's message size limit (16 MiB by default from 4.0), so that
/// a batch of large frames is never refused again and again.
pub(super) const MAX_BATCH_BYTES: usize = 1 << 20;

/// Batches waiting for the broker's confirm (or for the broker) beyond this
/// stop the link from taking copies: their senders wait for room.
pub(super) const OUTBOX_LIMIT: usize = 1_024;

/// How long a stopping link waits for the broker to confirm what is left;
/// copies still unconfirmed then are counted as dropped.
pub(super) const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The signed kind of a batch of delivery copies (which has no AMQP type).
pub(super) const BATCH_KIND: &str = "batch";

/// The broker's answer for every message of a batch: a nack if any was
/// nacked.
pub(super) type BatchConfirm = Pin<Box<dyn Future<Output = lapin::Result<Confirmation>> + Send>>;

/// Copies gathered to be published together (one message per node).
#[derive(Default)]
pub(super) struct Batch {
    copies: Vec<DeliveryCopy>,
    /// The nodes each copy goes to.
    nodes: Vec<Vec<Arc<str>>>,
    confirmed: Vec<oneshot::Sender<()>>,
    /// The size of the encoded body of all the copies, but for its header.
    bytes: usize,
}

impl Batch {
    pub(super) fn len(&self) -> usize {
        self.copies.len()
    }

    /// Whether it takes another copy.
    pub(super) fn has_room(&self) -> bool {
        self.len() < MAX_BATCH && self.bytes < MAX_BATCH_BYTES
    }

    pub(super) fn push(&mut self, outgoing: Outgoing) {
        self.bytes += batch::encoded_len(&outgoing.copy);
        self.copies.push(outgoing.copy);
        self.nodes.push(outgoing.nodes);
        self.confirmed.push(outgoing.confirmed);
    }

    /// The copies waiting in `queued` (after `first`), up to a batch.
    pub(super) fn gather(first: Outgoing, queued: &mut mpsc::Receiver<Outgoing>) -> Self {
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
    pub(super) fn by_node(&self) -> Vec<(&Arc<str>, Vec<&DeliveryCopy>)> {
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
    pub(super) fn confirm(self) {
        for confirmed in self.confirmed {
            let _ = confirmed.send(());
        }
    }
}

impl Link {
    pub(super) fn outbox_has_room(&self) -> bool {
        self.outbox.len() < OUTBOX_LIMIT || self.outbox.back().is_some_and(Batch::has_room)
    }

    /// Keeps a copy for when the broker is back.
    pub(super) fn keep(&mut self, outgoing: Outgoing) {
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
    pub(super) fn drop_outbox(&mut self, why: &str) {
        // Their waiters hear of it when the senders drop.
        let dropped: usize = self.outbox.drain(..).map(|batch| batch.len()).sum();
        if dropped > 0 {
            self.metrics.cluster_copies_dropped(dropped);
            tracing::error!(dropped, "delivery copies for other nodes lost: {why}");
        }
    }

    /// Keeps `batch` in the outbox, then publishes it: should publishing
    /// fail, it is still there to be published after the reconnect.
    pub(super) async fn send(
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
    pub(super) async fn settle(
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
    pub(super) async fn flush(
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

    /// Publishes a batch: one message per node it goes to, with the copies
    /// for that node. Resolves once the broker answered every message.
    pub(super) async fn publish(
        &self,
        channel: &Channel,
        batch: &Batch,
    ) -> lapin::Result<BatchConfirm> {
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
