//! The host's own view of what goes into and comes out of a plugin. These are
//! plain Rust values: the rest of the host never sees generated bindings.

use serde::Serialize;
use serde_json::value::RawValue;

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
