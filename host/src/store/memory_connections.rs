//! Connection records in memory: the embedded default has one node, so the
//! records live and die with the process.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use async_trait::async_trait;

use super::{ConnectionRecord, ConnectionStore, StoreError};
use crate::protocol::rfc3339;

/// In-memory `userConnections`.
#[derive(Debug, Default)]
pub struct MemoryConnections {
    records: Mutex<HashMap<String, ConnectionRecord>>,
}

impl MemoryConnections {
    /// No records.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(&self, f: impl FnOnce(&mut HashMap<String, ConnectionRecord>) -> R) -> R {
        f(&mut self.records.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// A connection's record.
    pub fn record(&self, id: &str) -> Option<ConnectionRecord> {
        self.with(|records| records.get(id).cloned())
    }

    /// Every record.
    pub fn records(&self) -> Vec<ConnectionRecord> {
        self.with(|records| records.values().cloned().collect())
    }

    /// How many records the user has.
    pub fn count_of_user(&self, user_id: &str) -> usize {
        self.with(|records| {
            records
                .values()
                .filter(|record| record.user_id == user_id)
                .count()
        })
    }
}

#[async_trait]
impl ConnectionStore for MemoryConnections {
    async fn insert(&self, record: ConnectionRecord) -> Result<(), StoreError> {
        self.with(|records| records.insert(record.id.clone(), record));
        Ok(())
    }

    async fn set_details(
        &self,
        id: &str,
        details: serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), StoreError> {
        self.with(|records| {
            if let Some(record) = records.get_mut(id) {
                record.details = details;
            }
        });
        Ok(())
    }

    async fn touch(&self, id: &str, at: SystemTime) -> Result<(), StoreError> {
        self.with(|records| {
            if let Some(record) = records.get_mut(id) {
                record.last_seen_at = rfc3339(at);
            }
        });
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<(), StoreError> {
        self.with(|records| records.remove(id));
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<ConnectionRecord>, StoreError> {
        Ok(self.record(id))
    }
}
