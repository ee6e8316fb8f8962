//! Keeps the database in shape while the node runs: creates the indexes,
//! renews this node's lease in `instances`, removes the connection records
//! of nodes whose lease ran out (killed, partitioned), and reconciles this
//! node's records after failed writes. Its operations double as the health
//! probe of `/readyz`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mongodb::bson::{Bson, DateTime, Document, doc};
use mongodb::{Collection, IndexModel};
use tokio::sync::watch;

use super::{INSTANCES, Mongo, MongoConnections, NOTIFICATION_LOGS, USER_CONNECTIONS};

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
            match self.renew_lease().await {
                Ok(fresh) => {
                    if fresh {
                        // First lease, or another node swept us while we
                        // could not renew: put our records back.
                        self.connections.mark_dirty();
                    }
                }
                Err(err) => {
                    tracing::warn!("cannot renew this node's lease: {err}");
                    continue;
                }
            }
            if let Err(err) = self.mongo.observe(self.sweep().await) {
                tracing::warn!("cannot sweep dead nodes' records: {err}");
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
        let connections = self.user_connections();
        connections
            .create_index(IndexModel::builder().keys(doc! {"userId": 1}).build())
            .await?;
        connections
            .create_index(IndexModel::builder().keys(doc! {"instanceId": 1}).build())
            .await?;
        Ok(())
    }

    /// Renews the lease; `true` when the lease document had to be created.
    async fn renew_lease(&self) -> Result<bool, crate::store::StoreError> {
        let now = DateTime::now();
        let renewed = self
            .instances()
            .update_one(
                doc! {"_id": &*self.instance_id},
                doc! {"$set": {"heartbeatAt": now}, "$setOnInsert": {"startedAt": now}},
            )
            .upsert(true)
            .await;
        self.mongo
            .observe(renewed)
            .map(|result| result.upserted_id.is_some())
    }

    /// Removes the leases that ran out and the records of every node
    /// without a live lease (older than one lease, so that a node that has
    /// just started is not swept before its first renewal).
    async fn sweep(&self) -> mongodb::error::Result<()> {
        let cutoff = DateTime::from_system_time(
            SystemTime::now()
                .checked_sub(self.lease)
                .unwrap_or(SystemTime::UNIX_EPOCH),
        );
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
