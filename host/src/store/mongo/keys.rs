//! Idempotency keys in MongoDB, shared by every node of the deployment:
//! `publishedKeys` holds the claims, `publishedAnswers` the first
//! publication's answer of each key. `_id` is the key in both, so the
//! insert that claims a key is atomic across nodes (a second insert meets
//! a duplicate-key error), and a key with an answer is published. The
//! maintenance task deletes answers past the retention, and claims a while
//! later (TTL indexes are not available on every MongoDB-protocol server,
//! FerretDB 1.x among them): a claim always outlives its answer, so a key
//! whose claim is gone is not published.
//!
//! Claims and answers are inserted in batches (one `insertMany` for
//! whatever waits, like the notification log): one write per key each
//! made keyed publishes as slow as the database's commits (about 25/s on
//! FerretDB's SQLite backend).
//!
//! A claim is `{_id, node, state: "claimed", claimedAt}`. The publishing
//! node renews `claimedAt` every third of the lease, so a claim older than
//! the lease and without an answer belongs to a node that stopped
//! mid-publication (`kill -9`): another node takes it over, and processes
//! the event again under the same delivery ids. Times are the nodes' own
//! clocks (a node running ahead by more than the lease could take a live
//! claim over: the event is then processed twice under the same ids).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use mongodb::Collection;
use mongodb::bson::{Bson, DateTime, Document, doc};
use mongodb::error::ErrorKind;
use tokio::sync::{mpsc, oneshot};

use super::{Mongo, PUBLISHED_ANSWERS, PUBLISHED_KEYS};
use crate::store::{Accepted, Claim, PublishedKeys, StoreError};

/// MongoDB's duplicate key error.
const DUPLICATE_KEY: i32 = 11_000;
const CLAIMED: &str = "claimed";
/// Inserts waiting for the writer; callers wait for room beyond it.
const QUEUED_INSERTS: usize = 8_192;
/// Most documents inserted in one command.
const MAX_BATCH: usize = 1_000;
/// An insert the database has not answered by then is `unavailable`.
const INSERT_TIMEOUT: Duration = Duration::from_secs(10);

/// Published keys in MongoDB.
pub struct MongoKeys {
    mongo: Mongo,
    /// `publishedKeys`: the claims.
    collection: Collection<Document>,
    /// `publishedAnswers`.
    answers_collection: Collection<Document>,
    claims: BatchedInserts,
    answers: BatchedInserts,
    instance_id: Arc<str>,
    retention: Duration,
    lease: Duration,
}

impl std::fmt::Debug for MongoKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoKeys")
            .field("instance_id", &self.instance_id)
            .finish_non_exhaustive()
    }
}

fn millis_before(now: DateTime, duration: Duration) -> DateTime {
    let millis = i64::try_from(duration.as_millis()).unwrap_or(i64::MAX);
    DateTime::from_millis(now.timestamp_millis().saturating_sub(millis))
}

impl MongoKeys {
    /// Keys of this node (`instance_id`), remembered for `retention`; a
    /// claim older than `lease` is another node's to take over.
    /// Starts the batch writers (on the current tokio runtime).
    pub fn new(mongo: &Mongo, instance_id: Arc<str>, retention: Duration, lease: Duration) -> Self {
        let collection = mongo.db.collection(PUBLISHED_KEYS);
        let answers_collection = mongo.db.collection(PUBLISHED_ANSWERS);
        Self {
            mongo: mongo.clone(),
            claims: BatchedInserts::start(mongo, &collection),
            answers: BatchedInserts::start(mongo, &answers_collection),
            collection,
            answers_collection,
            instance_id,
            retention,
            lease,
        }
    }

    /// Replaces `existing` with a fresh claim of this node, unless someone
    /// changed it meanwhile (then the claim is settled again).
    async fn take_over(&self, existing: &Document) -> Result<bool, StoreError> {
        let mut unchanged = doc! {"_id": existing.get("_id").cloned().unwrap_or(Bson::Null)};
        for field in ["node", "state", "claimedAt"] {
            unchanged.insert(field, existing.get(field).cloned().unwrap_or(Bson::Null));
        }
        let taken = self
            .collection
            .replace_one(
                unchanged,
                doc! {
                    "node": &*self.instance_id,
                    "state": CLAIMED,
                    "claimedAt": DateTime::from_system_time(SystemTime::now()),
                },
            )
            .await;
        let taken = self.mongo.observe(taken)?.matched_count == 1;
        let previous = existing.get_str("node").unwrap_or("?");
        if taken && previous != &*self.instance_id {
            tracing::info!(previous, "idempotency claim of a stopped node taken over");
        }
        Ok(taken)
    }
}

/// The answer a `publishedAnswers` document records.
fn answer_of(answer: &Document, key: &str) -> Accepted {
    let recipients = match answer.get("recipients") {
        Some(Bson::Int64(n)) => usize::try_from(*n).unwrap_or(0),
        Some(Bson::Int32(n)) => usize::try_from(*n).unwrap_or(0),
        _ => 0,
    };
    Accepted {
        event_id: answer.get_str("eventId").unwrap_or(key).to_owned(),
        recipients,
    }
}

/// What became of one document of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inserted {
    New,
    /// A document with its `_id` was there already.
    Duplicate,
}

struct Insert {
    document: Document,
    done: oneshot::Sender<Result<Inserted, StoreError>>,
}

/// Inserts into one collection, whatever waits in one unordered
/// `insertMany`; each caller hears what became of its document.
struct BatchedInserts {
    inserts: mpsc::Sender<Insert>,
}

impl BatchedInserts {
    fn start(mongo: &Mongo, collection: &Collection<Document>) -> Self {
        let (inserts, queue) = mpsc::channel(QUEUED_INSERTS);
        tokio::spawn(insert_loop(mongo.clone(), collection.clone(), queue));
        Self { inserts }
    }

    async fn insert(&self, document: Document) -> Result<Inserted, StoreError> {
        let stopped = || StoreError::Unavailable("the published keys writer stopped".into());
        let (done, answer) = oneshot::channel();
        self.inserts
            .send(Insert { document, done })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn insert_loop(
    mongo: Mongo,
    collection: Collection<Document>,
    mut queue: mpsc::Receiver<Insert>,
) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(insert) => batch.push(insert),
                Err(_) => break,
            }
        }
        let outcomes = insert_many(&mongo, &collection, &batch).await;
        for (insert, outcome) in batch.into_iter().zip(outcomes) {
            let _ = insert.done.send(outcome);
        }
    }
}

/// One `insertMany`; what became of each document, in order.
async fn insert_many(
    mongo: &Mongo,
    collection: &Collection<Document>,
    batch: &[Insert],
) -> Vec<Result<Inserted, StoreError>> {
    let documents: Vec<&Document> = batch.iter().map(|insert| &insert.document).collect();
    insert_documents(mongo, collection, &documents).await
}

async fn insert_documents(
    mongo: &Mongo,
    collection: &Collection<Document>,
    documents: &[&Document],
) -> Vec<Result<Inserted, StoreError>> {
    let inserted = tokio::time::timeout(
        INSERT_TIMEOUT,
        collection
            .insert_many(documents.iter().copied())
            .ordered(false),
    )
    .await;
    let failure = match inserted {
        Err(_) => {
            let problem = StoreError::Unavailable(format!(
                "MongoDB did not answer within {INSERT_TIMEOUT:?}"
            ));
            mongo.health.set(Some(problem.to_string()));
            return vec![Err(problem); documents.len()];
        }
        Ok(Ok(_)) => {
            let _ = mongo.observe(Ok(()));
            return vec![Ok(Inserted::New); documents.len()];
        }
        Ok(Err(err)) => err,
    };
    if let ErrorKind::InsertMany(many) = &*failure.kind
        && many.write_concern_error.is_none()
        && many.write_errors.iter().flatten().all(|error| {
            error.code == DUPLICATE_KEY || super::is_refusal_of_the_document(error.code)
        })
    {
        let _ = mongo.observe(Ok(()));
        let mut outcomes = vec![Ok(Inserted::New); documents.len()];
        for error in many.write_errors.iter().flatten() {
            if let Some(outcome) = outcomes.get_mut(error.index) {
                *outcome = if error.code == DUPLICATE_KEY {
                    Ok(Inserted::Duplicate)
                } else {
                    Err(StoreError::Rejected(error.message.clone()))
                };
            }
        }
        return outcomes;
    }
    match mongo.observe::<()>(Err(failure)) {
        // One document the driver or server cannot take fails the whole
        // command: each is tried alone, so only that one is refused.
        Err(StoreError::Rejected(_)) if documents.len() > 1 => {
            let mut outcomes = Vec::with_capacity(documents.len());
            for document in documents {
                let alone = Box::pin(insert_documents(
                    mongo,
                    collection,
                    std::slice::from_ref(document),
                ))
                .await;
                outcomes.extend(alone);
            }
            outcomes
        }
        Err(problem) => vec![Err(problem); documents.len()],
        Ok(()) => vec![Ok(Inserted::New); documents.len()],
    }
}

#[async_trait]
impl PublishedKeys for MongoKeys {
    async fn claim(&self, key: &str) -> Result<Claim, StoreError> {
        // Two rounds at most: a lost take-over race reads the winner's claim.
        for _ in 0..2 {
            let now = DateTime::from_system_time(SystemTime::now());
            let claim = doc! {
                "_id": key,
                "node": &*self.instance_id,
                "state": CLAIMED,
                "claimedAt": now,
            };
            if self.claims.insert(claim).await? == Inserted::New {
                return Ok(Claim::Ours);
            }
            let answer = self.answers_collection.find_one(doc! {"_id": key}).await;
            if let Some(answer) = self.mongo.observe(answer)? {
                let answered_at = answer
                    .get_datetime("answeredAt")
                    .copied()
                    .unwrap_or(DateTime::MIN);
                if answered_at >= millis_before(now, self.retention) {
                    return Ok(Claim::Done(answer_of(&answer, key)));
                }
            }
            let found = self.collection.find_one(doc! {"_id": key}).await;
            let Some(existing) = self.mongo.observe(found)? else {
                continue; // expired between the two calls
            };
            let claimed_at = existing
                .get_datetime("claimedAt")
                .copied()
                .unwrap_or(DateTime::MIN);
            let stale = existing.get_str("node") == Ok(&*self.instance_id)
                || claimed_at < millis_before(now, self.lease);
            if !stale {
                return Ok(Claim::Elsewhere);
            }
            if self.take_over(&existing).await? {
                return Ok(Claim::Ours);
            }
        }
        Ok(Claim::Elsewhere)
    }

    async fn complete(&self, key: &str, accepted: &Accepted) -> Result<(), StoreError> {
        let recipients = i64::try_from(accepted.recipients).unwrap_or(i64::MAX);
        let answer = doc! {
            "_id": key,
            "eventId": &accepted.event_id,
            "recipients": recipients,
            "answeredAt": DateTime::from_system_time(SystemTime::now()),
        };
        if self.answers.insert(answer.clone()).await? == Inserted::New {
            return Ok(());
        }
        // An answer is there: one past the retention, not swept yet (this
        // publication is the key's new first one), or a node that took
        // the claim over answered the same: either way, ours replaces it.
        let replaced = self
            .answers_collection
            .replace_one(doc! {"_id": key}, answer)
            .await;
        self.mongo.observe(replaced).map(drop)
    }

    fn renew_every(&self) -> Option<Duration> {
        Some(self.lease / 3)
    }

    async fn renew(&self, key: &str) {
        let renewed = self
            .collection
            .update_one(
                doc! {"_id": key, "node": &*self.instance_id, "state": CLAIMED},
                doc! {"$set": {"claimedAt": DateTime::from_system_time(SystemTime::now())}},
            )
            .await;
        if let Err(err) = self.mongo.observe(renewed) {
            tracing::warn!(key, "idempotency claim not renewed: {err}");
        }
    }

    async fn release(&self, key: &str) {
        let released = self
            .collection
            .delete_one(doc! {"_id": key, "node": &*self.instance_id, "state": CLAIMED})
            .await;
        if let Err(err) = self.mongo.observe(released) {
            tracing::warn!(key, "idempotency claim not released (it expires): {err}");
        }
    }
}
