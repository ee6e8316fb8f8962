//! What the link consumes: authenticated before it is parsed, then copies
//! pushed to this node's connections.

use std::borrow::Cow;

use lapin::types::{AMQPValue, ShortString};

use super::Link;
use super::gossip::addressed_kind;
use super::outbox::BATCH_KIND;
use crate::cluster::batch;
use crate::cluster::presence;
use crate::cluster::signing;
use crate::delivery::registry::Push;

impl Link {
    /// Whether a consumed message was signed with the cluster key by the
    /// node it names; others are dropped, counted and (the first of a
    /// burst) logged.
    pub(super) fn authentic(&mut self, delivery: &lapin::message::Delivery) -> bool {
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
    pub(super) fn receive(&mut self, delivery: lapin::message::Delivery) {
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
pub(super) fn sender(delivery: &lapin::message::Delivery) -> Option<&str> {
    delivery
        .properties
        .app_id()
        .as_ref()
        .map(ShortString::as_str)
}

/// A cluster message's AMQP `type`: presence messages have one, batches of
/// copies none.
pub(super) fn message_type(delivery: &lapin::message::Delivery) -> Option<&str> {
    delivery.properties.kind().as_ref().map(ShortString::as_str)
}
