//! The ledger every fault scenario ends with (tests/tests/faults.rs): what
//! the publisher was told was accepted, what the broker still holds, what
//! the log holds and what the clients received must agree, with no
//! delivery id received twice on a connection.
//!
//! Events are payments to one student, `paymentId` = the event id (the
//! AMQP `message_id` or HTTP `id`), so a push names its event.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use mongodb::bson::{Document, doc};
use serde_json::{Value, json};

use crate::broker::{Names, amqp_url};
use crate::client::Client;
use crate::mongo::TestDb;

/// The pushes one connection received: `(event id, delivery id)`, in order.
#[derive(Clone, Default)]
pub struct Receipts(Arc<Mutex<Vec<(String, String)>>>);

impl Receipts {
    /// Reads `client`'s frames in the background until its connection ends,
    /// recording every push.
    pub fn listen(mut client: Client) -> Receipts {
        let receipts = Receipts::default();
        let record = receipts.clone();
        tokio::spawn(async move {
            while let Some(frame) = client.try_recv(Duration::from_secs(600)).await {
                let (Some(event), Some(id)) = (
                    frame["data"]["paymentId"]
                        .as_str()
                        .or(frame["data"]["messageId"].as_str()),
                    frame["id"].as_str(),
                ) else {
                    continue;
                };
                record.push(event, id);
            }
        });
        receipts
    }

    fn push(&self, event: &str, id: &str) {
        self.0
            .lock()
            .unwrap()
            .push((event.to_owned(), id.to_owned()));
    }

    /// The event ids received.
    pub fn events(&self) -> BTreeSet<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(event, _)| event.clone())
            .collect()
    }

    /// Delivery ids received more than once, with their counts.
    pub fn duplicates(&self) -> BTreeMap<String, usize> {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for (_, id) in self.0.lock().unwrap().iter() {
            *counts.entry(id.clone()).or_default() += 1;
        }
        counts.retain(|_, count| *count > 1);
        counts
    }
}

/// Where a scenario's notification log is.
pub enum Log<'a> {
    /// `notificationLogs` of this database.
    Mongo(&'a TestDb),
    /// The embedded journal in this data folder.
    Embedded(&'a Path),
}

impl Log<'_> {
    /// `(_id, eventId)` of every record.
    pub async fn records(&self) -> Vec<(String, String)> {
        match self {
            Log::Mongo(db) => db
                .find("notificationLogs", doc! {})
                .await
                .iter()
                .map(|record: &Document| {
                    (
                        record.get_str("_id").unwrap_or_default().to_owned(),
                        record.get_str("eventId").unwrap_or_default().to_owned(),
                    )
                })
                .collect(),
            Log::Embedded(data_dir) => {
                let mut records = Vec::new();
                let dir = data_dir.join("notifications");
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    return records;
                };
                for entry in entries.flatten() {
                    if entry.path().extension().is_none_or(|ext| ext != "jsonl") {
                        continue;
                    }
                    let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                    for line in text.lines() {
                        let Ok(record) = serde_json::from_str::<Value>(line) else {
                            continue;
                        };
                        records.push((
                            record["_id"].as_str().unwrap_or_default().to_owned(),
                            record["eventId"].as_str().unwrap_or_default().to_owned(),
                        ));
                    }
                }
                records
            }
        }
    }
}

/// What the publisher was told, and what it expects to be dead-lettered.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Events the publisher was told were taken: a broker confirm, an HTTP
    /// `202`, a chat reply `ok`.
    pub confirmed: BTreeSet<String>,
    /// Events sent without a confirmation either way (in flight when a
    /// node died): they may or may not have been delivered and logged,
    /// but at most once.
    pub unconfirmed: BTreeSet<String>,
    /// Events that must end in the dead-letter queue, neither delivered
    /// nor logged.
    pub dead: BTreeSet<String>,
    /// Events sent without a confirmation whose ids the sender never
    /// learned (the host chooses a chat message's id): at most this many
    /// unknown events may be in the log, each once.
    pub unknown_in_flight: usize,
}

/// The recipient's connections, and what each must have received.
pub struct Connections<'a> {
    /// Open from before the first event to the end: each received every
    /// confirmed event, once, and nothing else.
    pub throughout: Vec<&'a Receipts>,
    /// Opened late or ended by a fault: each received no delivery id twice.
    pub partly: Vec<&'a Receipts>,
}

impl<'a> Connections<'a> {
    /// One connection, open throughout.
    pub fn one(receipts: &'a Receipts) -> Self {
        Connections {
            throughout: vec![receipts],
            partly: Vec::new(),
        }
    }
}

/// How long a fault scenario may take to catch up after its last event
/// (a restarted broker redelivers, a database comes back).
pub const CATCH_UP: Duration = Duration::from_secs(90);

impl Ledger {
    /// Waits (at most [`CATCH_UP`]) until the log and the receipts caught up,
    /// then checks, with nothing left to arrive, that:
    /// - the broker holds nothing (every message acked or dead-lettered),
    ///   and its dead letters are exactly [`Ledger::dead`];
    /// - the log has one record per confirmed event, none of a dead one,
    ///   none of an event nobody sent, and no `_id` twice;
    /// - no connection received a delivery id twice, and each connection
    ///   open throughout received every confirmed event and nothing else.
    pub async fn check(&self, names: Option<&Names>, log: Log<'_>, connections: Connections<'_>) {
        let deadline = Instant::now() + CATCH_UP;
        let behind = || -> Option<(usize, Vec<String>)> {
            connections
                .throughout
                .iter()
                .enumerate()
                .find_map(|(index, receipts)| {
                    let missing: Vec<String> = self
                        .confirmed
                        .difference(&receipts.events())
                        .take(5)
                        .cloned()
                        .collect();
                    (!missing.is_empty()).then_some((index, missing))
                })
        };
        loop {
            let logged: BTreeSet<String> =
                log.records().await.into_iter().map(|(_, e)| e).collect();
            let log_done = self.confirmed.is_subset(&logged);
            let broker_done = names.is_none_or(|names| queue_depth(&names.queue) == Some(0));
            if log_done && broker_done && behind().is_none() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not caught up within {CATCH_UP:?}: logged {} of {} confirmed (missing {:?}), \
                 a connection open throughout is missing events: {:?}, broker queue depth {:?}",
                logged.intersection(&self.confirmed).count(),
                self.confirmed.len(),
                self.confirmed
                    .difference(&logged)
                    .take(5)
                    .collect::<Vec<_>>(),
                behind(),
                names.map(|names| queue_depth(&names.queue)),
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // Anything late (a duplicate, a dead event delivered after all)
        // shows up now.
        tokio::time::sleep(Duration::from_secs(2)).await;

        if let Some(names) = names {
            assert_eq!(queue_depth(&names.queue), Some(0), "the intake queue");
            let dead = dead_letters(&names.dead).await;
            assert_eq!(dead, self.dead, "the dead letters");
        }

        let records = log.records().await;
        let mut ids = BTreeSet::new();
        let mut per_event: BTreeMap<String, usize> = BTreeMap::new();
        for (id, event) in &records {
            assert!(ids.insert(id.clone()), "log record {id} written twice");
            *per_event.entry(event.clone()).or_default() += 1;
        }
        for event in &self.confirmed {
            assert_eq!(
                per_event.get(event),
                Some(&1),
                "log records of confirmed event {event}"
            );
        }
        let mut unknown = 0;
        for (event, count) in &per_event {
            assert_eq!(*count, 1, "log records of {event}");
            if !self.confirmed.contains(event) && !self.unconfirmed.contains(event) {
                assert!(
                    !self.dead.contains(event),
                    "dead-lettered event {event} was logged"
                );
                unknown += 1;
            }
        }
        assert!(
            unknown <= self.unknown_in_flight,
            "{unknown} log records of events never sent (at most {} were in flight unconfirmed)",
            self.unknown_in_flight
        );

        let all = connections.throughout.iter().chain(&connections.partly);
        for (index, receipts) in all.enumerate() {
            assert!(
                receipts.duplicates().is_empty(),
                "connection {index} received delivery ids twice: {:?}",
                receipts.duplicates()
            );
            let events = receipts.events();
            assert!(
                self.dead.is_disjoint(&events),
                "connection {index} received a dead-lettered event"
            );
            let stray: Vec<&String> = events
                .iter()
                .filter(|event| {
                    !self.confirmed.contains(*event) && !self.unconfirmed.contains(*event)
                })
                .collect();
            assert!(
                stray.len() <= self.unknown_in_flight,
                "connection {index} received events never confirmed: {stray:?}"
            );
        }
        for (index, receipts) in connections.throughout.iter().enumerate() {
            assert!(
                self.confirmed.is_subset(&receipts.events()),
                "connection {index} (open throughout) missed confirmed events"
            );
        }
    }
}

/// Messages in `queue` (ready and unacknowledged), as the broker counts
/// them; `None` while it cannot say.
pub fn queue_depth(queue: &str) -> Option<u64> {
    let output = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name", "messages"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next()? == queue).then(|| fields.next()?.parse().ok())?
        })
}

/// The `message_id`s of the dead letters in `queue` (consumed).
async fn dead_letters(queue: &str) -> BTreeSet<String> {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ is reachable");
    let channel = connection.create_channel().await.unwrap();
    let mut ids = BTreeSet::new();
    while let Some(message) = channel
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        let properties = &message.delivery.properties;
        ids.insert(
            properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .unwrap_or_default(),
        );
    }
    ids
}

/// Publishes with publisher confirms through broker restarts: reconnects
/// and publishes again (same `message_id`) until the broker confirms.
#[derive(Default)]
pub struct ConfirmingPublisher {
    link: Option<(Connection, Channel)>,
}

impl ConfirmingPublisher {
    async fn channel() -> Option<(Connection, Channel)> {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .ok()?;
        let channel = connection.create_channel().await.ok()?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .ok()?;
        Some((connection, channel))
    }

    /// Publishes `body` as `event` with `message_id` `id` until confirmed
    /// (60 s at most).
    pub async fn publish(&mut self, exchange: &str, event: &str, id: &str, body: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.link.is_none() {
                self.link = Self::channel().await;
            }
            if let Some((_, channel)) = self.link.as_ref() {
                let properties = BasicProperties::default()
                    .with_message_id(id.into())
                    .with_content_type("application/json".into());
                let sent = channel
                    .basic_publish(
                        exchange.into(),
                        event.into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        properties,
                    )
                    .await;
                if let Ok(confirm) = sent
                    && let Ok(confirmation) = confirm.await
                    && confirmation.is_ack()
                {
                    return;
                }
                self.link = None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("event {id} was never confirmed by the broker");
    }

    /// Publishes payments `ids` to `student` back to back (confirms
    /// awaited together), so that many are in flight at once; any not
    /// confirmed is published again alone.
    pub async fn burst(&mut self, exchange: &str, ids: &[String], student: &str) {
        if self.link.is_none() {
            self.link = Self::channel().await;
        }
        let mut unconfirmed: Vec<&String> = ids.iter().collect();
        if let Some((_, channel)) = self.link.as_ref() {
            let mut confirms = Vec::new();
            for id in ids {
                let body = json!({"paymentId": id, "studentId": student, "amount": 100});
                let properties = BasicProperties::default()
                    .with_message_id(id.as_str().into())
                    .with_content_type("application/json".into());
                let sent = channel
                    .basic_publish(
                        exchange.into(),
                        "PAYMENT_PROCESSED".into(),
                        BasicPublishOptions::default(),
                        body.to_string().as_bytes(),
                        properties,
                    )
                    .await;
                confirms.push((id, sent));
            }
            let mut failed = Vec::new();
            for (id, sent) in confirms {
                let confirmed = match sent {
                    Ok(confirm) => confirm
                        .await
                        .is_ok_and(|confirmation| confirmation.is_ack()),
                    Err(_) => false,
                };
                if !confirmed {
                    failed.push(id);
                }
            }
            unconfirmed = failed;
        }
        for id in unconfirmed {
            self.payment(exchange, id, student).await;
        }
    }

    /// Publishes payment `id` to `student` until confirmed.
    pub async fn payment(&mut self, exchange: &str, id: &str, student: &str) {
        let body = json!({"paymentId": id, "studentId": student, "amount": 100}).to_string();
        self.publish(exchange, "PAYMENT_PROCESSED", id, &body).await;
    }
}
