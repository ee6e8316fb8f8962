//! The live connections of this node: user → connections, connection id →
//! connection. Delivery looks recipients up here and pushes frames into each
//! connection's bounded outbound queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use tokio::sync::{Notify, mpsc};

/// Close code for a client that cannot keep up (PROTOCOL.md §6).
pub const CLOSE_TRY_AGAIN_LATER: u16 = 1013;

/// A frame ready to write: shared between all its recipients.
pub type OutboundFrame = axum::extract::ws::Utf8Bytes;

/// Why and how a connection is to be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseRequest {
    /// WebSocket close code.
    pub code: u16,
    /// Close reason.
    pub reason: &'static str,
}

/// One live connection as the rest of the host sees it.
#[derive(Debug)]
pub struct ConnectionHandle {
    /// The connection id.
    pub id: Arc<str>,
    /// The authenticated user.
    pub user_id: Arc<str>,
    /// The user's role.
    pub role: Arc<str>,
    outbound: mpsc::Sender<OutboundFrame>,
    close: OnceLock<CloseRequest>,
    close_requested: Notify,
}

/// What happened to a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Queued for the connection.
    Queued,
    /// The connection's queue is full: it is being closed with 1013.
    TooSlow,
    /// The connection is gone.
    Closed,
}

impl ConnectionHandle {
    /// A handle whose frames go to `outbound`.
    pub fn new(
        id: Arc<str>,
        user_id: Arc<str>,
        role: Arc<str>,
        outbound: mpsc::Sender<OutboundFrame>,
    ) -> Self {
        Self {
            id,
            user_id,
            role,
            outbound,
            close: OnceLock::new(),
            close_requested: Notify::new(),
        }
    }

    /// Queues a frame without waiting. A full queue means the client does
    /// not keep up: rather than grow memory, the connection is closed.
    pub fn push(&self, frame: OutboundFrame) -> Push {
        match self.outbound.try_send(frame) {
            Ok(()) => Push::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.request_close(CLOSE_TRY_AGAIN_LATER, "too slow");
                Push::TooSlow
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Push::Closed,
        }
    }

    /// Asks the connection's task to close it; the first request wins.
    pub fn request_close(&self, code: u16, reason: &'static str) {
        if self.close.set(CloseRequest { code, reason }).is_ok() {
            self.close_requested.notify_one();
        }
    }

    /// Resolves once a close was requested, with the request.
    pub async fn close_requested(&self) -> CloseRequest {
        loop {
            if let Some(request) = self.close.get() {
                return *request;
            }
            self.close_requested.notified().await;
        }
    }
}

#[derive(Debug, Default)]
struct Maps {
    by_user: HashMap<Arc<str>, Vec<Arc<ConnectionHandle>>>,
    by_id: HashMap<Arc<str>, Arc<ConnectionHandle>>,
}

/// The registry of this node's connections.
#[derive(Debug, Default)]
pub struct Connections {
    maps: RwLock<Maps>,
    count: AtomicUsize,
}

impl Connections {
    /// No connections.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a connection.
    pub fn register(&self, handle: Arc<ConnectionHandle>) {
        let mut maps = self.maps.write().unwrap_or_else(PoisonError::into_inner);
        maps.by_user
            .entry(Arc::clone(&handle.user_id))
            .or_default()
            .push(Arc::clone(&handle));
        maps.by_id.insert(Arc::clone(&handle.id), handle);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Removes a connection.
    pub fn unregister(&self, handle: &ConnectionHandle) {
        let mut maps = self.maps.write().unwrap_or_else(PoisonError::into_inner);
        if maps.by_id.remove(&handle.id).is_none() {
            return;
        }
        if let Some(list) = maps.by_user.get_mut(&handle.user_id) {
            list.retain(|other| other.id != handle.id);
            if list.is_empty() {
                maps.by_user.remove(&handle.user_id);
            }
        }
        self.count.fetch_sub(1, Ordering::Relaxed);
    }

    /// The connections of a user.
    pub fn of_user(&self, user_id: &str) -> Vec<Arc<ConnectionHandle>> {
        let maps = self.maps.read().unwrap_or_else(PoisonError::into_inner);
        maps.by_user.get(user_id).cloned().unwrap_or_default()
    }

    /// How many connections a user has on this node.
    pub fn count_of_user(&self, user_id: &str) -> usize {
        let maps = self.maps.read().unwrap_or_else(PoisonError::into_inner);
        maps.by_user.get(user_id).map_or(0, Vec::len)
    }

    /// The users with at least one connection.
    pub fn users(&self) -> Vec<Arc<str>> {
        let maps = self.maps.read().unwrap_or_else(PoisonError::into_inner);
        maps.by_user.keys().cloned().collect()
    }

    /// A connection by id.
    pub fn get(&self, id: &str) -> Option<Arc<ConnectionHandle>> {
        let maps = self.maps.read().unwrap_or_else(PoisonError::into_inner);
        maps.by_id.get(id).cloned()
    }

    /// How many connections are live.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Whether no connection is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(
        id: &str,
        user: &str,
        queue: usize,
    ) -> (Arc<ConnectionHandle>, mpsc::Receiver<OutboundFrame>) {
        let (tx, rx) = mpsc::channel(queue);
        (
            Arc::new(ConnectionHandle::new(
                id.into(),
                user.into(),
                "student".into(),
                tx,
            )),
            rx,
        )
    }

    #[test]
    fn users_map_to_their_connections() {
        let connections = Connections::new();
        let (a, _ra) = handle("a", "u1", 4);
        let (b, _rb) = handle("b", "u1", 4);
        connections.register(Arc::clone(&a));
        connections.register(Arc::clone(&b));
        assert_eq!(connections.count_of_user("u1"), 2);
        connections.unregister(&a);
        connections.unregister(&a);
        assert_eq!(connections.len(), 1);
        assert_eq!(connections.of_user("u1")[0].id.as_ref(), "b");
        assert!(connections.get("a").is_none());
    }

    #[tokio::test]
    async fn a_full_queue_asks_for_1013() {
        let (slow, _rx) = handle("s", "u", 1);
        assert_eq!(slow.push("1".into()), Push::Queued);
        assert_eq!(slow.push("2".into()), Push::TooSlow);
        assert_eq!(slow.close_requested().await.code, CLOSE_TRY_AGAIN_LATER);
    }
}
