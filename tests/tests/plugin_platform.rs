//! The plugin contract 0.2 (issue 37) against the real host and real
//! components: a 0.1 plugin still loads beside 0.2 ones; ephemeral pushes
//! are never logged or replayed; lifecycle events drive the bundled
//! `presence` plugin; emitted events reach their subscribers through the
//! host's own router, with loops cut at the depth limit.

use std::time::Duration;

use serde_json::{Value, json};
use sockets_tests::client::{Client, counter, http, publish};
use sockets_tests::server::{Server, ServerConfig, scratch_dir, token};

/// How long a test waits to be sure a frame does not come.
const QUIET: Duration = Duration::from_millis(600);

fn with_plugin(plugin: &'static str) -> ServerConfig {
    let mut config = ServerConfig::default();
    config.plugins.push(plugin);
    config
}

/// Sends `event` with `data` and ack 1 and returns the reply frame, with
/// the pushes that came before it dropped.
async fn ask(client: &mut Client, event: &str, data: Value) -> Value {
    client
        .send(&json!({"event": event, "data": data, "ack": 1}))
        .await;
    loop {
        let frame = client.recv().await;
        if frame["ack"] == 1 {
            return frame;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_built_against_contract_0_1_still_loads_and_behaves() {
    let server = Server::in_process_with(with_plugin("legacy")).await;
    let mut student = Client::connect_as(&server, "s_1", "student").await;
    let mut student_tab = Client::connect_as(&server, "s_1", "student").await;
    let mut consultant = Client::connect_as(&server, "c_1", "consultant").await;

    let reply = ask(&mut student, "legacyPing", json!({"to": "c_1"})).await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["data"], json!({"pong": true, "delivered": 1}));
    let pong = consultant.next_push("legacyPong").await;
    assert_eq!(
        pong["data"],
        json!({"from": "s_1", "online": 1, "config": {}})
    );
    assert!(pong["id"].is_string() && pong.get("ephemeral").is_none());
    assert_eq!(student_tab.next_push("legacyPong").await["id"], pong["id"]);

    let refused = ask(&mut student, "legacyPing", json!({"to": "nobody"})).await;
    assert_eq!(refused["error"]["code"], "not_found", "{refused}");

    // The bundled (0.2) chat works beside it, and the admin API tells them
    // apart.
    let sent = ask(
        &mut student,
        "sendMessage",
        json!({"to": "c_1", "text": "hi"}),
    )
    .await;
    assert_eq!(sent["data"]["delivered"], 1);
    let admin = vec![("authorization", format!("Bearer {}", token("ops", "admin")))];
    let listed = http(&server, "GET", "/admin/plugins", &admin, b"").await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    let plugins = listed.json();
    let contract = |name: &str| {
        plugins["plugins"]
            .as_array()
            .and_then(|all| all.iter().find(|plugin| plugin["name"] == name))
            .map(|plugin| plugin["current"]["contract"].clone())
    };
    assert_eq!(contract("legacy"), Some(json!("0.1")), "{plugins}");
    assert_eq!(contract("chat"), Some(json!("0.2")));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn typing_is_pushed_at_once_and_never_logged_or_replayed() {
    let server = Server::in_process().await;
    let since = sockets_host::protocol::rfc3339(std::time::SystemTime::now());
    let mut student = Client::connect_as(&server, "s_1", "student").await;
    let mut consultant = Client::connect_as(&server, "c_1", "consultant").await;

    let reply = ask(&mut student, "typing", json!({"to": "c_1"})).await;
    assert_eq!(reply["data"], json!({"delivered": 1}), "{reply}");
    let typing = consultant.next_push("typing").await;
    assert_eq!(typing["data"], json!({"from": "s_1"}));
    assert_eq!(typing["ephemeral"], true);
    let typing_id = typing["id"].as_str().unwrap().to_owned();

    let sent = ask(
        &mut student,
        "sendMessage",
        json!({"to": "c_1", "text": "hi"}),
    )
    .await;
    assert_eq!(sent["ok"], true);
    let message = consultant.next_push("message").await;

    // A second connection resumes: the message comes back, the typing
    // indicator does not, and its id is no cursor in the log.
    let mut again = Client::connect_as(&server, "c_1", "consultant").await;
    let (replayed, reply) = again.resume(json!({"since": since})).await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(replayed.len(), 1, "{replayed:?}");
    assert_eq!(replayed[0]["id"], message["id"]);
    let (_, reply) = again.resume(json!({"after": typing_id})).await;
    assert_eq!(reply["error"]["code"], "not_found", "{reply}");

    // Chat's role rules hold for typing too.
    let refused = ask(&mut student, "typing", json!({"to": "s_2"})).await;
    assert_eq!(refused["error"]["code"], "forbidden", "{refused}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn watchers_hear_status_changes_and_a_user_coming_and_going() {
    let server = Server::in_process().await;
    let mut student = Client::connect_as(&server, "s_1", "student").await;
    let reply = ask(&mut student, "watchStatus", json!({"users": ["c_1"]})).await;
    assert_eq!(
        reply["data"],
        json!({"statuses": [{"userId": "c_1", "status": "available", "text": null, "online": false}]}),
        "{reply}"
    );

    let consultant = Client::connect_as(&server, "c_1", "consultant").await;
    let online = student.next_push("statusChanged").await;
    assert_eq!(online["data"]["online"], true, "{online}");
    assert_eq!(online["ephemeral"], true);

    // A second connection is not a user coming online.
    let mut second_tab = Client::connect_as(&server, "c_1", "consultant").await;
    student.no_push("statusChanged", QUIET).await;

    let set = ask(
        &mut second_tab,
        "setStatus",
        json!({"status": "busy", "text": "in a session"}),
    )
    .await;
    assert_eq!(set["ok"], true, "{set}");
    let busy = student.next_push("statusChanged").await;
    assert_eq!(
        busy["data"],
        json!({"userId": "c_1", "status": "busy", "text": "in a session", "online": true})
    );

    // Closing one of two connections is not going offline; the last is.
    consultant.close().await;
    student.no_push("statusChanged", QUIET).await;
    second_tab.close().await;
    let offline = student.next_push("statusChanged").await;
    assert_eq!(
        offline["data"],
        json!({"userId": "c_1", "status": "busy", "text": "in a session", "online": false})
    );

    // Clients cannot raise the host's lifecycle events themselves.
    let forged = ask(
        &mut student,
        "sockets.userOnline",
        json!({"connections": 1}),
    )
    .await;
    assert_eq!(forged["error"]["code"], "unknown_event", "{forged}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_opening_or_closing_at_once_are_one_coming_online_and_one_going_offline() {
    let server = Server::in_process().await;
    let mut student = Client::connect_as(&server, "s_1", "student").await;
    ask(&mut student, "watchStatus", json!({"users": ["c_1"]})).await;
    for _ in 0..3 {
        let (first, second) = tokio::join!(
            Client::connect_as(&server, "c_1", "consultant"),
            Client::connect_as(&server, "c_1", "consultant"),
        );
        let online = student.next_push("statusChanged").await;
        assert_eq!(online["data"]["online"], true, "{online}");
        student.no_push("statusChanged", QUIET).await;
        tokio::join!(first.close(), second.close());
        let offline = student.next_push("statusChanged").await;
        assert_eq!(offline["data"]["online"], false, "{offline}");
        student.no_push("statusChanged", QUIET).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn emitted_events_reach_their_subscribers_and_loops_are_cut() {
    let dir = scratch_dir("emit");
    let file = dir.join("sockets.toml");
    std::fs::write(&file, "[plugins.chat]\nofflineNotify = true\n").unwrap();
    let mut config = with_plugin("emitter");
    config.args = vec!["--config".into(), file.display().to_string()];
    let server = Server::in_process_with(config).await;
    let mut observer = Client::connect_as(&server, "observer", "user").await;
    let mut student = Client::connect_as(&server, "s_1", "student").await;

    // c_1 is offline: chat emits NOTIFICATION_REQUESTED, which the host
    // routes to its subscriber (no broker here).
    let sent = ask(
        &mut student,
        "sendMessage",
        json!({"to": "c_1", "text": "are you there?"}),
    )
    .await;
    let message_id = sent["data"]["messageId"].clone();
    let requested = observer.next_push("notificationRequested").await;
    assert_eq!(requested["data"]["origin"], "plugin:chat");
    assert_eq!(
        requested["data"]["data"],
        json!({
            "userId": "c_1",
            "kind": "message",
            "ids": {"messageId": message_id, "from": "s_1"},
            "preview": "are you there?",
        })
    );

    // Online, no notification is requested.
    let _consultant = Client::connect_as(&server, "c_1", "consultant").await;
    ask(
        &mut student,
        "sendMessage",
        json!({"to": "c_1", "text": "hi"}),
    )
    .await;
    observer.no_push("notificationRequested", QUIET).await;

    // A plugin that emits what it handles: the chain stops at the limit.
    let dropped_before = counter(&server, "sockets_plugin_emitted_dropped_total").await;
    let accepted = publish(
        &server,
        &token("billing", "service"),
        &json!({"event": "PING_LOOP", "data": {"n": 1}}),
    )
    .await;
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let depth = usize::from(sockets_host::dispatch::MAX_EMIT_DEPTH);
    for level in 0..=depth {
        let ping = observer.next_push("loop").await;
        let expected_origin = if level == 0 {
            "api:billing"
        } else {
            "plugin:emitter"
        };
        assert_eq!(ping["data"]["origin"], expected_origin, "{ping}");
    }
    observer.no_push("loop", QUIET).await;
    assert_eq!(
        counter(&server, "sockets_plugin_emitted_dropped_total").await,
        dropped_before + 1
    );
    server.stop().await;
}
