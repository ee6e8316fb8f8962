//! Remembers the outcome of published events by idempotency key (the HTTP
//! `id`, the AMQP `message_id`: one namespace), so a repeated key causes no
//! second delivery and gets the first call's answer.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

/// What the first publication of a key produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The event id.
    pub event_id: String,
    /// Distinct users addressed.
    pub recipients: usize,
}

struct Entry {
    created: Instant,
    outcome: OnceCell<Accepted>,
}

/// Idempotency keys seen within the retention window.
pub struct Idempotency {
    retention: Duration,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    last_sweep: Mutex<Instant>,
}

impl std::fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency")
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl Idempotency {
    /// Keys are remembered for `retention` (PROTOCOL: at least 10 minutes).
    pub fn new(retention: Duration) -> Self {
        Self {
            retention,
            entries: Mutex::new(HashMap::new()),
            last_sweep: Mutex::new(Instant::now()),
        }
    }

    /// Runs `publish` unless `key` was published before (or is being
    /// published right now, in which case this waits for it). Returns the
    /// outcome and whether it is a duplicate. A failed publication is not
    /// remembered, so it can be retried.
    pub async fn run<E, Fut>(
        &self,
        key: Option<&str>,
        publish: impl FnOnce() -> Fut,
    ) -> Result<(Accepted, bool), E>
    where
        Fut: Future<Output = Result<Accepted, E>>,
    {
        let Some(key) = key else {
            return publish().await.map(|accepted| (accepted, false));
        };
        let entry = self.entry(key);
        let mut first = false;
        let accepted = entry
            .outcome
            .get_or_try_init(|| {
                first = true;
                publish()
            })
            .await?;
        Ok((accepted.clone(), !first))
    }

    /// Whether `key` has been seen within the retention (its first call may
    /// still be running).
    pub fn contains(&self, key: &str) -> bool {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .get(key)
            .is_some_and(|entry| entry.created.elapsed() < self.retention)
    }

    fn entry(&self, key: &str) -> Arc<Entry> {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        {
            let mut last_sweep = self
                .last_sweep
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if now.duration_since(*last_sweep) >= Duration::from_secs(30) {
                *last_sweep = now;
                entries.retain(|_, entry| now.duration_since(entry.created) < self.retention);
            }
        }
        let fresh = |entry: &Arc<Entry>| now.duration_since(entry.created) < self.retention;
        match entries.get(key) {
            Some(entry) if fresh(entry) => Arc::clone(entry),
            _ => {
                let entry = Arc::new(Entry {
                    created: now,
                    outcome: OnceCell::new(),
                });
                entries.insert(key.to_owned(), Arc::clone(&entry));
                entry
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn accepted(n: usize) -> Accepted {
        Accepted {
            event_id: format!("e{n}"),
            recipients: n,
        }
    }

    #[tokio::test]
    async fn a_repeated_key_runs_once_and_answers_like_the_first() {
        let seen = Idempotency::new(Duration::from_secs(600));
        let runs = AtomicUsize::new(0);
        let publish = || async {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            Ok::<_, ()>(accepted(n))
        };
        assert_eq!(seen.run(Some("k"), publish).await, Ok((accepted(1), false)));
        assert_eq!(seen.run(Some("k"), publish).await, Ok((accepted(1), true)));
        assert_eq!(
            seen.run(Some("other"), publish).await,
            Ok((accepted(2), false))
        );
        assert_eq!(seen.run(None, publish).await, Ok((accepted(3), false)));
    }

    #[tokio::test]
    async fn a_failure_is_not_remembered() {
        let seen = Idempotency::new(Duration::from_secs(600));
        assert_eq!(
            seen.run(Some("k"), || async { Err::<Accepted, _>("down") })
                .await,
            Err("down")
        );
        assert_eq!(
            seen.run(Some("k"), || async { Ok::<_, &str>(accepted(1)) })
                .await,
            Ok((accepted(1), false))
        );
    }
}
