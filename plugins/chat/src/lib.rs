//! Direct messages between users (PROTOCOL.md §4, `sendMessage`).
//!
//! Who may write to whom comes from the plugin's configuration, an
//! `allow` list of role pairs ([`sockets_sdk::roles`]); without one only
//! students and consultants may write to each other. With
//! `"offlineNotify": true`, a message to a user with no live connection
//! also emits `NOTIFICATION_REQUESTED` for the Notifications Service.

mod chat;

pub use chat::Chat;

sockets_sdk::export_plugin!(Chat);
