//! `notificationLogs` in MongoDB: appends are queued to one writer that
//! inserts whatever waits in one unordered `insertMany`, and retries with
//! backoff until the database takes it. Record ids are deterministic, so a
//! retried batch that was partly written only meets duplicate-key errors,
//! which count as written.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures_util::TryStreamExt;
use mongodb::Collection;
use mongodb::bson::{Document, doc};
use mongodb::error::ErrorKind;
use tokio::sync::{mpsc, oneshot};

use super::{Mongo, NOTIFICATION_LOGS, documents};
use crate::backoff::Backoff;
use crate::store::{
    LogClock, NotificationLog, NotificationRecord, ReplayFrom, ReplayPage, StoreError, first_kept,
};

/// Appends waiting for the writer beyond this are refused (`unavailable`)
/// rather than held in memory without bound.
const QUEUED_APPENDS: usize = 8_192;
/// Most records inserted in one command.
const MAX_BATCH: usize = 1_000;
/// Retrying a write: 0.1 s doubling to 5 s.
const RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5), 0);
/// MongoDB's duplicate key error.
const DUPLICATE_KEY: i32 = 11_000;

struct Append {
    records: Vec<NotificationRecord>,
    written: oneshot::Sender<()>,
}

/// The notification log in MongoDB.
pub struct MongoLog {
    collection: Collection<Document>,
    appends: mpsc::Sender<Append>,
    /// Records older than this are not replayed (the maintenance task
    /// deletes them).
    max_age: Option<Duration>,
    /// Numbers this node's deliveries; the order between nodes follows
    /// their clocks.
    clock: LogClock,
}

impl std::fmt::Debug for MongoLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoLog").finish_non_exhaustive()
    }
}

impl MongoLog {
    /// Starts the writer (on the current tokio runtime); `max_age`: the
    /// retention.
    pub fn start(mongo: &Mongo, max_age: Option<Duration>) -> Self {
        let collection = mongo.db.collection::<Document>(NOTIFICATION_LOGS);
        let (appends, queue) = mpsc::channel(QUEUED_APPENDS);
        tokio::spawn(write_loop(mongo.clone(), collection.clone(), queue));
        Self {
            collection,
            appends,
            max_age,
            clock: LogClock::default(),
        }
    }

    async fn find(
        &self,
        filter: Document,
        limit: Option<i64>,
    ) -> Result<Vec<NotificationRecord>, StoreError> {
        let mut find = self
            .collection
            .find(filter)
            .sort(doc! {"createdAt": -1, "_id": -1});
        if let Some(limit) = limit {
            find = find.limit(limit);
        }
        let documents: Vec<Document> = find
            .await
            .map_err(|err| super::unavailable(&err))?
            .try_collect()
            .await
            .map_err(|err| super::unavailable(&err))?;
        Ok(documents
            .iter()
            .filter_map(documents::notification_record)
            .collect())
    }
}

#[async_trait]
impl NotificationLog for MongoLog {
    async fn append(&self, mut records: Vec<NotificationRecord>) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        self.clock.number(&mut records);
        let (written, done) = oneshot::channel();
        self.appends
            .try_send(Append { records, written })
            .map_err(|_| {
                StoreError::Unavailable("too many notification log writes waiting".to_owned())
            })?;
        done.await
            .map_err(|_| StoreError::Unavailable("the notification log stopped".to_owned()))
    }

    fn next_seq(&self) -> i64 {
        self.clock.next(SystemTime::now())
    }

    async fn for_user(
        &self,
        user_id: &str,
        limit: usize,
    ) -> Result<Vec<NotificationRecord>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.find(doc! {"to": user_id}, Some(limit)).await
    }

    async fn for_event(&self, event_id: &str) -> Result<Vec<NotificationRecord>, StoreError> {
        self.find(doc! {"eventId": event_id}, None).await
    }

    /// Through the index on (`to`, `seq`, `_id`): records of two nodes
    /// with one number are ordered by id. Records written before `seq`
    /// existed are not replayed, and an anchor among them is `not_found`.
    async fn replay(
        &self,
        user_id: &str,
        from: &ReplayFrom,
        limit: usize,
    ) -> Result<Option<ReplayPage>, StoreError> {
        let first_kept = first_kept(self.max_age, SystemTime::now());
        let filter = match from {
            ReplayFrom::After(delivery) => {
                let id = NotificationRecord::record_id(delivery, user_id);
                let anchor = self
                    .collection
                    .find_one(doc! {"_id": &id})
                    .projection(doc! {"seq": 1})
                    .await
                    .map_err(|err| super::unavailable(&err))?;
                // Past the retention (not swept yet), or of an older version.
                let Some(seq) = anchor
                    .and_then(|anchor| anchor.get_i64("seq").ok())
                    .filter(|seq| *seq >= first_kept)
                else {
                    return Ok(None);
                };
                doc! {"to": user_id, "$or": [
                    {"seq": {"$gt": seq}},
                    {"seq": seq, "_id": {"$gt": id}},
                ]}
            }
            ReplayFrom::Since(at) => {
                doc! {"to": user_id, "seq": {"$gte": LogClock::first_at(*at).max(first_kept)}}
            }
        };
        // One more than asked: whether there is more.
        let wanted = i64::try_from(limit).unwrap_or(i64::MAX - 1) + 1;
        let documents = self
            .collection
            .find(filter)
            .sort(doc! {"seq": 1, "_id": 1})
            .limit(wanted)
            .await
            .map_err(|err| super::unavailable(&err))?
            .try_collect::<Vec<Document>>()
            .await
            .map_err(|err| super::unavailable(&err))?;
        let more = documents.len() > limit;
        let records = documents
            .iter()
            .take(limit)
            .filter_map(documents::notification_record)
            .collect();
        Ok(Some(ReplayPage { records, more }))
    }

    /// The writer takes appends in order: a marker behind them is answered
    /// once they are written. Waits for room in the queue, unlike `append`.
    async fn flush(&self) -> Result<(), StoreError> {
        let stopped = || StoreError::Unavailable("the notification log stopped".to_owned());
        let (written, done) = oneshot::channel();
        let marker = Append {
            records: Vec::new(),
            written,
        };
        self.appends.send(marker).await.map_err(|_| stopped())?;
        done.await.map_err(|_| stopped())
    }
}

/// Writes what waits, together, until it is written; then answers.
async fn write_loop(
    mongo: Mongo,
    collection: Collection<Document>,
    mut queue: mpsc::Receiver<Append>,
) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        let mut records = batch[0].records.len();
        while records < MAX_BATCH {
            match queue.try_recv() {
                Ok(append) => {
                    records += append.records.len();
                    batch.push(append);
                }
                Err(_) => break,
            }
        }
        let documents: Vec<Document> = batch
            .iter()
            .flat_map(|append| &append.records)
            .map(documents::notification)
            .collect();
        // Flush markers alone have nothing to insert.
        if !documents.is_empty() {
            insert_until_written(&mongo, &collection, &documents).await;
        }
        for append in batch {
            let _ = append.written.send(());
        }
    }
}

/// Inserts the documents, retrying with backoff until the database takes
/// them (ids are deterministic: what a failed try wrote is not doubled).
async fn insert_until_written(
    mongo: &Mongo,
    collection: &Collection<Document>,
    documents: &[Document],
) {
    let mut backoff = RETRY;
    loop {
        let result = collection
            .insert_many(documents.iter())
            .ordered(false)
            .await;
        let result = match result {
            Err(err) if only_duplicates(&err) => Ok(()),
            other => other.map(drop),
        };
        match mongo.observe(result) {
            Ok(()) => return,
            // The database refuses what a record holds (e.g. a key with NUL
            // in a plugin's data): retrying cannot help, and must not hold
            // back the records written after it. A batch is retried record
            // by record to find the refused ones; those are dropped.
            Err(StoreError::Rejected(err)) => {
                if let [document] = documents {
                    tracing::error!(
                        id = document.get_str("_id").unwrap_or_default(),
                        "notification log record refused by MongoDB, dropped: {err}"
                    );
                } else {
                    for document in documents {
                        Box::pin(insert_until_written(
                            mongo,
                            collection,
                            std::slice::from_ref(document),
                        ))
                        .await;
                    }
                }
                return;
            }
            Err(err) => {
                let wait = backoff.next_wait();
                tracing::warn!(
                    records = documents.len(),
                    "notification log write failed, retrying in {wait:?}: {err}"
                );
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Whether an `insertMany` failed only because some records were there
/// already (a retried batch).
fn only_duplicates(err: &mongodb::error::Error) -> bool {
    match err.kind.as_ref() {
        ErrorKind::InsertMany(failure) => {
            failure.write_concern_error.is_none()
                && failure
                    .write_errors
                    .as_ref()
                    .is_some_and(|errors| errors.iter().all(|error| error.code == DUPLICATE_KEY))
        }
        _ => false,
    }
}
