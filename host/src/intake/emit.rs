//! Where the events plugins emit go without RabbitMQ: straight back into
//! this host's dispatcher. With RabbitMQ they are published to the events
//! exchange instead (`amqp::publish_emitted`): other services see them, and
//! every node's intake routes them to the plugins subscribed, deduplicated
//! by message id like any event.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::dispatch::{Dispatcher, Inbound, RouteError};

/// Routes emitted events through `dispatcher`, in order, until the
/// dispatcher (the queue's sender) is gone.
pub async fn route_locally(dispatcher: Arc<Dispatcher>, mut queue: mpsc::Receiver<Inbound>) {
    // Weak: the dispatcher holds the queue's sender, so this task ends
    // when the server drops it.
    let weak = Arc::downgrade(&dispatcher);
    drop(dispatcher);
    while let Some(inbound) = queue.recv().await {
        let Some(dispatcher) = weak.upgrade() else {
            return;
        };
        match dispatcher.route(&inbound).await {
            // Nobody here subscribes: the event was for other services.
            Ok(_) | Err(RouteError::UnknownEvent(_)) => {}
            Err(err) => {
                tracing::warn!(event = %inbound.event.name, from = %inbound.from, "emitted event not routed: {err}");
            }
        }
    }
}
