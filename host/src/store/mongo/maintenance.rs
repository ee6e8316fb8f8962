//! Keeps the database in shape while the node runs: creates the indexes,
//! renews this node's lease in `instances`, removes the connection records
//! of nodes whose lease ran out (killed, partitioned), and reconciles this
//! node's records after failed writes. Its operations double as the health
//! probe of `/readyz`.

use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::{Bson, DateTime, Document, doc};
use mongodb::{Collection, IndexModel};
use tokio::sync::watch;

use super::{
    INSTANCES, Mongo, MongoConnections, NOTIFICATION_LOGS, PLUGIN_STATE, PUBLISHED_ANSWERS,
    PUBLISHED_KEYS, USER_CONNECTIONS,
};
use crate::store::PUBLISHED_KEY_RETENTION;

/// The maintenance task of one node.
pub struct Maintenance {
    /// The database.
    pub mongo: Mongo,
    /// This node.
    pub instance_id: Arc<str>,
    /// A node whose lease is this old is dead; renewed every third of it.
    pub lease: Duration,
    /// This node's connection records.
    pub connections: Arc<MongoConnections>,
    /// Notification log records older than this are deleted.
    pub log_retention: Option<Duration>,
}

impl Maintenance {
    /// Runs until `shutdown` flips, then removes this node's lease and
    /// records.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut indexed = false;
        let mut tick = tokio::time::interval(self.lease / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = crate::intake::amqp::stopped(&mut shutdown) => break,
            }
            if !indexed {
                indexed = self.mongo.observe(self.create_indexes().await).is_ok();
            }
            let database_now = match self.renew_lease().await {
                Ok((fresh, database_now)) => {
                    if fresh {
                        // First lease, or another node swept us while we
                        // could not renew: put our records back.
                        self.connections.mark_dirty();
                    }
                    database_now
                }
                Err(err) => {
                    tracing::warn!("cannot renew this node's lease: {err}");
                    continue;
                }
            };
            if let Err(err) = self.mongo.observe(self.sweep(database_now).await) {
                tracing::warn!("cannot sweep dead nodes' records: {err}");
            }
            if let Err(err) = self.mongo.observe(self.sweep_keys(database_now).await) {
                tracing::warn!("cannot sweep expired published keys and plugin state: {err}");
            }
            if let Err(err) = self.mongo.observe(self.sweep_log(database_now).await) {
                tracing::warn!("cannot delete notification log records past the retention: {err}");
            }
            self.connections.reconcile_if_dirty();
        }
        let _ = self.leave().await;
    }

    fn instances(&self) -> Collection<Document> {
        self.mongo.db.collection(INSTANCES)
    }

    fn user_connections(&self) -> Collection<Document> {
        self.mongo.db.collection(USER_CONNECTIONS)
    }

    async fn create_indexes(&self) -> mongodb::error::Result<()> {
        let logs = self.mongo.db.collection::<Document>(NOTIFICATION_LOGS);
        logs.create_index(
            IndexModel::builder()
                .keys(doc! {"to": 1, "createdAt": -1})
                .build(),
        )
        .await?;
        logs.create_index(IndexModel::builder().keys(doc! {"eventId": 1}).build())
            .await?;
        // The retention's sweep.
        logs.create_index(IndexModel::builder().keys(doc! {"createdAt": 1}).build())
            .await?;
        // `resume`: a user's records in log order.
        logs.create_index(
            IndexModel::builder()
                .keys(doc! {"to": 1, "seq": 1, "_id": 1})
                .build(),
        )
        .await?;
        let connections = self.user_connections();
        connections
            .create_index(IndexModel::builder().keys(doc! {"userId": 1}).build())
            .await?;
        connections
            .create_index(IndexModel::builder().keys(doc! {"instanceId": 1}).build())
            .await?;
        // A plugin's live keys are counted when it adds one; expired ones
        // are swept (`sweep_keys`).
        let state = self.mongo.db.collection::<Document>(PLUGIN_STATE);
        state
            .create_index(
                IndexModel::builder()
                    .keys(doc! {"plugin": 1, "expiresAt": 1})
                    .build(),
            )
            .await?;
        state
            .create_index(IndexModel::builder().keys(doc! {"expiresAt": 1}).build())
            .await?;
        // Published keys are swept by their time (`sweep_keys`).
        for (collection, time) in [
            (PUBLISHED_KEYS, "claimedAt"),
            (PUBLISHED_ANSWERS, "answeredAt"),
        ] {
            self.mongo
                .db
                .collection::<Document>(collection)
                .create_index(IndexModel::builder().keys(doc! {time: 1}).build())
                .await?;
        }
        Ok(())
    }

    /// Renews the lease, stamped with the database's clock; returns whether
    /// the lease document had to be created, and the database's time.
    ///
    /// Leases are judged by the database's clock alone: compared with each
    /// node's own, a node whose clock ran ahead would take the others'
    /// leases for expired and delete their connection records.
    async fn renew_lease(&self) -> Result<(bool, DateTime), crate::store::StoreError> {
        let renewed = self
            .instances()
            .update_one(
                doc! {"_id": &*self.instance_id},
                doc! {
                    "$currentDate": {"heartbeatAt": true},
                    "$setOnInsert": {"startedAt": DateTime::now()},
                },
            )
            .upsert(true)
            .await;
        let fresh = self
            .mongo
            .observe(renewed)
            .map(|result| result.upserted_id.is_some())?;
        let lease = self
            .instances()
            .find_one(doc! {"_id": &*self.instance_id})
            .await;
        let database_now = self
            .mongo
            .observe(lease)?
            .and_then(|lease| lease.get_datetime("heartbeatAt").ok().copied())
            .ok_or_else(|| {
                crate::store::StoreError::Unavailable(
                    "this node's lease is not readable after its renewal".into(),
                )
            })?;
        Ok((fresh, database_now))
    }

    /// Removes the leases that ran out by the database's clock (`now` is its
    /// time) and the records of every node without a live lease (older
    /// than one lease, so that a node that has just started is not swept
    /// before its first renewal).
    async fn sweep(&self, now: DateTime) -> mongodb::error::Result<()> {
        let lease_millis = i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX);
        let cutoff = DateTime::from_millis(now.timestamp_millis().saturating_sub(lease_millis));
        let expired = self
            .instances()
            .delete_many(doc! {"heartbeatAt": {"$lt": cutoff}})
            .await?;
        let live: Vec<Bson> = self.instances().distinct("_id", doc! {}).await?;
        let swept = self
            .user_connections()
            .delete_many(doc! {"instanceId": {"$nin": live}, "connectedAt": {"$lt": cutoff}})
            .await?;
        if expired.deleted_count > 0 || swept.deleted_count > 0 {
            tracing::info!(
                nodes = expired.deleted_count,
                connections = swept.deleted_count,
                "removed the records of dead nodes"
            );
        }
        Ok(())
    }

    /// Deletes the answers of keys published longer than the retention ago,
    /// and their claims two leases and a minute later: a claim outlives
    /// its answer (answered at most a third of a lease after its last
    /// renewal), so a key whose claim is gone has no answer left either.
    async fn sweep_keys(&self, now: DateTime) -> mongodb::error::Result<()> {
        let before = |age| before(now, age);
        self.mongo
            .db
            .collection::<Document>(PUBLISHED_ANSWERS)
            .delete_many(doc! {"answeredAt": {"$lt": before(PUBLISHED_KEY_RETENTION)}})
            .await?;
        let claims_age = PUBLISHED_KEY_RETENTION + self.lease * 2 + Duration::from_secs(60);
        self.mongo
            .db
            .collection::<Document>(PUBLISHED_KEYS)
            .delete_many(doc! {"claimedAt": {"$lt": before(claims_age)}})
            .await?;
        // Expired plugin state: ignored by reads already, deleted here.
        self.mongo
            .db
            .collection::<Document>(PLUGIN_STATE)
            .delete_many(doc! {"expiresAt": {"$lte": now}})
            .await?;
        Ok(())
    }

    /// Deletes the log records past the retention, by the database's clock
    /// (a sweep rather than a TTL index, as for the keys: not every
    /// MongoDB-protocol server has them; a replay never reaches past the
    /// retention in between).
    async fn sweep_log(&self, now: DateTime) -> mongodb::error::Result<()> {
        if let Some(age) = self.log_retention {
            self.mongo
                .db
                .collection::<Document>(NOTIFICATION_LOGS)
                .delete_many(doc! {"createdAt": {"$lt": before(now, age)}})
                .await?;
        }
        Ok(())
    }

    /// A clean exit: nothing of this node stays behind.
    async fn leave(&self) -> mongodb::error::Result<()> {
        self.user_connections()
            .delete_many(doc! {"instanceId": &*self.instance_id})
            .await?;
        self.instances()
            .delete_one(doc! {"_id": &*self.instance_id})
            .await?;
        Ok(())
    }
}

/// The time `age` before `now`.
fn before(now: DateTime, age: Duration) -> DateTime {
    let millis = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
    DateTime::from_millis(now.timestamp_millis().saturating_sub(millis))
}
