//! What the link declares on the broker (the nodes exchange, this node's
//! queue and its bindings) and how nodes are addressed.

use std::borrow::Cow;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use super::Link;

/// A node queue nobody consumes from is deleted after this long: a node
/// that died leaves no queue behind for longer.
pub(super) const NODE_QUEUE_EXPIRES_MS: i64 = 30_000;

/// The longest routing key AMQP allows, in bytes.
pub(super) const MAX_ROUTING_KEY: usize = 255;

impl Link {
    /// The nodes exchange and this node's queue, bound to it once by the
    /// node's id and to the presence exchange. The queue is durable and not
    /// exclusive, so that it (and what was routed to it) survives a short
    /// outage of the link or the broker; it expires once unused.
    pub(super) async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(NODE_QUEUE_EXPIRES_MS),
        );
        // Durable, so that a broker restart keeps it (and its bindings):
        // copies republished after the restart must find it.
        channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await?;
        let exchanges = [
            (&self.settings.nodes_exchange, ExchangeKind::Direct),
            (&self.presence_exchange, ExchangeKind::Fanout),
        ];
        for (exchange, kind) in exchanges {
            channel
                .exchange_declare(
                    exchange.as_str().into(),
                    kind.clone(),
                    durable,
                    FieldTable::default(),
                )
                .await?;
            let routing_key = match kind {
                ExchangeKind::Direct => routing_key(&self.instance_id),
                _ => Cow::Borrowed(""),
            };
            channel
                .queue_bind(
                    self.queue.as_str().into(),
                    exchange.as_str().into(),
                    routing_key.as_ref().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }

    pub(super) fn queue_of(&self, node: &str) -> String {
        format!("{}.{node}", self.settings.nodes_exchange)
    }
}

/// The binding and routing key of a node's copies: its id, or, for an id
/// longer than an AMQP short string holds, a digest of it.
pub(super) fn routing_key(node: &str) -> Cow<'_, str> {
    use sha2::Digest;
    if node.len() <= MAX_ROUTING_KEY {
        return Cow::Borrowed(node);
    }
    let digest = sha2::Sha256::digest(node.as_bytes());
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    Cow::Owned(format!("sha256:{hex}"))
}
