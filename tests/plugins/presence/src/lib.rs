//! Answers `whoIs` with what the host knows of a user: its directory entry
//! (`get-user`) and its live connections (`connection-count`), so tests can
//! check both through a real component.

use serde::Deserialize;
use sockets_sdk::{Event, Failure, Host, NonEmptyString, Outcome, Plugin};

/// The presence plugin.
pub struct Presence;

#[derive(Deserialize)]
struct WhoIs {
    user: NonEmptyString,
}

impl Plugin for Presence {
    const SUBSCRIPTIONS: &'static [&'static str] = &["whoIs"];

    fn handle(event: &Event, host: &dyn Host) -> Result<Outcome, Failure> {
        event.require_client()?;
        let request: WhoIs = event.data_as()?;
        let user = host
            .get_user(&request.user)
            .map(|user| serde_json::json!({"id": user.id, "role": user.role, "name": user.name}));
        let connections = host.connection_count(&request.user);
        Outcome::new().reply(&serde_json::json!({"user": user, "connections": connections}))
    }
}

sockets_sdk::export_plugin!(Presence);
