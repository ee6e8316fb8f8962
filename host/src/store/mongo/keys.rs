//! `publishedKeys` in MongoDB: one document per idempotency key, shared by
//! every node of the deployment. `_id` is the key, so the insert that
//! claims it is atomic across nodes (a second insert meets a duplicate-key
//! error); `claimedAt` carries a TTL index that removes keys past the
//! retention.
//!
//! A claim is `{_id, node, state: "claimed", claimedAt}`; completing it adds
//! `state: "done"`, `eventId` and `recipients`. The publishing node renews
//! `claimedAt` every third of the lease, so a claim older than the lease
//! belongs to a node that stopped mid-publication (`kill -9`): another node
//! takes it over, and processes the event again under the same delivery
//! ids. Times are the nodes' own clocks (a node running ahead by more than
//! the lease could take a live claim over: the event is then processed
//! twice under the same ids).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use mongodb::Collection;
use mongodb::bson::{Bson, DateTime, Document, doc};
use mongodb::error::{ErrorKind, WriteFailure};

use super::{Mongo, PUBLISHED_KEYS};
use crate::store::{Accepted, Claim, PublishedKeys, StoreError};

/// MongoDB's duplicate key error.
const DUPLICATE_KEY: i32 = 11_000;
const CLAIMED: &str = "claimed";
const DONE: &str = "done";

/// Published keys in MongoDB.
pub struct MongoKeys {
    mongo: Mongo,
    collection: Collection<Document>,
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
    pub fn new(mongo: &Mongo, instance_id: Arc<str>, retention: Duration, lease: Duration) -> Self {
        Self {
            mongo: mongo.clone(),
            collection: mongo.db.collection(PUBLISHED_KEYS),
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

fn is_duplicate_key(err: &mongodb::error::Error) -> bool {
    matches!(&*err.kind, ErrorKind::Write(WriteFailure::WriteError(error)) if error.code == DUPLICATE_KEY)
}

#[async_trait]
impl PublishedKeys for MongoKeys {
    async fn claim(&self, key: &str) -> Result<Claim, StoreError> {
        // Two rounds at most: a lost take-over race reads the winner's claim.
        for _ in 0..2 {
            let now = DateTime::from_system_time(SystemTime::now());
            let inserted = self
                .collection
                .insert_one(doc! {
                    "_id": key,
                    "node": &*self.instance_id,
                    "state": CLAIMED,
                    "claimedAt": now,
                })
                .await;
            match inserted {
                Ok(_) => {
                    self.mongo.observe(Ok(()))?;
                    return Ok(Claim::Ours);
                }
                Err(err) if is_duplicate_key(&err) => {}
                Err(err) => return self.mongo.observe(Err(err)),
            }
            let found = self.collection.find_one(doc! {"_id": key}).await;
            let Some(existing) = self.mongo.observe(found)? else {
                continue; // expired between the two calls
            };
            let claimed_at = existing
                .get_datetime("claimedAt")
                .copied()
                .unwrap_or(DateTime::MIN);
            let expired = claimed_at < millis_before(now, self.retention);
            if existing.get_str("state") == Ok(DONE) && !expired {
                let recipients = match existing.get("recipients") {
                    Some(Bson::Int64(n)) => usize::try_from(*n).unwrap_or(0),
                    Some(Bson::Int32(n)) => usize::try_from(*n).unwrap_or(0),
                    _ => 0,
                };
                return Ok(Claim::Done(Accepted {
                    event_id: existing.get_str("eventId").unwrap_or(key).to_owned(),
                    recipients,
                }));
            }
            let stale = existing.get_str("node") == Ok(&*self.instance_id)
                || claimed_at < millis_before(now, self.lease);
            if !(expired || stale) {
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
        let completed = self
            .collection
            .update_one(
                doc! {"_id": key, "node": &*self.instance_id},
                doc! {"$set": {
                    "state": DONE,
                    "eventId": &accepted.event_id,
                    "recipients": recipients,
                }},
            )
            .await;
        if self.mongo.observe(completed)?.matched_count == 0 {
            // Another node took the claim over (this one looked dead): it
            // publishes the same deliveries under the same ids.
            tracing::warn!(key, "idempotency claim taken over by another node");
        }
        Ok(())
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
