//! Payment notifications (PROTOCOL.md §5, `PAYMENT_PROCESSED`): the student
//! who paid receives `paymentProcessed`.

use serde::{Deserialize, Serialize};
use serde_json::Number;
use sockets_sdk::{Delivery, Event, Failure, Host, NonEmptyString, Outcome, Plugin, UserId};

/// The payments plugin.
pub struct Payments;

/// The event as published by the payments service; unlisted fields are
/// dropped so that nothing unexpected reaches clients.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PaymentProcessed {
    payment_id: NonEmptyString,
    student_id: UserId,
    consultant_id: Option<String>,
    amount: Option<Number>,
    currency: Option<String>,
    status: Option<String>,
}

/// What the student receives: the listed fields that are present, without
/// `studentId`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PaymentPush<'a> {
    payment_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    amount: Option<&'a Number>,
    #[serde(skip_serializing_if = "Option::is_none")]
    currency: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    consultant_id: Option<&'a str>,
}

impl Plugin for Payments {
    const SUBSCRIPTIONS: &'static [&'static str] = &["PAYMENT_PROCESSED"];

    fn handle(event: &Event, _host: &dyn Host) -> Result<Outcome, Failure> {
        event.require_backend()?;
        let payment: PaymentProcessed = event.data_as()?;
        let push = PaymentPush {
            payment_id: &payment.payment_id,
            amount: payment.amount.as_ref(),
            currency: payment.currency.as_deref(),
            status: payment.status.as_deref(),
            consultant_id: payment.consultant_id.as_deref(),
        };
        let delivery = Delivery::new("paymentProcessed", &push)?.to_user(&payment.student_id);
        Ok(Outcome::new().deliver(delivery))
    }
}

sockets_sdk::export_plugin!(Payments);

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};
    use sockets_sdk::testing::{TestHost, broker_event, client_event};
    use sockets_sdk::{ErrorCode, Recipient};

    use super::*;

    fn handle(data: Value) -> Result<Outcome, Failure> {
        Payments::handle(
            &broker_event("PAYMENT_PROCESSED", &data.to_string()),
            &TestHost::new(),
        )
    }

    #[test]
    fn the_protocol_example_reaches_the_student() {
        let outcome = handle(
            json!({"paymentId":"p_1","studentId":"s_1","consultantId":"c_1",
            "amount":4900,"currency":"USD","status":"succeeded"}),
        )
        .unwrap();

        assert_eq!(outcome.deliveries.len(), 1);
        let push = &outcome.deliveries[0];
        assert_eq!(push.event, "paymentProcessed");
        assert_eq!(push.to, vec![Recipient::User("s_1".into())]);
        assert_eq!(
            push.data,
            r#"{"paymentId":"p_1","amount":4900,"currency":"USD","status":"succeeded","consultantId":"c_1"}"#
        );
        assert_eq!(outcome.reply, None);
    }

    #[test]
    fn absent_optional_fields_and_unlisted_fields_are_not_forwarded() {
        let outcome = handle(json!({"paymentId":"p_2","studentId":"s_1","currency":null,
            "cardNumber":"4242"}))
        .unwrap();
        assert_eq!(outcome.deliveries[0].data, r#"{"paymentId":"p_2"}"#);
    }

    #[test]
    fn fractional_amounts_keep_their_value() {
        let outcome = handle(json!({"paymentId":"p_3","studentId":"s_1","amount":49.5})).unwrap();
        let data: Value = serde_json::from_str(&outcome.deliveries[0].data).unwrap();
        assert_eq!(data["amount"], json!(49.5));
    }

    #[test]
    fn missing_ids_and_wrong_types_are_bad_requests() {
        for data in [
            json!(null),
            json!([]),
            json!({"studentId":"s_1"}),
            json!({"paymentId":"p_1"}),
            json!({"paymentId":"","studentId":"s_1"}),
            json!({"paymentId":"p_1","studentId":7}),
            json!({"paymentId":"p_1","studentId":"s_1","amount":"4900"}),
            json!({"paymentId":"p_1","studentId":"s_1","currency":5}),
        ] {
            let failure = handle(data.clone()).expect_err("expected a failure");
            assert_eq!(failure.code, ErrorCode::BadRequest, "data: {data}");
        }
    }

    #[test]
    fn clients_cannot_forge_payments() {
        let event = client_event(
            "PAYMENT_PROCESSED",
            "s_1",
            "student",
            r#"{"paymentId":"p","studentId":"s_1"}"#,
        );
        let failure = Payments::handle(&event, &TestHost::new()).unwrap_err();
        assert_eq!(failure.code, ErrorCode::Forbidden);
    }

    #[test]
    fn other_plugins_cannot_forge_payments_by_emitting_them() {
        let mut event = broker_event(
            "PAYMENT_PROCESSED",
            r#"{"paymentId":"p","studentId":"s_1"}"#,
        );
        event.origin = sockets_sdk::Origin::Plugin("chat".into());
        let failure = Payments::handle(&event, &TestHost::new()).unwrap_err();
        assert_eq!(failure.code, ErrorCode::Forbidden);
    }
}
