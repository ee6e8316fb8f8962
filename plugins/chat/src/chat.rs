//! The chat plugin's logic, without its export (`lib.rs`): the tests'
//! chat-v2 compiles this file into a plugin of its own.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use sockets_sdk::{Delivery, Event, Failure, Host, Outcome, Plugin, UserId, roles};

/// Longest accepted message, in Unicode scalar values.
const MAX_TEXT_CHARS: usize = 4000;

/// The chat plugin.
pub struct Chat;

#[derive(Deserialize)]
struct SendMessage<'a> {
    to: UserId,
    /// Borrowed from the event unless it holds escapes: no copy per message.
    #[serde(borrow)]
    text: Cow<'a, str>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Config {
    allow: Option<Vec<roles::Rule>>,
    /// Emit `NOTIFICATION_REQUESTED` for a message to a user with no live
    /// connection, for the Notifications Service.
    #[serde(default)]
    offline_notify: bool,
}

/// Characters of a message's text in its notification's preview.
const PREVIEW_CHARS: usize = 100;

/// The body of `NOTIFICATION_REQUESTED` (README, "Offline notifications").
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NotificationRequest<'a> {
    user_id: &'a str,
    kind: &'static str,
    ids: NotificationIds<'a>,
    preview: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NotificationIds<'a> {
    message_id: &'a str,
    from: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Message<'a> {
    message_id: &'a str,
    from: &'a str,
    from_role: &'a str,
    to: &'a str,
    text: &'a str,
    sent_at: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Ack<'a> {
    message_id: &'a str,
}

impl Plugin for Chat {
    const SUBSCRIPTIONS: &'static [&'static str] = &["sendMessage"];

    fn handle(event: &Event, host: &dyn Host) -> Result<Outcome, Failure> {
        let sender = event.require_client()?;
        let request: SendMessage<'_> = event.data_as()?;
        let text_chars = request.text.chars().count();
        if text_chars == 0 || text_chars > MAX_TEXT_CHARS {
            return Err(Failure::bad_request(format!(
                "`text` must be 1 to {MAX_TEXT_CHARS} characters"
            )));
        }
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

        let message = Message {
            message_id: &event.id,
            from: &sender.user_id,
            from_role: &sender.role,
            to: &request.to,
            text: &request.text,
            sent_at: &event.received_at,
        };
        let push = Delivery::new("message", &message)?
            .to_user(&request.to)
            .to_sender_others();
        let mut outcome = Outcome::new()
            .deliver(push)
            .reply(&Ack {
                message_id: &event.id,
            })?
            .count_delivered_in("delivered");
        if config.offline_notify && host.connection_count(&request.to) == 0 {
            outcome = outcome.emit(
                "NOTIFICATION_REQUESTED",
                &NotificationRequest {
                    user_id: &request.to,
                    kind: "message",
                    ids: NotificationIds {
                        message_id: &event.id,
                        from: &sender.user_id,
                    },
                    preview: request.text.chars().take(PREVIEW_CHARS).collect(),
                },
            )?;
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};
    use sockets_sdk::testing::{TEST_RECEIVED_AT, TestHost, broker_event, client_event};
    use sockets_sdk::{ErrorCode, Recipient};

    use super::*;

    fn directory() -> TestHost {
        TestHost::new()
            .with_user("s_1", "student")
            .with_user("s_2", "student")
            .with_user("c_1", "consultant")
    }

    fn send(host: &TestHost, from: &str, role: &str, data: Value) -> Result<Outcome, Failure> {
        Chat::handle(
            &client_event("sendMessage", from, role, &data.to_string()),
            host,
        )
    }

    fn code(result: Result<Outcome, Failure>) -> ErrorCode {
        result.expect_err("expected a failure").code
    }

    #[test]
    fn student_to_consultant_is_delivered_to_recipient_and_sender_others() {
        let outcome = send(
            &directory(),
            "s_1",
            "student",
            json!({"to": "c_1", "text": "hello"}),
        )
        .unwrap();

        assert_eq!(outcome.deliveries.len(), 1);
        let push = &outcome.deliveries[0];
        assert_eq!(push.event, "message");
        assert_eq!(
            push.to,
            vec![Recipient::User("c_1".into()), Recipient::SenderOthers]
        );
        let data: Value = serde_json::from_str(&push.data).unwrap();
        assert_eq!(
            data,
            json!({"messageId": "evt-1", "from": "s_1", "fromRole": "student", "to": "c_1",
                   "text": "hello", "sentAt": TEST_RECEIVED_AT})
        );
        let reply = outcome.reply.unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&reply.data).unwrap(),
            json!({"messageId": "evt-1"})
        );
        assert_eq!(reply.delivered_field.as_deref(), Some("delivered"));
    }

    #[test]
    fn data_that_is_not_an_object_is_a_bad_request() {
        // serde would fill the struct from an array, field by field.
        assert_eq!(
            code(send(&directory(), "s_1", "student", json!(["c_1", "hi"]))),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(send(&directory(), "s_1", "student", json!("c_1"))),
            ErrorCode::BadRequest
        );
    }

    #[test]
    fn a_recipient_id_over_256_bytes_is_a_bad_request_not_a_lookup() {
        let long = "c".repeat(257);
        assert_eq!(
            code(send(
                &directory(),
                "s_1",
                "student",
                json!({"to": long, "text": "hi"})
            )),
            ErrorCode::BadRequest
        );
        let longest = "c".repeat(256);
        assert_eq!(
            code(send(
                &directory(),
                "s_1",
                "student",
                json!({"to": longest, "text": "hi"})
            )),
            ErrorCode::NotFound
        );
    }

    #[test]
    fn consultant_to_student_is_allowed_by_default() {
        assert!(
            send(
                &directory(),
                "c_1",
                "consultant",
                json!({"to": "s_1", "text": "hi"})
            )
            .is_ok()
        );
    }

    #[test]
    fn a_forged_from_is_ignored() {
        let outcome = send(
            &directory(),
            "s_1",
            "student",
            json!({"to": "c_1", "text": "hi", "from": "c_1"}),
        )
        .unwrap();
        let data: Value = serde_json::from_str(&outcome.deliveries[0].data).unwrap();
        assert_eq!(data["from"], "s_1");
    }

    #[test]
    fn student_to_student_is_forbidden_by_default() {
        let result = send(
            &directory(),
            "s_1",
            "student",
            json!({"to": "s_2", "text": "hi"}),
        );
        assert_eq!(code(result), ErrorCode::Forbidden);
    }

    #[test]
    fn configured_rules_replace_the_default() {
        let host = directory().with_config(r#"{"allow":[{"from":"student","to":"*"}]}"#);
        assert!(send(&host, "s_1", "student", json!({"to": "s_2", "text": "hi"})).is_ok());
        let result = send(
            &host,
            "c_1",
            "consultant",
            json!({"to": "s_1", "text": "hi"}),
        );
        assert_eq!(code(result), ErrorCode::Forbidden);
    }

    #[test]
    fn unknown_recipient_is_not_found() {
        let result = send(
            &directory(),
            "s_1",
            "student",
            json!({"to": "nobody", "text": "hi"}),
        );
        assert_eq!(code(result), ErrorCode::NotFound);
    }

    #[test]
    fn bad_request_comes_before_not_found() {
        let result = send(
            &directory(),
            "s_1",
            "student",
            json!({"to": "nobody", "text": ""}),
        );
        assert_eq!(code(result), ErrorCode::BadRequest);
    }

    #[test]
    fn malformed_requests_are_bad_requests() {
        let too_long = "é".repeat(MAX_TEXT_CHARS + 1);
        for data in [
            json!(null),
            json!("text"),
            json!({"text": "hi"}),
            json!({"to": "c_1"}),
            json!({"to": "", "text": "hi"}),
            json!({"to": 5, "text": "hi"}),
            json!({"to": "c_1", "text": 5}),
            json!({"to": "c_1", "text": ""}),
            json!({"to": "c_1", "text": too_long}),
            json!({"to": "s_1", "text": "to myself"}),
        ] {
            let result = send(&directory(), "s_1", "student", data.clone());
            assert_eq!(code(result), ErrorCode::BadRequest, "data: {data}");
        }
    }

    #[test]
    fn text_with_escapes_is_pushed_as_sent() {
        let text = "say \"hi\"\n\tthen \\ and é";
        let outcome = send(
            &directory(),
            "s_1",
            "student",
            json!({"to": "c_1", "text": text}),
        )
        .unwrap();
        let data: Value = serde_json::from_str(&outcome.deliveries[0].data).unwrap();
        assert_eq!(data["text"], text);
    }

    #[test]
    fn text_length_counts_characters_not_bytes() {
        let longest = "é".repeat(MAX_TEXT_CHARS);
        assert!(
            send(
                &directory(),
                "s_1",
                "student",
                json!({"to": "c_1", "text": longest})
            )
            .is_ok()
        );
    }

    #[test]
    fn backend_events_are_refused() {
        let event = broker_event("sendMessage", r#"{"to":"c_1","text":"hi"}"#);
        assert_eq!(
            code(Chat::handle(&event, &directory())),
            ErrorCode::Forbidden
        );
    }

    #[test]
    fn a_message_to_an_offline_user_requests_a_notification_when_configured() {
        let text = "x".repeat(150);
        let data = json!({"to": "c_1", "text": text});
        let quiet = send(&directory(), "s_1", "student", data.clone()).unwrap();
        assert!(quiet.emit.is_empty(), "not configured: nothing emitted");

        let host = directory().with_config(r#"{"offlineNotify": true}"#);
        let outcome = send(&host, "s_1", "student", data.clone()).unwrap();
        assert_eq!(outcome.emit.len(), 1);
        assert_eq!(outcome.emit[0].name, "NOTIFICATION_REQUESTED");
        let body: Value = serde_json::from_str(&outcome.emit[0].data).unwrap();
        assert_eq!(
            body,
            json!({
                "userId": "c_1",
                "kind": "message",
                "ids": {"messageId": "evt-1", "from": "s_1"},
                "preview": "x".repeat(PREVIEW_CHARS),
            })
        );

        let online = host.with_connections("c_1", 1);
        assert!(
            send(&online, "s_1", "student", data)
                .unwrap()
                .emit
                .is_empty()
        );
    }

    #[test]
    fn a_broken_configuration_is_internal() {
        let host = directory().with_config(r#"{"allow": 3}"#);
        let result = send(&host, "s_1", "student", json!({"to": "c_1", "text": "hi"}));
        assert_eq!(code(result), ErrorCode::Internal);
    }
}
