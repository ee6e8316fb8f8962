//! Shows emitted events to user `observer`: `NOTIFICATION_REQUESTED` is
//! pushed to it as `notificationRequested` (with its origin), and
//! `PING_LOOP` is pushed as `loop` and emitted again — a loop the host must
//! cut at its depth limit.

use sockets_sdk::{Delivery, Event, Failure, Host, Origin, Outcome, Plugin};

/// The emitter test plugin.
pub struct Emitter;

const OBSERVER: &str = "observer";

impl Plugin for Emitter {
    const SUBSCRIPTIONS: &'static [&'static str] = &["NOTIFICATION_REQUESTED", "PING_LOOP"];

    fn handle(event: &Event, _host: &dyn Host) -> Result<Outcome, Failure> {
        // Events plugins emit are what this plugin is for.
        let origin = match &event.origin {
            Origin::Plugin(name) => format!("plugin:{name}"),
            Origin::Broker => "broker".to_owned(),
            Origin::Api(service) => format!("api:{service}"),
            _ => return Err(Failure::forbidden("backend and plugin events only")),
        };
        let data: serde_json::Value = serde_json::from_str(&event.data)
            .map_err(|err| Failure::bad_request(err.to_string()))?;
        let body = serde_json::json!({"origin": origin, "data": data, "id": event.id});
        if event.name == "PING_LOOP" {
            let push = Delivery::new("loop", &body)?.to_user(OBSERVER);
            return Outcome::new().deliver(push).emit("PING_LOOP", &data);
        }
        let push = Delivery::new("notificationRequested", &body)?.to_user(OBSERVER);
        Ok(Outcome::new().deliver(push))
    }
}

sockets_sdk::export_plugin!(Emitter);
