//! PROTOCOL.md §4 (`sendMessage` through the chat plugin) and the
//! notification log (§7), end to end.

use std::time::Duration;

use serde_json::{Value, json};
use sockets_host::store::{EmbeddedLog, NotificationLog};
use sockets_tests::client::Client;
use sockets_tests::server::{Server, ServerConfig, token};

async fn connect(server: &Server, sub: &str, role: &str) -> Client {
    Client::connect(server, &token(sub, role)).await.0
}

async fn send(client: &mut Client, to: &str, text: &str, ack: u64) -> Value {
    client
        .send(&json!({"event": "sendMessage", "data": {"to": to, "text": text}, "ack": ack}))
        .await;
    client.recv().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_reaches_every_recipient_connection_and_the_senders_other_devices() {
    let server = Server::in_process().await;
    let mut phone = connect(&server, "s_1", "student").await;
    let mut laptop = connect(&server, "s_1", "student").await;
    let mut consultant_a = connect(&server, "c_1", "consultant").await;
    let mut consultant_b = connect(&server, "c_1", "consultant").await;

    phone
        .send(&json!({"event": "sendMessage", "data": {"to": "c_1", "text": "hello", "from": "c_1"}, "ack": 2}))
        .await;
    let reply = phone.recv().await;
    assert_eq!(reply["ack"], 2);
    assert_eq!(reply["ok"], true);
    assert_eq!(reply["data"]["delivered"], 2, "{reply}");
    let message_id = reply["data"]["messageId"].as_str().unwrap().to_owned();

    let pushes = [
        consultant_a.recv().await,
        consultant_b.recv().await,
        laptop.recv().await,
    ];
    for push in &pushes {
        assert_eq!(push["event"], "message");
        let data = &push["data"];
        assert_eq!(data["messageId"], message_id.as_str());
        assert_eq!(data["from"], "s_1", "a forged from is ignored");
        assert_eq!(data["fromRole"], "student");
        assert_eq!(data["to"], "c_1");
        assert_eq!(data["text"], "hello");
        assert!(data["sentAt"].as_str().unwrap().ends_with('Z'));
        assert!(push.get("ack").is_none());
    }
    let ids: Vec<_> = pushes.iter().map(|push| push["id"].clone()).collect();
    assert!(
        ids.iter().all(|id| id == &ids[0] && id.is_string()),
        "one delivery id: {ids:?}"
    );
    // The sending connection gets the reply, never the push.
    assert_eq!(phone.try_recv(Duration::from_millis(300)).await, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_offline_recipient_is_not_an_error_and_the_message_is_still_logged() {
    let server = Server::in_process().await;
    let mut student = connect(&server, "s_1", "student").await;
    let reply = send(&mut student, "c_2", "are you there?", 1).await;
    assert_eq!(reply["ok"], true);
    assert_eq!(reply["data"]["delivered"], 0);
    let message_id = reply["data"]["messageId"].as_str().unwrap().to_owned();
    let data_dir = server.data_dir.clone();
    assert!(server.stop().await);

    let log = EmbeddedLog::open(&data_dir).unwrap();
    let records = log.for_user("c_2", 10).await.unwrap();
    assert_eq!(records.len(), 1);
    let record = serde_json::to_value(&records[0]).unwrap();
    assert_eq!(record["eventId"], message_id.as_str());
    assert_eq!(record["event"], "message");
    assert_eq!(record["trigger"], "sendMessage");
    assert_eq!(record["source"], "client");
    assert_eq!(record["from"], "s_1");
    assert_eq!(record["to"], "c_2");
    assert_eq!(record["plugin"], "chat@0.1.0");
    assert_eq!(record["connections"], 0);
    assert_eq!(record["data"]["text"], "are you there?");
    assert!(record["_id"].as_str().unwrap().ends_with(":c_2"));
    assert!(record["createdAt"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_follow_the_protocol_order_and_codes() {
    let server = Server::in_process().await;
    let mut student = connect(&server, "s_1", "student").await;
    let cases = [
        (json!({"to": "c_1"}), "bad_request"),
        (json!({"to": "c_1", "text": ""}), "bad_request"),
        (
            json!({"to": "c_1", "text": "x".repeat(4001)}),
            "bad_request",
        ),
        (json!({"to": "c_1", "text": 5}), "bad_request"),
        (json!({"to": "s_1", "text": "me"}), "bad_request"),
        (json!({"to": "ghost", "text": ""}), "bad_request"),
        (json!({"to": "ghost", "text": "hi"}), "not_found"),
        (json!({"to": "s_2", "text": "hi"}), "forbidden"),
        (json!("hi"), "bad_request"),
    ];
    for (data, code) in cases {
        student
            .send(&json!({"event": "sendMessage", "data": data, "ack": 9}))
            .await;
        let reply = student.recv().await;
        assert_eq!(reply["error"]["code"], code, "data {data}: {reply}");
    }
    // 4000 characters (not bytes) is the limit.
    let reply = send(&mut student, "c_1", &"é".repeat(4000), 10).await;
    assert_eq!(reply["ok"], true, "{reply}");
}

#[tokio::test(flavor = "multi_thread")]
async fn frames_of_one_connection_are_delivered_in_order() {
    let server = Server::in_process().await;
    let mut student = connect(&server, "s_1", "student").await;
    let mut consultant = connect(&server, "c_1", "consultant").await;
    for i in 0..50 {
        student
            .send(&json!({"event": "sendMessage", "data": {"to": "c_1", "text": format!("m{i}")}}))
            .await;
    }
    for i in 0..50 {
        assert_eq!(consultant.recv().await["data"]["text"], format!("m{i}"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_log_survives_a_restart() {
    let data_dir = sockets_tests::server::scratch_dir("restart").join("data");
    let config = || ServerConfig {
        data_dir: Some(data_dir.clone()),
        ..ServerConfig::default()
    };

    let server = Server::in_process_with(config()).await;
    let mut student = connect(&server, "s_1", "student").await;
    let mut consultant = connect(&server, "c_1", "consultant").await;
    assert_eq!(
        send(&mut student, "c_1", "before restart", 1).await["data"]["delivered"],
        1
    );
    consultant.recv().await;
    assert!(server.stop().await);

    let server = Server::in_process_with(config()).await;
    let mut student = connect(&server, "s_1", "student").await;
    assert_eq!(
        send(&mut student, "c_1", "after restart", 2).await["ok"],
        true
    );
    assert!(server.stop().await);

    let log = EmbeddedLog::open(&data_dir).unwrap();
    let texts: Vec<_> = log
        .for_user("c_1", 10)
        .await
        .unwrap()
        .iter()
        .map(|record| serde_json::to_value(record).unwrap()["data"]["text"].clone())
        .collect();
    assert_eq!(texts, [json!("after restart"), json!("before restart")]);
    let connections: Vec<_> = log
        .for_user("c_1", 10)
        .await
        .unwrap()
        .iter()
        .map(|r| r.connections)
        .collect();
    assert_eq!(connections, [0, 1]);
}

/// A plugin may name a connection by id and its user too (the presence
/// test plugin's `nudge`): each connection still gets one push, and the
/// count covers each once.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_named_by_id_and_through_its_user_gets_one_push() {
    let server = Server::in_process_with(ServerConfig::default().with_whois()).await;
    let (mut phone, connected) = Client::connect(&server, &token("c_1", "consultant")).await;
    let phone_id = connected["data"]["connectionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut laptop = connect(&server, "c_1", "consultant").await;
    let mut sender = connect(&server, "s_1", "student").await;

    sender
        .send(&json!({"event": "nudge", "data": {"connection": phone_id, "user": "c_1"}, "ack": 1}))
        .await;
    let reply = sender.recv().await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["data"], json!({"delivered": 2}));
    for device in [&mut phone, &mut laptop] {
        let push = device.recv().await;
        assert_eq!(push["event"], "nudged", "{push}");
        assert_eq!(push["data"]["by"], "s_1");
        assert_eq!(device.try_recv(Duration::from_millis(200)).await, None);
    }
}
