//! Answers `whoIs` with what the host knows of a user: its directory entry
//! (`get-user`) and its live connections (`connection-count`), so tests can
//! check both through a real component. `nudge` pushes to one connection
//! and to a user, to test deliveries addressed by connection id.

use serde::Deserialize;
use sockets_sdk::{Delivery, Event, Failure, Host, NonEmptyString, Outcome, Plugin};

/// The whois test plugin.
pub struct Whois;

#[derive(Deserialize)]
struct WhoIs {
    user: NonEmptyString,
}

#[derive(Deserialize)]
struct Nudge {
    connection: NonEmptyString,
    user: NonEmptyString,
}

impl Plugin for Whois {
    const SUBSCRIPTIONS: &'static [&'static str] = &["whoIs", "nudge"];

    fn handle(event: &Event, host: &dyn Host) -> Result<Outcome, Failure> {
        let sender = event.require_client()?;
        if event.name == "nudge" {
            let nudge: Nudge = event.data_as()?;
            let delivery = Delivery::new("nudged", &serde_json::json!({"by": sender.user_id}))?
                .to_connection(&nudge.connection)
                .to_user(&nudge.user);
            return Ok(Outcome::new()
                .deliver(delivery)
                .reply(&serde_json::json!({}))?
                .count_delivered_in("delivered"));
        }
        let request: WhoIs = event.data_as()?;
        let user = host
            .get_user(&request.user)
            .map(|user| serde_json::json!({"id": user.id, "role": user.role, "name": user.name}));
        let connections = host.connection_count(&request.user);
        Outcome::new().reply(&serde_json::json!({"user": user, "connections": connections}))
    }
}

sockets_sdk::export_plugin!(Whois);
