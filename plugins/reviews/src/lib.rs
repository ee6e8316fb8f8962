//! Review notifications (PROTOCOL.md §5, `REVIEW_ADDED`): the reviewed
//! consultant receives `reviewAdded`.

use serde::{Deserialize, Serialize};
use sockets_sdk::{Delivery, Event, Failure, Host, NonEmptyString, Outcome, Plugin, UserId};

/// The reviews plugin.
pub struct Reviews;

/// The event as published by the reviews service; unlisted fields are
/// dropped so that nothing unexpected reaches clients.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewAdded {
    review_id: NonEmptyString,
    consultant_id: UserId,
    rating: u8,
    student_id: Option<String>,
    comment: Option<String>,
}

/// What the consultant receives: the listed fields that are present, without
/// `consultantId`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewPush<'a> {
    review_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    student_id: Option<&'a str>,
    rating: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    comment: Option<&'a str>,
}

impl Plugin for Reviews {
    const SUBSCRIPTIONS: &'static [&'static str] = &["REVIEW_ADDED"];

    fn handle(event: &Event, _host: &dyn Host) -> Result<Outcome, Failure> {
        event.require_backend()?;
        let review: ReviewAdded = event.data_as()?;
        if !(1..=5).contains(&review.rating) {
            return Err(Failure::bad_request(
                "`rating` must be an integer from 1 to 5",
            ));
        }
        let push = ReviewPush {
            review_id: &review.review_id,
            student_id: review.student_id.as_deref(),
            rating: review.rating,
            comment: review.comment.as_deref(),
        };
        let delivery = Delivery::new("reviewAdded", &push)?.to_user(&review.consultant_id);
        Ok(Outcome::new().deliver(delivery))
    }
}

sockets_sdk::export_plugin!(Reviews);

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};
    use sockets_sdk::testing::{TestHost, broker_event, client_event};
    use sockets_sdk::{ErrorCode, Recipient};

    use super::*;

    fn handle(data: Value) -> Result<Outcome, Failure> {
        Reviews::handle(
            &broker_event("REVIEW_ADDED", &data.to_string()),
            &TestHost::new(),
        )
    }

    #[test]
    fn the_protocol_example_reaches_the_consultant() {
        let outcome = handle(
            json!({"reviewId":"r_1","consultantId":"c_1","studentId":"s_1",
            "rating":5,"comment":"Great session"}),
        )
        .unwrap();

        assert_eq!(outcome.deliveries.len(), 1);
        let push = &outcome.deliveries[0];
        assert_eq!(push.event, "reviewAdded");
        assert_eq!(push.to, vec![Recipient::User("c_1".into())]);
        assert_eq!(
            push.data,
            r#"{"reviewId":"r_1","studentId":"s_1","rating":5,"comment":"Great session"}"#
        );
    }

    #[test]
    fn optional_fields_may_be_absent_or_null() {
        let outcome = handle(json!({"reviewId":"r_2","consultantId":"c_1","rating":1,
            "comment":null,"secret":"x"}))
        .unwrap();
        assert_eq!(
            outcome.deliveries[0].data,
            r#"{"reviewId":"r_2","rating":1}"#
        );
    }

    #[test]
    fn missing_ids_wrong_types_and_out_of_range_ratings_are_bad_requests() {
        for data in [
            json!({"consultantId":"c_1","rating":5}),
            json!({"reviewId":"r_1","rating":5}),
            json!({"reviewId":"r_1","consultantId":"c_1"}),
            json!({"reviewId":"r_1","consultantId":"","rating":5}),
            json!({"reviewId":"r_1","consultantId":"c_1","rating":0}),
            json!({"reviewId":"r_1","consultantId":"c_1","rating":6}),
            json!({"reviewId":"r_1","consultantId":"c_1","rating":5.0}),
            json!({"reviewId":"r_1","consultantId":"c_1","rating":"5"}),
            json!({"reviewId":"r_1","consultantId":"c_1","rating":300}),
            json!({"reviewId":"r_1","consultantId":"c_1","rating":5,"comment":false}),
        ] {
            let failure = handle(data.clone()).expect_err("expected a failure");
            assert_eq!(failure.code, ErrorCode::BadRequest, "data: {data}");
        }
    }

    #[test]
    fn clients_cannot_forge_reviews() {
        let event = client_event(
            "REVIEW_ADDED",
            "s_1",
            "student",
            r#"{"reviewId":"r","consultantId":"c_1","rating":5}"#,
        );
        let failure = Reviews::handle(&event, &TestHost::new()).unwrap_err();
        assert_eq!(failure.code, ErrorCode::Forbidden);
    }
}
