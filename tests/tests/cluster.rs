//! Several `sockets-host` processes behind one RabbitMQ (issue #5, DESIGN.md
//! "Horizontal scaling"): a delivery reaches every connection of its users
//! on whichever node they are, exactly once per connection, and a node
//! killed with SIGKILL leaves no routing behind that loses or duplicates
//! later deliveries; a reply's `delivered` counts the recipient's connections
//! on every node.

use std::collections::HashSet;
use std::time::Duration;

use lapin::BasicProperties;
use serde_json::{Value, json};
use sockets_tests::broker::{
    Names, Publisher, connections_counted_across_two_nodes, consuming, with_message_id,
};
use sockets_tests::client::{Client, counter, publish};
use sockets_tests::eventually;
use sockets_tests::server::{Server, token};

/// How long a test waits to be sure that no extra copy arrives.
const QUIET: Duration = Duration::from_millis(700);

/// Two nodes sharing one broker (and one set of exchanges and queues).
async fn two_nodes() -> (Server, Server, Names) {
    let names = Names::unique();
    let a = consuming(names.server_config()).await;
    let b = consuming(names.server_config()).await;
    (a, b, names)
}

async fn connect(server: &Server, sub: &str, role: &str) -> Client {
    Client::connect(server, &token(sub, role)).await.0
}

/// Asserts that nothing more arrives on any of `clients`.
async fn assert_quiet(clients: &mut [&mut Client]) {
    for client in clients {
        if let Some(extra) = client.try_recv(QUIET).await {
            panic!("unexpected extra frame: {extra}");
        }
    }
}

fn payment(student: &str, n: u64) -> Value {
    json!({"paymentId": format!("p_{n}"), "studentId": student, "consultantId": "c_1",
           "amount": 4900, "currency": "USD", "status": "succeeded"})
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_sent_on_one_node_reaches_the_recipient_on_the_other_once() {
    let (a, b, _names) = two_nodes().await;
    let mut student = connect(&a, "s_1", "student").await;
    let mut students_laptop = connect(&b, "s_1", "student").await;
    let mut consultant = connect(&b, "c_1", "consultant").await;

    student
        .send(&json!({"event": "sendMessage", "data": {"to": "c_1", "text": "across"}, "ack": 1}))
        .await;
    let reply = student.recv().await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(
        reply["data"]["delivered"], 1,
        "the recipient's connection on node B counts: {reply}"
    );
    let message_id = reply["data"]["messageId"].clone();

    let push = consultant.recv().await;
    assert_eq!(push["event"], "message");
    assert_eq!(push["data"]["messageId"], message_id);
    assert_eq!(push["data"]["from"], "s_1");
    assert_eq!(push["data"]["text"], "across");
    // The sender's other device, on the other node, gets its copy too.
    let copy = students_laptop.recv().await;
    assert_eq!(copy["event"], "message");
    assert_eq!(copy["id"], push["id"], "one delivery, one id");

    assert_quiet(&mut [&mut consultant, &mut students_laptop, &mut student]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recipient_on_both_nodes_gets_each_delivery_once_per_connection() {
    let (a, b, names) = two_nodes().await;
    let mut on_a = connect(&a, "s_7", "student").await;
    let mut on_b = connect(&b, "s_7", "student").await;
    let mut also_on_b = connect(&b, "s_7", "student").await;

    // Through the HTTP API of node A.
    let service = token("billing", "service");
    let response = publish(
        &a,
        &service,
        &json!({"event": "PAYMENT_PROCESSED", "data": payment("s_7", 1)}),
    )
    .await;
    assert_eq!(response.status, 202, "{}", response.body);
    let mut ids = HashSet::new();
    for client in [&mut on_a, &mut on_b, &mut also_on_b] {
        let push = client.recv().await;
        assert_eq!(push["event"], "paymentProcessed");
        assert_eq!(push["data"]["paymentId"], "p_1");
        ids.insert(push["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 1, "every copy carries the delivery's id");

    // Through RabbitMQ: whichever node takes it from the shared intake.
    let publisher = Publisher::connect().await;
    for n in 2..=11 {
        publisher
            .publish(
                &names.exchange,
                "PAYMENT_PROCESSED",
                payment("s_7", n).to_string().as_bytes(),
                BasicProperties::default(),
            )
            .await;
    }
    // The two nodes share the intake, so copies from both interleave: each
    // connection gets every payment once, in no promised order.
    let expected: HashSet<String> = (2..=11).map(|n| format!("p_{n}")).collect();
    for client in [&mut on_a, &mut on_b, &mut also_on_b] {
        let mut payments = HashSet::new();
        for _ in 2..=11 {
            let push = client.recv().await;
            let payment = push["data"]["paymentId"].as_str().unwrap().to_owned();
            assert!(payments.insert(payment), "duplicate: {push}");
        }
        assert_eq!(payments, expected);
    }
    assert_quiet(&mut [&mut on_a, &mut on_b, &mut also_on_b]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn delivered_counts_the_recipients_connections_on_every_node() {
    let (a, b, _names) = two_nodes().await;
    let mut student = connect(&a, "s_2", "student").await;
    let mut consultant_on_a = connect(&a, "c_2", "consultant").await;
    let mut consultant_on_b = connect(&b, "c_2", "consultant").await;
    let mut also_on_b = connect(&b, "c_2", "consultant").await;

    let message = |ack: u64| json!({"event": "sendMessage", "data": {"to": "c_2", "text": "count me"}, "ack": ack});
    student.send(&message(1)).await;
    let reply = student.recv().await;
    assert_eq!(reply["data"]["delivered"], 3, "one on A, two on B: {reply}");
    for consultant in [&mut consultant_on_a, &mut consultant_on_b, &mut also_on_b] {
        assert_eq!(consultant.recv().await["data"]["text"], "count me");
    }

    // Node B's connections go; node A hears of it.
    drop(consultant_on_b);
    drop(also_on_b);
    let clients = &tokio::sync::Mutex::new((student, consultant_on_a, 1));
    eventually(
        Duration::from_secs(10),
        "node A stops counting node B's closed connections",
        || async move {
            let (student, consultant_on_a, ack) = &mut *clients.lock().await;
            *ack += 1;
            student.send(&message(*ack)).await;
            let reply = student.recv().await;
            assert_eq!(consultant_on_a.recv().await["data"]["text"], "count me");
            (reply["data"]["delivered"] == 1).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn plugins_count_the_users_connections_on_every_node() {
    let names = Names::unique();
    let counted = connections_counted_across_two_nodes(|| names.server_config().with_whois()).await;
    assert_eq!(counted, 3, "connection-count is cluster-wide");
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_nodes_exchange_a_few_presence_announcements_not_a_stream() {
    let (a, b, _names) = two_nodes().await;
    // Each hears the other's hello or its table in answer; wait for that
    // (a loaded machine may be slow), then give a storm time to show.
    eventually(
        Duration::from_secs(10),
        "each node hears an announcement",
        || async {
            let heard = |node| counter(node, "sockets_cluster_presence_received_total");
            (heard(&a).await > 0 && heard(&b).await > 0).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for node in [&a, &b] {
        let heard = counter(node, "sockets_cluster_presence_received_total").await;
        // A few more at most (a heartbeat every 5 s); two empty tables once
        // answered each other without end, thousands in 2 s.
        assert!(heard <= 10, "{heard} announcements in about 2 s");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_node_leaves_no_routing_that_loses_or_duplicates() {
    let (a, b, names) = two_nodes().await;
    let mut consultant = connect(&a, "c_1", "consultant").await;
    let student_on_b = connect(&b, "s_1", "student").await;
    drop(student_on_b);
    let b_with_user = connect(&b, "s_2", "student").await;

    b.kill().await;
    drop(b_with_user);
    // Its users reconnect to the surviving node.
    let mut student = connect(&a, "s_2", "student").await;

    let publisher = Publisher::connect().await;
    for n in 0..50 {
        publisher
            .publish(
                &names.exchange,
                "PAYMENT_PROCESSED",
                payment("s_2", n).to_string().as_bytes(),
                with_message_id(&format!("kill-{n}")),
            )
            .await;
    }
    let mut seen = HashSet::new();
    for _ in 0..50 {
        let push = student.recv().await;
        assert_eq!(push["event"], "paymentProcessed");
        assert!(
            seen.insert(push["data"]["paymentId"].as_str().unwrap().to_owned()),
            "duplicate: {push}"
        );
    }
    assert_eq!(seen.len(), 50);

    // Client events keep flowing on the survivor too.
    student
        .send(
            &json!({"event": "sendMessage", "data": {"to": "c_1", "text": "still here"}, "ack": 9}),
        )
        .await;
    assert_eq!(student.recv().await["ok"], true);
    assert_eq!(consultant.recv().await["data"]["text"], "still here");
    assert_quiet(&mut [&mut student, &mut consultant]).await;
}

/// A node that stalls past a join's wait is not waited for, but its users
/// keep their deliveries; one silent for longer than 15 s is forgotten, and
/// as nothing re-sends whole tables on a timer, the peer must ask for its
/// table when it is heard from again to route to its users.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_node_keeps_its_users_and_a_forgotten_one_is_relearned() {
    let (a, b, _names) = two_nodes().await;
    let mut consultant = connect(&a, "c_1", "consultant").await;

    // A short stall: B's join waits 1 s for A, then goes on without it.
    a.signal("STOP");
    let connected =
        tokio::time::timeout(Duration::from_secs(4), connect(&b, "s_1", "student")).await;
    a.signal("CONT");
    let mut student = connected.expect("a join does not wait for a stalled node for long");
    assert!(
        b.log()
            .contains("did not answer a presence announcement in time"),
        "B's join should have waited for A in vain:\n{}",
        b.log()
    );
    student
        .send(&json!({"event": "sendMessage", "data": {"to": "c_1", "text": "after a stall"}, "ack": 1}))
        .await;
    let reply = student.recv().await;
    assert_eq!(
        reply["data"]["delivered"], 1,
        "B still routes to A: {reply}"
    );
    assert_eq!(consultant.recv().await["data"]["text"], "after a stall");

    // A long stall: B forgets A, and learns its users again from its table.
    a.signal("STOP");
    tokio::time::sleep(Duration::from_secs(16)).await;
    a.signal("CONT");
    let student = std::sync::Arc::new(tokio::sync::Mutex::new(student));
    let tried = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1));
    let reached = eventually(
        Duration::from_secs(15),
        "B routes to A's user again",
        || {
            let (student, tried) = (student.clone(), tried.clone());
            async move {
                let ack = tried.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                let mut student = student.lock().await;
                student
                    .send(&json!({"event": "sendMessage", "data": {"to": "c_1", "text": format!("try {ack}")}, "ack": ack}))
                    .await;
                let reply = student.recv().await;
                assert_eq!(reply["ok"], true, "{reply}");
                (reply["data"]["delivered"] == 1).then_some(ack)
            }
        },
    )
    .await;
    let push = consultant.recv().await;
    assert_eq!(push["data"]["text"], format!("try {reached}"), "{push}");
    assert_quiet(&mut [&mut consultant]).await;
}

/// Connections in the storm (as in the benchmark of issue #34).
const STORM_CONNECTIONS: usize = 19_500;
/// Handshakes in flight at once.
const STORM_IN_FLIGHT: usize = 200;
/// The publisher's pace on the other node.
const PUBLISH_EVERY: Duration = Duration::from_millis(4);

/// A connect storm on node A while node B publishes to the users already
/// told `connected`, the newest first (the user whose presence has only
/// just reached B): every push arrives exactly once, on the right user.
#[tokio::test(flavor = "multi_thread")]
async fn pushes_from_another_node_reach_every_user_of_a_connect_storm_once() {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use futures_util::StreamExt;
    use futures_util::stream::FuturesUnordered;

    let (a, b, _names) = two_nodes().await;
    let connected: Arc<Mutex<Vec<String>>> = Arc::default();
    let received: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let (stop_readers, readers_stop) = tokio::sync::watch::channel(false);

    // B publishes while A takes the storm.
    let (stop_publisher, mut publisher_stop) = tokio::sync::watch::channel(false);
    let publisher = {
        let connected = Arc::clone(&connected);
        let b_addr = b.addr;
        tokio::spawn(async move {
            let service = token("billing", "service");
            let mut published: Vec<(String, String)> = Vec::new();
            let mut pace = tokio::time::interval(PUBLISH_EVERY);
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0u64;
            loop {
                tokio::select! {
                    _ = publisher_stop.changed() => break,
                    _ = pace.tick() => {}
                }
                let user = {
                    let connected = connected.lock().unwrap();
                    match connected.len() {
                        0 => continue,
                        // The newest, then one from before.
                        len if n.is_multiple_of(2) => connected[len - 1].clone(),
                        len => connected[(n as usize * 7919) % len].clone(),
                    }
                };
                n += 1;
                let mut data = payment(&user, n);
                data["consultantId"] = json!("c_storm_offline");
                let body =
                    json!({"event": "PAYMENT_PROCESSED", "data": data, "id": format!("storm-{n}")});
                let response = sockets_tests::client::publish_at(b_addr, &service, &body).await;
                assert_eq!(response.status, 202, "{}", response.body);
                published.push((user, format!("p_{n}")));
            }
            published
        })
    };

    let mut handshakes = FuturesUnordered::new();
    let mut readers = Vec::with_capacity(STORM_CONNECTIONS);
    let mut started = 0;
    while started < STORM_CONNECTIONS || !handshakes.is_empty() {
        while started < STORM_CONNECTIONS && handshakes.len() < STORM_IN_FLIGHT {
            let user = format!("storm_{started}");
            // 127.0.0.2–17: the storm does not use up 127.0.0.1's ports.
            let source = std::net::Ipv4Addr::new(127, 0, 0, 2 + (started % 16) as u8);
            let token = token(&user, "student");
            let a = &a;
            handshakes.push(async move {
                let (client, frame) = Client::connect_from(a, source.into(), &token)
                    .await
                    .unwrap_or_else(|err| panic!("{user} could not connect: {err:?}"));
                assert_eq!(frame["event"], "connected", "{frame}");
                (user, client)
            });
            started += 1;
        }
        let Some((user, mut client)) = handshakes.next().await else {
            continue;
        };
        connected.lock().unwrap().push(user.clone());
        let received = Arc::clone(&received);
        let mut stop = readers_stop.clone();
        readers.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    frame = client.try_recv(Duration::from_secs(1)) => {
                        let Some(frame) = frame else { continue };
                        assert_eq!(frame["event"], "paymentProcessed", "{frame}");
                        let payment = frame["data"]["paymentId"].as_str().unwrap().to_owned();
                        received.lock().unwrap().entry(user.clone()).or_default().push(payment);
                    }
                }
            }
        }));
    }
    stop_publisher.send_replace(true);
    let published = publisher.await.unwrap();
    assert!(
        published.len() >= 20,
        "the storm was too short to publish into: {} pushes",
        published.len()
    );

    eventually(
        Duration::from_secs(30),
        "every push published on B reaches its user on A",
        || async {
            let received: usize = received.lock().unwrap().values().map(Vec::len).sum();
            (received >= published.len()).then_some(())
        },
    )
    .await;
    tokio::time::sleep(QUIET).await;
    stop_readers.send_replace(true);
    for reader in readers {
        reader.await.unwrap();
    }
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    for (user, payment) in published {
        expected.entry(user).or_default().push(payment);
    }
    let mut received = std::mem::take(&mut *received.lock().unwrap());
    for payments in received.values_mut().chain(expected.values_mut()) {
        payments.sort();
    }
    assert_eq!(
        received, expected,
        "each push once, to its user, none missing"
    );
}
