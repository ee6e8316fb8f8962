//! One delivery's frame to the connections its recipients name: each
//! connection once, the sending connection never, and per addressed user a
//! count of the connections that took the frame (its log record says so).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::delivery::registry::{ConnectionHandle, ConnectionRegistry, OutboundFrame, Push};
use crate::plugin::Recipient;

/// Where one frame went.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reached {
    /// Per addressed user (by id or through one of its connections), in the
    /// order first addressed: how many of its connections queued the frame.
    /// Users with no live connection are listed with 0.
    pub users: Vec<(String, u32)>,
    /// Connections that queued the frame, `sender-others` copies included.
    pub queued: usize,
}

impl Reached {
    /// Nobody reached (the delivery was pushed here before): the users
    /// addressed by id, each with 0 connections, for their log records.
    pub fn nobody(recipients: &[Recipient]) -> Self {
        let mut users: Vec<(String, u32)> = Vec::new();
        for recipient in recipients {
            if let Recipient::User(user) = recipient
                && !users.iter().any(|(seen, _)| seen == user)
            {
                users.push((user.clone(), 0));
            }
        }
        Reached { users, queued: 0 }
    }
}

/// The sender of the event a delivery answers, when a client sent it.
#[derive(Debug, Clone, Copy)]
pub struct Sender<'a> {
    /// The sending user: `sender-others` names its other connections.
    pub user: &'a str,
    /// The sending connection, never pushed to.
    pub connection: &'a str,
}

/// Pushes `frame` to the recipients' connections on this node.
///
/// `sender-others` copies are pushed but not counted: the addressed users'
/// records are the audit.
pub fn fan_out(
    connections: &ConnectionRegistry,
    recipients: &[Recipient],
    sender: Option<Sender<'_>>,
    frame: &OutboundFrame,
) -> Reached {
    // One recipient cannot name a connection or a user twice; several can,
    // and only then is it worth remembering what was done (a direct
    // message, to a user and `sender-others`, usually needs neither).
    let counted = recipients
        .iter()
        .filter(|recipient| !matches!(recipient, Recipient::SenderOthers))
        .count();
    // The sender whose other connections get copies, if any.
    let others_of = sender.filter(|_| recipients.contains(&Recipient::SenderOthers));
    let may_reach_sender_twice = others_of.is_some_and(|sender| {
        recipients.iter().any(|recipient| match recipient {
            Recipient::User(user) => user == sender.user,
            Recipient::Connection(_) => true,
            Recipient::SenderOthers => false,
        })
    });
    let mut fanout = Fanout {
        frame,
        sender_connection: sender.map(|sender| sender.connection),
        offered: (counted > 1 || may_reach_sender_twice).then(HashSet::new),
        slots: (counted > 1).then(HashMap::new),
        reached: Reached::default(),
    };
    for recipient in recipients {
        match recipient {
            Recipient::User(user) => {
                let slot = fanout.slot(user);
                let mut took = 0;
                connections.for_each_of_user(user, |connection| {
                    if fanout.offer(connection) {
                        took += 1;
                    }
                });
                fanout.add(slot, took);
            }
            Recipient::Connection(id) => {
                if let Some(connection) = connections.get(id) {
                    let slot = fanout.slot(&connection.user_id);
                    let took = u32::from(fanout.offer(&connection));
                    fanout.add(slot, took);
                }
            }
            Recipient::SenderOthers => {}
        }
    }
    // After the counted recipients, so that a sender also addressed by id
    // has its connections counted.
    if let Some(sender) = others_of {
        connections.for_each_of_user(sender.user, |connection| {
            fanout.offer(connection);
        });
    }
    fanout.reached
}

struct Fanout<'a> {
    frame: &'a OutboundFrame,
    sender_connection: Option<&'a str>,
    /// Connections already offered the frame (only when recipients can
    /// overlap).
    offered: Option<HashSet<Arc<str>>>,
    /// Each user's index in `reached.users` (only with several users or
    /// connections named).
    slots: Option<HashMap<Arc<str>, usize>>,
    reached: Reached,
}

impl Fanout<'_> {
    /// Offers the frame to a connection not offered it yet; whether it
    /// queued the frame.
    fn offer(&mut self, connection: &ConnectionHandle) -> bool {
        if Some(&*connection.id) == self.sender_connection {
            return false;
        }
        if let Some(offered) = &mut self.offered
            && !offered.insert(Arc::clone(&connection.id))
        {
            return false;
        }
        let queued = connection.push(self.frame.clone()) == Push::Queued;
        self.reached.queued += usize::from(queued);
        queued
    }

    /// The user's entry in `reached.users`, added with 0 if new.
    fn slot(&mut self, user: &str) -> usize {
        let next = self.reached.users.len();
        if let Some(slots) = &mut self.slots {
            if let Some(&slot) = slots.get(user) {
                return slot;
            }
            slots.insert(Arc::from(user), next);
        }
        self.reached.users.push((user.to_owned(), 0));
        next
    }

    fn add(&mut self, slot: usize, took: u32) {
        let count = &mut self.reached.users[slot].1;
        *count = count.saturating_add(took);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Node {
        connections: ConnectionRegistry,
        handles: HashMap<&'static str, Arc<ConnectionHandle>>,
    }

    /// A node with these `(connection, user, queue size)` connections.
    fn node(live: &[(&'static str, &str, usize)]) -> Node {
        let connections = ConnectionRegistry::new();
        let mut handles = HashMap::new();
        for &(id, user, queue) in live {
            let handle = Arc::new(ConnectionHandle::new(
                id.into(),
                user.into(),
                "student".into(),
                queue,
            ));
            connections.register(Arc::clone(&handle));
            handles.insert(id, handle);
        }
        Node {
            connections,
            handles,
        }
    }

    impl Node {
        fn send(&self, recipients: &[Recipient], sender: Option<Sender<'_>>) -> Reached {
            fan_out(&self.connections, recipients, sender, &"frame".into())
        }

        /// How many frames each connection has queued, by connection id.
        fn frames(&self) -> Vec<(&'static str, usize)> {
            let mut frames: Vec<_> = self
                .handles
                .iter()
                .map(|(&id, handle)| {
                    let mut count = 0;
                    while handle.try_next_frame().is_some() {
                        count += 1;
                    }
                    (id, count)
                })
                .collect();
            frames.sort_unstable();
            frames
        }
    }

    fn user(id: &str) -> Recipient {
        Recipient::User(id.to_owned())
    }

    fn connection(id: &str) -> Recipient {
        Recipient::Connection(id.to_owned())
    }

    const SENDER: Sender<'static> = Sender {
        user: "u1",
        connection: "a",
    };

    #[test]
    fn a_user_gets_the_frame_on_every_connection_but_the_sending_one() {
        let node = node(&[("a", "u1", 4), ("b", "u1", 4), ("c", "u2", 4)]);
        let reached = node.send(&[user("u1")], Some(SENDER));
        assert_eq!(reached.users, vec![("u1".to_owned(), 1)]);
        assert_eq!(reached.queued, 1);
        assert_eq!(node.frames(), vec![("a", 0), ("b", 1), ("c", 0)]);
    }

    #[test]
    fn a_user_without_connections_is_listed_with_none() {
        let node = node(&[("a", "u1", 4)]);
        let reached = node.send(&[user("offline"), user("u1")], None);
        assert_eq!(
            reached.users,
            vec![("offline".to_owned(), 0), ("u1".to_owned(), 1)]
        );
    }

    #[test]
    fn a_connection_named_by_id_and_through_its_user_gets_one_frame() {
        let node = node(&[("a", "u1", 4), ("b", "u1", 4), ("c", "u2", 4)]);
        let reached = node.send(
            &[connection("a"), user("u1"), user("u1"), connection("c")],
            None,
        );
        assert_eq!(
            reached.users,
            vec![("u1".to_owned(), 2), ("u2".to_owned(), 1)]
        );
        assert_eq!(reached.queued, 3);
        assert_eq!(node.frames(), vec![("a", 1), ("b", 1), ("c", 1)]);
    }

    #[test]
    fn sender_others_copies_are_pushed_once_and_counted_only_when_addressed() {
        let live = [("a", "u1", 4), ("b", "u1", 4), ("c", "u2", 4)];
        let node = node(&live);
        let reached = node.send(&[user("u2"), Recipient::SenderOthers], Some(SENDER));
        assert_eq!(reached.users, vec![("u2".to_owned(), 1)]);
        assert_eq!(reached.queued, 2);
        assert_eq!(node.frames(), vec![("a", 0), ("b", 1), ("c", 1)]);

        let reached = node.send(&[Recipient::SenderOthers, user("u1")], Some(SENDER));
        assert_eq!(reached.users, vec![("u1".to_owned(), 1)]);
        assert_eq!(node.frames(), vec![("a", 0), ("b", 1), ("c", 0)]);

        // A sender's connection named by id is not pushed twice either.
        let reached = node.send(&[connection("b"), Recipient::SenderOthers], Some(SENDER));
        assert_eq!(reached.users, vec![("u1".to_owned(), 1)]);
        assert_eq!(node.frames(), vec![("a", 0), ("b", 1), ("c", 0)]);

        // Without a sending client there are no "others".
        let reached = node.send(&[Recipient::SenderOthers], None);
        assert_eq!(reached, Reached::default());
    }

    #[test]
    fn a_connection_whose_queue_is_full_is_not_counted() {
        let node = node(&[("a", "u1", 1), ("b", "u1", 4)]);
        node.handles["a"].push("earlier".into());
        let reached = node.send(&[user("u1")], None);
        assert_eq!(reached.users, vec![("u1".to_owned(), 1)]);
        assert_eq!(reached.queued, 1);
    }
}
