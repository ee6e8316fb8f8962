//! Presence over the broker: this node's announcements and tables, and the
//! other nodes' (applied, answered, or asked for).

use std::time::Instant;

use lapin::options::BasicPublishOptions;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};

use super::Link;
use super::inbound::sender;
use crate::cluster::presence::{self, Announcement};

impl Link {
    /// Publishes the gathered changes: each user's count now.
    pub(super) async fn announce_changes(&mut self, channel: &Channel) -> lapin::Result<()> {
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

    pub(super) fn count_of(&self, user: &str) -> u32 {
        u32::try_from(self.connections.count_of_user(user)).unwrap_or(u32::MAX)
    }

    /// Answers the joins that are done. The peers that did not answer in
    /// time are not waited for until they answer again (a node killed
    /// moments ago should not slow every connect down), but still routed
    /// to: a slow node keeps its users' deliveries.
    pub(super) fn release_joins(&mut self, now: Instant) {
        for peer in self.joins.release(now) {
            tracing::warn!(%peer, "a node did not answer a presence announcement in time; joins do not wait for it until it answers again");
        }
    }

    /// This node's whole table (users with connections), under the last
    /// sequence number announced (the changes after it follow), in parts
    /// of at most [`presence::TABLE_PART`] bytes of user ids: the first
    /// `full`, the others `more`.
    pub(super) fn local_table(&self) -> Vec<Announcement> {
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
    pub(super) async fn announce(
        &self,
        channel: &Channel,
        announcement: &Announcement,
    ) -> lapin::Result<()> {
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
    pub(super) async fn send_table(&self, channel: &Channel, node: &str) -> lapin::Result<()> {
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

    pub(super) async fn publish_presence(
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

    /// Takes a presence message. Another node that said hello gets this
    /// node's table; one whose table is incomplete here is asked for it;
    /// one that waits for an answer gets it. This node's own hello, back
    /// through its queue, says the backlog before it has been read.
    pub(super) async fn hear(
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
            self.send_to(channel, &node, presence::REQUEST_TYPE, Vec::new())
                .await?;
        }
        if answer {
            let body = format!("{seq} {session}").into_bytes();
            self.send_to(channel, &node, presence::ACK_TYPE, body)
                .await?;
        }
        Ok(())
    }

    /// Sends `node` alone a message of `kind`, signed for it alone.
    async fn send_to(
        &self,
        channel: &Channel,
        node: &str,
        kind: &str,
        body: Vec<u8>,
    ) -> lapin::Result<()> {
        let queue = self.queue_of(node);
        let signed_kind = addressed_kind(kind, node);
        self.publish_presence(channel, "", &queue, kind, signed_kind, body)
            .await
    }

    /// A peer has applied this node's announcements up to the answered one
    /// (body: `<seq> <session>`).
    pub(super) fn answered(&mut self, delivery: &lapin::message::Delivery) {
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
}

/// The signed kind of a message for `node` alone (an answer, a request).
pub(super) fn addressed_kind(kind: &str, node: &str) -> String {
    format!("{kind}:{node}")
}
