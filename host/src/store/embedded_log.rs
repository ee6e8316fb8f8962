//! The notification log on disk (redb) for the embedded default: survives
//! restarts, written by one thread that commits concurrent appends together
//! (group commit), so durability costs one fsync per batch, not per event.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, TableDefinition};
use tokio::sync::oneshot;

use super::{NotificationLog, NotificationRecord, StoreError};

/// Record id → the record as JSON.
const RECORDS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("notification_logs");
/// `<to>\0<createdAt>\0<id>` → id: deliveries to a user in time order.
const BY_USER: TableDefinition<'_, &str, &str> = TableDefinition::new("notification_logs_by_user");
/// `<eventId>\0<id>` → id: deliveries caused by an event.
const BY_EVENT: TableDefinition<'_, &str, &str> =
    TableDefinition::new("notification_logs_by_event");

/// Most appends committed in one transaction.
const MAX_BATCH: usize = 512;

struct Append {
    records: Vec<NotificationRecord>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// The embedded notification log.
pub struct EmbeddedLog {
    db: Arc<Database>,
    /// `None` only while dropping.
    appends: Option<mpsc::Sender<Append>>,
    writer: Option<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for EmbeddedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedLog").finish_non_exhaustive()
    }
}

fn unavailable(err: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(err.to_string())
}

impl EmbeddedLog {
    /// Opens (or creates) the log in `dir/notifications.redb`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|err| unavailable(format!("cannot create {}: {err}", dir.display())))?;
        let db = Database::create(dir.join("notifications.redb")).map_err(unavailable)?;
        let txn = db.begin_write().map_err(unavailable)?;
        txn.open_table(RECORDS).map_err(unavailable)?;
        txn.open_table(BY_USER).map_err(unavailable)?;
        txn.open_table(BY_EVENT).map_err(unavailable)?;
        txn.commit().map_err(unavailable)?;

        let db = Arc::new(db);
        let (appends, queue) = mpsc::channel();
        let writer_db = Arc::clone(&db);
        let writer = thread::Builder::new()
            .name("notification-log".into())
            .spawn(move || write_loop(&writer_db, &queue))
            .map_err(unavailable)?;
        Ok(Self {
            db,
            appends: Some(appends),
            writer: Some(writer),
        })
    }

    /// Queues records for the writer and waits for their commit.
    async fn enqueue(&self, records: Vec<NotificationRecord>) -> Result<(), StoreError> {
        let (done, committed) = oneshot::channel();
        self.appends
            .as_ref()
            .ok_or_else(|| unavailable("the log is closing"))?
            .send(Append { records, done })
            .map_err(|_| unavailable("the log writer stopped"))?;
        committed
            .await
            .map_err(|_| unavailable("the log writer stopped"))?
    }

    async fn read<R: Send + 'static>(
        &self,
        read: impl FnOnce(&Database) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || read(&db))
            .await
            .map_err(unavailable)?
    }
}

impl Drop for EmbeddedLog {
    /// Finishes pending appends and releases the database file, so that it
    /// can be opened again at once (a restart in the same process).
    fn drop(&mut self) {
        drop(self.appends.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Takes appends as they come, commits everything waiting in one
/// transaction, then answers each. Ends when the log is dropped.
fn write_loop(db: &Database, queue: &mpsc::Receiver<Append>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(append) => batch.push(append),
                Err(_) => break,
            }
        }
        // A batch of flush markers only has nothing to commit.
        let result = if batch.iter().all(|append| append.records.is_empty()) {
            Ok(())
        } else {
            write(db, batch.iter().flat_map(|append| &append.records))
        };
        if let Err(err) = &result {
            tracing::error!("notification log write failed: {err}");
        }
        for append in batch {
            let _ = append.done.send(result.clone());
        }
    }
}

fn write<'a>(
    db: &Database,
    records: impl Iterator<Item = &'a NotificationRecord>,
) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(unavailable)?;
    {
        let mut by_id = txn.open_table(RECORDS).map_err(unavailable)?;
        let mut by_user = txn.open_table(BY_USER).map_err(unavailable)?;
        let mut by_event = txn.open_table(BY_EVENT).map_err(unavailable)?;
        for record in records {
            let json = serde_json::to_vec(record).map_err(unavailable)?;
            by_id
                .insert(record.id.as_str(), json.as_slice())
                .map_err(unavailable)?;
            let user_key = format!("{}\0{}\0{}", record.to, record.created_at, record.id);
            by_user
                .insert(user_key.as_str(), record.id.as_str())
                .map_err(unavailable)?;
            let event_key = format!("{}\0{}", record.event_id, record.id);
            by_event
                .insert(event_key.as_str(), record.id.as_str())
                .map_err(unavailable)?;
        }
    }
    txn.commit().map_err(unavailable)
}

/// Reads the records an index range points at.
fn lookup(
    db: &Database,
    index: TableDefinition<'_, &str, &str>,
    prefix: &str,
    newest_first: bool,
    limit: usize,
) -> Result<Vec<NotificationRecord>, StoreError> {
    let txn = db.begin_read().map_err(unavailable)?;
    let index = txn.open_table(index).map_err(unavailable)?;
    let records = txn.open_table(RECORDS).map_err(unavailable)?;
    let start = format!("{prefix}\0");
    let end = format!("{prefix}\u{1}");
    let range = index
        .range(start.as_str()..end.as_str())
        .map_err(unavailable)?;
    let ids: Box<dyn Iterator<Item = _>> = if newest_first {
        Box::new(range.rev())
    } else {
        Box::new(range)
    };
    let mut found = Vec::new();
    for entry in ids.take(limit) {
        let (_, id) = entry.map_err(unavailable)?;
        if let Some(json) = records.get(id.value()).map_err(unavailable)? {
            found.push(serde_json::from_slice(json.value()).map_err(unavailable)?);
        }
    }
    Ok(found)
}

#[async_trait]
impl NotificationLog for EmbeddedLog {
    async fn append(&self, records: Vec<NotificationRecord>) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        self.enqueue(records).await
    }

    /// Appends are committed in order: a marker behind them is answered
    /// after they are.
    async fn flush(&self) -> Result<(), StoreError> {
        self.enqueue(Vec::new()).await
    }

    async fn for_user(
        &self,
        user_id: &str,
        limit: usize,
    ) -> Result<Vec<NotificationRecord>, StoreError> {
        let user_id = user_id.to_owned();
        self.read(move |db| lookup(db, BY_USER, &user_id, true, limit))
            .await
    }

    async fn for_event(&self, event_id: &str) -> Result<Vec<NotificationRecord>, StoreError> {
        let event_id = event_id.to_owned();
        self.read(move |db| lookup(db, BY_EVENT, &event_id, false, usize::MAX))
            .await
    }
}

#[cfg(test)]
mod tests {
    use serde_json::value::RawValue;

    use super::*;

    fn record(delivery: &str, to: &str, at: &str) -> NotificationRecord {
        NotificationRecord {
            id: NotificationRecord::record_id(delivery, to),
            event_id: format!("evt-{delivery}"),
            event: "message".into(),
            trigger: "sendMessage".into(),
            source: "client".into(),
            from: "s_1".into(),
            to: to.into(),
            plugin: "chat@0.1.0".into(),
            data: RawValue::from_string(r#"{"text":"hi"}"#.into()).unwrap(),
            connections: 1,
            created_at: at.into(),
        }
    }

    #[tokio::test]
    async fn records_survive_reopening_and_are_found_by_user_and_event() {
        let dir = std::env::temp_dir().join(format!("embedded-log-{}", crate::protocol::new_id()));
        {
            let log = EmbeddedLog::open(&dir).unwrap();
            log.append(vec![record("d1", "c_1", "2026-01-01T00:00:00.000Z")])
                .await
                .unwrap();
            log.append(vec![
                record("d2", "c_1", "2026-01-01T00:00:01.000Z"),
                record("d2", "c_2", "2026-01-01T00:00:01.000Z"),
            ])
            .await
            .unwrap();
            // A retried write of the same delivery stays one record.
            log.append(vec![record("d1", "c_1", "2026-01-01T00:00:00.000Z")])
                .await
                .unwrap();
        }
        let log = EmbeddedLog::open(&dir).unwrap();
        let to_c1: Vec<_> = log
            .for_user("c_1", 10)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(to_c1, ["d2:c_1", "d1:c_1"]);
        assert_eq!(log.for_event("evt-d2").await.unwrap().len(), 2);
        assert!(log.for_user("c_3", 10).await.unwrap().is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
