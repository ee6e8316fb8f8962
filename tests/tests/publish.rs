//! PROTOCOL.md §5: the HTTP publish API and the backend events' pushes.

use serde_json::{Value, json};
use sockets_host::store::{EmbeddedLog, NotificationLog};
use sockets_tests::client::{Client, http, publish, student_and_consultant};
use sockets_tests::server::{Server, token};

fn service() -> String {
    token("billing", "service")
}

fn payment() -> Value {
    json!({"paymentId":"p_1","studentId":"s_1","consultantId":"c_1","amount":4900,"currency":"USD","status":"succeeded"})
}

#[tokio::test(flavor = "multi_thread")]
async fn payment_processed_reaches_every_connection_of_the_student() {
    let server = Server::in_process().await;
    let mut phone = Client::connect_as(&server, "s_1", "student").await;
    let (mut laptop, mut other) = student_and_consultant(&server).await;

    let response = publish(
        &server,
        &service(),
        &json!({"event": "PAYMENT_PROCESSED", "data": payment()}),
    )
    .await;
    assert_eq!(response.status, 202, "{}", response.body);
    let accepted = response.json();
    assert_eq!(accepted["recipients"], 1);
    assert!(accepted["id"].as_str().is_some_and(|id| !id.is_empty()));
    assert!(accepted.get("duplicate").is_none());

    let expected = json!({"paymentId":"p_1","amount":4900,"currency":"USD","status":"succeeded","consultantId":"c_1"});
    let (a, b) = (phone.recv().await, laptop.recv().await);
    for push in [&a, &b] {
        assert_eq!(push["event"], "paymentProcessed");
        assert_eq!(push["data"], expected);
    }
    assert_eq!(a["id"], b["id"]);
    assert_eq!(
        other.try_recv(std::time::Duration::from_millis(300)).await,
        None
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn review_added_reaches_the_consultant_and_is_logged_even_offline() {
    let server = Server::in_process().await;
    let mut consultant = Client::connect_as(&server, "c_1", "consultant").await;
    let review = json!({"reviewId":"r_1","consultantId":"c_1","studentId":"s_1","rating":5,"comment":"Great session"});
    let response = publish(
        &server,
        &service(),
        &json!({"event": "REVIEW_ADDED", "data": review}),
    )
    .await;
    assert_eq!(response.status, 202, "{}", response.body);
    let push = consultant.recv().await;
    assert_eq!(push["event"], "reviewAdded");
    assert_eq!(
        push["data"],
        json!({"reviewId":"r_1","studentId":"s_1","rating":5,"comment":"Great session"})
    );

    // Nobody online: still 202 with the addressed user counted, and logged.
    let offline = json!({"reviewId":"r_2","consultantId":"c_2","rating":4});
    let response = publish(
        &server,
        &service(),
        &json!({"event": "REVIEW_ADDED", "data": offline, "id": "review-r_2"}),
    )
    .await;
    assert_eq!(
        response.json(),
        json!({"id": "review-r_2", "recipients": 1})
    );
    let data_dir = server.data_dir.clone();
    assert!(server.stop().await);

    let log = EmbeddedLog::open(&data_dir).unwrap();
    let records = log.for_event("review-r_2").await.unwrap();
    assert_eq!(records.len(), 1);
    let record = serde_json::to_value(&records[0]).unwrap();
    assert_eq!(record["to"], "c_2");
    assert_eq!(record["source"], "api");
    assert_eq!(record["from"], "billing");
    assert_eq!(record["trigger"], "REVIEW_ADDED");
    assert_eq!(record["event"], "reviewAdded");
    assert_eq!(record["plugin"], "reviews@0.1.0");
    assert_eq!(record["connections"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_id_is_answered_like_the_first_and_delivered_once() {
    let server = Server::in_process().await;
    let mut student = Client::connect_as(&server, "s_1", "student").await;
    let body = json!({"event": "PAYMENT_PROCESSED", "data": payment(), "id": "pay-p_1"});
    let first = publish(&server, &service(), &body).await.json();
    assert_eq!(first, json!({"id": "pay-p_1", "recipients": 1}));
    let second = publish(&server, &service(), &body).await;
    assert_eq!(second.status, 202);
    assert_eq!(
        second.json(),
        json!({"id": "pay-p_1", "recipients": 1, "duplicate": true})
    );

    assert_eq!(student.recv().await["event"], "paymentProcessed");
    assert_eq!(
        student
            .try_recv(std::time::Duration::from_millis(500))
            .await,
        None
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_have_the_protocol_statuses_and_bodies() {
    let server = Server::in_process().await;
    let expect = |response: sockets_tests::client::Response, status: u16, code: &str| {
        response.assert_error(status, code);
    };

    let no_token = http(
        &server,
        "POST",
        "/api/events",
        &[],
        br#"{"event":"PAYMENT_PROCESSED"}"#,
    )
    .await;
    expect(no_token, 401, "unauthorized");
    let bad_token = publish(
        &server,
        "nope",
        &json!({"event": "PAYMENT_PROCESSED", "data": payment()}),
    )
    .await;
    expect(bad_token, 401, "unauthorized");
    let student = publish(
        &server,
        &token("s_1", "student"),
        &json!({"event": "PAYMENT_PROCESSED", "data": payment()}),
    )
    .await;
    expect(student, 403, "forbidden");

    for body in [
        json!([1]),
        json!({"data": {}}),
        json!({"event": 5}),
        json!({"event": "bad name"}),
        json!({"event": "X", "id": ""}),
        json!({"event": "X", "id": 7}),
    ] {
        expect(
            publish(&server, &service(), &body).await,
            400,
            "bad_request",
        );
    }
    let not_json = http(
        &server,
        "POST",
        "/api/events",
        &[("authorization", format!("Bearer {}", service()))],
        b"{oops",
    )
    .await;
    expect(not_json, 400, "bad_request");

    expect(
        publish(
            &server,
            &service(),
            &json!({"event": "NOBODY_HANDLES_THIS", "data": {}}),
        )
        .await,
        422,
        "unknown_event",
    );
    let missing_student = json!({"event": "PAYMENT_PROCESSED", "data": {"paymentId": "p_1"}});
    expect(
        publish(&server, &service(), &missing_student).await,
        400,
        "bad_request",
    );
    let wrong_rating = json!({"event": "REVIEW_ADDED", "data": {"reviewId": "r", "consultantId": "c_1", "rating": 5.5}});
    expect(
        publish(&server, &service(), &wrong_rating).await,
        400,
        "bad_request",
    );

    let huge = format!(
        r#"{{"event":"PAYMENT_PROCESSED","data":"{}"}}"#,
        "x".repeat((1 << 20) + 10)
    );
    let too_large = http(
        &server,
        "POST",
        "/api/events",
        &[("authorization", format!("Bearer {}", service()))],
        huge.as_bytes(),
    )
    .await;
    expect(too_large, 413, "too_large");

    expect(
        http(&server, "GET", "/nowhere", &[], b"").await,
        404,
        "not_found",
    );
    expect(
        http(&server, "GET", "/api/events", &[], b"").await,
        405,
        "bad_request",
    );
    // /ws without an upgrade, with a valid token: not a WebSocket request.
    let plain = http(
        &server,
        "GET",
        "/ws",
        &[(
            "authorization",
            format!("Bearer {}", token("s_1", "student")),
        )],
        b"",
    )
    .await;
    assert!((400..500).contains(&plain.status), "{}", plain.body);
    assert_eq!(plain.json()["error"]["code"], "bad_request");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_cannot_forge_a_backend_event() {
    let server = Server::in_process().await;
    let mut student = Client::connect_as(&server, "s_1", "student").await;
    student
        .send(&json!({"event": "PAYMENT_PROCESSED", "data": payment(), "ack": 1}))
        .await;
    let reply = student.recv().await;
    assert_eq!(reply["error"]["code"], "forbidden", "{reply}");
}

/// PROTOCOL §5 (v1.1): delivery ids are derived from the event id, so the
/// same event processed by two nodes (or again after a restart) pushes
/// under the same `id`, which clients de-duplicate by, and writes the same
/// log `_id`s.
#[tokio::test]
async fn the_same_event_on_two_nodes_pushes_the_same_delivery_id() {
    let first = Server::in_process().await;
    let second = Server::in_process().await;
    let service = token("billing", "service");
    let event = json!({"event": "PAYMENT_PROCESSED", "id": "pay-same-everywhere",
        "data": {"paymentId": "p_7", "studentId": "s_1"}});
    let mut ids = Vec::new();
    for server in [&first, &second] {
        let (mut student, _) = Client::connect(server, &token("s_1", "student")).await;
        let answer = publish(server, &service, &event).await;
        assert_eq!(answer.status, 202, "{}", answer.body);
        let push = student.recv().await;
        assert_eq!(push["event"], "paymentProcessed", "{push}");
        ids.push(push["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids[0], ids[1], "one event, one delivery id, whichever node");
    // Another event id, another delivery id.
    let (mut student, _) = Client::connect(&first, &token("s_1", "student")).await;
    let other = json!({"event": "PAYMENT_PROCESSED", "id": "pay-another",
        "data": {"paymentId": "p_7", "studentId": "s_1"}});
    assert_eq!(publish(&first, &service, &other).await.status, 202);
    let push = student.recv().await;
    assert_ne!(push["id"], ids[0]);
}
