//! Checks a plugin's raw outcome before the host acts on it: a plugin must
//! not be able to make the host send malformed frames or unbounded traffic.

use serde_json::value::RawValue;

use super::bindings::v2::sockets::plugin::types as wit;
use super::error::CallError;
use super::runtime::PluginLimits;
use super::types::{Delivery, Emitted, Outcome, Recipient, Reply, lifecycle};
use crate::protocol::is_valid_event_name;

/// Most events one outcome may emit.
pub const MAX_EMITTED: usize = 16;

/// Validates and converts an outcome. `from_client` tells whether the event
/// concerns a connection (`sender-others` needs one).
pub(crate) fn validate(
    outcome: wit::Outcome,
    from_client: bool,
    limits: &PluginLimits,
) -> Result<Outcome, CallError> {
    let invalid = |why: String| CallError::InvalidOutcome(why);
    if outcome.deliveries.len() > limits.max_deliveries {
        return Err(invalid(format!(
            "{} deliveries, at most {} allowed",
            outcome.deliveries.len(),
            limits.max_deliveries
        )));
    }

    let mut total_bytes = 0usize;
    let mut total_recipients = 0usize;
    let mut deliveries = Vec::with_capacity(outcome.deliveries.len());
    for (index, delivery) in outcome.deliveries.into_iter().enumerate() {
        if !is_valid_event_name(&delivery.event) {
            return Err(invalid(format!(
                "delivery {index}: event name {:?} is not 1-64 chars of [A-Za-z0-9_.:-]",
                truncate(&delivery.event)
            )));
        }
        if delivery.to.is_empty() {
            return Err(invalid(format!("delivery {index} has no recipient")));
        }
        total_recipients += delivery.to.len();
        if total_recipients > limits.max_recipients {
            return Err(invalid(format!(
                "more than {} recipients in one outcome",
                limits.max_recipients
            )));
        }
        let to = delivery
            .to
            .into_iter()
            .map(|recipient| recipient_of(recipient, from_client))
            .collect::<Result<Vec<_>, String>>()
            .map_err(|why| invalid(format!("delivery {index}: {why}")))?;
        total_bytes += delivery.data.len();
        let data = json_payload(delivery.data, limits)
            .map_err(|why| invalid(format!("delivery {index}: {why}")))?;
        deliveries.push(Delivery {
            to,
            event: delivery.event,
            data,
            ephemeral: delivery.ephemeral,
        });
    }

    if outcome.emit.len() > MAX_EMITTED {
        return Err(invalid(format!(
            "{} emitted events, at most {MAX_EMITTED} allowed",
            outcome.emit.len()
        )));
    }
    let mut emit = Vec::with_capacity(outcome.emit.len());
    for (index, event) in outcome.emit.into_iter().enumerate() {
        if !is_valid_event_name(&event.name) || lifecycle::is_reserved(&event.name) {
            return Err(invalid(format!(
                "emitted event {index}: name {:?} is not 1-64 chars of [A-Za-z0-9_.:-] outside `sockets.`",
                truncate(&event.name)
            )));
        }
        total_bytes += event.data.len();
        let data = json_payload(event.data, limits)
            .map_err(|why| invalid(format!("emitted event {index}: {why}")))?;
        emit.push(Emitted {
            name: event.name,
            data,
        });
    }

    let reply = match outcome.reply {
        None => None,
        Some(reply) => {
            total_bytes += reply.data.len();
            let data =
                json_payload(reply.data, limits).map_err(|why| invalid(format!("reply: {why}")))?;
            if reply.delivered_field.is_some() && !data.get().trim_start().starts_with('{') {
                return Err(invalid(
                    "reply: `delivered-field` needs the reply data to be a JSON object".to_owned(),
                ));
            }
            Some(Reply {
                data,
                delivered_field: reply.delivered_field,
            })
        }
    };

    if total_bytes > limits.max_outcome_bytes {
        return Err(invalid(format!(
            "{total_bytes} bytes of payload, at most {} allowed",
            limits.max_outcome_bytes
        )));
    }
    Ok(Outcome {
        deliveries,
        reply,
        emit,
    })
}

fn recipient_of(recipient: wit::Recipient, from_client: bool) -> Result<Recipient, String> {
    match recipient {
        wit::Recipient::User(id) if !id.is_empty() => Ok(Recipient::User(id)),
        wit::Recipient::Connection(id) if !id.is_empty() => Ok(Recipient::Connection(id)),
        wit::Recipient::User(_) | wit::Recipient::Connection(_) => {
            Err("a recipient id is empty".to_owned())
        }
        wit::Recipient::SenderOthers if from_client => Ok(Recipient::SenderOthers),
        wit::Recipient::SenderOthers => {
            Err("`sender-others` is only meaningful for client events".to_owned())
        }
    }
}

fn json_payload(text: String, limits: &PluginLimits) -> Result<Box<RawValue>, String> {
    if text.len() > limits.max_payload_bytes {
        return Err(format!(
            "payload of {} bytes, at most {} allowed",
            text.len(),
            limits.max_payload_bytes
        ));
    }
    RawValue::from_string(text).map_err(|err| format!("payload is not JSON: {err}"))
}

/// Keeps error messages about plugin-provided strings short.
fn truncate(text: &str) -> String {
    text.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(event: &str, data: &str, to: Vec<wit::Recipient>) -> wit::Delivery {
        wit::Delivery {
            to,
            event: event.to_owned(),
            data: data.to_owned(),
            ephemeral: false,
        }
    }

    fn user(id: &str) -> wit::Recipient {
        wit::Recipient::User(id.to_owned())
    }

    fn outcome(deliveries: Vec<wit::Delivery>) -> wit::Outcome {
        wit::Outcome {
            deliveries,
            reply: None,
            emit: Vec::new(),
        }
    }

    fn check(outcome: wit::Outcome) -> Result<Outcome, CallError> {
        validate(outcome, false, &PluginLimits::default())
    }

    fn rejection(outcome: wit::Outcome) -> String {
        match check(outcome) {
            Err(CallError::InvalidOutcome(why)) => why,
            other => panic!("expected an invalid outcome, got {other:?}"),
        }
    }

    #[test]
    fn a_well_formed_outcome_passes() {
        let checked = check(outcome(vec![delivery(
            "paymentProcessed",
            r#"{"a":1}"#,
            vec![user("s_1")],
        )]))
        .unwrap();
        assert_eq!(checked.deliveries[0].data.get(), r#"{"a":1}"#);
        assert_eq!(
            checked.deliveries[0].to,
            vec![Recipient::User("s_1".into())]
        );
    }

    #[test]
    fn payloads_must_be_json() {
        let why = rejection(outcome(vec![delivery("x", "{not json", vec![user("s_1")])]));
        assert!(why.contains("not JSON"), "{why}");
    }

    #[test]
    fn event_names_follow_the_protocol() {
        let why = rejection(outcome(vec![delivery("bad name", "1", vec![user("s_1")])]));
        assert!(why.contains("event name"), "{why}");
    }

    #[test]
    fn deliveries_need_recipients_with_ids() {
        assert!(rejection(outcome(vec![delivery("x", "1", vec![])])).contains("no recipient"));
        assert!(rejection(outcome(vec![delivery("x", "1", vec![user("")])])).contains("empty"));
    }

    #[test]
    fn sender_others_needs_a_client_event() {
        let raw = || outcome(vec![delivery("x", "1", vec![wit::Recipient::SenderOthers])]);
        assert!(rejection(raw()).contains("sender-others"));
        assert!(validate(raw(), true, &PluginLimits::default()).is_ok());
    }

    #[test]
    fn sizes_and_counts_are_capped() {
        let limits = PluginLimits::default();
        let many = (0..=limits.max_deliveries)
            .map(|_| delivery("x", "1", vec![user("u")]))
            .collect();
        assert!(rejection(outcome(many)).contains("deliveries"));

        let big = format!("\"{}\"", "x".repeat(limits.max_payload_bytes));
        assert!(
            rejection(outcome(vec![delivery("x", &big, vec![user("u")])])).contains("payload of")
        );

        let recipients = (0..=limits.max_recipients)
            .map(|i| user(&i.to_string()))
            .collect();
        assert!(rejection(outcome(vec![delivery("x", "1", recipients)])).contains("recipients"));
    }

    #[test]
    fn emitted_events_are_checked_like_deliveries() {
        let emitted = |name: &str, data: &str| wit::EmittedEvent {
            name: name.to_owned(),
            data: data.to_owned(),
        };
        let mut raw = outcome(vec![]);
        raw.emit = vec![emitted("NOTIFICATION_REQUESTED", r#"{"userId":"s_1"}"#)];
        assert_eq!(check(raw).unwrap().emit[0].name, "NOTIFICATION_REQUESTED");
        for (name, data, why) in [
            ("sockets.userOnline", "{}", "name"),
            ("has space", "{}", "name"),
            ("X", "{not json", "not JSON"),
        ] {
            let mut raw = outcome(vec![]);
            raw.emit = vec![emitted(name, data)];
            assert!(rejection(raw).contains(why), "{name}");
        }
        let mut raw = outcome(vec![]);
        raw.emit = (0..=MAX_EMITTED).map(|_| emitted("X", "1")).collect();
        assert!(rejection(raw).contains("emitted events"));
    }

    #[test]
    fn a_counted_reply_must_be_an_object() {
        let mut raw = outcome(vec![]);
        raw.reply = Some(wit::Reply {
            data: "[1]".to_owned(),
            delivered_field: Some("delivered".to_owned()),
        });
        assert!(rejection(raw).contains("object"));
    }
}
