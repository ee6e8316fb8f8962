//! The real RabbitMQ the test command starts: its URL, and a publisher and
//! dead-letter reader for the tests, each test on its own exchanges and
//! queues so tests run side by side.

use std::time::Duration;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};

use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, PublisherConfirm};

use serde_json::{Value, json};

use crate::client::{Client, http};
use crate::server::{Server, ServerConfig, token};

/// The broker URL: `SOCKETS_TEST_AMQP_URL`, else the local RabbitMQ that
/// `scripts/test.sh` starts.
pub fn amqp_url() -> String {
    std::env::var("SOCKETS_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// Names of one test's exchanges and queue.
#[derive(Debug, Clone)]
pub struct Names {
    /// Events exchange.
    pub exchange: String,
    /// Dead-letter exchange and queue.
    pub dead: String,
    /// Intake queue.
    pub queue: String,
    /// Exchange between nodes.
    pub nodes: String,
}

impl Names {
    /// Fresh names.
    pub fn unique() -> Self {
        let id = sockets_host::protocol::new_id();
        Self {
            exchange: format!("test.events.{id}"),
            dead: format!("test.dead.{id}"),
            queue: format!("test.intake.{id}"),
            nodes: format!("test.nodes.{id}"),
        }
    }

    /// A server configuration that consumes from these.
    pub fn server_config(&self) -> ServerConfig {
        ServerConfig::default()
            .env("SOCKETS_AMQP_URL", amqp_url())
            .env("SOCKETS_AMQP_EXCHANGE", &self.exchange)
            .env("SOCKETS_AMQP_DEAD_EXCHANGE", &self.dead)
            .env("SOCKETS_AMQP_QUEUE", &self.queue)
            .env("SOCKETS_AMQP_NODES_EXCHANGE", &self.nodes)
    }
}

/// Starts a server and waits until `/readyz` says it consumes from the
/// broker; panics with its log when it never does.
pub async fn consuming(config: ServerConfig) -> Server {
    let server = Server::start_with(config).await;
    for _ in 0..200 {
        let ready = http(&server, "GET", "/readyz", &[], b"").await;
        if ready.status == 200 {
            return server;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the server never consumed from RabbitMQ; its log:\n{}",
        server.log()
    );
}

/// Starts two nodes from `config` (which must hold the presence plugin and
/// one set of [`Names`]), connects `c_1` once to the first and twice to the
/// second, and returns what the first node's `whoIs` says of `c_1`: its
/// reply's `data.connections`. The connections stay open until it answers.
pub async fn connections_counted_across_two_nodes(config: impl Fn() -> ServerConfig) -> Value {
    let a = consuming(config()).await;
    let b = consuming(config()).await;
    let connect =
        |server, sub, role| async move { Client::connect(server, &token(sub, role)).await.0 };
    let mut asker = connect(&a, "s_1", "student").await;
    let _on_a = connect(&a, "c_1", "consultant").await;
    let _on_b = connect(&b, "c_1", "consultant").await;
    let _also_on_b = connect(&b, "c_1", "consultant").await;
    asker
        .send(&json!({"event": "whoIs", "data": {"user": "c_1"}, "ack": 1}))
        .await;
    let reply = asker.recv().await;
    assert_eq!(reply["ok"], true, "{reply}");
    reply["data"]["connections"].clone()
}

/// A publishing connection with publisher confirms.
pub struct Publisher {
    _connection: Connection,
    channel: Channel,
}

impl Publisher {
    /// Connects; panics loudly when the broker is not there (tests never
    /// skip).
    pub async fn connect() -> Publisher {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .unwrap_or_else(|err| panic!("RabbitMQ is not reachable at {}: {err}", amqp_url()));
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Publisher {
            _connection: connection,
            channel,
        }
    }

    /// Publishes and waits for the broker's confirmation.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) {
        let confirm = self.send(exchange, routing_key, body, properties).await;
        assert_acked(confirm).await;
    }

    /// Publishes every body, then waits for the broker's confirmations:
    /// the messages are queued back to back, in this order.
    pub async fn publish_all(&self, exchange: &str, routing_key: &str, bodies: &[Vec<u8>]) {
        let mut confirms = Vec::with_capacity(bodies.len());
        for body in bodies {
            let properties = BasicProperties::default();
            confirms.push(self.send(exchange, routing_key, body, properties).await);
        }
        for confirm in confirms {
            assert_acked(confirm).await;
        }
    }

    /// Publishes a JSON body, without waiting for its confirmation.
    async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> PublisherConfirm {
        self.channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties.with_content_type("application/json".into()),
            )
            .await
            .unwrap()
    }

    /// Declares a queue of this connection's own, bound to `exchange` for
    /// `routing_key`, as another service consuming events would; returns
    /// its name.
    pub async fn listen(&self, exchange: &str, routing_key: &str) -> String {
        let queue = self
            .channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let name = queue.name().to_string();
        self.channel
            .queue_bind(
                name.as_str().into(),
                exchange.into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        name
    }

    /// Waits up to 10 s for the next message in `queue`.
    pub async fn next_message(&self, queue: &str) -> lapin::message::Delivery {
        for _ in 0..200 {
            let message = self
                .channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap();
            if let Some(message) = message {
                return message.delivery;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no message in {queue} within 10 s");
    }

    /// Waits up to 10 s for the next dead letter in `queue`; returns its
    /// routing key, body and reason header.
    pub async fn dead_letter(&self, queue: &str) -> (String, Vec<u8>, String) {
        let delivery = self.next_message(queue).await;
        let reason = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|headers| {
                headers
                    .inner()
                    .get(sockets_host::intake::amqp::REASON_HEADER)
                    .cloned()
            })
            .map(|value| match value {
                AMQPValue::LongString(text) => text.to_string(),
                other => format!("{other:?}"),
            })
            .unwrap_or_default();
        (delivery.routing_key.to_string(), delivery.data, reason)
    }
}

/// Properties with a `message_id`.
pub fn with_message_id(id: &str) -> BasicProperties {
    BasicProperties::default().with_message_id(id.into())
}

/// Waits for a publish's confirmation; panics unless the broker took it.
async fn assert_acked(confirm: PublisherConfirm) {
    let confirmation = confirm.await.unwrap();
    assert!(
        confirmation.is_ack(),
        "the broker refused the message: {confirmation:?}"
    );
}
