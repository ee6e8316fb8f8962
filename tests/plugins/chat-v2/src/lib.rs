//! The chat plugin, answering differently: every pushed message carries
//! `"edition": 2`, so a test can tell which version handled an event.

use sockets_sdk::{Event, Failure, Host, Outcome, Plugin};

// The bundled chat plugin's logic (its export is in its lib.rs): a
// dependency on the chat crate would bring its component exports along
// and clash with ours.
#[path = "../../../../plugins/chat/src/chat.rs"]
mod chat;

/// Chat, second edition.
pub struct ChatV2;

impl Plugin for ChatV2 {
    const SUBSCRIPTIONS: &'static [&'static str] = chat::Chat::SUBSCRIPTIONS;

    fn handle(event: &Event, host: &dyn Host) -> Result<Outcome, Failure> {
        let mut outcome = chat::Chat::handle(event, host)?;
        for delivery in &mut outcome.deliveries {
            let mut data: serde_json::Value = serde_json::from_str(&delivery.data)
                .map_err(|err| Failure::internal(err.to_string()))?;
            data["edition"] = 2.into();
            delivery.data = data.to_string();
        }
        Ok(outcome)
    }
}

sockets_sdk::export_plugin!(ChatV2);
