//! MongoDB persistence (issue #6, PROTOCOL.md §7) against a real
//! MongoDB-protocol server: FerretDB, started by the test command (or the
//! server at `SOCKETS_TEST_MONGO_URL`); the outage tests run FerretDB
//! processes of their own, which they stop and start.

use std::collections::HashSet;
use std::time::Duration;

use lapin::BasicProperties;
use mongodb::bson::{Document, doc};
use serde_json::json;
use sockets_tests::broker::{Names, Publisher, connections_counted_across_two_nodes, consuming};
use sockets_tests::client::{Client, http, publish, student_and_consultant};
use sockets_tests::eventually;
use sockets_tests::mongo::{FerretDb, TestDb};
use sockets_tests::server::{Server, ServerConfig, token, token_with};

const WAIT: Duration = Duration::from_secs(15);
/// How long a test waits to be sure a push does not come.
const QUIET: Duration = Duration::from_millis(800);

async fn ready(server: &Server) {
    eventually(WAIT, "the server is ready", || async {
        (http(server, "GET", "/readyz", &[], b"").await.status == 200).then_some(())
    })
    .await;
}

async fn connection_records(db: &TestDb, user: &str) -> Vec<Document> {
    db.find("userConnections", doc! {"userId": user}).await
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_records_follow_the_connection() {
    let db = TestDb::unique().await;
    let server = Server::start_with(db.server_config(ServerConfig::default())).await;
    let (mut client, connected) = Client::connect(&server, &token("s_1", "student")).await;
    let id = connected["data"]["connectionId"]
        .as_str()
        .unwrap()
        .to_owned();

    let record = eventually(WAIT, "the connection is recorded", || async {
        connection_records(&db, "s_1").await.into_iter().next()
    })
    .await;
    assert_eq!(record.get_str("_id").unwrap(), id);
    assert_eq!(record.get_str("role").unwrap(), "student");
    assert!(!record.get_str("instanceId").unwrap().is_empty());
    assert!(record.get_datetime("connectedAt").is_ok());
    assert!(record.get_datetime("lastSeenAt").is_ok());
    assert_eq!(record.get_document("details").unwrap(), &doc! {});
    assert!(
        record
            .get_str("remoteAddr")
            .unwrap()
            .starts_with("127.0.0.1:")
    );

    client
        .send(&json!({"event": "setConnection", "data": {"device": "ios", "appVersion": "3.2.1"}, "ack": 1}))
        .await;
    assert_eq!(client.recv().await["data"]["connectionId"], id.as_str());
    eventually(WAIT, "the details are stored", || async {
        let record = connection_records(&db, "s_1").await.into_iter().next()?;
        (record.get_document("details").ok()? == &doc! {"device": "ios", "appVersion": "3.2.1"})
            .then_some(())
    })
    .await;

    client.close().await;
    eventually(WAIT, "the record is removed on disconnect", || async {
        connection_records(&db, "s_1")
            .await
            .is_empty()
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deliveries_are_logged_once_with_deterministic_ids_and_indexes() {
    let db = TestDb::unique().await;
    db.seed_demo_users().await;
    let server = Server::start_with(db.server_config(ServerConfig::default())).await;
    ready(&server).await;
    let (mut student, mut consultant) = student_and_consultant(&server).await;

    student
        .send(&json!({"event": "sendMessage", "data": {"to": "c_1", "text": "logged"}, "ack": 1}))
        .await;
    assert_eq!(student.recv().await["ok"], true);
    let push = consultant.recv().await;
    let delivery_id = push["id"].as_str().unwrap().to_owned();

    // The ack came after the write: the record is there at once.
    let records = db.find("notificationLogs", doc! {"to": "c_1"}).await;
    assert_eq!(records.len(), 1, "{records:?}");
    let record = &records[0];
    assert_eq!(record.get_str("_id").unwrap(), format!("{delivery_id}:c_1"));
    assert_eq!(record.get_str("event").unwrap(), "message");
    assert_eq!(record.get_str("trigger").unwrap(), "sendMessage");
    assert_eq!(record.get_str("source").unwrap(), "client");
    assert_eq!(record.get_str("from").unwrap(), "s_1");
    assert!(record.get_str("plugin").unwrap().starts_with("chat@"));
    assert!(!record.get_str("eventId").unwrap().is_empty());
    assert_eq!(
        record
            .get_document("data")
            .unwrap()
            .get_str("text")
            .unwrap(),
        "logged"
    );
    assert_eq!(record.get_i64("connections").unwrap(), 1);
    assert!(record.get_datetime("createdAt").is_ok());
    assert!(record.get_i64("seq").unwrap() > 0, "the log order");

    // A repeated HTTP id is logged once.
    let service = token("billing", "service");
    let body = json!({"id": "pay-once", "event": "PAYMENT_PROCESSED",
        "data": {"paymentId": "p_1", "studentId": "s_1", "amount": 1}});
    for _ in 0..2 {
        assert_eq!(publish(&server, &service, &body).await.status, 202);
    }
    let payments = db
        .find("notificationLogs", doc! {"eventId": "pay-once"})
        .await;
    assert_eq!(payments.len(), 1);

    let indexes: Vec<Document> = eventually(WAIT, "the indexes exist", || async {
        use futures_util::TryStreamExt;
        let indexes: Vec<Document> = db
            .db
            .collection::<Document>("notificationLogs")
            .list_indexes()
            .await
            .ok()?
            .try_collect::<Vec<_>>()
            .await
            .ok()?
            .into_iter()
            .map(|index| index.keys)
            .collect();
        // `_id` and the four of the log.
        (indexes.len() >= 5).then_some(indexes)
    })
    .await;
    assert!(
        indexes.contains(&doc! {"to": 1, "createdAt": -1}),
        "{indexes:?}"
    );
    assert!(indexes.contains(&doc! {"eventId": 1}), "{indexes:?}");
    assert!(
        indexes.contains(&doc! {"to": 1, "seq": 1, "_id": 1}),
        "{indexes:?}"
    );
    assert!(indexes.contains(&doc! {"createdAt": 1}), "{indexes:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_resumes_on_another_node_from_the_shared_log() {
    let db = TestDb::unique().await;
    db.seed_demo_users().await;
    let config = || db.server_config(ServerConfig::default());
    let (a, b) = tokio::join!(Server::start_with(config()), Server::start_with(config()));
    ready(&a).await;
    ready(&b).await;
    let mut student = Client::connect_as(&a, "s_1", "student").await;
    // The consultant's laptop stays on node A; its phone was on node B
    // and comes back there after a gap.
    let mut laptop = Client::connect_as(&a, "c_1", "consultant").await;
    let mut phone = Client::connect_as(&b, "c_1", "consultant").await;
    let mut sent = 0;
    let mut send = async |student: &mut Client, text: &str| {
        sent += 1;
        student
            .send(
                &json!({"event": "sendMessage", "data": {"to": "c_1", "text": text}, "ack": sent}),
            )
            .await;
        assert_eq!(student.recv().await["ok"], true);
    };
    send(&mut student, "before").await;
    let seen = laptop.recv().await;
    let (replayed, _) = phone.resume(json!({"since": "2000-01-01T00:00:00Z"})).await;
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0]["id"], seen["id"]);
    drop(phone);

    for text in ["m0", "m1", "m2"] {
        send(&mut student, text).await;
    }
    let live: Vec<serde_json::Value> = [
        laptop.recv().await,
        laptop.recv().await,
        laptop.recv().await,
    ]
    .into();
    let mut phone = Client::connect_as(&b, "c_1", "consultant").await;
    let (page, reply) = phone.resume(json!({"after": seen["id"], "limit": 2})).await;
    assert_eq!(reply["data"], json!({"replayed": 2, "more": true}));
    let (rest, reply) = phone
        .resume(json!({"after": page[1]["id"], "limit": 2}))
        .await;
    assert_eq!(reply["data"], json!({"replayed": 1, "more": false}));
    let replayed: Vec<&serde_json::Value> = page.iter().chain(&rest).collect();
    assert_eq!(replayed.len(), 3);
    for (replayed, live) in replayed.iter().zip(&live) {
        assert_eq!(*replayed, live, "the same push, logged by node A");
    }

    let (_, reply) = phone
        .resume(json!({"after": "0123456789abcdef0123456789abcdef"}))
        .await;
    assert_eq!(reply["error"]["code"], "not_found");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_users_collection_is_the_directory() {
    let db = TestDb::unique().await;
    db.db
        .collection::<Document>("users")
        .insert_many([
            doc! {"_id": "mongo_consultant", "role": "consultant", "name": "Mona"},
            doc! {"_id": "mongo_student", "role": "student", "name": "Stu"},
        ])
        .await
        .unwrap();
    let server = Server::start_with(db.server_config(ServerConfig::default().with_whois())).await;
    let mut student = Client::connect_as(&server, "mongo_student", "student").await;
    let mut consultant = Client::connect_as(&server, "mongo_consultant", "consultant").await;

    student
        .send(&json!({"event": "whoIs", "data": {"user": "mongo_consultant"}, "ack": 1}))
        .await;
    let reply = student.recv().await;
    assert_eq!(
        reply["data"]["user"],
        json!({"id": "mongo_consultant", "role": "consultant", "name": "Mona"})
    );

    student
        .send(&json!({"event": "sendMessage", "data": {"to": "mongo_consultant", "text": "hi"}, "ack": 2}))
        .await;
    assert_eq!(student.recv().await["ok"], true);
    assert_eq!(consultant.recv().await["data"]["text"], "hi");

    // The demo file's users are not the directory any more.
    student
        .send(&json!({"event": "sendMessage", "data": {"to": "c_1", "text": "hi"}, "ack": 3}))
        .await;
    let reply = student.recv().await;
    assert_eq!(reply["error"]["code"], "not_found", "{reply}");
}

#[tokio::test(flavor = "multi_thread")]
async fn presence_counts_connections_on_every_node() {
    let db = TestDb::unique().await;
    db.seed_demo_users().await;
    let names = Names::unique();
    // In a cluster the count comes from the nodes' announcements, which a
    // join waits for, not from the written-behind records: it is 3 at once.
    let counted = connections_counted_across_two_nodes(|| {
        db.server_config(names.server_config().with_whois())
    })
    .await;
    assert_eq!(counted, 3, "connection-count is cluster-wide");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_nodes_records_are_removed_by_the_survivor() {
    let db = TestDb::unique().await;
    let config = || db.server_config(ServerConfig::default().env("SOCKETS_NODE_LEASE", "2"));
    let survivor = Server::start_with(config()).await;
    let doomed = Server::start_with(config()).await;
    let _alive = Client::connect_as(&survivor, "s_1", "student").await;
    let dead = Client::connect_as(&doomed, "c_1", "consultant").await;
    eventually(WAIT, "both connections are recorded", || async {
        let records = db.find("userConnections", doc! {}).await;
        (records.len() == 2).then_some(())
    })
    .await;

    doomed.kill().await;
    drop(dead);
    eventually(WAIT, "the dead node's record is removed", || async {
        connection_records(&db, "c_1")
            .await
            .is_empty()
            .then_some(())
    })
    .await;
    assert_eq!(
        connection_records(&db, "s_1").await.len(),
        1,
        "the survivor's record stays"
    );
}

/// A node whose clock runs two minutes ahead (libfaketime) must not take
/// the others' leases for expired: leases are judged by the database's
/// clock. Before, it deleted the other node's lease and connection records.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_clock_runs_ahead_sweeps_no_live_node() {
    // libfaketime preloaded into the server itself, as the `faketime`
    // command does but without its forking wrapper, which outlived the
    // test (`$LIB` is the loader's: lib/<multiarch triple> on Debian).
    assert!(
        std::path::Path::new("/usr/bin/faketime").exists(),
        "faketime is missing: scripts/test.sh installs Debian's faketime"
    );
    let libfaketime = "/usr/$LIB/faketime/libfaketime.so.1";
    let db = TestDb::unique().await;
    let config = || db.server_config(ServerConfig::default().env("SOCKETS_NODE_LEASE", "3"));
    let honest = Server::start_with(config()).await;
    let _client = Client::connect_as(&honest, "s_1", "student").await;
    eventually(WAIT, "the connection is recorded", || async {
        (connection_records(&db, "s_1").await.len() == 1).then_some(())
    })
    .await;
    let ahead = Server::start_with(
        config()
            .env("LD_PRELOAD", libfaketime)
            .env("FAKETIME", "+120s")
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    )
    .await;
    let skewed = http(&ahead, "GET", "/healthz", &[], b"").await;
    let date = skewed
        .headers
        .iter()
        .find(|(name, _)| name == "date")
        .map(|(_, value)| value.clone())
        .unwrap_or_default();
    let honest_date = http(&honest, "GET", "/healthz", &[], b"").await;
    assert!(
        !honest_date
            .headers
            .iter()
            .any(|(name, value)| name == "date" && *value == date),
        "the skewed node's clock is not ahead ({date}): is libfaketime working?"
    );
    // Watch several maintenance ticks of both nodes (a third of a lease):
    // the honest node puts swept records back at its next tick, so a sweep
    // shows as a gap, not as a lasting loss.
    let watch_until = tokio::time::Instant::now() + Duration::from_secs(6);
    while tokio::time::Instant::now() < watch_until {
        assert_eq!(
            connection_records(&db, "s_1").await.len(),
            1,
            "the live node's record was swept by a node whose clock runs ahead"
        );
        assert_eq!(
            db.find("instances", doc! {}).await.len(),
            2,
            "a live node's lease was taken for expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(ahead);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_down_at_start_degrades_readiness_until_it_is_up() {
    let mut ferret = FerretDb::new();
    let db_name = format!("test_{}", sockets_host::protocol::new_id());
    let server = Server::start_with(
        ServerConfig::default()
            .env("SOCKETS_MONGO_URL", ferret.url())
            .env("SOCKETS_MONGO_DB", &db_name)
            .env("SOCKETS_NODE_LEASE", "3"),
    )
    .await;
    let readiness = http(&server, "GET", "/readyz", &[], b"").await;
    assert_eq!(readiness.status, 503);
    let body = readiness.json();
    assert_eq!(body["checks"]["store"]["status"], "degraded", "{body}");
    assert_eq!(body["checks"]["store"]["backend"], "mongodb");
    // Clients still connect meanwhile.
    let (_client, connected) = Client::connect(&server, &token("s_1", "student")).await;
    assert_eq!(connected["event"], "connected");

    ferret.start().await;
    ready(&server).await;
    // The connection made while the database was away is recorded now.
    let db = TestDb::on(&ferret.url()).await;
    let db = TestDb {
        db: db.db.client().database(&db_name),
        name: db_name,
    };
    eventually(
        WAIT,
        "the connection is reconciled into the database",
        || async { (connection_records(&db, "s_1").await.len() == 1).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_restart_mid_stream_loses_and_duplicates_no_log_record() {
    const EVENTS: usize = 300;
    let mut ferret = FerretDb::new();
    ferret.start().await;
    let db = TestDb::on(&ferret.url()).await;
    let names = Names::unique();
    let server = consuming(db.server_config_at(&ferret.url(), names.server_config())).await;
    let mut student = Client::connect_as(&server, "s_1", "student").await;
    let publisher = Publisher::connect().await;

    let payment = |n: usize| {
        json!({"paymentId": format!("p_{n}"), "studentId": "s_1", "amount": n})
            .to_string()
            .into_bytes()
    };
    let mut received = HashSet::new();
    for n in 0..EVENTS {
        publisher
            .publish(
                &names.exchange,
                "PAYMENT_PROCESSED",
                &payment(n),
                BasicProperties::default().with_message_id(format!("restart-{n}").into()),
            )
            .await;
        if n == EVENTS / 3 {
            ferret.stop().await;
        }
        if n == 2 * EVENTS / 3 {
            ferret.start().await;
        }
        while let Some(push) = student.try_recv(Duration::from_millis(1)).await {
            assert!(
                received.insert(push["data"]["paymentId"].clone()),
                "duplicate {push}"
            );
        }
    }
    while received.len() < EVENTS {
        let push = student.recv().await;
        assert!(
            received.insert(push["data"]["paymentId"].clone()),
            "duplicate {push}"
        );
    }

    let logged = eventually(
        Duration::from_secs(60),
        "every delivery is logged",
        || async {
            let records = db.find("notificationLogs", doc! {"to": "s_1"}).await;
            (records.len() >= EVENTS).then_some(records)
        },
    )
    .await;
    let event_ids: HashSet<&str> = logged
        .iter()
        .map(|record| record.get_str("eventId").unwrap())
        .collect();
    assert_eq!(logged.len(), EVENTS, "each delivery logged once");
    // Met by the log writer, or before it by the event's idempotency claim
    // (the intake then waits and retries in place).
    let log = server.log();
    assert!(
        log.contains("notification log write failed") || log.contains("not logged, will retry"),
        "the outage was not felt: the test proves nothing"
    );
    assert_eq!(event_ids.len(), EVENTS);
    assert!(student.try_recv(Duration::from_millis(500)).await.is_none());
}

/// A chat message sent while the database is down: the recipient has it,
/// the sender heard `unavailable`, its log record waits in the writer.
struct Outage {
    ferret: FerretDb,
    db: TestDb,
    server: Server,
    /// The `_id` of the waiting record.
    record_id: String,
}

/// A server on MongoDB, a student and a consultant who exchanged a message
/// (so the directory entry is cached), and then the database stopped.
struct DatabaseDown {
    ferret: FerretDb,
    db: TestDb,
    server: Server,
    student: Client,
    consultant: Client,
}

async fn chat_then_database_down() -> DatabaseDown {
    let mut ferret = FerretDb::new();
    ferret.start().await;
    let db = TestDb::on(&ferret.url()).await;
    db.seed_demo_users().await;
    let server =
        Server::start_with(db.server_config_at(&ferret.url(), ServerConfig::default())).await;
    ready(&server).await;
    let (mut student, mut consultant) = student_and_consultant(&server).await;
    student
        .send(&json!({"event": "sendMessage", "data": {"to": "c_1", "text": "before"}, "ack": 1}))
        .await;
    assert_eq!(student.recv().await["ok"], true);
    consultant.recv().await;
    ferret.stop().await;
    DatabaseDown {
        ferret,
        db,
        server,
        student,
        consultant,
    }
}

async fn message_during_an_outage() -> Outage {
    let DatabaseDown {
        ferret,
        db,
        server,
        mut student,
        mut consultant,
    } = chat_then_database_down().await;
    student
        .send(&json!({"event": "sendMessage", "data": {"to": "c_1", "text": "during"}, "ack": 2}))
        .await;
    let push = consultant.recv().await;
    assert_eq!(
        push["data"]["text"], "during",
        "delivery does not wait for the log"
    );
    let reply = student.recv().await;
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["error"]["code"], "unavailable");
    Outage {
        ferret,
        db,
        server,
        record_id: format!("{}:c_1", push["id"].as_str().unwrap()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_event_during_an_outage_is_answered_unavailable_and_logged_later() {
    let Outage {
        mut ferret,
        db,
        server: _server,
        record_id,
    } = message_during_an_outage().await;

    ferret.start().await;
    eventually(
        Duration::from_secs(30),
        "the queued record is written",
        || async {
            let records = db.find("notificationLogs", doc! {"_id": &record_id}).await;
            (records.len() == 1).then_some(())
        },
    )
    .await;
    assert_eq!(
        db.find("notificationLogs", doc! {"to": "c_1"}).await.len(),
        2,
        "each delivery logged once"
    );
}

/// A token refreshed while a reply waits for the log does not move that
/// reply's time limit: `unavailable` comes after 5 s, not at the idle limit.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_refreshed_while_a_reply_waits_for_the_log_keeps_its_time_limit() {
    let DatabaseDown {
        mut ferret,
        db: _db,
        server: _server,
        mut student,
        mut consultant,
    } = chat_then_database_down().await;
    student
        .send(&json!({"event": "sendMessage", "data": {"to": "c_1", "text": "during"}, "ack": 2}))
        .await;
    consultant.recv().await;
    // A later expiry than the connection's token: the refresh moves it.
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 7200;
    let fresh = token_with(json!({"sub": "s_1", "role": "student", "exp": exp}));
    student
        .send(&json!({"event": "refreshToken", "data": {"token": fresh}, "ack": 3}))
        .await;
    let waited = std::time::Instant::now();
    let reply = student.recv().await;
    assert_eq!(reply["ack"], 2, "{reply}");
    assert_eq!(reply["error"]["code"], "unavailable", "{reply}");
    assert!(
        waited.elapsed() < Duration::from_secs(8),
        "answered after {:?}",
        waited.elapsed()
    );
    let refreshed = student.recv().await;
    assert_eq!(refreshed["ack"], 3, "{refreshed}");
    assert_eq!(refreshed["ok"], true, "replies keep frame order");
    ferret.start().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn records_queued_during_an_outage_are_written_before_shutdown_ends() {
    let Outage {
        mut ferret,
        db,
        mut server,
        record_id,
    } = message_during_an_outage().await;

    // Told to stop while the database is still down, the server waits for
    // the record; the database comes back meanwhile, once the steps before
    // the log's flush are over, so only that wait keeps the record.
    server.begin_stop();
    eventually(
        Duration::from_secs(30),
        "the server's shutdown reaches the log's flush",
        || async {
            server
                .log()
                .contains("flushing the notification log")
                .then_some(())
        },
    )
    .await;
    ferret.start().await;
    assert!(server.stopped().await, "the server exits cleanly");
    assert_eq!(
        db.find("notificationLogs", doc! {"_id": &record_id})
            .await
            .len(),
        1,
        "the queued record was written before the process ended"
    );
}

/// A connection record with these details, as the gateway would store it.
fn record(id: &str, details: serde_json::Value) -> sockets_host::store::ConnectionRecord {
    sockets_host::store::ConnectionRecord {
        id: id.to_owned(),
        user_id: format!("user-{id}"),
        role: "student".to_owned(),
        instance_id: "node-poison".to_owned(),
        connected_at: "2026-12-06T10:00:00Z".to_owned(),
        last_seen_at: "2026-12-06T10:00:00Z".to_owned(),
        details: details.as_object().cloned().unwrap_or_default(),
        remote_addr: None,
        user_agent: None,
    }
}

/// The gateway refuses details MongoDB cannot keep (`edge.rs`), but a
/// record the database refuses must still not hold back the others, nor
/// mark the database unhealthy, nor be retried forever.
#[tokio::test(flavor = "multi_thread")]
async fn a_record_the_database_refuses_holds_back_no_other() {
    use sockets_host::store::ConnectionStore;
    use sockets_host::store::mongo::{Mongo, MongoConnections};
    let db = TestDb::unique().await;
    let mongo = Mongo::connect(&sockets_tests::mongo::mongo_url(), &db.name)
        .await
        .unwrap();
    let store = MongoConnections::start(&mongo, "node-poison".into());
    store
        .insert(record("0-poison", json!({"bad\u{0}key": 1})))
        .await
        .unwrap();
    store
        .insert(record("fine", json!({"device": "ios"})))
        .await
        .unwrap();
    let stored = eventually(WAIT, "the good record is written", || async {
        let found = db.find("userConnections", doc! {"_id": "fine"}).await;
        (!found.is_empty()).then_some(found)
    })
    .await;
    assert_eq!(stored[0].get_str("userId").unwrap(), "user-fine");
    assert!(
        db.find("userConnections", doc! {"_id": "0-poison"})
            .await
            .is_empty(),
        "the refused record is not stored"
    );
    assert_eq!(
        mongo.health().problem(),
        None,
        "a refused record says nothing of the database's health"
    );
    // Later writes go through too.
    store.insert(record("later", json!({}))).await.unwrap();
    eventually(WAIT, "a later record is written", || async {
        (!db.find("userConnections", doc! {"_id": "later"})
            .await
            .is_empty())
        .then_some(())
    })
    .await;

    // Reconciliation (the node's first lease marks its records for it)
    // writes every other record back, wherever the refused one falls in
    // its order.
    let mut good = vec!["fine".to_owned(), "later".to_owned()];
    for n in 0..20 {
        let id = format!("good-{n}");
        store.insert(record(&id, json!({"n": n}))).await.unwrap();
        good.push(id);
    }
    eventually(WAIT, "every good record is written", || async {
        (db.find("userConnections", doc! {}).await.len() == good.len()).then_some(())
    })
    .await;
    db.db
        .collection::<Document>("userConnections")
        .delete_many(doc! {})
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let maintenance = tokio::spawn(
        sockets_host::store::mongo::Maintenance {
            mongo: mongo.clone(),
            instance_id: "node-poison".into(),
            lease: Duration::from_secs(30),
            connections: std::sync::Arc::clone(&store),
            log_retention: None,
        }
        .run(stopped),
    );
    eventually(
        WAIT,
        "reconciliation writes every good record back",
        || async { (db.find("userConnections", doc! {}).await.len() == good.len()).then_some(()) },
    )
    .await;
    assert_eq!(mongo.health().problem(), None);
    let _ = stop.send(true);
    let _ = maintenance.await;
}

/// A log record MongoDB refuses (a plugin's data with a NUL in a key) is
/// dropped and reported; the records after it are written, and readiness
/// holds.
#[tokio::test(flavor = "multi_thread")]
async fn a_log_record_the_database_refuses_holds_back_no_other() {
    let db = TestDb::unique().await;
    let server = Server::start_with(db.server_config(ServerConfig {
        plugins: vec!["misbehaving"],
        ..ServerConfig::default()
    }))
    .await;
    ready(&server).await;
    let (mut client, _) = Client::connect(&server, &token("u_1", "student")).await;
    client
        .send(&json!({"event": "ok", "data": {"bad\u{0}key": 1}, "ack": 1}))
        .await;
    let first = client.recv().await;
    let first = if first.get("ack").is_some() {
        first
    } else {
        client.recv().await
    };
    assert_eq!(first["ok"], true, "{first}");
    for ack in 2..=4 {
        client
            .send(&json!({"event": "ok", "data": {"n": ack}, "ack": ack}))
            .await;
    }
    eventually(
        WAIT,
        "the records after the refused one are written",
        || async {
            let records = db.find("notificationLogs", doc! {"trigger": "ok"}).await;
            (records.len() == 3).then_some(())
        },
    )
    .await;
    assert!(
        server.log().contains("refused by MongoDB, dropped"),
        "the refused record is reported"
    );
    let readiness = http(&server, "GET", "/readyz", &[], b"").await;
    assert_eq!(readiness.status, 200, "{}", readiness.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn log_records_past_the_retention_are_not_replayed_and_are_deleted() {
    let db = TestDb::unique().await;
    db.seed_demo_users().await;
    let config = ServerConfig::default()
        .env("SOCKETS_LOG_RETENTION", "2")
        // Maintenance (and its sweep) every second.
        .env("SOCKETS_NODE_LEASE", "3");
    let server = Server::start_with(db.server_config(config)).await;
    ready(&server).await;
    let (mut student, mut consultant) = student_and_consultant(&server).await;
    let send = async |student: &mut Client, text: &str, ack: u64| {
        student
            .send(&json!({"event": "sendMessage", "data": {"to": "c_1", "text": text}, "ack": ack}))
            .await;
        assert_eq!(student.recv().await["ok"], true);
    };
    send(&mut student, "old", 1).await;
    let old = consultant.recv().await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    send(&mut student, "new", 2).await;
    consultant.recv().await;

    let (_, reply) = consultant.resume(json!({"after": old["id"]})).await;
    assert_eq!(reply["error"]["code"], "not_found", "{reply}");
    let (kept, _) = consultant
        .resume(json!({"since": "2000-01-01T00:00:00Z"}))
        .await;
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0]["data"]["text"], "new");
    eventually(WAIT, "the old record is deleted", || async {
        let texts: Vec<String> = db
            .find("notificationLogs", doc! {"to": "c_1"})
            .await
            .iter()
            .filter_map(|record| {
                Some(
                    record
                        .get_document("data")
                        .ok()?
                        .get_str("text")
                        .ok()?
                        .to_owned(),
                )
            })
            .collect();
        // (`new` goes too, 2 s after it was written.)
        (!texts.iter().any(|text| text == "old")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn records_of_two_nodes_with_one_number_are_all_replayed_in_id_order() {
    use sockets_host::store::mongo::{Mongo, MongoLog};
    use sockets_host::store::{NotificationLog, NotificationRecord, ReplayFrom};
    let db = TestDb::unique().await;
    let mongo = Mongo::connect(&sockets_tests::mongo::mongo_url(), &db.name)
        .await
        .unwrap();
    let log = MongoLog::start(&mongo, None);
    // Two nodes numbered a delivery each in the same millisecond.
    let record = |delivery: &str, seq: i64| NotificationRecord {
        id: NotificationRecord::record_id(delivery, "u"),
        event_id: format!("e-{delivery}"),
        event: "message".into(),
        trigger: "sendMessage".into(),
        source: "client".into(),
        from: "s_1".into(),
        to: "u".into(),
        plugin: "chat@0.1.0".into(),
        data: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
        connections: 0,
        created_at: "2026-12-07T10:00:00.000Z".into(),
        seq,
    };
    let seq = sockets_host::store::LogClock::first_at(std::time::SystemTime::now());
    log.append(vec![
        record("b", seq),
        record("a", seq),
        record("c", seq + 1),
    ])
    .await
    .unwrap();
    let replayed = async |from: ReplayFrom, limit| {
        let page = log.replay("u", &from, limit).await.unwrap().unwrap();
        let ids: Vec<String> = page
            .records
            .iter()
            .map(|record| record.delivery_id().to_owned())
            .collect();
        (ids, page.more)
    };
    let after = |delivery: &str| ReplayFrom::After(delivery.to_owned());
    assert_eq!(
        replayed(after("a"), 10).await,
        (vec!["b".into(), "c".into()], false)
    );
    assert_eq!(replayed(after("b"), 10).await, (vec!["c".into()], false));
    let since = ReplayFrom::Since(std::time::SystemTime::UNIX_EPOCH);
    assert_eq!(
        replayed(since, 2).await,
        (vec!["a".into(), "b".into()], true)
    );
}

/// What `node`'s `whoIs` says of `user`'s connections.
async fn connections_seen(asker: &mut Client, user: &str) -> u64 {
    asker
        .send(&json!({"event": "whoIs", "data": {"user": user}, "ack": 77}))
        .await;
    loop {
        let frame = asker.recv().await;
        if frame["ack"] == 77 {
            return frame["data"]["connections"].as_u64().expect("a count");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn plugin_state_is_shared_by_the_nodes_of_one_database() {
    let db = TestDb::unique().await;
    db.seed_demo_users().await;
    let a = Server::start_with(db.server_config(ServerConfig::default())).await;
    let b = Server::start_with(db.server_config(ServerConfig::default())).await;
    let mut consultant = Client::connect_as(&b, "c_1", "consultant").await;
    consultant
        .send(&json!({"event": "setStatus", "data": {"status": "away", "text": "lunch"}, "ack": 1}))
        .await;
    assert_eq!(consultant.recv().await["ok"], true);

    // The status set through node B is what node A's plugin reads.
    let mut student = Client::connect_as(&a, "s_1", "student").await;
    student
        .send(&json!({"event": "watchStatus", "data": {"users": ["c_1"]}, "ack": 2}))
        .await;
    let reply = student.recv().await;
    assert_eq!(reply["data"]["statuses"][0]["status"], "away", "{reply}");
    assert_eq!(reply["data"]["statuses"][0]["text"], "lunch");
    let stored = db
        .find("pluginState", doc! {"_id": "presence/status/c_1"})
        .await;
    assert_eq!(stored.len(), 1, "kept in MongoDB: {stored:?}");
    assert!(stored[0].get_datetime("expiresAt").is_ok(), "with its TTL");
}

/// Online and offline across two nodes: a user's first connection
/// anywhere raises `sockets.userOnline` once, its last one
/// `sockets.userOffline` once, whichever node they are on (README,
/// "Lifecycle events": exactly once when the changes are further apart
/// than the nodes' announcements).
#[tokio::test(flavor = "multi_thread")]
async fn online_and_offline_are_raised_once_across_two_nodes() {
    let db = TestDb::unique().await;
    db.seed_demo_users().await;
    let names = Names::unique();
    let config = || db.server_config(names.server_config().with_whois());
    let a = consuming(config()).await;
    let b = consuming(config()).await;
    let mut watcher = Client::connect_as(&a, "s_1", "student").await;
    watcher
        .send(&json!({"event": "watchStatus", "data": {"users": ["c_1"]}, "ack": 1}))
        .await;
    assert_eq!(watcher.recv().await["ok"], true);

    // First connection, on B: the watcher on A hears it through the cluster.
    let on_b = Client::connect_as(&b, "c_1", "consultant").await;
    let online = watcher.next_push("statusChanged").await;
    assert_eq!(online["data"]["online"], true, "{online}");

    // A second one, on A, once A counts B's: not a user coming online.
    eventually(WAIT, "node A counts c_1's connection on B", || async {
        let mut asker = Client::connect_as(&a, "s_2", "student").await;
        (connections_seen(&mut asker, "c_1").await == 1).then_some(())
    })
    .await;
    let on_a = Client::connect_as(&a, "c_1", "consultant").await;
    watcher.no_push("statusChanged", QUIET).await;

    // B's goes: one left on A, still online.
    on_b.close().await;
    watcher.no_push("statusChanged", QUIET).await;
    eventually(
        WAIT,
        "node A no longer counts c_1's connection on B",
        || async {
            let mut asker = Client::connect_as(&a, "s_2", "student").await;
            (connections_seen(&mut asker, "c_1").await == 1).then_some(())
        },
    )
    .await;
    on_a.close().await;
    let offline = watcher.next_push("statusChanged").await;
    assert_eq!(offline["data"]["online"], false, "{offline}");
    watcher.no_push("statusChanged", QUIET).await;
}

/// The MongoDB plugin state against FerretDB, as plugins call it (blocking,
/// from a runtime worker): values, TTLs, compare-and-set between two nodes
/// racing for one key, the deadline.
#[tokio::test(flavor = "multi_thread")]
async fn plugin_state_in_mongodb_compares_and_sets_across_nodes_and_expires() {
    use serde_json::Value;
    use sockets_host::store::mongo::{Mongo, MongoPluginState};
    use sockets_host::store::plugin_state::{PluginState, StateError};
    use std::sync::Arc;
    use std::time::Instant;

    let db = TestDb::unique().await;
    let url = sockets_tests::mongo::mongo_url();
    let node = || async {
        Arc::new(MongoPluginState::new(
            &Mongo::connect(&url, &db.name).await.unwrap(),
        ))
    };
    let (a, b) = (node().await, node().await);
    // Plugin calls block a worker of the server's runtime; so do these.
    let on_worker = |state: Arc<MongoPluginState>, run: fn(&MongoPluginState, Instant) -> Value| {
        tokio::spawn(async move { run(&state, Instant::now() + Duration::from_secs(2)) })
    };

    let set = on_worker(Arc::clone(&a), |state, deadline| {
        state.set("p", "k", "1".into(), None, deadline).unwrap();
        state
            .set(
                "p",
                "short",
                "x".into(),
                Some(Duration::from_millis(200)),
                deadline,
            )
            .unwrap();
        json!(state.get("p", "k", deadline).unwrap())
    });
    assert_eq!(set.await.unwrap(), json!("1"));
    let other_plugin = on_worker(Arc::clone(&b), |state, deadline| {
        json!(state.get("q", "k", deadline).unwrap())
    });
    assert_eq!(
        other_plugin.await.unwrap(),
        Value::Null,
        "one namespace per plugin"
    );

    // A swap from a value another node already replaced fails. (Two
    // updates racing are atomic on MongoDB, one document at a time, but
    // not on FerretDB 1.24, which lets both match: see docs/plugins.md.)
    let swap = |state: &Arc<MongoPluginState>| {
        on_worker(Arc::clone(state), |state, deadline| {
            json!(
                state
                    .swap("p", "k", Some("1"), Some("2".into()), None, deadline)
                    .unwrap()
            )
        })
    };
    assert_eq!(swap(&a).await.unwrap(), json!(true));
    assert_eq!(swap(&b).await.unwrap(), json!(false));
    // Creating a key both want, at once: the insert decides, one wins.
    let create = |state: &Arc<MongoPluginState>| {
        on_worker(Arc::clone(state), |state, deadline| {
            json!(
                state
                    .swap("p", "new", None, Some("n".into()), None, deadline)
                    .unwrap()
            )
        })
    };
    let (first, second) = tokio::join!(create(&a), create(&b));
    let mut won = [first.unwrap(), second.unwrap()];
    won.sort_by_key(|v| v.as_bool());
    assert_eq!(won, [json!(false), json!(true)]);

    // Expired: gone for reads, and absent for a swap from `None`.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let expired = on_worker(Arc::clone(&b), |state, deadline| {
        let read = state.get("p", "short", deadline).unwrap();
        let retaken = state
            .swap("p", "short", None, Some("y".into()), None, deadline)
            .unwrap();
        json!([read, retaken, state.get("p", "short", deadline).unwrap()])
    });
    assert_eq!(expired.await.unwrap(), json!([null, true, "y"]));

    // A call past its deadline does not wait for the database.
    let late = tokio::spawn({
        let a = Arc::clone(&a);
        async move { a.get("p", "k", Instant::now()) }
    });
    assert!(matches!(
        late.await.unwrap(),
        Err(StateError::Unavailable(_))
    ));
}

/// A node that stops gracefully closes its connections; watchers on other
/// nodes hear its users go offline before it is gone.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_stopping_tells_other_nodes_its_users_went_offline() {
    let db = TestDb::unique().await;
    db.seed_demo_users().await;
    let names = Names::unique();
    let config = || db.server_config(names.server_config());
    let a = consuming(config()).await;
    let b = consuming(config()).await;
    let mut watcher = Client::connect_as(&a, "s_1", "student").await;
    watcher
        .send(&json!({"event": "watchStatus", "data": {"users": ["c_1"]}, "ack": 1}))
        .await;
    assert_eq!(watcher.recv().await["ok"], true);
    let _on_b = Client::connect_as(&b, "c_1", "consultant").await;
    let online = watcher.next_push("statusChanged").await;
    assert_eq!(online["data"]["online"], true, "{online}");

    assert!(b.stop().await, "node B stops cleanly");
    let offline = watcher.next_push("statusChanged").await;
    assert_eq!(offline["data"]["online"], false, "{offline}");
}
