//! Typing indicators: `typing {"to": user}` pushes `typing {"from": sender}`
//! to the recipient's live connections, ephemeral (never logged, never
//! replayed: a keystroke is stale a second later).
//!
//! Who may show whom they are typing follows the same `allow` role rules as
//! the chat plugin ([`sockets_sdk::roles`]); give both the same `allow`
//! configuration when you change chat's.

use serde::{Deserialize, Serialize};
use sockets_sdk::{Delivery, Event, Failure, Host, Outcome, Plugin, UserId, roles};

/// The typing plugin.
pub struct Typing;

#[derive(Deserialize)]
struct TypingRequest {
    to: UserId,
}

#[derive(Deserialize, Default)]
struct Config {
    allow: Option<Vec<roles::Rule>>,
}

#[derive(Serialize)]
struct TypingPush<'a> {
    from: &'a str,
}

impl Plugin for Typing {
    const SUBSCRIPTIONS: &'static [&'static str] = &["typing"];

    fn handle(event: &Event, host: &dyn Host) -> Result<Outcome, Failure> {
        let sender = event.require_client()?;
        let request: TypingRequest = event.data_as()?;
        if *request.to == *sender.user_id {
            return Err(Failure::bad_request("`to` must be another user"));
        }
        let recipient = host
            .get_user(&request.to)
            .ok_or_else(|| Failure::not_found(format!("user `{}` does not exist", request.to)))?;
        let config: Config = host.config_as()?;
        roles::check(
            config.allow.as_deref(),
            &sender.role,
            &recipient.role,
            "message",
        )?;
        let push = Delivery::new(
            "typing",
            &TypingPush {
                from: &sender.user_id,
            },
        )?
        .to_user(&request.to)
        .ephemeral();
        Ok(Outcome::new()
            .deliver(push)
            .reply(&serde_json::json!({}))?
            .count_delivered_in("delivered"))
    }
}

sockets_sdk::export_plugin!(Typing);

#[cfg(test)]
mod tests {
    use serde_json::json;
    use sockets_sdk::testing::{TestHost, broker_event, client_event};
    use sockets_sdk::{ErrorCode, Recipient};

    use super::*;

    fn directory() -> TestHost {
        TestHost::new()
            .with_user("s_1", "student")
            .with_user("s_2", "student")
            .with_user("c_1", "consultant")
    }

    fn typing(host: &TestHost, from: &str, role: &str, to: &str) -> Result<Outcome, Failure> {
        let data = json!({ "to": to }).to_string();
        Typing::handle(&client_event("typing", from, role, &data), host)
    }

    #[test]
    fn the_recipient_gets_an_ephemeral_push() {
        let outcome = typing(&directory(), "s_1", "student", "c_1").unwrap();
        let push = &outcome.deliveries[0];
        assert!(push.ephemeral, "typing must never be logged");
        assert_eq!(push.event, "typing");
        assert_eq!(push.to, vec![Recipient::User("c_1".into())]);
        assert_eq!(push.data, r#"{"from":"s_1"}"#);
        assert_eq!(
            outcome.reply.unwrap().delivered_field.as_deref(),
            Some("delivered")
        );
    }

    #[test]
    fn chats_role_rules_apply() {
        let refused = typing(&directory(), "s_1", "student", "s_2").unwrap_err();
        assert_eq!(refused.code, ErrorCode::Forbidden);
        let open = directory().with_config(r#"{"allow":[{"from":"*","to":"*"}]}"#);
        assert!(typing(&open, "s_1", "student", "s_2").is_ok());
    }

    #[test]
    fn bad_requests_and_unknown_users_are_refused() {
        let host = directory();
        assert_eq!(
            typing(&host, "s_1", "student", "nobody").unwrap_err().code,
            ErrorCode::NotFound
        );
        assert_eq!(
            typing(&host, "s_1", "student", "s_1").unwrap_err().code,
            ErrorCode::BadRequest
        );
        let backend = Typing::handle(&broker_event("typing", r#"{"to":"c_1"}"#), &host);
        assert_eq!(backend.unwrap_err().code, ErrorCode::Forbidden);
    }
}
