//! The lifecycle events plugins may subscribe to: a connection opened or
//! closed, a user online (its first connection in the cluster) or offline
//! (its last). Raised off the connection's path, in the order they
//! happened on this node, from counts taken when they happened.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Notify, mpsc};

use crate::cluster::Cluster;
use crate::dispatch::Dispatcher;
use crate::plugin::{ClientOrigin, PluginRegistry, lifecycle};

/// Lifecycle events waiting for the plugins, at most: beyond it a
/// connection's opening or closing waits for room.
const QUEUE: usize = 65_536;

/// One lifecycle event to raise.
#[derive(Debug)]
pub struct LifecycleEvent {
    /// One of [`lifecycle::ALL`].
    pub name: &'static str,
    /// The connection it is about.
    pub about: ClientOrigin,
    /// The user's live connections cluster-wide after the change.
    pub connections: usize,
}

/// Where connections report their opening and closing.
pub struct Lifecycle {
    plugins: Arc<PluginRegistry>,
    cluster: Option<Arc<Cluster>>,
    queue: mpsc::Sender<LifecycleEvent>,
    pending: Mutex<Option<mpsc::Receiver<LifecycleEvent>>>,
    /// Events queued and not yet handled, and who waits for none.
    unhandled: AtomicUsize,
    drained: Notify,
}

impl Lifecycle {
    /// Lifecycle events for these plugins; in a cluster, a user's
    /// connections on other nodes count as they announced them.
    pub fn new(plugins: Arc<PluginRegistry>, cluster: Option<Arc<Cluster>>) -> Self {
        let (queue, pending) = mpsc::channel(QUEUE);
        Self {
            plugins,
            cluster,
            queue,
            pending: Mutex::new(Some(pending)),
            unhandled: AtomicUsize::new(0),
            drained: Notify::new(),
        }
    }

    /// A connection opened; `local` is its user's connections on this node
    /// with it, counted when it was registered. Raises
    /// `sockets.connectionOpened`, and `sockets.userOnline` for the user's
    /// first connection in the cluster.
    pub async fn opened(&self, about: &ClientOrigin, local: usize) {
        let connections = local + self.remote(&about.user_id);
        self.raise(lifecycle::CONNECTION_OPENED, about, connections)
            .await;
        if connections == 1 {
            self.raise(lifecycle::USER_ONLINE, about, connections).await;
        }
    }

    /// A connection closed; `local` is its user's connections left on this
    /// node, counted when it was unregistered. Raises
    /// `sockets.connectionClosed`, and `sockets.userOffline` for the
    /// user's last connection in the cluster.
    pub async fn closed(&self, about: &ClientOrigin, local: usize) {
        let connections = local + self.remote(&about.user_id);
        self.raise(lifecycle::CONNECTION_CLOSED, about, connections)
            .await;
        if connections == 0 {
            self.raise(lifecycle::USER_OFFLINE, about, connections)
                .await;
        }
    }

    fn remote(&self, user: &str) -> usize {
        self.cluster.as_ref().map_or(0, |cluster| {
            usize::try_from(cluster.remote_connections(user)).unwrap_or(usize::MAX)
        })
    }

    /// Queues the event if a plugin subscribes to it now.
    async fn raise(&self, name: &'static str, about: &ClientOrigin, connections: usize) {
        if self.plugins.snapshot().handlers(name).is_empty() {
            return;
        }
        let event = LifecycleEvent {
            name,
            about: about.clone(),
            connections,
        };
        self.unhandled.fetch_add(1, Ordering::SeqCst);
        // Closed only once the server has stopped raising them.
        if self.queue.send(event).await.is_err() {
            self.handled();
        }
    }

    fn handled(&self) {
        if self.unhandled.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.drained.notify_waiters();
        }
    }

    /// Waits until every event queued so far has been handled: at shutdown,
    /// after the connections closed, so that their users' `userOffline`
    /// reaches the plugins (and their pushes other nodes) before the
    /// cluster link and the log stop.
    pub async fn drained(&self) {
        loop {
            let notified = self.drained.notified();
            if self.unhandled.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Hands the queued events to the plugins, one at a time in order,
    /// until the server drops this; runs once (the queue is taken).
    pub async fn run(self: Arc<Self>, dispatcher: Arc<Dispatcher>) {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(mut pending) = pending else { return };
        // Not kept alive by this task: the queue ends when the server drops
        // its `Lifecycle`, and the dispatcher is only borrowed per event.
        let lifecycle = Arc::downgrade(&self);
        drop(self);
        let dispatcher = Arc::downgrade(&dispatcher);
        while let Some(event) = pending.recv().await {
            let Some(dispatcher) = dispatcher.upgrade() else {
                return;
            };
            dispatcher
                .raise(event.name, &event.about, event.connections)
                .await;
            if let Some(lifecycle) = lifecycle.upgrade() {
                lifecycle.handled();
            }
        }
    }
}
