//! `{{name}}`: a plugin of the sockets host, made by `sockets-host plugin
//! new`. A client sends `{{name}}.ping {"text": "hi"}` and gets the reply
//! `{"pong": true}`; the user's other connections (another tab, a phone)
//! receive `{{name}}.pong {"text": "hi", "from": "<user id>"}` — the host
//! never pushes to the sending connection. Make it yours: the guide is the
//! project's docs/plugins.md.

use serde::{Deserialize, Serialize};
use sockets_sdk::{Delivery, Event, Failure, Host, NonEmptyString, Outcome, Plugin};

/// The event a client sends.
const PING: &str = "{{name}}.ping";
/// The event the user's other connections receive.
const PONG: &str = "{{name}}.pong";

/// The plugin: what it subscribes to, and what it does with each event.
pub struct {{type}};

/// What a client sends (anything else is a `bad_request`).
#[derive(Deserialize)]
struct Ping {
    text: NonEmptyString,
}

/// What the user's other connections receive.
#[derive(Serialize)]
struct Pong<'a> {
    text: &'a str,
    from: &'a str,
}

impl Plugin for {{type}} {
    const SUBSCRIPTIONS: &'static [&'static str] = &[PING];

    fn handle(event: &Event, _host: &dyn Host) -> Result<Outcome, Failure> {
        // From a client only: a backend publishing it is refused.
        let sender = event.require_client()?;
        let ping: Ping = event.data_as()?;
        let pong = Pong {
            text: &ping.text,
            from: &sender.user_id,
        };
        let push = Delivery::new(PONG, &pong)?.to_user(&sender.user_id);
        Outcome::new()
            .deliver(push)
            .reply(&serde_json::json!({"pong": true}))
    }
}

sockets_sdk::export_plugin!({{type}});

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};
    use sockets_sdk::testing::{TestHost, broker_event, client_event};
    use sockets_sdk::{ErrorCode, Recipient};

    use super::*;

    fn handle(event: &Event) -> Result<Outcome, Failure> {
        {{type}}::handle(event, &TestHost::new())
    }

    #[test]
    fn a_ping_is_pushed_to_the_senders_user_and_answered() {
        let outcome = handle(&client_event(PING, "s_1", "student", r#"{"text":"hi"}"#)).unwrap();

        assert_eq!(outcome.deliveries.len(), 1);
        let push = &outcome.deliveries[0];
        assert_eq!(push.event, PONG);
        assert_eq!(push.to, vec![Recipient::User("s_1".into())]);
        let data: Value = serde_json::from_str(&push.data).unwrap();
        assert_eq!(data, json!({"text": "hi", "from": "s_1"}));
        let reply: Value = serde_json::from_str(&outcome.reply.unwrap().data).unwrap();
        assert_eq!(reply, json!({"pong": true}));
    }

    #[test]
    fn bad_data_and_backend_events_are_refused() {
        let empty = client_event(PING, "s_1", "student", r#"{"text":""}"#);
        assert_eq!(handle(&empty).unwrap_err().code, ErrorCode::BadRequest);
        assert!(handle(&broker_event(PING, r#"{"text":"hi"}"#)).is_err());
    }
}
