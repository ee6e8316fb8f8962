//! The host's own view of what goes into and comes out of a plugin. These are
//! plain Rust values: the rest of the host never sees generated bindings.

use serde::Serialize;
use serde_json::value::RawValue;

/// The events the host raises about connections and users, for plugins of
/// the 0.2 contract that subscribe to them. Names under `sockets.` are the
/// host's: no client, backend or plugin may send one.
pub mod lifecycle {
    /// A connection opened (after it became reachable).
    pub const CONNECTION_OPENED: &str = "sockets.connectionOpened";
    /// A connection closed (after it stopped being reachable).
    pub const CONNECTION_CLOSED: &str = "sockets.connectionClosed";
    /// A user's first live connection in the cluster opened.
    pub const USER_ONLINE: &str = "sockets.userOnline";
    /// A user's last live connection in the cluster closed.
    pub const USER_OFFLINE: &str = "sockets.userOffline";
    /// All of them.
    pub const ALL: [&str; 4] = [
        CONNECTION_OPENED,
        CONNECTION_CLOSED,
        USER_ONLINE,
        USER_OFFLINE,
    ];

    /// Whether `name` is in the host's reserved namespace.
    pub fn is_reserved(name: &str) -> bool {
        name.starts_with("sockets.")
    }
}

/// One event to route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Unique id, stable across retries of the same event.
    pub id: String,
    /// The event name.
    pub name: String,
    /// Who sent it.
    pub origin: Origin,
    /// The payload as JSON text (`null` when absent).
    pub data: String,
    /// When the host received the event, RFC 3339 UTC.
    pub received_at: String,
}

/// Where an event came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A WebSocket client.
    Client(ClientOrigin),
    /// A backend service through RabbitMQ.
    Broker,
    /// A backend service through the HTTP API; the service token's `sub`.
    Api(String),
    /// Raised by the host about a connection (a lifecycle event).
    Lifecycle(ClientOrigin),
    /// Emitted by the named plugin and routed by this host (no broker).
    Plugin(String),
}

impl Origin {
    /// The connection an event concerns: its sender, or the connection a
    /// lifecycle event is about.
    pub fn client(&self) -> Option<&ClientOrigin> {
        match self {
            Self::Client(client) | Self::Lifecycle(client) => Some(client),
            _ => None,
        }
    }
}

/// The connection that sent a client event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOrigin {
    /// The user id (token `sub`).
    pub user_id: String,
    /// The user's role.
    pub role: String,
    /// The sending connection.
    pub connection_id: String,
}

/// Who a delivery goes to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Recipient {
    /// Every live connection of a user.
    User(String),
    /// One connection.
    Connection(String),
    /// The sending user's other connections.
    SenderOthers,
}

/// One push decided by a plugin; `data` is checked to be JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    /// Recipients.
    pub to: Vec<Recipient>,
    /// The pushed frame's event name.
    pub event: String,
    /// The pushed frame's data.
    pub data: Box<RawValue>,
    /// Pushed to live connections only: not logged, not replayed, not
    /// waited for.
    pub ephemeral: bool,
}

/// A backend event an outcome emits; `data` is checked to be JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Emitted {
    /// The event name (routing key).
    pub name: String,
    /// The payload.
    pub data: Box<RawValue>,
}

/// The answer for the sending client.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Reply {
    /// The reply's data.
    pub data: Box<RawValue>,
    /// A field of `data` (then an object) that the host sets to the number of
    /// connections the deliveries reached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered_field: Option<String>,
}

/// What one plugin decided for one event, validated.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Pushes to send.
    pub deliveries: Vec<Delivery>,
    /// The reply, if the plugin gave one.
    pub reply: Option<Reply>,
    /// Backend events to emit.
    pub emit: Vec<Emitted>,
}

/// Why a plugin refused an event; maps onto PROTOCOL error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalCode {
    /// `bad_request`
    BadRequest,
    /// `forbidden`
    Forbidden,
    /// `not_found`
    NotFound,
    /// `internal`
    Internal,
}

impl RefusalCode {
    /// The PROTOCOL error code.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::Internal => "internal",
        }
    }
}

/// The name and version a plugin declares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PluginInfo {
    /// Declared name.
    pub name: String,
    /// Declared version.
    pub version: String,
}
