//! The notification log on disk for the embedded default: an append-only
//! journal of JSON lines under `<data dir>/notifications/`, one
//! `notificationLogs` record per line (the document MongoDB would hold), in
//! numbered segments of at most [`SEGMENT_BYTES`]. One writer thread appends
//! everything waiting in one write and one `fdatasync` (group commit), so
//! durability costs one sync per batch, not per event, and a record costs a
//! serialization and a copy, not B-tree pages.
//!
//! Each line also holds `seq`, the record's place in the log order
//! ([`LogClock`]). A `resume` reads a user's records through an index in
//! memory ([`index`]); the other queries below scan the segments.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock, mpsc};
use std::thread;
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use tokio::sync::oneshot;

use crate::health::Health;

use super::{
    Appended, LogClock, LogRetention, NotificationLog, NotificationRecord, ReplayFrom, ReplayPage,
    StoreError,
};
use index::{Plan, Position, UserIndex};
use sync_pace::SyncPace;

mod index;
mod retention;
mod sync_pace;

/// A segment that reached this size is closed and the next one started, so
/// operators can archive or delete old segments.
const SEGMENT_BYTES: u64 = 64 << 20;
/// Most appends committed in one write: what 2 ms bring at 2M appends/s.
const MAX_BATCH: usize = 4096;
/// The folder's lock file: one process writes a log at a time.
const LOCK_FILE: &str = "LOCK";
const SEGMENT_SUFFIX: &str = ".jsonl";

struct Append {
    records: Vec<NotificationRecord>,
    done: Callback,
}

/// Whom the writer tells that an append is committed (or failed), on the
/// writer thread: an [`NotificationLog::append_then`] callback, or one that
/// wakes a task awaiting [`EmbeddedLog::enqueue`]. Called exactly once:
/// with the append's result or, dropped unanswered (the writer thread died
/// with it queued), with "the log writer stopped".
struct Callback(Option<Appended>);

impl Callback {
    fn new(then: Appended) -> Self {
        Self(Some(then))
    }

    fn call(mut self, result: Result<(), StoreError>) {
        let Some(then) = self.0.take() else { return };
        // A panicking callback must not stop the writer thread (and with
        // it every later append).
        let called = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| then(result)));
        if called.is_err() {
            tracing::error!("notification log: a commit callback panicked");
        }
    }
}

impl Drop for Callback {
    fn drop(&mut self) {
        if let Some(then) = self.0.take() {
            then(Err(unavailable("the log writer stopped")));
        }
    }
}

/// The embedded notification log.
pub struct EmbeddedLog {
    dir: PathBuf,
    retention: LogRetention,
    /// Numbers deliveries; goes on above what the log held when opened.
    clock: LogClock,
    index: Arc<RwLock<UserIndex>>,
    /// Degraded while writes fail (a full or failing disk), for `/readyz`.
    health: Arc<Health>,
    /// `None` only while dropping.
    appends: Option<mpsc::Sender<Append>>,
    writer: Option<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for EmbeddedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedLog")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn unavailable(err: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(err.to_string())
}

impl EmbeddedLog {
    /// Opens (or creates) the log in `data_dir/notifications/`, keeping
    /// everything (for tools and tests that read a log).
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(data_dir, LogRetention::FOREVER)
    }

    /// Opens (or creates) the log in `data_dir/notifications/`; what
    /// `retention` does not keep is deleted, whole segments at a time.
    pub fn open_with(data_dir: &Path, retention: LogRetention) -> Result<Self, StoreError> {
        // Several segments under a size cap, so that deleting the oldest
        // frees a part of it, not all.
        let segment_bytes = retention
            .max_bytes
            .map_or(SEGMENT_BYTES, |max| (max / 8).clamp(4096, SEGMENT_BYTES));
        Self::open_with_segment_bytes(data_dir, segment_bytes, retention)
    }

    fn open_with_segment_bytes(
        data_dir: &Path,
        segment_bytes: u64,
        retention: LogRetention,
    ) -> Result<Self, StoreError> {
        let dir = data_dir.join("notifications");
        let opened = Journal::open(&dir, segment_bytes, retention).and_then(|journal| {
            let index = UserIndex::build(&segments(&dir)?)?;
            Ok((journal, index))
        });
        let (journal, index) = opened
            .map_err(|err| unavailable(format!("notification log in {}: {err}", dir.display())))?;
        let clock = LogClock::after(index.last_seq());
        let index = Arc::new(RwLock::new(index));
        let health = Arc::new(Health::default());
        let (appends, queue) = mpsc::channel();
        let writer = thread::Builder::new()
            .name("notification-log".into())
            .spawn({
                let index = Arc::clone(&index);
                let health = Arc::clone(&health);
                move || write_loop(journal, &index, &health, &queue)
            })
            .map_err(unavailable)?;
        Ok(Self {
            dir,
            retention,
            clock,
            index,
            health,
            appends: Some(appends),
            writer: Some(writer),
        })
    }

    /// The log's health: degraded from a failed write until the disk takes
    /// writes again.
    pub fn health(&self) -> Arc<Health> {
        Arc::clone(&self.health)
    }

    /// Queues records for the writer and waits for their commit.
    async fn enqueue(&self, records: Vec<NotificationRecord>) -> Result<(), StoreError> {
        let (done, committed) = oneshot::channel();
        self.send(
            records,
            Callback::new(Box::new(move |result| {
                let _ = done.send(result);
            })),
        );
        committed
            .await
            .map_err(|_| unavailable("the log writer stopped"))?
    }

    /// Queues records for the writer, which tells `done`; told at once when
    /// the writer is gone.
    fn send(&self, records: Vec<NotificationRecord>, done: Callback) {
        let Some(appends) = self.appends.as_ref() else {
            return done.call(Err(unavailable("the log is closing")));
        };
        if let Err(refused) = appends.send(Append { records, done }) {
            refused
                .0
                .done
                .call(Err(unavailable("the log writer stopped")));
        }
    }

    /// Scans every committed record, off the async workers.
    async fn scan(
        &self,
        wanted: impl Fn(&NotificationRecord) -> bool + Send + 'static,
    ) -> Result<Vec<NotificationRecord>, StoreError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || scan(&dir, &wanted))
            .await
            .map_err(unavailable)?
            .map_err(unavailable)
    }
}

impl Drop for EmbeddedLog {
    /// Finishes pending appends and releases the folder's lock, so that the
    /// log can be opened again at once (a restart in the same process).
    fn drop(&mut self) {
        drop(self.appends.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Takes appends as they come, commits everything waiting in one write,
/// indexes it, then answers each. Ends when the log is dropped.
///
/// A failed write (a full disk) fails its appenders (`unavailable`) and
/// marks `health` degraded; every second a probe write checks whether the
/// disk takes writes again, so readiness comes back without traffic.
///
/// Syncs are paced by [`SyncPace`] (1 ms apart while the process has CPU
/// to spare, up to 2 ms once busy), so an ack waits 2 ms at most for its
/// sync.
fn write_loop(
    mut journal: Journal,
    index: &RwLock<UserIndex>,
    health: &Health,
    queue: &mpsc::Receiver<Append>,
) {
    let mut pace = SyncPace::new();
    let mut last_sync: Option<Instant> = None;
    let mut retention_checked = Instant::now();
    let mut failing = false;
    let recovered = |failing: &mut bool| {
        if std::mem::take(failing) {
            health.set(None);
            tracing::info!("notification log: writes succeed again");
        }
    };
    loop {
        let first = match queue.recv_timeout(retention::CHECK_EVERY) {
            Ok(first) => Some(first),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        if retention_checked.elapsed() >= retention::CHECK_EVERY {
            retention_checked = Instant::now();
            journal.enforce_retention(index);
            if failing && journal.probe().is_ok() {
                recovered(&mut failing);
            }
        }
        let Some(first) = first else { continue };
        if let Some(wait) = last_sync.and_then(|at| pace.interval().checked_sub(at.elapsed())) {
            thread::sleep(wait);
        }
        last_sync = Some(Instant::now());
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(append) => batch.push(append),
                Err(_) => break,
            }
        }
        let records = || batch.iter().flat_map(|append| &append.records);
        let result = journal.append(records()).map_err(unavailable);
        match &result {
            Ok(()) => {
                // Before the appenders hear of it: a replay that follows a
                // flush finds every record the flush waited for.
                let mut index = index.write().unwrap_or_else(PoisonError::into_inner);
                for (record, position) in records().zip(&journal.appended) {
                    index.add(&record.id, &record.to, *position, record.seq);
                }
                drop(index);
                // Flush markers alone wrote nothing: no sign of the disk.
                if !journal.appended.is_empty() {
                    recovered(&mut failing);
                }
            }
            Err(err) => {
                tracing::error!("notification log write failed: {err}");
                failing = true;
                health.set(Some(format!("notification log write failed: {err}")));
            }
        }
        for append in batch {
            append.done.call(result.clone());
        }
    }
}

/// The open end of the log: the newest segment, owned by the writer thread.
struct Journal {
    dir: PathBuf,
    segment_bytes: u64,
    segment: u64,
    file: File,
    /// Bytes of complete records in `file`: where the next write goes.
    len: u64,
    /// When the open segment got its first record.
    segment_started: Option<SystemTime>,
    retention: LogRetention,
    buffer: Vec<u8>,
    /// Where the records of the last append went.
    appended: Vec<Position>,
    /// Held (locked) for the journal's life.
    _lock: File,
    /// Makes the next sync fail, as a full or failing disk would.
    #[cfg(test)]
    fail_next_sync: bool,
}

impl Journal {
    fn open(dir: &Path, segment_bytes: u64, retention: LogRetention) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let lock = File::create(dir.join(LOCK_FILE))?;
        lock.try_lock().map_err(|err| match err {
            TryLockError::WouldBlock => io::Error::new(
                io::ErrorKind::WouldBlock,
                "in use by another process (its LOCK file is held)",
            ),
            TryLockError::Error(err) => err,
        })?;
        let segment = segments(dir)?.last().map_or(1, |(number, _)| *number);
        let (file, len) = open_segment(dir, segment)?;
        let segment_started = if len == 0 {
            None
        } else {
            let metadata = file.metadata()?;
            Some(metadata.created().or_else(|_| metadata.modified())?)
        };
        Ok(Self {
            dir: dir.to_owned(),
            segment_bytes,
            segment,
            file,
            len,
            segment_started,
            retention,
            buffer: Vec::new(),
            appended: Vec::new(),
            _lock: lock,
            #[cfg(test)]
            fail_next_sync: false,
        })
    }

    /// Writes the records, one line each, and syncs them to disk; on
    /// success `appended` says where each went.
    fn append<'a>(
        &mut self,
        records: impl Iterator<Item = &'a NotificationRecord>,
    ) -> io::Result<()> {
        self.buffer.clear();
        self.appended.clear();
        let now = SystemTime::now();
        for record in records {
            let start = self.buffer.len();
            serde_json::to_writer(&mut self.buffer, record)?;
            // A plugin's payload is kept as it wrote it, and JSON allows a
            // line break only as whitespace (never inside a string), so a
            // space in its place keeps the record one line and the same JSON.
            for byte in &mut self.buffer[start..] {
                if *byte == b'\n' {
                    *byte = b' ';
                }
            }
            self.buffer.push(b'\n');
            self.appended.push(Position::new(0, start as u64));
        }
        if self.buffer.is_empty() {
            return Ok(());
        }
        let full = self.len + self.buffer.len() as u64 > self.segment_bytes;
        let old = retention::segment_closes(self.segment_started, &self.retention, now);
        if self.len > 0 && (full || old) {
            self.start_next_segment()?;
        }
        for position in &mut self.appended {
            *position = Position::new(self.segment, self.len + position.offset());
        }
        let written = self.file.write_all(&self.buffer);
        if let Err(err) = written.and_then(|()| self.sync()) {
            // Its appenders hear that the batch failed, so none of it may
            // stay; and the next batch must start a line.
            let _ = self.file.set_len(self.len);
            return Err(err);
        }
        self.len += self.buffer.len() as u64;
        self.segment_started.get_or_insert(now);
        Ok(())
    }

    /// Whether the disk takes a write again: a page written, synced and
    /// removed beside the segments.
    fn probe(&self) -> io::Result<()> {
        let path = self.dir.join("PROBE");
        let written = File::create(&path)
            .and_then(|mut file| file.write_all(&[0; 4096]).and_then(|()| file.sync_data()));
        let _ = std::fs::remove_file(&path);
        written
    }

    /// Deletes the closed segments the retention no longer keeps, and
    /// forgets their records and those past the retention in the index.
    fn enforce_retention(&self, index: &RwLock<UserIndex>) {
        let now = SystemTime::now();
        match retention::delete_segments(&self.dir, self.segment, &self.retention, now) {
            Ok(Some(through)) => index
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .forget(Some(through), self.retention.first_kept(now)),
            Ok(None) => {}
            Err(err) => tracing::warn!("notification log: cannot apply the retention: {err}"),
        }
    }

    fn sync(&mut self) -> io::Result<()> {
        #[cfg(test)]
        if std::mem::take(&mut self.fail_next_sync) {
            return Err(io::Error::other("injected sync failure"));
        }
        self.file.sync_data()
    }

    fn start_next_segment(&mut self) -> io::Result<()> {
        let (file, len) = open_segment(&self.dir, self.segment + 1)?;
        self.segment += 1;
        self.file = file;
        self.len = len;
        self.segment_started = None;
        Ok(())
    }
}

fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:06}{SEGMENT_SUFFIX}"))
}

/// Opens a segment for appending, creating it (durably) if needed, and cuts
/// a record left unfinished by a crash: it was never acknowledged.
fn open_segment(dir: &Path, number: u64) -> io::Result<(File, u64)> {
    let path = segment_path(dir, number);
    let created = !path.exists();
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(&path)?;
    if created {
        // The new name must survive a crash as well as what is written to it.
        File::open(dir)?.sync_all()?;
    }
    let written = file.metadata()?.len();
    let complete = complete_lines_len(&file, written)?;
    if complete < written {
        tracing::warn!(
            segment = %path.display(),
            bytes = written - complete,
            "notification log: cutting a record left unfinished by a crash"
        );
        file.set_len(complete)?;
        file.sync_data()?;
    }
    Ok((file, complete))
}

/// The length of `file` up to and including its last line break.
fn complete_lines_len(file: &File, len: u64) -> io::Result<u64> {
    let mut chunk = [0u8; 4096];
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let chunk = &mut chunk[..(end - start) as usize];
        file.read_exact_at(chunk, start)?;
        if let Some(at) = chunk.iter().rposition(|&byte| byte == b'\n') {
            return Ok(start + at as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// The folder's segments, oldest first.
fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let number = path
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_suffix(SEGMENT_SUFFIX))
            .and_then(|stem| stem.parse::<u64>().ok());
        if let Some(number) = number {
            found.push((number, path));
        }
    }
    found.sort_unstable_by_key(|(number, _)| *number);
    Ok(found)
}

/// Every complete record `wanted` keeps, once per record id (a retried
/// write of a delivery appends the same record again).
fn scan(
    dir: &Path,
    wanted: &dyn Fn(&NotificationRecord) -> bool,
) -> io::Result<Vec<NotificationRecord>> {
    let mut seen = std::collections::HashSet::new();
    let mut found = Vec::new();
    let mut unreadable = 0usize;
    let mut line = Vec::new();
    for (_, path) in segments(dir)? {
        let mut reader = BufReader::new(File::open(&path)?);
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            // A line without its break is still being written.
            if line.last() != Some(&b'\n') {
                break;
            }
            match serde_json::from_slice::<NotificationRecord>(&line) {
                Ok(record) if wanted(&record) => {
                    if seen.insert(record.id.clone()) {
                        found.push(record);
                    }
                }
                Ok(_) => {}
                Err(_) => unreadable += 1,
            }
        }
    }
    if unreadable > 0 {
        tracing::warn!(
            dir = %dir.display(),
            lines = unreadable,
            "notification log: skipped lines that are not records"
        );
    }
    Ok(found)
}

#[async_trait]
impl NotificationLog for EmbeddedLog {
    async fn append(&self, mut records: Vec<NotificationRecord>) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        self.clock.number(&mut records);
        self.enqueue(records).await
    }

    fn append_then(self: Arc<Self>, mut records: Vec<NotificationRecord>, then: Appended) {
        if records.is_empty() {
            return then(Ok(()));
        }
        self.clock.number(&mut records);
        self.send(records, Callback::new(then));
    }

    fn next_seq(&self) -> i64 {
        self.clock.next(SystemTime::now())
    }

    /// Appends are committed in order: a marker behind them is answered
    /// after they are.
    async fn flush(&self) -> Result<(), StoreError> {
        self.enqueue(Vec::new()).await
    }

    /// Newest first: by `createdAt`, then by id.
    async fn for_user(
        &self,
        user_id: &str,
        limit: usize,
    ) -> Result<Vec<NotificationRecord>, StoreError> {
        let user_id = user_id.to_owned();
        let mut records = self.scan(move |record| record.to == user_id).await?;
        records.sort_unstable_by(|a, b| (&b.created_at, &b.id).cmp(&(&a.created_at, &a.id)));
        records.truncate(limit);
        Ok(records)
    }

    /// In record id order.
    async fn for_event(&self, event_id: &str) -> Result<Vec<NotificationRecord>, StoreError> {
        let event_id = event_id.to_owned();
        let mut records = self.scan(move |record| record.event_id == event_id).await?;
        records.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        Ok(records)
    }

    async fn replay(
        &self,
        user_id: &str,
        from: &ReplayFrom,
        limit: usize,
    ) -> Result<Option<ReplayPage>, StoreError> {
        let plan = self
            .index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .plan(
                user_id,
                from,
                limit,
                self.retention.first_kept(SystemTime::now()),
            );
        let Some(plan) = plan else {
            return Ok(None);
        };
        let dir = self.dir.clone();
        let anchor_id = match from {
            ReplayFrom::After(delivery) => Some(NotificationRecord::record_id(delivery, user_id)),
            ReplayFrom::Since(_) => None,
        };
        let user = user_id.to_owned();
        tokio::task::spawn_blocking(move || read_plan(&dir, &user, plan, anchor_id.as_deref()))
            .await
            .map_err(unavailable)?
            .map_err(unavailable)
    }
}

/// Reads the records of a replay; `None` if its anchor is not the record
/// asked for (two delivery ids whose hashes collide) or if a segment it
/// needs was deleted meanwhile (the client cannot have all it missed).
/// A replay `since` a time skips deleted segments: it starts later.
fn read_plan(
    dir: &Path,
    user: &str,
    plan: Plan,
    anchor_id: Option<&str>,
) -> io::Result<Option<ReplayPage>> {
    let mut reader = SegmentReader::new(dir);
    if let (Some(anchor), Some(anchor_id)) = (plan.anchor, anchor_id) {
        match reader.read(anchor)? {
            Some(anchor) if anchor.id == anchor_id => {}
            _ => return Ok(None),
        }
    }
    let mut records = Vec::with_capacity(plan.records.len());
    for position in plan.records {
        match reader.read(position)? {
            Some(record) if record.to == user => records.push(record),
            Some(record) => {
                // An index bug must not push one user's records to another.
                return Err(io::Error::other(format!(
                    "the index points at a record of another user ({})",
                    record.id
                )));
            }
            None if anchor_id.is_some() => return Ok(None),
            None => {}
        }
    }
    Ok(Some(ReplayPage {
        records,
        more: plan.more,
    }))
}

/// Reads records at positions, keeping the last segment open: a replay's
/// records are mostly in one or two, in file order.
struct SegmentReader<'a> {
    dir: &'a Path,
    /// The open segment, its reader and the reader's offset in it.
    open: Option<(u64, BufReader<File>, u64)>,
    line: Vec<u8>,
}

impl<'a> SegmentReader<'a> {
    fn new(dir: &'a Path) -> Self {
        Self {
            dir,
            open: None,
            line: Vec::new(),
        }
    }

    /// The record at `position`; `None` if its segment was deleted.
    fn read(&mut self, position: Position) -> io::Result<Option<NotificationRecord>> {
        use std::io::{Seek, SeekFrom};
        let offset = position.offset();
        let (reader, at) = match &mut self.open {
            Some((segment, reader, at)) if *segment == position.segment() => {
                // Forward within the buffer keeps it: records of one user
                // often sit close together.
                match i64::try_from(offset).ok().zip(i64::try_from(*at).ok()) {
                    Some((to, from)) if to >= from => reader.seek_relative(to - from)?,
                    _ => {
                        reader.seek(SeekFrom::Start(offset))?;
                    }
                }
                (reader, at)
            }
            open => {
                let file = match File::open(segment_path(self.dir, position.segment())) {
                    Ok(file) => file,
                    Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(err) => return Err(err),
                };
                let (_, reader, at) = open.insert((position.segment(), BufReader::new(file), 0));
                reader.seek(SeekFrom::Start(offset))?;
                (reader, at)
            }
        };
        self.line.clear();
        let read = reader.read_until(b'\n', &mut self.line)?;
        *at = offset + read as u64;
        serde_json::from_slice(&self.line)
            .map(Some)
            .map_err(io::Error::other)
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
            seq: 0,
        }
    }

    fn temp_dir() -> PathBuf {
        std::env::temp_dir().join(format!("embedded-log-{}", crate::protocol::new_id()))
    }

    async fn ids_to(log: &EmbeddedLog, user: &str) -> Vec<String> {
        let records = log.for_user(user, 100).await.unwrap();
        records.into_iter().map(|record| record.id).collect()
    }

    #[tokio::test]
    async fn records_survive_reopening_and_are_found_by_user_and_event() {
        let dir = temp_dir();
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
        assert_eq!(ids_to(&log, "c_1").await, ["d2:c_1", "d1:c_1"]);
        assert_eq!(log.for_user("c_1", 1).await.unwrap().len(), 1);
        assert_eq!(log.for_event("evt-d2").await.unwrap().len(), 2);
        assert!(log.for_user("c_3", 10).await.unwrap().is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn each_record_is_one_line_of_the_stored_document() {
        let dir = temp_dir();
        let log = EmbeddedLog::open(&dir).unwrap();
        let mut pretty = record("d1", "c_1", "2026-01-01T00:00:00.000Z");
        pretty.data = RawValue::from_string("{\n  \"text\": \"two\\nlines\"\n}".into()).unwrap();
        log.append(vec![
            pretty,
            record("d2", "c_1", "2026-01-01T00:00:01.000Z"),
        ])
        .await
        .unwrap();

        let text = std::fs::read_to_string(segment_path(&dir.join("notifications"), 1)).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["_id"], "d1:c_1");
        assert_eq!(lines[0]["data"]["text"], "two\nlines");
        assert_eq!(lines[1]["createdAt"], "2026-01-01T00:00:01.000Z");
        drop(log);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_record_cut_short_by_a_crash_is_dropped_and_appends_go_on() {
        let dir = temp_dir();
        {
            let log = EmbeddedLog::open(&dir).unwrap();
            log.append(vec![record("d1", "c_1", "2026-01-01T00:00:00.000Z")])
                .await
                .unwrap();
        }
        let segment = segment_path(&dir.join("notifications"), 1);
        let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
        file.write_all(br#"{"_id":"d2:c_1","eventId":"ev"#).unwrap();
        drop(file);

        let log = EmbeddedLog::open(&dir).unwrap();
        log.append(vec![record("d3", "c_1", "2026-01-01T00:00:02.000Z")])
            .await
            .unwrap();
        assert_eq!(ids_to(&log, "c_1").await, ["d3:c_1", "d1:c_1"]);
        let text = std::fs::read_to_string(&segment).unwrap();
        assert_eq!(text.lines().count(), 2);
        drop(log);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_full_segment_is_closed_and_reads_span_segments() {
        let dir = temp_dir();
        {
            let log =
                EmbeddedLog::open_with_segment_bytes(&dir, 600, LogRetention::FOREVER).unwrap();
            for n in 0..6 {
                let at = format!("2026-01-01T00:00:0{n}.000Z");
                log.append(vec![record(&format!("d{n}"), "c_1", &at)])
                    .await
                    .unwrap();
            }
        }
        let folder = dir.join("notifications");
        let numbers: Vec<u64> = segments(&folder).unwrap().iter().map(|(n, _)| *n).collect();
        assert!(numbers.len() >= 2, "segments {numbers:?}");
        assert_eq!(numbers, (1..=numbers.len() as u64).collect::<Vec<_>>());
        for (_, path) in segments(&folder).unwrap() {
            assert!(std::fs::metadata(path).unwrap().len() <= 600);
        }

        // Reopened, the log appends to its newest segment.
        let log = EmbeddedLog::open_with_segment_bytes(&dir, 600, LogRetention::FOREVER).unwrap();
        log.append(vec![record("d6", "c_1", "2026-01-01T00:00:06.000Z")])
            .await
            .unwrap();
        let ids = ids_to(&log, "c_1").await;
        let expected: Vec<String> = (0..7).rev().map(|n| format!("d{n}:c_1")).collect();
        assert_eq!(ids, expected);
        drop(log);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_batch_whose_sync_failed_is_cut_and_the_next_one_starts_a_line() {
        let dir = temp_dir();
        let folder = dir.join("notifications");
        let mut journal = Journal::open(&folder, SEGMENT_BYTES, LogRetention::FOREVER).unwrap();
        let first = record("d1", "c_1", "2026-01-01T00:00:00.000Z");
        journal.append([&first].into_iter()).unwrap();

        journal.fail_next_sync = true;
        let failed = record("d2", "c_1", "2026-01-01T00:00:01.000Z");
        journal.append([&failed].into_iter()).unwrap_err();
        let last = record("d3", "c_1", "2026-01-01T00:00:02.000Z");
        journal.append([&last].into_iter()).unwrap();
        drop(journal);

        let text = std::fs::read_to_string(segment_path(&folder, 1)).unwrap();
        let ids: Vec<String> = text
            .lines()
            .map(|line| serde_json::from_str::<NotificationRecord>(line).unwrap().id)
            .collect();
        assert_eq!(ids, ["d1:c_1", "d3:c_1"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    async fn replayed(
        log: &EmbeddedLog,
        user: &str,
        from: ReplayFrom,
        limit: usize,
    ) -> Option<(Vec<String>, bool)> {
        let page = log.replay(user, &from, limit).await.unwrap()?;
        let ids = page
            .records
            .iter()
            .map(|record| record.delivery_id().to_owned())
            .collect();
        Some((ids, page.more))
    }

    fn after(delivery: &str) -> ReplayFrom {
        ReplayFrom::After(delivery.into())
    }

    #[tokio::test]
    async fn a_replay_reads_a_users_records_in_log_order_across_segments_and_reopening() {
        let dir = temp_dir();
        {
            let log =
                EmbeddedLog::open_with_segment_bytes(&dir, 600, LogRetention::FOREVER).unwrap();
            for n in 0..6 {
                let at = format!("2026-01-01T00:00:0{n}.000Z");
                log.append(vec![
                    record(&format!("d{n}"), "c_1", &at),
                    record(&format!("e{n}"), "c_2", &at),
                ])
                .await
                .unwrap();
            }
            // A retried write of d1 keeps d1's first place.
            log.append(vec![record("d1", "c_1", "2026-01-01T00:00:01.000Z")])
                .await
                .unwrap();
            assert_eq!(
                replayed(&log, "c_1", after("d1"), 10).await,
                Some((
                    vec!["d2".into(), "d3".into(), "d4".into(), "d5".into()],
                    false
                ))
            );
        }
        assert!(segments(&dir.join("notifications")).unwrap().len() > 2);
        // Reopened: the index is rebuilt from the segments, and numbering
        // goes on above what they hold.
        let log = EmbeddedLog::open_with_segment_bytes(&dir, 600, LogRetention::FOREVER).unwrap();
        log.append(vec![record("d6", "c_1", "2026-01-01T00:00:06.000Z")])
            .await
            .unwrap();
        assert_eq!(
            replayed(&log, "c_1", after("d3"), 2).await,
            Some((vec!["d4".into(), "d5".into()], true))
        );
        assert_eq!(
            replayed(&log, "c_1", after("d5"), 2).await,
            Some((vec!["d6".into()], false))
        );
        assert_eq!(
            replayed(&log, "c_1", after("d6"), 2).await,
            Some((vec![], false))
        );
        // Not a delivery to this user, or none at all.
        assert_eq!(replayed(&log, "c_1", after("e2"), 2).await, None);
        assert_eq!(replayed(&log, "c_1", after("zz"), 2).await, None);
        assert_eq!(replayed(&log, "c_3", after("d2"), 2).await, None);
        // Records carry the order they were written in.
        let text = std::fs::read_to_string(segment_path(&dir.join("notifications"), 1)).unwrap();
        let seqs: Vec<i64> = text
            .lines()
            .map(|line| {
                serde_json::from_str::<serde_json::Value>(line).unwrap()["seq"]
                    .as_i64()
                    .unwrap()
            })
            .collect();
        assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]), "{seqs:?}");
        drop(log);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_replay_skips_segments_an_operator_deleted() {
        let dir = temp_dir();
        let log = EmbeddedLog::open_with_segment_bytes(&dir, 600, LogRetention::FOREVER).unwrap();
        for n in 0..6 {
            let at = format!("2026-01-01T00:00:0{n}.000Z");
            log.append(vec![record(&format!("d{n}"), "c_1", &at)])
                .await
                .unwrap();
        }
        let folder = dir.join("notifications");
        std::fs::remove_file(segment_path(&folder, 1)).unwrap();
        assert_eq!(replayed(&log, "c_1", after("d0"), 10).await, None);
        let (ids, more) = replayed(&log, "c_1", ReplayFrom::Since(SystemTime::UNIX_EPOCH), 10)
            .await
            .unwrap();
        assert!(!more);
        assert!(
            !ids.is_empty() && !ids.contains(&"d0".to_owned()),
            "{ids:?}"
        );
        assert_eq!(ids.last().map(String::as_str), Some("d5"));
        drop(log);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_replay_since_a_time_starts_with_what_was_written_then() {
        let dir = temp_dir();
        let log = EmbeddedLog::open(&dir).unwrap();
        log.append(vec![record("d1", "c_1", "2026-01-01T00:00:00.000Z")])
            .await
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let between = SystemTime::now();
        std::thread::sleep(std::time::Duration::from_millis(5));
        log.append(vec![record("d2", "c_1", "2026-01-01T00:00:00.000Z")])
            .await
            .unwrap();
        let since = |at| ReplayFrom::Since(at);
        assert_eq!(
            replayed(&log, "c_1", since(SystemTime::UNIX_EPOCH), 10).await,
            Some((vec!["d1".into(), "d2".into()], false))
        );
        assert_eq!(
            replayed(&log, "c_1", since(between), 10).await,
            Some((vec!["d2".into()], false))
        );
        assert_eq!(
            replayed(
                &log,
                "c_1",
                since(SystemTime::now() + std::time::Duration::from_secs(5)),
                10
            )
            .await,
            Some((vec![], false))
        );
        drop(log);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn records_of_versions_before_seq_are_replayed_in_their_order() {
        let dir = temp_dir();
        let folder = dir.join("notifications");
        std::fs::create_dir_all(&folder).unwrap();
        let old: String = ["d1", "d2"]
            .iter()
            .map(|delivery| {
                let line =
                    serde_json::to_string(&record(delivery, "c_1", "2026-01-01T00:00:00.000Z"))
                        .unwrap();
                line + "\n"
            })
            .collect();
        std::fs::write(segment_path(&folder, 1), old).unwrap();
        let log = EmbeddedLog::open(&dir).unwrap();
        log.append(vec![record("d3", "c_1", "2026-01-01T00:00:00.000Z")])
            .await
            .unwrap();
        assert_eq!(
            replayed(&log, "c_1", after("d1"), 10).await,
            Some((vec!["d2".into(), "d3".into()], false))
        );
        drop(log);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_callback_dropped_unanswered_hears_that_the_writer_stopped() {
        let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
        let callback = |heard: &Arc<std::sync::Mutex<Vec<String>>>| {
            let heard = Arc::clone(heard);
            Callback::new(Box::new(move |result: Result<(), StoreError>| {
                heard.lock().unwrap().push(format!("{result:?}"));
            }))
        };
        callback(&heard).call(Ok(()));
        drop(callback(&heard));
        let heard = heard.lock().unwrap();
        assert_eq!(heard.len(), 2, "each called once: {heard:?}");
        assert_eq!(heard[0], "Ok(())");
        assert!(heard[1].contains("the log writer stopped"), "{heard:?}");
    }

    #[test]
    fn a_second_writer_of_the_same_log_is_refused() {
        let dir = temp_dir();
        let first = EmbeddedLog::open(&dir).unwrap();
        let second = EmbeddedLog::open(&dir).unwrap_err();
        assert!(second.to_string().contains("in use"), "{second}");
        drop(first);
        EmbeddedLog::open(&dir).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
