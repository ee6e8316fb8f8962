//! What this node knows of the other nodes' connections: which nodes hold a
//! user (so a delivery is published to those nodes' queues and no others)
//! and how many connections each has (so a reply's `delivered` counts them
//! cluster-wide, PROTOCOL.md §4, without asking a database per message).
//!
//! Every node announces changes of its per-user connection counts on a
//! fanout exchange that all node queues are bound to, paced by the peers'
//! answers and by [`GATHER`] (module `joins`; changes meanwhile gathered
//! into the next message; deltas only: a user's count after the change). Each announcement carries the node's link session and a
//! sequence number, so a receiver notices a gap (a new session, a lost
//! message) and asks that node alone for its table. A node whose link comes
//! up says `hello` with its own table; the others answer with theirs, to
//! it alone. Nothing re-sends whole tables on a timer: a heartbeat (the
//! current sequence number, no users) every [`HEARTBEAT_EVERY`] keeps a
//! quiet node known, and a node not heard from for [`FORGET_AFTER`]
//! (killed) counts nothing. One that stops cleanly says it is leaving.
//!
//! Body: JSON `{"session": "<id>", "seq": <u64>, "full": bool, "users":
//! {"<user id>": <connections>}, "more": <bool, a further part of the
//! table just sent>, "answer": <bool, when the sender waits for the
//! receivers' answers>, "hello": <bool, when it asks for their tables>,
//! "leaving": <bool, when it stops>}`. A table larger than [`TABLE_PART`]
//! goes in parts: the first `full`, the others `more`, all under one
//! sequence number. An answer's body is `<seq> <session>`; a table
//! request's is empty. The sending node is the message's `app_id`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::delivery::registry::ConnectionRegistry;
use crate::store::Presence;

/// How often a node says it is alive when nothing changed.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// A node not heard from for this long counts no connections.
pub const FORGET_AFTER: Duration = Duration::from_secs(15);
/// How long a join waits for a peer's answer before forgetting the peer.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(1);
/// The least time between two announcements of changes, but for a join's
/// when no earlier announcement waits for answers: changes made sooner are
/// gathered until then into one.
pub const GATHER: Duration = Duration::from_millis(2);
/// Most users in one announcement of changes.
pub const MAX_CHANGES: usize = 512;
/// How long a node whose link came up collects the others' tables, counted
/// from when its own hello came back through its queue (so a backlog in
/// the queue is read first), before it routes by them and answers joins.
pub const DISCOVERY: Duration = Duration::from_millis(500);
/// The longest discovery, should the hello not come back.
pub const DISCOVERY_LIMIT: Duration = Duration::from_secs(5);
/// A table asked for and not received is asked for again after this.
pub const TABLE_RETRY: Duration = Duration::from_secs(10);
/// The most bytes of user ids in one part of a table: far below RabbitMQ's
/// message size limit whatever the number of connections.
pub const TABLE_PART: usize = 1 << 20;
/// The AMQP `type` of announcements and tables (delivery batches have none).
pub const MESSAGE_TYPE: &str = "presence";
/// The AMQP `type` of a peer's answer to an announcement with `answer`.
pub const ACK_TYPE: &str = "presence-ack";
/// The AMQP `type` of a request for the receiver's table.
pub const REQUEST_TYPE: &str = "presence-request";

/// One presence message.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Announcement {
    /// The sender's link session: sequence numbers count within one.
    pub session: String,
    /// The sender's sequence number: one more for every change announced;
    /// a table or heartbeat carries the last one.
    pub seq: u64,
    /// The whole table of the node (users absent have no connection), or
    /// changes only.
    pub full: bool,
    pub users: HashMap<String, u32>,
    /// A further part of the table sent just before, under the same number.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
    /// The sender waits for the receivers' answers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub answer: bool,
    /// The sender's link just came up: receivers send it their tables.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hello: bool,
    /// The sender stops: forget it now rather than after 15 s of silence.
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

/// What applying an announcement asks of the receiving node.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The sender's table is incomplete here (a node not known, a new
    /// session, a missed announcement): ask it for its table.
    pub wants_table: bool,
}

/// A node's number in the index (never reused).
type NodeKey = u32;

struct NodeState {
    name: Arc<str>,
    heard: Instant,
    session: String,
    seq: u64,
    /// When its table was asked for, until it comes: asked again only
    /// after [`TABLE_RETRY`].
    table_asked: Option<Instant>,
    /// The users it holds, so that forgetting it or replacing its table
    /// costs its own users, not the cluster's.
    users: HashSet<Arc<str>>,
}

#[derive(Default)]
struct Tables {
    keys: HashMap<Arc<str>, NodeKey>,
    nodes: HashMap<NodeKey, NodeState>,
    /// User → the nodes holding it and their connections. One entry per
    /// user, so a lookup costs the same whatever the number of nodes.
    holders: HashMap<Arc<str>, Vec<(NodeKey, u32)>>,
    next_key: NodeKey,
}

impl Tables {
    fn live(&self, key: NodeKey, now: Instant) -> Option<&NodeState> {
        self.nodes
            .get(&key)
            .filter(|node| now.duration_since(node.heard) < FORGET_AFTER)
    }

    /// Sets `user`'s connections on node `key` (0: none).
    fn set(&mut self, key: NodeKey, user: &str, count: u32) {
        let Some(node) = self.nodes.get_mut(&key) else {
            return;
        };
        let known = self
            .holders
            .get_key_value(user)
            .map(|(shared, _)| Arc::clone(shared));
        let Some(shared) = known else {
            if count > 0 {
                let user: Arc<str> = user.into();
                node.users.insert(Arc::clone(&user));
                self.holders.insert(user, vec![(key, count)]);
            }
            return;
        };
        let holders = self.holders.get_mut(user).expect("found above");
        match holders.iter().position(|(holder, _)| *holder == key) {
            Some(at) if count == 0 => {
                holders.swap_remove(at);
                node.users.remove(user);
            }
            Some(at) => holders[at].1 = count,
            None if count > 0 => {
                holders.push((key, count));
                node.users.insert(shared);
            }
            None => {}
        }
        if holders.is_empty() {
            self.holders.remove(user);
        }
    }

    /// Removes everything node `key` holds: the cost of its own users.
    fn clear(&mut self, key: NodeKey) {
        let Some(node) = self.nodes.get_mut(&key) else {
            return;
        };
        for user in std::mem::take(&mut node.users) {
            if let Some(holders) = self.holders.get_mut(&user) {
                holders.retain(|(holder, _)| *holder != key);
                if holders.is_empty() {
                    self.holders.remove(&user);
                }
            }
        }
    }

    fn remove_node(&mut self, name: &str) {
        if let Some(key) = self.keys.remove(name) {
            self.clear(key);
            self.nodes.remove(&key);
        }
    }

    fn forget_silent(&mut self, now: Instant) {
        let silent: Vec<Arc<str>> = self
            .nodes
            .values()
            .filter(|node| now.duration_since(node.heard) >= FORGET_AFTER)
            .map(|node| Arc::clone(&node.name))
            .collect();
        for name in silent {
            self.remove_node(&name);
        }
    }
}

/// The other nodes' connections per user, as they announced them.
#[derive(Default)]
pub struct RemotePresence {
    tables: Mutex<Tables>,
}

impl RemotePresence {
    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies what `node` announced at `now`.
    pub fn apply(&self, node: &str, announcement: Announcement, now: Instant) -> Applied {
        let mut tables = self.tables();
        tables.forget_silent(now);
        if announcement.leaving {
            tables.remove_node(node);
            return Applied::default();
        }
        let key = match tables.keys.get(node) {
            Some(key) => *key,
            None => {
                let key = tables.next_key;
                tables.next_key += 1;
                let name: Arc<str> = node.into();
                tables.keys.insert(Arc::clone(&name), key);
                tables.nodes.insert(
                    key,
                    NodeState {
                        name,
                        heard: now,
                        session: String::new(),
                        seq: 0,
                        table_asked: None,
                        users: HashSet::new(),
                    },
                );
                key
            }
        };
        let state = tables.nodes.get_mut(&key).expect("inserted above");
        state.heard = now;
        let same_session = state.session == announcement.session;
        let mut applied = Applied::default();
        if announcement.more {
            // A part of a table: it belongs to the one just applied.
            if !same_session || announcement.seq != state.seq {
                return applied;
            }
        } else if announcement.full {
            state.table_asked = None;
        } else {
            // A change is the next number; a heartbeat repeats the last.
            let expected = if announcement.users.is_empty() {
                state.seq
            } else {
                state.seq + 1
            };
            let in_step = same_session && announcement.seq == expected;
            let asked_lately = state
                .table_asked
                .is_some_and(|asked| now.duration_since(asked) < TABLE_RETRY);
            if !in_step && !asked_lately {
                state.table_asked = Some(now);
                applied.wants_table = true;
            }
        }
        state.session = announcement.session;
        state.seq = announcement.seq;
        if announcement.full {
            tables.clear(key);
        }
        // Counts are absolute, so a change applies even after a gap.
        for (user, count) in &announcement.users {
            tables.set(key, user, *count);
        }
        applied
    }

    /// The nodes heard from recently.
    pub fn nodes(&self, now: Instant) -> Vec<String> {
        let tables = self.tables();
        tables
            .nodes
            .values()
            .filter(|node| now.duration_since(node.heard) < FORGET_AFTER)
            .map(|node| node.name.to_string())
            .collect()
    }

    /// Whether a node other than those in `except` was heard from recently.
    pub fn has_live_node(&self, now: Instant, except: &HashSet<String>) -> bool {
        let tables = self.tables();
        tables.nodes.values().any(|node| {
            now.duration_since(node.heard) < FORGET_AFTER && !except.contains(&*node.name)
        })
    }

    /// The user's connections on other nodes heard from recently.
    pub fn connections_of(&self, user: &str, now: Instant) -> u32 {
        let tables = self.tables();
        let Some(holders) = tables.holders.get(user) else {
            return 0;
        };
        holders
            .iter()
            .filter(|(node, _)| tables.live(*node, now).is_some())
            .map(|(_, count)| *count)
            .fold(0, u32::saturating_add)
    }

    /// The other nodes holding at least one of `users`, each once.
    pub fn nodes_holding<'a>(
        &self,
        users: impl IntoIterator<Item = &'a str>,
        now: Instant,
    ) -> Vec<Arc<str>> {
        let tables = self.tables();
        if tables.holders.is_empty() {
            return Vec::new();
        }
        let mut found: Vec<Arc<str>> = Vec::new();
        for user in users {
            for (key, _) in tables.holders.get(user).into_iter().flatten() {
                if let Some(node) = tables.live(*key, now)
                    && !found.contains(&node.name)
                {
                    found.push(Arc::clone(&node.name));
                }
            }
        }
        found
    }

    /// How many users the other nodes hold, for metrics and tests.
    pub fn users_known(&self) -> usize {
        self.tables().holders.len()
    }
}

/// Plugins' `connection-count` in a cluster: this node's connections plus
/// those the other nodes announced, from memory (no database per call).
pub struct ClusterPresence {
    pub local: Arc<ConnectionRegistry>,
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

    fn change(session: &str, seq: u64, users: &[(&str, u32)]) -> Announcement {
        Announcement {
            session: session.to_owned(),
            seq,
            users: users
                .iter()
                .map(|(user, count)| ((*user).to_owned(), *count))
                .collect(),
            ..Announcement::default()
        }
    }

    fn table(session: &str, seq: u64, users: &[(&str, u32)]) -> Announcement {
        Announcement {
            full: true,
            ..change(session, seq, users)
        }
    }

    fn names(nodes: Vec<Arc<str>>) -> Vec<String> {
        let mut names: Vec<String> = nodes.iter().map(|node| node.to_string()).collect();
        names.sort();
        names
    }

    #[test]
    fn counts_add_up_over_nodes_and_follow_changes_and_tables() {
        let presence = RemotePresence::default();
        let now = Instant::now();
        presence.apply("a", table("s", 3, &[("u", 2), ("v", 1)]), now);
        presence.apply("b", table("t", 1, &[("u", 1)]), now);
        assert_eq!(presence.connections_of("u", now), 3);
        assert_eq!(names(presence.nodes_holding(["u", "v"], now)), ["a", "b"]);
        assert_eq!(names(presence.nodes_holding(["v", "w"], now)), ["a"]);

        assert_eq!(
            presence.apply("a", change("s", 4, &[("u", 0)]), now),
            Applied::default()
        );
        assert_eq!(presence.connections_of("u", now), 1);
        assert_eq!(presence.connections_of("v", now), 1);
        assert_eq!(names(presence.nodes_holding(["u"], now)), ["b"]);

        // A table replaces the node's users.
        presence.apply("a", table("s", 4, &[("w", 1)]), now);
        assert_eq!(presence.connections_of("v", now), 0);
        assert_eq!(presence.connections_of("w", now), 1);
        assert_eq!(presence.users_known(), 2, "u on b, w on a");
    }

    #[test]
    fn a_gap_a_new_session_or_an_unknown_node_asks_for_the_table() {
        let presence = RemotePresence::default();
        let now = Instant::now();
        let unknown = presence.apply("a", change("s", 7, &[("u", 1)]), now);
        assert!(unknown.wants_table, "a node known only by a change");
        assert_eq!(
            presence.connections_of("u", now),
            1,
            "the change applies meanwhile"
        );
        assert!(
            !presence
                .apply("a", change("s", 9, &[("v", 1)]), now)
                .wants_table,
            "asked already"
        );
        assert!(
            presence
                .apply("a", change("s", 10, &[]), now + TABLE_RETRY)
                .wants_table,
            "the table did not come: asked again"
        );
        presence.apply("a", table("s", 9, &[("u", 1), ("v", 1)]), now);
        assert!(
            !presence
                .apply("a", change("s", 10, &[("u", 2)]), now)
                .wants_table
        );
        assert!(
            !presence.apply("a", change("s", 10, &[]), now).wants_table,
            "a heartbeat repeats the last number"
        );
        assert!(
            presence.apply("a", change("s", 11, &[]), now).wants_table,
            "a heartbeat after number 11 was lost"
        );
        presence.apply("a", table("s", 11, &[]), now);
        assert!(
            presence
                .apply("a", change("s", 13, &[("u", 1)]), now)
                .wants_table,
            "number 12 was missed"
        );
        presence.apply("a", table("s", 13, &[]), now);
        assert!(
            presence.apply("a", change("r", 1, &[]), now).wants_table,
            "the node's link restarted"
        );
    }

    #[test]
    fn a_table_in_parts_adds_up_and_a_stray_part_is_ignored() {
        let presence = RemotePresence::default();
        let now = Instant::now();
        presence.apply("a", table("s", 4, &[("u", 1)]), now);
        let part = |session: &str, seq: u64, users: &[(&str, u32)]| Announcement {
            more: true,
            ..change(session, seq, users)
        };
        assert_eq!(
            presence.apply("a", part("s", 4, &[("v", 2)]), now),
            Applied::default()
        );
        assert_eq!(presence.connections_of("v", now), 2);
        presence.apply("a", part("s", 3, &[("w", 1)]), now);
        presence.apply("a", part("old", 4, &[("w", 1)]), now);
        assert_eq!(presence.connections_of("w", now), 0, "not of this table");
        assert!(
            !presence
                .apply("a", change("s", 5, &[("x", 1)]), now)
                .wants_table,
            "the parts kept the sequence"
        );
    }

    #[test]
    fn a_silent_node_is_forgotten_and_a_leaving_one_at_once() {
        let presence = RemotePresence::default();
        let then = Instant::now();
        presence.apply("a", table("s", 1, &[("u", 1)]), then);
        presence.apply("b", table("t", 1, &[("u", 1)]), then);
        assert_eq!(presence.connections_of("u", then), 2);

        presence.apply("b", Announcement::leaving(), then);
        assert_eq!(presence.connections_of("u", then), 1);
        assert_eq!(presence.nodes(then), ["a"]);

        let later = then + FORGET_AFTER;
        assert_eq!(presence.connections_of("u", later), 0);
        assert!(presence.nodes_holding(["u"], later).is_empty());
        assert!(presence.nodes(later).is_empty());
        assert!(
            presence.apply("a", change("s", 2, &[]), later).wants_table,
            "a forgotten node is asked for its table again"
        );
        assert_eq!(presence.users_known(), 0, "the forgotten table is gone");
    }

    #[test]
    fn the_body_round_trips() {
        let sent = table("s", 2, &[("u", 2)]);
        assert_eq!(Announcement::decode(&sent.encode()).unwrap(), sent);
        let asking = Announcement {
            answer: true,
            hello: true,
            ..change("s", 3, &[("u", 1)])
        };
        assert_eq!(Announcement::decode(&asking.encode()).unwrap(), asking);
        assert!(Announcement::decode(b"not json").is_err());
    }
}
