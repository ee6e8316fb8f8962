//! The bookkeeping between a connection's registration and its `connected`
//! frame in a cluster: a new connection's user is announced at once unless
//! an earlier announcement still waits for answers, and other changes once
//! the last announcement is [`GATHER`] old; changes meanwhile are gathered
//! into the next one (group commit: a lone connect waits for no timer, a
//! storm sends one announcement per round trip to the peers, or per
//! [`GATHER`]). A new connection hears `connected` once every peer known
//! when it was announced has applied it (answered its sequence number in
//! this session), or did not answer within [`ACK_TIMEOUT`]: such a peer is
//! *unresponsive* — still routed to, but not waited for — until it answers
//! again. That is all correctness needs: after it, a delivery made on any
//! responsive node is published to this one. With no responsive peer, a
//! join waits for nothing. While the link discovers the others (until
//! [`DISCOVERY`] after its hello came back, [`DISCOVERY_LIMIT`] at most)
//! joins wait for the discovery to end, then for the peers it found.
//!
//! No I/O here: the link feeds it events and publishes what it returns.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use super::presence::{ACK_TIMEOUT, DISCOVERY, DISCOVERY_LIMIT, GATHER, MAX_CHANGES};

/// A batch of changes to announce: the users whose counts changed (the
/// link reads their counts when it publishes) under a new sequence number.
#[derive(Debug, PartialEq, Eq)]
pub struct Changes {
    pub seq: u64,
    pub users: Vec<Arc<str>>,
    /// Joins wait for the receivers' answers.
    pub answer: bool,
}

struct WaitingJoin {
    seq: u64,
    /// The peers yet to answer; `None` while the link discovers them.
    peers: Option<HashSet<String>>,
    done: Vec<oneshot::Sender<()>>,
    deadline: Instant,
}

/// This node's side of presence: what to announce, and who waits for it.
pub struct Joins {
    session: String,
    /// The last sequence number announced in this session.
    seq: u64,
    changed: HashSet<Arc<str>>,
    /// Joins among the changes not yet announced.
    joining: Vec<oneshot::Sender<()>>,
    gather_until: Option<Instant>,
    /// When the last changes were announced.
    last_announced: Option<Instant>,
    discovery_until: Option<Instant>,
    /// The highest sequence number each peer answered in this session.
    answered: HashMap<String, u64>,
    /// Peers that let a join's wait run out: not waited for until they
    /// answer again.
    unresponsive: HashSet<String>,
    waiting: Vec<WaitingJoin>,
}

impl Default for Joins {
    fn default() -> Self {
        Self::new()
    }
}

impl Joins {
    pub fn new() -> Self {
        Self {
            session: String::new(),
            seq: 0,
            changed: HashSet::new(),
            joining: Vec::new(),
            gather_until: None,
            last_announced: None,
            discovery_until: None,
            answered: HashMap::new(),
            unresponsive: HashSet::new(),
            waiting: Vec::new(),
        }
    }

    pub fn session(&self) -> &str {
        &self.session
    }

    /// The last sequence number announced.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The link came up: a new session, whose first message (sequence
    /// number 1) is this node's whole table. The discovery starts.
    pub fn start_session(&mut self, session: String, now: Instant) {
        self.link_down();
        self.session = session;
        self.seq = 1;
        self.answered.clear();
        self.unresponsive.clear();
        self.discovery_until = Some(now + DISCOVERY_LIMIT);
    }

    /// This node's hello came back through its own queue: what was queued
    /// before it has been read, and the peers' tables are on their way.
    pub fn hello_returned(&mut self, now: Instant) {
        if let Some(until) = &mut self.discovery_until {
            *until = (*until).min(now + DISCOVERY);
        }
    }

    /// The peers not to wait for (they did not answer in time lately).
    pub fn unresponsive(&self) -> &HashSet<String> {
        &self.unresponsive
    }

    /// Whether the link is still collecting the others' tables.
    pub fn discovering(&self) -> bool {
        self.discovery_until.is_some()
    }

    /// The link is down: joins go on (they would wait for nothing), and
    /// changes are covered by the next session's table.
    pub fn link_down(&mut self) {
        self.last_announced = None;
        self.changed.clear();
        self.joining.clear();
        self.waiting.clear();
        self.gather_until = None;
        self.discovery_until = None;
    }

    /// A user's local connection count changed; `join` is a new
    /// connection's wait for `connected`. `alone`: no responsive peer is
    /// known.
    pub fn change(
        &mut self,
        user: Arc<str>,
        join: Option<oneshot::Sender<()>>,
        alone: bool,
        now: Instant,
    ) {
        if let Some(join) = join {
            if alone && !self.discovering() {
                let _ = join.send(());
            } else {
                self.joining.push(join);
            }
        }
        self.changed.insert(user);
        self.schedule(now);
    }

    /// When the gathered changes go out: at once for joins when no earlier
    /// announcement waits for answers, else [`GATHER`] after the last one.
    fn schedule(&mut self, now: Instant) {
        if self.changed.is_empty() {
            return;
        }
        let paced = self
            .last_announced
            .map_or(now, |last| last + GATHER)
            .max(now);
        let due = if !self.joining.is_empty() && self.waiting.is_empty() {
            now
        } else {
            paced
        };
        self.gather_until = Some(self.gather_until.map_or(due, |until| until.min(due)));
    }

    /// Whether the gathered changes are to be announced now.
    pub fn changes_due(&self, now: Instant) -> bool {
        self.changed.len() >= MAX_CHANGES || self.gather_until.is_some_and(|until| until <= now)
    }

    /// Takes the gathered changes under the next sequence number; their
    /// joins wait for `peers` (the nodes known now) to answer it.
    pub fn take_changes(&mut self, peers: Vec<String>, now: Instant) -> Option<Changes> {
        self.gather_until = None;
        if self.changed.is_empty() {
            return None;
        }
        self.last_announced = Some(now);
        self.seq += 1;
        let seq = self.seq;
        let users: Vec<Arc<str>> = self.changed.drain().collect();
        let done = std::mem::take(&mut self.joining);
        let answer = !done.is_empty();
        if answer {
            let discovering = self.discovering();
            let unresponsive = &self.unresponsive;
            self.waiting.push(WaitingJoin {
                seq,
                peers: (!discovering).then(|| {
                    peers
                        .into_iter()
                        .filter(|peer| !unresponsive.contains(peer))
                        .collect()
                }),
                done,
                deadline: now.max(self.discovery_until.unwrap_or(now)) + ACK_TIMEOUT,
            });
        }
        Some(Changes { seq, users, answer })
    }

    /// `peer` has applied this node's announcements of `session` up to
    /// `seq` (a node's messages arrive in order). An answer of another
    /// session (queued before a reconnect) says nothing of this one.
    pub fn answered(&mut self, peer: &str, session: &str, seq: u64) {
        if session != self.session {
            return;
        }
        self.unresponsive.remove(peer);
        let highest = self.answered.entry(peer.to_owned()).or_default();
        *highest = (*highest).max(seq);
        for join in &mut self.waiting {
            if let Some(peers) = &mut join.peers
                && join.seq <= seq
            {
                peers.remove(peer);
            }
        }
    }

    /// `peer` stopped cleanly: nobody waits for it any more.
    pub fn peer_left(&mut self, peer: &str) {
        self.answered.remove(peer);
        self.unresponsive.remove(peer);
        for join in &mut self.waiting {
            if let Some(peers) = &mut join.peers {
                peers.remove(peer);
            }
        }
    }

    /// Ends the discovery at its time: the joins it held wait for the
    /// peers found (those that have not answered yet). Returns whether it
    /// ended now.
    pub fn end_discovery(&mut self, peers: &[String], now: Instant) -> bool {
        if self.discovery_until.is_none_or(|until| until > now) {
            return false;
        }
        self.discovery_until = None;
        for join in &mut self.waiting {
            if join.peers.is_none() {
                join.peers = Some(
                    peers
                        .iter()
                        .filter(|peer| self.answered.get(*peer).is_none_or(|seq| *seq < join.seq))
                        .cloned()
                        .collect(),
                );
            }
        }
        true
    }

    /// Answers the joins every peer has answered, and those whose time is
    /// up. Returns the peers that did not answer in time (now unresponsive).
    pub fn release(&mut self, now: Instant) -> HashSet<String> {
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|join| {
                join.peers.as_ref().is_some_and(HashSet::is_empty) || join.deadline <= now
            });
        self.waiting = waiting;
        let mut silent = HashSet::new();
        for join in ready {
            silent.extend(join.peers.into_iter().flatten());
            for done in join.done {
                let _ = done.send(());
            }
        }
        for peer in &silent {
            // Not waited for until it answers; other joins stop waiting.
            self.unresponsive.insert(peer.clone());
            for join in &mut self.waiting {
                if let Some(peers) = &mut join.peers {
                    peers.remove(peer);
                }
            }
        }
        // Joins gathered behind the answered announcement may go now.
        self.schedule(now);
        silent
    }

    /// When something is due next: changes to announce, the discovery's
    /// end, a join's deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        let joins = self.waiting.iter().map(|join| join.deadline);
        joins
            .chain(self.gather_until)
            .chain(self.discovery_until)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join() -> (oneshot::Sender<()>, oneshot::Receiver<()>) {
        oneshot::channel()
    }

    fn answered(receiver: &mut oneshot::Receiver<()>) -> bool {
        receiver.try_recv().is_ok()
    }

    fn peers(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    /// A session past its discovery.
    fn started(now: Instant) -> Joins {
        let mut joins = Joins::new();
        joins.start_session("s".to_owned(), now);
        joins.hello_returned(now);
        assert!(joins.end_discovery(&[], now + DISCOVERY));
        joins
    }

    #[test]
    fn alone_a_join_waits_for_nothing() {
        let now = Instant::now();
        let mut joins = started(now);
        let (done, mut heard) = join();
        joins.change("u".into(), Some(done), true, now);
        assert!(answered(&mut heard));
        // The change is still announced, for peers to come.
        assert!(joins.changes_due(now));
        let changes = joins.take_changes(Vec::new(), now).unwrap();
        assert_eq!((changes.seq, changes.answer), (2, false));
        assert_eq!(changes.users, vec![Arc::<str>::from("u")]);
    }

    #[test]
    fn a_join_goes_out_at_once_unless_one_waits_for_answers() {
        let now = Instant::now();
        let mut joins = started(now);
        let (first, _first_heard) = join();
        joins.change("u".into(), Some(first), false, now);
        assert!(joins.changes_due(now), "nothing waits for answers");
        joins.take_changes(peers(&["a"]), now);
        let soon = now + GATHER / 4;
        let (second, _second_heard) = join();
        joins.change("v".into(), Some(second), false, soon);
        joins.change("w".into(), None, false, soon);
        assert!(!joins.changes_due(soon), "u's announcement waits for a");
        joins.answered("a", "s", 2);
        joins.release(soon);
        assert!(joins.changes_due(soon), "answered: the gathered join goes");
        let changes = joins.take_changes(peers(&["a"]), soon).unwrap();
        assert_eq!(changes.users.len(), 2, "gathered into one");
    }

    #[test]
    fn other_changes_go_out_gather_after_the_last_announcement() {
        let now = Instant::now();
        let mut joins = started(now);
        joins.change("u".into(), None, false, now);
        assert!(joins.changes_due(now), "nothing announced lately");
        joins.take_changes(Vec::new(), now);
        let soon = now + GATHER / 2;
        joins.change("v".into(), None, false, soon);
        joins.change("w".into(), None, false, soon);
        assert!(!joins.changes_due(soon));
        assert_eq!(joins.next_deadline(), Some(now + GATHER));
        let changes = joins.take_changes(Vec::new(), now + GATHER).unwrap();
        assert_eq!(changes.users.len(), 2, "gathered into one");
        let later = now + 10 * GATHER;
        joins.change("x".into(), None, false, later);
        assert!(joins.changes_due(later));
    }

    #[test]
    fn a_join_waits_for_every_peer_to_answer_its_number_or_a_later_one() {
        let now = Instant::now();
        let mut joins = started(now);
        let (first, mut first_heard) = join();
        let (second, mut second_heard) = join();
        joins.change("u".into(), Some(first), false, now);
        joins.change("v".into(), None, false, now);
        let changes = joins.take_changes(peers(&["a", "b"]), now).unwrap();
        assert_eq!((changes.seq, changes.answer), (2, true));
        assert_eq!(changes.users.len(), 2);
        joins.change("w".into(), Some(second), false, now);
        joins.take_changes(peers(&["a", "b"]), now).unwrap();

        joins.answered("a", "s", 2);
        assert!(joins.release(now).is_empty());
        assert!(!answered(&mut first_heard));
        joins.answered("b", "s", 3);
        assert!(joins.release(now).is_empty());
        assert!(answered(&mut first_heard), "b's answer to 3 covers 2");
        assert!(!answered(&mut second_heard), "a answered 2 only");
        joins.answered("a", "s", 3);
        joins.release(now);
        assert!(answered(&mut second_heard));
        assert_eq!(joins.next_deadline(), None);
    }

    #[test]
    fn a_silent_peer_holds_a_join_for_the_timeout_and_is_named() {
        let now = Instant::now();
        let mut joins = started(now);
        let (done, mut heard) = join();
        joins.change("u".into(), Some(done), false, now);
        joins.take_changes(peers(&["a", "dead"]), now);
        joins.answered("a", "s", 2);
        assert!(joins.release(now).is_empty());
        assert_eq!(joins.next_deadline(), Some(now + ACK_TIMEOUT));
        let silent = joins.release(now + ACK_TIMEOUT);
        assert_eq!(silent, ["dead".to_owned()].into());
        assert!(answered(&mut heard));
    }

    #[test]
    fn during_discovery_joins_wait_for_its_end_then_for_the_peers_found() {
        let now = Instant::now();
        let mut joins = Joins::new();
        joins.start_session("s".to_owned(), now);
        joins.hello_returned(now);
        let (done, mut heard) = join();
        // Even with no peer known yet: the discovery may find some.
        joins.change("u".into(), Some(done), true, now);
        let changes = joins.take_changes(Vec::new(), now).unwrap();
        assert!(changes.answer);
        joins.answered("a", "s", 2);
        assert!(joins.release(now).is_empty());
        assert!(!answered(&mut heard), "discovery still on");
        assert!(!joins.end_discovery(&peers(&["a", "b"]), now));
        assert!(joins.end_discovery(&peers(&["a", "b"]), now + DISCOVERY));
        joins.release(now + DISCOVERY);
        assert!(!answered(&mut heard), "b found and not answered yet");
        joins.answered("b", "s", 2);
        joins.release(now + DISCOVERY);
        assert!(answered(&mut heard));
    }

    #[test]
    fn a_peer_that_did_not_answer_in_time_is_not_waited_for_until_it_answers() {
        let now = Instant::now();
        let mut joins = started(now);
        let (first, mut first_heard) = join();
        joins.change("u".into(), Some(first), false, now);
        joins.take_changes(peers(&["slow", "b"]), now);
        let (second, mut second_heard) = join();
        joins.change("v".into(), Some(second), false, now);
        joins.answered("b", "s", 2);
        joins.release(now + ACK_TIMEOUT);
        assert!(answered(&mut first_heard));
        assert!(joins.unresponsive().contains("slow"));
        assert!(
            joins.changes_due(now + ACK_TIMEOUT),
            "v goes: nothing waits now"
        );
        joins.take_changes(peers(&["slow", "b"]), now + ACK_TIMEOUT);
        joins.answered("b", "s", 3);
        joins.release(now + ACK_TIMEOUT);
        assert!(answered(&mut second_heard), "slow is not waited for");
        joins.answered("slow", "s", 3);
        assert!(joins.unresponsive().is_empty(), "it answered again");
    }

    #[test]
    fn an_answer_of_another_session_counts_for_nothing() {
        let now = Instant::now();
        let mut joins = started(now);
        let (done, mut heard) = join();
        joins.change("u".into(), Some(done), false, now);
        joins.take_changes(peers(&["a"]), now);
        joins.answered("a", "an earlier session", 9);
        joins.release(now);
        assert!(!answered(&mut heard));
        joins.answered("a", "s", 2);
        joins.release(now);
        assert!(answered(&mut heard));
    }

    #[test]
    fn a_peer_that_leaves_is_not_waited_for() {
        let now = Instant::now();
        let mut joins = started(now);
        let (done, mut heard) = join();
        joins.change("u".into(), Some(done), false, now);
        joins.take_changes(peers(&["a", "leaving"]), now);
        joins.answered("a", "s", 2);
        joins.peer_left("leaving");
        assert!(joins.release(now).is_empty(), "nobody was silent");
        assert!(answered(&mut heard));
    }

    #[test]
    fn discovery_ends_after_the_hello_came_back_or_at_its_limit() {
        let now = Instant::now();
        let mut joins = Joins::new();
        joins.start_session("s".to_owned(), now);
        assert!(!joins.end_discovery(&[], now + DISCOVERY));
        assert!(joins.end_discovery(&[], now + DISCOVERY_LIMIT));
        joins.start_session("t".to_owned(), now);
        let backlog_read = now + DISCOVERY;
        joins.hello_returned(backlog_read);
        assert!(!joins.end_discovery(&[], backlog_read));
        assert!(joins.end_discovery(&[], backlog_read + DISCOVERY));
    }
}
