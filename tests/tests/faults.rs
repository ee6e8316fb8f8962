//! The fault suite: exactly once (PROTOCOL §5) under the faults a
//! deployment meets. Every scenario streams events while something breaks
//! (the broker restarts, the database dies, a node is killed or stopped, a
//! plugin misbehaves, an id is published twice) and ends with the same
//! ledger check (`sockets_tests::ledger`): events confirmed to the
//! publisher = events the host acked = unique log records = events the
//! recipient's connections received, with no delivery id received twice on
//! a connection.
//!
//! Scenarios run one at a time: one restarts the shared broker, and the
//! others' timing must not depend on it.

use std::time::Duration;

use mongodb::bson::doc;
use serde_json::json;
use sockets_tests::broker::{Names, consuming};
use sockets_tests::client::{Client, counter, publish_at};
use sockets_tests::eventually;
use sockets_tests::ledger::{ConfirmingPublisher, Connections, Ledger, Log, Receipts};
use sockets_tests::mongo::{FerretDb, TestDb};
use sockets_tests::server::{Server, ServerConfig, token};
use tokio::sync::Mutex;

/// Events per scenario.
const EVENTS: usize = 150;

/// One scenario at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

fn ids(scenario: &str) -> Vec<String> {
    let run = sockets_host::protocol::new_id();
    (0..EVENTS)
        .map(|i| format!("{scenario}-{run}-{i}"))
        .collect()
}

async fn student(server: &Server) -> Receipts {
    Receipts::listen(Client::connect(server, &token("s_1", "student")).await.0)
}

fn rabbitmqctl(args: &[&str]) {
    let status = std::process::Command::new("rabbitmqctl")
        .args(args)
        .status()
        .expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

/// Nodes sharing one broker setup and one database, the cluster link on, a
/// dead node's claims taken over after 3 s.
fn shared(names: &Names, db: &TestDb) -> ServerConfig {
    db.server_config(names.server_config())
        .env("SOCKETS_NODE_LEASE", "3")
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_restarted_mid_stream() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let names = Names::unique();
    let server = consuming(names.server_config()).await;
    let receipts = student(&server).await;
    let mut publisher = ConfirmingPublisher::default();
    let mut ledger = Ledger::default();
    for (i, id) in ids("broker-restart").into_iter().enumerate() {
        if i == EVENTS / 3 {
            // Every connection to the broker drops, the host's included.
            tokio::task::spawn_blocking(|| {
                rabbitmqctl(&["stop_app"]);
                rabbitmqctl(&["start_app"]);
                rabbitmqctl(&["await_startup"]);
            })
            .await
            .unwrap();
        }
        publisher.payment(&names.exchange, &id, "s_1").await;
        ledger.confirmed.insert(id);
    }
    ledger
        .check(
            Some(&names),
            Log::Embedded(&server.data_dir),
            Connections::one(&receipts),
        )
        .await;
    let log = server.log();
    assert!(
        log.contains("broker unavailable"),
        "the host never saw the broker go:\n{log}"
    );
    // Clustered on the embedded store: ids are this node's alone, and it
    // says so.
    assert!(
        log.contains("each node keeps its own log and idempotency keys"),
        "no warning about the embedded store in a cluster:\n{log}"
    );
    assert!(server.stop().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn database_killed_and_restarted_mid_stream() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut ferret = FerretDb::new();
    ferret.start().await;
    let db = TestDb::on(&ferret.url()).await;
    let names = Names::unique();
    let server = consuming(db.server_config_at(&ferret.url(), names.server_config())).await;
    let receipts = student(&server).await;
    let mut publisher = ConfirmingPublisher::default();
    let mut ledger = Ledger::default();
    for (i, id) in ids("database-restart").into_iter().enumerate() {
        if i == EVENTS / 3 {
            ferret.stop().await;
        }
        if i == 2 * EVENTS / 3 {
            // Down until the intake has met it, whatever the publishing pace.
            eventually(
                Duration::from_secs(30),
                "the intake meets the database's outage",
                || async { server.log().contains("will retry").then_some(()) },
            )
            .await;
            ferret.start().await;
        }
        publisher.payment(&names.exchange, &id, "s_1").await;
        ledger.confirmed.insert(id);
    }
    ledger
        .check(Some(&names), Log::Mongo(&db), Connections::one(&receipts))
        .await;
    assert!(server.stop().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_of_two_nodes_killed_mid_stream() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let names = Names::unique();
    let db = TestDb::unique().await;
    let doomed = consuming(shared(&names, &db)).await;
    let survivor = consuming(shared(&names, &db)).await;
    let on_doomed = student(&doomed).await;
    let on_survivor = student(&survivor).await;
    let mut reconnected = None;
    let mut publisher = ConfirmingPublisher::default();
    let mut ledger = Ledger::default();
    let mut doomed = Some(doomed);
    let ids = ids("node-killed");
    for (i, id) in ids.iter().enumerate() {
        if i == EVENTS / 3 {
            // A burst, then no shutdown of any kind: what the node held
            // unacked goes back to the queue, its claims run out, its
            // client reconnects.
            let burst = &ids[i..i + 40];
            publisher.burst(&names.exchange, burst, "s_1").await;
            ledger.confirmed.extend(burst.iter().cloned());
            doomed.take().unwrap().kill().await;
            reconnected = Some(student(&survivor).await);
        }
        if ledger.confirmed.contains(id) {
            continue;
        }
        publisher.payment(&names.exchange, id, "s_1").await;
        ledger.confirmed.insert(id.clone());
    }
    let reconnected = reconnected.unwrap();
    assert_eq!(
        counter(&survivor, "sockets_cluster_copies_dropped_total").await,
        0
    );
    ledger
        .check(
            Some(&names),
            Log::Mongo(&db),
            Connections {
                throughout: vec![&on_survivor],
                partly: vec![&on_doomed, &reconnected],
            },
        )
        .await;
    assert!(survivor.stop().await);
}

/// Publishes `id` as a payment over HTTP to `node`; asserts the answer of
/// a repeat (`duplicate`, the first call's id and recipients).
async fn republished_is_a_duplicate(node: &Server, id: &str) {
    let body = json!({
        "event": "PAYMENT_PROCESSED",
        "id": id,
        "data": {"paymentId": id, "studentId": "s_1", "amount": 100},
    });
    let answer = publish_at(node.addr, &token("billing", "service"), &body).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let answer = answer.json();
    assert_eq!(answer["duplicate"], true, "{id} on {}: {answer}", node.addr);
    assert_eq!(answer["id"], id, "{answer}");
    assert_eq!(answer["recipients"], 1, "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_id_published_to_two_nodes() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let names = Names::unique();
    let db = TestDb::unique().await;
    let a = consuming(shared(&names, &db)).await;
    let b = consuming(shared(&names, &db)).await;
    let on_a = student(&a).await;
    let on_b = student(&b).await;
    let mut publisher = ConfirmingPublisher::default();
    let mut ledger = Ledger::default();
    let ids = ids("same-id");
    for id in &ids {
        // Through the shared queue (either node takes it); once it is
        // logged, both nodes know it, also the one that did not take it,
        // and a second AMQP copy changes nothing.
        publisher.payment(&names.exchange, id, "s_1").await;
        eventually(Duration::from_secs(10), "the event is logged", || async {
            let logged = db.find("notificationLogs", doc! {"eventId": id}).await;
            (!logged.is_empty()).then_some(())
        })
        .await;
        republished_is_a_duplicate(&a, id).await;
        republished_is_a_duplicate(&b, id).await;
        publisher.payment(&names.exchange, id, "s_1").await;
        ledger.confirmed.insert(id.clone());
    }
    ledger
        .check(
            Some(&names),
            Log::Mongo(&db),
            Connections {
                throughout: vec![&on_a, &on_b],
                partly: vec![],
            },
        )
        .await;
    // A node started afterwards knows them too (they are in the store).
    assert!(a.stop().await);
    let restarted = consuming(shared(&names, &db)).await;
    for id in ids.iter().step_by(30) {
        republished_is_a_duplicate(&restarted, id).await;
    }
    assert!(restarted.stop().await);
    assert!(b.stop().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_embedded_default_killed_during_a_chat_stream() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let server = Server::start().await;
    let data_dir = server.data_dir.clone();
    let consultant = Receipts::listen(Client::connect_as(&server, "c_1", "consultant").await);
    let (mut sender, _) = Client::connect(&server, &token("s_1", "student")).await;
    let mut ledger = Ledger::default();
    let message = |n: usize| json!({"event": "sendMessage", "data": {"to": "c_1", "text": format!("message {n}")}, "ack": n});
    // A window of messages in flight: the kill catches some of them
    // between the log and the ack.
    const WINDOW: usize = 8;
    let mut sent = 0;
    let mut server = Some(server);
    while sent < EVENTS / 2 {
        for _ in 0..WINDOW {
            sender.send(&message(sent)).await;
            sent += 1;
        }
        if sent >= EVENTS / 3 && server.is_some() {
            server.take().unwrap().kill().await;
            ledger.unknown_in_flight += WINDOW;
            break;
        }
        for _ in 0..WINDOW {
            let reply = sender.recv().await;
            assert_eq!(reply["ok"], true, "{reply}");
            ledger
                .confirmed
                .insert(reply["data"]["messageId"].as_str().unwrap().to_owned());
        }
    }
    // The same data folder: every message whose reply said ok is there.
    let restarted = Server::start_with(ServerConfig {
        data_dir: Some(data_dir.clone()),
        ..ServerConfig::default()
    })
    .await;
    let consultant_again =
        Receipts::listen(Client::connect_as(&restarted, "c_1", "consultant").await);
    let (mut sender, _) = Client::connect(&restarted, &token("s_1", "student")).await;
    for n in sent..EVENTS {
        sender.send(&message(n)).await;
        let reply = sender.recv().await;
        assert_eq!(reply["ok"], true, "{reply}");
        ledger
            .confirmed
            .insert(reply["data"]["messageId"].as_str().unwrap().to_owned());
    }
    ledger
        .check(
            None,
            Log::Embedded(&data_dir),
            Connections {
                throughout: vec![],
                partly: vec![&consultant, &consultant_again],
            },
        )
        .await;
    // What the consultant received after the restart is complete.
    let after: usize = consultant_again.events().len();
    assert_eq!(after, EVENTS - sent, "pushes after the restart");
    assert!(restarted.stop().await);
}

/// A stream with one event a plugin cannot handle in the middle: it is
/// dead-lettered (with the reason), the others flow.
async fn a_plugin_failure_mid_stream(scenario: &str, failing_event: &str, reason: &str) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let names = Names::unique();
    let mut config = names.server_config();
    config.plugins.push("misbehaving");
    let server = consuming(config).await;
    let receipts = student(&server).await;
    let mut publisher = ConfirmingPublisher::default();
    let mut ledger = Ledger::default();
    for (i, id) in ids(scenario).into_iter().enumerate() {
        if i == EVENTS / 2 {
            let poison = format!("{id}-poison");
            publisher
                .publish(&names.exchange, failing_event, &poison, "{}")
                .await;
            ledger.dead.insert(poison);
        }
        publisher.payment(&names.exchange, &id, "s_1").await;
        ledger.confirmed.insert(id);
    }
    ledger
        .check(
            Some(&names),
            Log::Embedded(&server.data_dir),
            Connections::one(&receipts),
        )
        .await;
    assert!(
        server.log().contains(reason),
        "no `{reason}` in the log:\n{}",
        server.log()
    );
    assert!(server.stop().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poison_message_mid_stream() {
    a_plugin_failure_mid_stream(
        "poison",
        "panic",
        "dead-lettering broker event: failed 3 times",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sleeping_plugin_mid_stream() {
    a_plugin_failure_mid_stream("sleeping", "sleep", "plugins may not wait").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_stream_flushes_the_copies_for_other_nodes() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let names = Names::unique();
    let db = TestDb::unique().await;
    let stopping = consuming(shared(&names, &db)).await;
    let staying = consuming(shared(&names, &db)).await;
    // The student is on the node that stays: whatever the stopping node
    // takes from the queue reaches it only as a copy.
    let receipts = student(&staying).await;
    let mut publisher = ConfirmingPublisher::default();
    let mut ledger = Ledger::default();
    let mut stopping = Some(stopping);
    let mut stopped = None;
    for (i, id) in ids("sigterm").into_iter().enumerate() {
        if i == EVENTS / 3 {
            let mut node = stopping.take().unwrap();
            node.begin_stop();
            stopped = Some(tokio::spawn(node.stopped_with_log()));
        }
        publisher.payment(&names.exchange, &id, "s_1").await;
        ledger.confirmed.insert(id);
    }
    let (clean_exit, log) = stopped.unwrap().await.unwrap();
    assert_eq!(
        counter(&staying, "sockets_cluster_copies_dropped_total").await,
        0
    );
    assert!(clean_exit, "the stopped node's exit:\n{log}");
    assert!(
        !log.contains("copies for other nodes lost"),
        "the stopped node lost copies:\n{log}"
    );
    ledger
        .check(Some(&names), Log::Mongo(&db), Connections::one(&receipts))
        .await;
    assert!(staying.stop().await);
}
