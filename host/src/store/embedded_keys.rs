//! Published idempotency keys for the embedded default: in memory, and in a
//! journal of JSON lines (`<data dir>/published-keys.jsonl`) that is read
//! back at start, so a key published before a restart (or a crash) is still
//! a duplicate after it. One node owns the folder (the log's lock), so a
//! claim never has to wait for another process.
//!
//! A writer thread appends every completion waiting in one write and one
//! `fdatasync`, like the notification log. The journal is rewritten with
//! the live keys alone when it opens and whenever expired lines outnumber
//! them.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::{Accepted, Claim, PublishedKeys, StoreError};

const FILE_NAME: &str = "published-keys.jsonl";
/// The journal is not rewritten below this many lines.
const MIN_COMPACTION_LINES: usize = 10_000;

/// One line of the journal.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Line {
    key: String,
    #[serde(flatten)]
    accepted: Accepted,
    /// Milliseconds since the Unix epoch of the completion.
    at: u64,
}

struct Completion {
    line: Line,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// Published keys in the data folder.
pub struct EmbeddedKeys {
    retention: Duration,
    live: Arc<Mutex<HashMap<String, (Accepted, u64)>>>,
    completions: Mutex<Option<mpsc::Sender<Completion>>>,
}

impl std::fmt::Debug for EmbeddedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedKeys")
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

fn unavailable(err: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("published keys: {err}"))
}

impl EmbeddedKeys {
    /// Opens (or creates) the journal in `data_dir`, keeping the keys
    /// completed within `retention`.
    pub fn open(data_dir: &Path, retention: Duration) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(unavailable)?;
        let path = data_dir.join(FILE_NAME);
        let retention_millis = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
        let cutoff = now_millis().saturating_sub(retention_millis);
        let live = read(&path, cutoff).map_err(unavailable)?;
        let file = rewrite(&path, &live).map_err(unavailable)?;
        let live = Arc::new(Mutex::new(live));
        let (completions, queue) = mpsc::channel();
        let writer = Writer {
            path,
            file,
            lines: 0,
            live: Arc::clone(&live),
            retention_millis,
        };
        thread::Builder::new()
            .name("published-keys".into())
            .spawn(move || writer.run(&queue))
            .map_err(unavailable)?;
        Ok(Self {
            retention,
            live,
            completions: Mutex::new(Some(completions)),
        })
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Accepted, u64)>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl PublishedKeys for EmbeddedKeys {
    async fn claim(&self, key: &str) -> Result<Claim, StoreError> {
        let retention_millis = u64::try_from(self.retention.as_millis()).unwrap_or(u64::MAX);
        let cutoff = now_millis().saturating_sub(retention_millis);
        Ok(match self.live().get(key) {
            Some((accepted, at)) if *at >= cutoff => Claim::Done(accepted.clone()),
            _ => Claim::Ours,
        })
    }

    async fn complete(&self, key: &str, accepted: &Accepted) -> Result<(), StoreError> {
        let (done, committed) = oneshot::channel();
        let completion = Completion {
            line: Line {
                key: key.to_owned(),
                accepted: accepted.clone(),
                at: now_millis(),
            },
            done,
        };
        self.completions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .ok_or_else(|| unavailable("closing"))?
            .send(completion)
            .map_err(|_| unavailable("the writer stopped"))?;
        committed
            .await
            .map_err(|_| unavailable("the writer stopped"))?
    }

    async fn release(&self, _key: &str) {
        // Claims are not written down: one node owns the folder.
    }
}

impl Drop for EmbeddedKeys {
    fn drop(&mut self) {
        // The writer finishes what is queued and ends.
        self.completions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}

/// The journal's keys completed at or after `cutoff` (the newest line of a
/// key wins). A torn last line (a crash mid-write) is ignored: its
/// completion was never confirmed.
fn read(path: &Path, cutoff: u64) -> io::Result<HashMap<String, (Accepted, u64)>> {
    let mut live = HashMap::new();
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(live),
        Err(err) => return Err(err),
    };
    // Bytes, not text: a line torn inside a character is skipped like any
    // other torn line.
    for bytes in BufReader::new(file).split(b'\n') {
        let Ok(line) = serde_json::from_slice::<Line>(&bytes?) else {
            continue;
        };
        if line.at >= cutoff {
            live.insert(line.key, (line.accepted, line.at));
        }
    }
    Ok(live)
}

/// Replaces the journal with the `live` keys (through a renamed temporary
/// file, so a crash leaves the old or the new one) and opens it to append.
fn rewrite(path: &Path, live: &HashMap<String, (Accepted, u64)>) -> io::Result<File> {
    let temporary = path.with_extension("jsonl.tmp");
    let mut file = File::create(&temporary)?;
    let mut buffer = Vec::new();
    for (key, (accepted, at)) in live {
        write_line(&mut buffer, key, accepted, *at)?;
    }
    file.write_all(&buffer)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    OpenOptions::new().append(true).open(path)
}

fn write_line(buffer: &mut Vec<u8>, key: &str, accepted: &Accepted, at: u64) -> io::Result<()> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Borrowed<'a> {
        key: &'a str,
        #[serde(flatten)]
        accepted: &'a Accepted,
        at: u64,
    }
    serde_json::to_writer(&mut *buffer, &Borrowed { key, accepted, at })?;
    buffer.push(b'\n');
    Ok(())
}

struct Writer {
    path: PathBuf,
    file: File,
    /// Lines appended since the journal was last rewritten.
    lines: usize,
    live: Arc<Mutex<HashMap<String, (Accepted, u64)>>>,
    retention_millis: u64,
}

impl Writer {
    /// Commits everything waiting in one write and one sync, then makes the
    /// keys visible to claims and answers each completion.
    fn run(mut self, queue: &mpsc::Receiver<Completion>) {
        let mut buffer = Vec::new();
        while let Ok(first) = queue.recv() {
            let mut batch = vec![first];
            batch.extend(queue.try_iter().take(4095));
            buffer.clear();
            let written = batch
                .iter()
                .try_for_each(|c| write_line(&mut buffer, &c.line.key, &c.line.accepted, c.line.at))
                .and_then(|()| self.append(&buffer))
                .map_err(unavailable);
            if let Err(err) = &written {
                tracing::error!("published keys not written: {err}");
            }
            let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            for completion in batch {
                if written.is_ok() {
                    self.lines += 1;
                    live.insert(
                        completion.line.key,
                        (completion.line.accepted, completion.line.at),
                    );
                }
                let _ = completion.done.send(written.clone());
            }
            let compact = self.lines >= MIN_COMPACTION_LINES.max(2 * live.len());
            if !compact {
                continue;
            }
            // Rewritten from a copy: claims keep reading the keys meanwhile.
            let cutoff = now_millis().saturating_sub(self.retention_millis);
            live.retain(|_, (_, at)| *at >= cutoff);
            let snapshot = live.clone();
            drop(live);
            match rewrite(&self.path, &snapshot) {
                Ok(file) => {
                    self.file = file;
                    self.lines = snapshot.len();
                }
                Err(err) => tracing::warn!("published keys not compacted: {err}"),
            }
        }
    }

    /// Appends `bytes` and syncs them; on failure, cuts the file back to
    /// where it was, so that the next batch does not start on a torn line.
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        let end = self.file.seek(io::SeekFrom::End(0))?;
        let appended = self
            .file
            .write_all(bytes)
            .and_then(|()| self.file.sync_data());
        if appended.is_err() {
            let _ = self.file.set_len(end);
        }
        appended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        std::env::temp_dir().join(format!("published-keys-{}", crate::protocol::new_id()))
    }

    fn accepted(n: usize) -> Accepted {
        Accepted {
            event_id: format!("e{n}"),
            recipients: n,
        }
    }

    #[tokio::test]
    async fn a_completed_key_is_a_duplicate_after_reopening() {
        let dir = temp_dir();
        let keys = EmbeddedKeys::open(&dir, Duration::from_secs(600)).unwrap();
        assert_eq!(keys.claim("k").await.unwrap(), Claim::Ours);
        keys.complete("k", &accepted(3)).await.unwrap();
        assert_eq!(keys.claim("k").await.unwrap(), Claim::Done(accepted(3)));
        drop(keys);

        let reopened = EmbeddedKeys::open(&dir, Duration::from_secs(600)).unwrap();
        assert_eq!(reopened.claim("k").await.unwrap(), Claim::Done(accepted(3)));
        assert_eq!(reopened.claim("other").await.unwrap(), Claim::Ours);
    }

    #[tokio::test]
    async fn expired_keys_are_forgotten_and_a_torn_line_ignored() {
        let dir = temp_dir();
        let old = now_millis() - 700_000;
        let mut text = Vec::new();
        write_line(&mut text, "old", &accepted(1), old).unwrap();
        write_line(&mut text, "new", &accepted(2), now_millis()).unwrap();
        text.extend_from_slice(br#"{"key":"torn","eventId":"#);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(FILE_NAME), &text).unwrap();

        let keys = EmbeddedKeys::open(&dir, Duration::from_secs(600)).unwrap();
        assert_eq!(keys.claim("old").await.unwrap(), Claim::Ours);
        assert_eq!(keys.claim("torn").await.unwrap(), Claim::Ours);
        assert_eq!(keys.claim("new").await.unwrap(), Claim::Done(accepted(2)));
        let rewritten = std::fs::read_to_string(dir.join(FILE_NAME)).unwrap();
        assert_eq!(rewritten.lines().count(), 1, "{rewritten}");
    }
}
