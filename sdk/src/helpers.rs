//! Typed helpers over the generated WIT types.

use std::fmt;
use std::ops::Deref;

use serde::de::{Deserializer, Error as _};
use serde::{Deserialize, Serialize};

use crate::{
    Client, Delivery, EmittedEvent, ErrorCode, Event, Failure, Origin, Outcome, Recipient, Reply,
};

impl Failure {
    /// A failure with the given code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// Malformed or invalid event data (`bad_request`).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    /// The sender may not do this (`forbidden`).
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    /// Something the event names does not exist (`not_found`).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    /// The plugin could not do its job (`internal`).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

impl Event {
    /// Parses the event's data, which must be a JSON object, into `T`; a
    /// mismatch is `bad_request` with serde's explanation. `T` may borrow
    /// from the data: a `Cow<str>` field with `#[serde(borrow)]` borrows a
    /// string without escapes and copies one with them (a plain `&str` field
    /// refuses the latter).
    ///
    /// The object check matters: serde fills a struct from a JSON array too
    /// (its fields in order), so `["c_1","hi"]` would pass for
    /// `{"to":"c_1","text":"hi"}`. Data of another shape is read from
    /// [`Event::data`] directly.
    pub fn data_as<'a, T: Deserialize<'a>>(&'a self) -> Result<T, Failure> {
        if !self.data.trim_start().starts_with('{') {
            return Err(Failure::bad_request("`data` must be a JSON object"));
        }
        serde_json::from_str(&self.data).map_err(|err| {
            Failure::bad_request(format!("invalid data: {}", without_position(&err)))
        })
    }

    /// The sending connection, when the event came from a client.
    pub fn client(&self) -> Option<&Client> {
        match &self.origin {
            Origin::Client(client) => Some(client),
            _ => None,
        }
    }

    /// The connection a lifecycle event (`sockets.connectionOpened`, …) is
    /// about, with the user's live connections cluster-wide after the
    /// change; `None` for any other event.
    pub fn lifecycle(&self) -> Option<(&Client, u32)> {
        #[derive(Deserialize)]
        struct Change {
            connections: u32,
        }
        match &self.origin {
            Origin::Lifecycle(client) => {
                let change: Change = serde_json::from_str(&self.data).ok()?;
                Some((client, change.connections))
            }
            _ => None,
        }
    }

    /// The sending connection; events from backends are `forbidden`.
    pub fn require_client(&self) -> Result<&Client, Failure> {
        self.client().ok_or_else(|| {
            Failure::forbidden(format!("`{}` is only accepted from clients", self.name))
        })
    }

    /// Succeeds for events from backend services (broker or HTTP API);
    /// anything else is `forbidden`: clients cannot forge backend events,
    /// nor can other plugins by emitting them (a plugin that takes events
    /// plugins emit matches [`Origin::Plugin`] itself).
    pub fn require_backend(&self) -> Result<(), Failure> {
        match self.origin {
            Origin::Broker | Origin::Api(_) => Ok(()),
            Origin::Client(_) | Origin::Lifecycle(_) | Origin::Plugin(_) => {
                Err(Failure::forbidden(format!(
                    "`{}` is only accepted from backend services",
                    self.name
                )))
            }
        }
    }
}

/// serde_json appends "at line 1 column 12" to its messages; the column of a
/// compact frame helps nobody.
fn without_position(err: &serde_json::Error) -> String {
    let text = err.to_string();
    match text.rfind(" at line ") {
        Some(cut) => text[..cut].to_owned(),
        None => text,
    }
}

impl Delivery {
    /// A push of `event` with `data` serialized as JSON, to nobody yet.
    pub fn new(event: &str, data: &impl Serialize) -> Result<Self, Failure> {
        let data = serde_json::to_string(data)
            .map_err(|err| Failure::internal(format!("cannot serialize delivery: {err}")))?;
        Ok(Self {
            to: Vec::new(),
            event: event.to_owned(),
            data,
            ephemeral: false,
        })
    }

    /// Makes the push ephemeral: sent to the connections live now, never
    /// logged or replayed, not waited for (typing indicators, cursors).
    pub fn ephemeral(mut self) -> Self {
        self.ephemeral = true;
        self
    }

    /// Adds every live connection of `user_id`.
    pub fn to_user(mut self, user_id: &str) -> Self {
        self.to.push(Recipient::User(user_id.to_owned()));
        self
    }

    /// Adds one connection.
    pub fn to_connection(mut self, connection_id: &str) -> Self {
        self.to
            .push(Recipient::Connection(connection_id.to_owned()));
        self
    }

    /// Adds the sending user's other connections (client events only).
    pub fn to_sender_others(mut self) -> Self {
        self.to.push(Recipient::SenderOthers);
        self
    }
}

impl Outcome {
    /// No deliveries and a `null` reply.
    pub fn new() -> Self {
        Self {
            deliveries: Vec::new(),
            reply: None,
            emit: Vec::new(),
        }
    }

    /// Emits a backend event (`name`, `data` serialized as JSON) once the
    /// deliveries are made: published to the events exchange with RabbitMQ,
    /// routed by the host itself without it.
    pub fn emit(mut self, name: &str, data: &impl Serialize) -> Result<Self, Failure> {
        let data = serde_json::to_string(data)
            .map_err(|err| Failure::internal(format!("cannot serialize emitted event: {err}")))?;
        self.emit.push(EmittedEvent {
            name: name.to_owned(),
            data,
        });
        Ok(self)
    }

    /// Adds a delivery.
    pub fn deliver(mut self, delivery: Delivery) -> Self {
        self.deliveries.push(delivery);
        self
    }

    /// Sets the reply's data, serialized as JSON.
    pub fn reply(mut self, data: &impl Serialize) -> Result<Self, Failure> {
        let data = serde_json::to_string(data)
            .map_err(|err| Failure::internal(format!("cannot serialize reply: {err}")))?;
        self.reply = Some(Reply {
            data,
            delivered_field: None,
        });
        Ok(self)
    }

    /// Asks the host to set `field` of the reply object to the number of
    /// connections the deliveries reached, summed over the users they
    /// address (by id or through one of their connections), each connection
    /// once per delivery; `sender-others` copies do not count.
    /// Call after [`Outcome::reply`] with an object.
    pub fn count_delivered_in(mut self, field: &str) -> Self {
        let reply = self.reply.get_or_insert_with(|| Reply {
            data: "{}".to_owned(),
            delivered_field: None,
        });
        reply.delivered_field = Some(field.to_owned());
        self
    }
}

impl Default for Outcome {
    fn default() -> Self {
        Self::new()
    }
}

/// A string that must not be empty: PROTOCOL's rule for required strings.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct NonEmptyString(String);

impl NonEmptyString {
    /// The inner string.
    pub fn into_inner(self) -> String {
        self.0
    }
}

/// Longest user id, bytes (PROTOCOL §6: user ids are 1–256 bytes).
pub const MAX_USER_ID_BYTES: usize = 256;

/// A user id named in event data (e.g. a message's `to`): a non-empty
/// string of at most [`MAX_USER_ID_BYTES`] bytes; anything else fails to
/// deserialize (so `data_as` answers `bad_request`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct UserId(String);

impl UserId {
    /// The inner string.
    pub fn into_inner(self) -> String {
        self.0
    }
}

impl<'de> Deserialize<'de> for UserId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = String::deserialize(deserializer)?;
        if value.is_empty() {
            return Err(D::Error::custom("a user id is empty"));
        }
        if value.len() > MAX_USER_ID_BYTES {
            return Err(D::Error::custom(format!(
                "a user id is at most {MAX_USER_ID_BYTES} bytes"
            )));
        }
        Ok(Self(value))
    }
}

impl Deref for UserId {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for NonEmptyString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = String::deserialize(deserializer)?;
        if value.is_empty() {
            return Err(D::Error::custom("a required string is empty"));
        }
        Ok(Self(value))
    }
}

impl Deref for NonEmptyString {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NonEmptyString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
