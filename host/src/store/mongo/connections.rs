//! `userConnections` in MongoDB. This node's records are kept in memory
//! (the truth for its own connections) and written behind by one task, so
//! a slow or absent database never delays a connect. A write that fails
//! marks the mirror dirty; the maintenance task then reconciles the
//! database with it.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures_util::TryStreamExt;
use mongodb::Collection;
use mongodb::bson::{Bson, Document, doc};
use tokio::sync::mpsc;

use super::{Mongo, USER_CONNECTIONS, documents, wait_in_plugin_call};
use crate::store::{ConnectionRecord, ConnectionStore, MemoryConnections, Presence, StoreError};

/// Writes waiting beyond this are dropped and left to reconciliation.
const QUEUED_WRITES: usize = 65_536;
/// How long a plugin's `connection-count` may wait for the database before
/// it is answered from this node's connections alone (plugin calls have a
/// 50 ms deadline).
const COUNT_TIMEOUT: Duration = Duration::from_millis(20);

enum Write {
    /// Make the database's record of this connection match the mirror
    /// (replace it, or delete it if the connection is gone).
    Sync(String),
    /// Make every record of this node match the mirror.
    Reconcile,
}

/// `userConnections` for a node of a cluster.
pub struct MongoConnections {
    instance_id: Arc<str>,
    /// This node's records: the truth the database is brought in line with.
    mirror: MemoryConnections,
    collection: Collection<Document>,
    writes: mpsc::Sender<Write>,
    dirty: Arc<AtomicBool>,
}

impl std::fmt::Debug for MongoConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoConnections")
            .field("instance_id", &self.instance_id)
            .finish_non_exhaustive()
    }
}

impl MongoConnections {
    /// Starts the writer (on the current tokio runtime).
    pub fn start(mongo: &Mongo, instance_id: Arc<str>) -> Arc<Self> {
        let (writes, queue) = mpsc::channel(QUEUED_WRITES);
        let connections = Arc::new(Self {
            instance_id,
            mirror: MemoryConnections::new(),
            collection: mongo.db.collection(USER_CONNECTIONS),
            writes,
            dirty: Arc::new(AtomicBool::new(false)),
        });
        tokio::spawn(write_loop(
            mongo.clone(),
            Arc::downgrade(&connections),
            queue,
        ));
        connections
    }

    fn write(&self, write: Write) {
        if self.writes.try_send(write).is_err() {
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    /// Asks for a reconciliation if a write failed since the last one.
    pub(super) fn reconcile_if_dirty(&self) {
        if self.dirty.swap(false, Ordering::Relaxed) {
            self.write(Write::Reconcile);
        }
    }

    /// Asks for a reconciliation (e.g. this node's records were swept).
    pub(super) fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Relaxed);
    }

    async fn apply(&self, write: &Write) -> mongodb::error::Result<()> {
        match write {
            Write::Sync(id) => {
                let record = self.mirror.record(id);
                self.store(id, record.as_ref()).await
            }
            Write::Reconcile => {
                let records = self.mirror.records();
                let live: HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
                let stored: Vec<Document> = self
                    .collection
                    .find(doc! {"instanceId": &*self.instance_id})
                    .projection(doc! {"_id": 1})
                    .await?
                    .try_collect()
                    .await?;
                let gone: Vec<Bson> = stored
                    .iter()
                    .filter_map(|document| document.get_str("_id").ok())
                    .filter(|id| !live.contains(id))
                    .map(|id| Bson::String(id.to_owned()))
                    .collect();
                if !gone.is_empty() {
                    self.collection
                        .delete_many(doc! {"_id": {"$in": gone}})
                        .await?;
                }
                // One record the database refuses must not keep the others
                // out: each is written on its own, and a refused one is
                // reported and left out until it changes.
                for record in &records {
                    if let Err(err) = self.store(&record.id, Some(record)).await {
                        if !super::is_about_the_document(&err) {
                            return Err(err);
                        }
                        tracing::warn!(connection = %record.id, "connection record refused by MongoDB, not stored: {err}");
                    }
                }
                Ok(())
            }
        }
    }

    async fn store(
        &self,
        id: &str,
        record: Option<&ConnectionRecord>,
    ) -> mongodb::error::Result<()> {
        match record {
            Some(record) => {
                self.collection
                    .replace_one(
                        doc! {"_id": id},
                        documents::connection(record, &self.instance_id),
                    )
                    .upsert(true)
                    .await?;
            }
            None => {
                self.collection.delete_one(doc! {"_id": id}).await?;
            }
        }
        Ok(())
    }
}

/// Applies writes in order; a failed one leaves the mirror to be
/// reconciled. Ends with the store.
async fn write_loop(
    mongo: Mongo,
    connections: std::sync::Weak<MongoConnections>,
    mut queue: mpsc::Receiver<Write>,
) {
    while let Some(write) = queue.recv().await {
        let Some(connections) = connections.upgrade() else {
            return;
        };
        match mongo.observe(connections.apply(&write).await) {
            Ok(()) => {}
            // Reconciling would write it again, and fail again.
            Err(StoreError::Rejected(err)) => {
                tracing::warn!("connection record refused by MongoDB, not stored: {err}");
            }
            Err(StoreError::Unavailable(_)) => connections.dirty.store(true, Ordering::Relaxed),
        }
    }
}

#[async_trait]
impl ConnectionStore for MongoConnections {
    async fn insert(&self, record: ConnectionRecord) -> Result<(), StoreError> {
        let id = record.id.clone();
        self.mirror.insert(record).await?;
        self.write(Write::Sync(id));
        Ok(())
    }

    async fn set_details(
        &self,
        id: &str,
        details: serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), StoreError> {
        self.mirror.set_details(id, details).await?;
        self.write(Write::Sync(id.to_owned()));
        Ok(())
    }

    async fn touch(&self, id: &str, at: SystemTime) -> Result<(), StoreError> {
        self.mirror.touch(id, at).await?;
        self.write(Write::Sync(id.to_owned()));
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<(), StoreError> {
        self.mirror.remove(id).await?;
        self.write(Write::Sync(id.to_owned()));
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<ConnectionRecord>, StoreError> {
        Ok(self.mirror.record(id))
    }
}

impl Presence for MongoConnections {
    /// Counts the user's records on every node. Called mid-plugin-call, so
    /// bounded by `COUNT_TIMEOUT` (20 ms); falls back to this node's count.
    fn count_of_user(&self, user_id: &str) -> usize {
        let count = wait_in_plugin_call(
            std::time::Instant::now() + COUNT_TIMEOUT,
            self.collection.count_documents(doc! {"userId": user_id}),
        )
        .ok()
        .and_then(Result::ok);
        // Writes behind may not have reached the database yet: this node's
        // own connections are known for sure.
        let local = self.mirror.count_of_user(user_id);
        count.map_or(local, |count| {
            usize::try_from(count).unwrap_or(usize::MAX).max(local)
        })
    }
}
