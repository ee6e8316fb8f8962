//! What this node knows of the other nodes' connections, so that a reply's
//! `delivered` counts the recipient's connections cluster-wide (PROTOCOL.md
//! §4) without asking a database per message.
//!
//! Every node publishes its per-user connection counts on a fanout exchange
//! that all node queues are bound to: a delta whenever one of its users'
//! counts changes, and its full table every [`SNAPSHOT_EVERY`], which heals
//! lost deltas and tells new nodes. The delta of a new connection carries a
//! sequence number; the peers it knows answer it once applied (an
//! [`ACK_TYPE`] message to its queue), and the connection hears `connected`
//! only then — so a message sent after that, on any node, counts it. A peer
//! that does not answer within [`ACK_TIMEOUT`] is forgotten until it is heard
//! again; one not heard from for [`FORGET_AFTER`] (killed) as well; one that
//! stops cleanly says it is leaving.
//!
//! Body: JSON `{"full": bool, "users": {"<user id>": <connections>},
//! "seq": <u64, when an answer is wanted>, "leaving": <bool, when true>}`;
//! an answer's body is the sequence number in decimal. The sending node is
//! the message's `app_id`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::connections::Connections;
use crate::store::Presence;

/// How often a node publishes its full table.
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(5);
/// A node not heard from for this long counts no connections.
pub const FORGET_AFTER: Duration = Duration::from_secs(15);
/// How long a join waits for a peer's answer before forgetting the peer.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(1);
/// The AMQP `type` of presence announcements (delivery batches have none).
pub const MESSAGE_TYPE: &str = "presence";
/// The AMQP `type` of a peer's answer to an announcement with a `seq`.
pub const ACK_TYPE: &str = "presence-ack";

/// One presence message.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Announcement {
    /// The whole table of the node (users absent have no connection), or
    /// changes only.
    pub full: bool,
    pub users: HashMap<String, u32>,
    /// Set when the sender waits for the peers' answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The sender stops: forget it now rather than after [`FORGET_AFTER`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leaving: bool,
}

impl Announcement {
    /// What a stopping node announces.
    pub fn leaving() -> Self {
        Self {
            full: true,
            leaving: true,
            ..Self::default()
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a presence table serializes")
    }

    pub fn decode(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }
}

struct NodeTable {
    users: HashMap<String, u32>,
    heard: Instant,
}

/// The other nodes' connection counts, as last announced.
#[derive(Default)]
pub struct RemotePresence {
    nodes: Mutex<HashMap<String, NodeTable>>,
}

impl RemotePresence {
    /// Applies what `node` announced at `now`. Returns whether the node was
    /// unknown (forgotten or new) and stays, so that it can be told this
    /// node's table. A node with no connections stays known: it still
    /// routes messages, so joins wait for its answers too.
    pub fn apply(&self, node: &str, announcement: Announcement, now: Instant) -> bool {
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        nodes.retain(|_, table| now.duration_since(table.heard) < FORGET_AFTER);
        if announcement.leaving {
            nodes.remove(node);
            return false;
        }
        let known = nodes.contains_key(node);
        let table = nodes.entry(node.to_owned()).or_insert_with(|| NodeTable {
            users: HashMap::new(),
            heard: now,
        });
        table.heard = now;
        if announcement.full {
            table.users = announcement.users;
        } else {
            table.users.extend(announcement.users);
        }
        table.users.retain(|_, count| *count > 0);
        !known
    }

    /// The nodes heard from recently.
    pub fn nodes(&self, now: Instant) -> Vec<String> {
        let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        nodes
            .iter()
            .filter(|(_, table)| now.duration_since(table.heard) < FORGET_AFTER)
            .map(|(node, _)| node.clone())
            .collect()
    }

    /// Stops counting `node`'s connections until it is heard from again.
    pub fn forget(&self, node: &str) {
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        nodes.remove(node);
    }

    /// The user's connections on other nodes heard from recently.
    pub fn connections_of(&self, user: &str, now: Instant) -> u32 {
        let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        nodes
            .values()
            .filter(|table| now.duration_since(table.heard) < FORGET_AFTER)
            .filter_map(|table| table.users.get(user))
            .sum()
    }
}

/// Plugins' `connection-count` in a cluster: this node's connections plus
/// those the other nodes announced, from memory (no database per call).
pub struct ClusterPresence {
    pub local: Arc<Connections>,
    pub remote: Arc<RemotePresence>,
}

impl Presence for ClusterPresence {
    fn count_of_user(&self, user_id: &str) -> usize {
        let remote = self.remote.connections_of(user_id, Instant::now());
        self.local
            .count_of_user(user_id)
            .saturating_add(usize::try_from(remote).unwrap_or(usize::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announcement(full: bool, users: &[(&str, u32)]) -> Announcement {
        Announcement {
            full,
            users: users
                .iter()
                .map(|(user, count)| ((*user).to_owned(), *count))
                .collect(),
            seq: None,
            leaving: false,
        }
    }

    #[test]
    fn counts_add_up_over_nodes_and_follow_deltas_and_snapshots() {
        let presence = RemotePresence::default();
        let now = Instant::now();
        assert!(presence.apply("a", announcement(true, &[("u", 2), ("v", 1)]), now));
        assert!(presence.apply("b", announcement(false, &[("u", 1)]), now));
        assert_eq!(presence.connections_of("u", now), 3);

        assert!(!presence.apply("a", announcement(false, &[("u", 0)]), now));
        assert_eq!(presence.connections_of("u", now), 1);
        assert_eq!(presence.connections_of("v", now), 1);

        // A snapshot replaces the node's table.
        presence.apply("a", announcement(true, &[("w", 1)]), now);
        assert_eq!(presence.connections_of("v", now), 0);
        assert_eq!(presence.connections_of("w", now), 1);
    }

    #[test]
    fn a_silent_node_is_forgotten_and_a_leaving_one_at_once() {
        let presence = RemotePresence::default();
        let then = Instant::now();
        presence.apply("a", announcement(true, &[("u", 1)]), then);
        presence.apply("b", announcement(true, &[("u", 1)]), then);
        assert_eq!(presence.connections_of("u", then), 2);

        assert!(!presence.apply("b", Announcement::leaving(), then));
        assert_eq!(presence.connections_of("u", then), 1);

        assert_eq!(presence.nodes(then), ["a"]);
        let later = then + FORGET_AFTER;
        assert_eq!(presence.connections_of("u", later), 0);
        assert!(presence.nodes(later).is_empty());
        assert!(
            presence.apply("a", announcement(false, &[]), later),
            "a forgotten node is new again"
        );
    }

    #[test]
    fn a_node_without_connections_stays_known_and_is_new_only_once() {
        let presence = RemotePresence::default();
        let now = Instant::now();
        // Two idle nodes must not answer each other's empty tables forever.
        assert!(presence.apply("a", announcement(true, &[]), now));
        assert!(!presence.apply("a", announcement(true, &[]), now));
        assert_eq!(presence.nodes(now), ["a"]);
    }

    #[test]
    fn a_forgotten_node_counts_nothing_until_heard_again() {
        let presence = RemotePresence::default();
        let now = Instant::now();
        presence.apply("a", announcement(true, &[("u", 1)]), now);
        presence.forget("a");
        assert_eq!(presence.connections_of("u", now), 0);
        assert!(presence.apply("a", announcement(true, &[("u", 1)]), now));
        assert_eq!(presence.connections_of("u", now), 1);
    }

    #[test]
    fn the_body_round_trips() {
        let sent = announcement(true, &[("u", 2)]);
        assert_eq!(Announcement::decode(&sent.encode()).unwrap(), sent);
        let asking = Announcement {
            seq: Some(7),
            ..announcement(false, &[("u", 1)])
        };
        assert_eq!(Announcement::decode(&asking.encode()).unwrap(), asking);
        assert!(Announcement::decode(b"not json").is_err());
    }
}
