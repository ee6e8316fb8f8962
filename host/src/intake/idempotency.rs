//! Idempotency keys of published events (the HTTP `id`, the AMQP
//! `message_id`: one namespace): a repeated key causes no second delivery
//! and gets the first call's answer, on any node that shares the store and
//! after a restart ([`PublishedKeys`]). Concurrent calls of one key on this
//! node run one publication; the others wait for its answer.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use crate::backoff::Backoff;
use crate::store::{Accepted, Claim, PublishedKeys, StoreError};

/// How long a publication waits for another node's publication of the same
/// key before giving up with `unavailable` (the caller retries).
const ELSEWHERE_WAIT: Duration = Duration::from_secs(5);
/// Asking again whether the other node finished: 20 ms doubling to 500 ms.
const ELSEWHERE_POLL: Backoff =
    Backoff::new(Duration::from_millis(20), Duration::from_millis(500), 10);

struct Entry {
    created: Instant,
    /// The answer, and whether it came from an earlier publication.
    outcome: OnceCell<(Accepted, bool)>,
}

/// Published keys: the store's, with this node's recent ones in front.
pub struct Idempotency {
    retention: Duration,
    store: Arc<dyn PublishedKeys>,
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
    /// Keys kept in `store`; this node remembers its own answers for
    /// `retention` (PROTOCOL: at least 10 minutes).
    pub fn new(store: Arc<dyn PublishedKeys>, retention: Duration) -> Self {
        Self {
            retention,
            store,
            entries: Mutex::new(HashMap::new()),
            last_sweep: Mutex::new(Instant::now()),
        }
    }

    /// Runs `publish` unless `key` was published before, here or on another
    /// node (or is being published right now: then this waits for it).
    /// Returns the outcome and whether it is a duplicate. A failed
    /// publication is not remembered, so it can be retried.
    pub async fn run<E, Fut>(
        &self,
        key: Option<&str>,
        publish: impl FnOnce() -> Fut,
    ) -> Result<(Accepted, bool), E>
    where
        Fut: Future<Output = Result<Accepted, E>>,
        E: From<StoreError>,
    {
        let Some(key) = key else {
            return publish().await.map(|accepted| (accepted, false));
        };
        let entry = self.entry(key);
        let mut first = false;
        let (accepted, earlier) = entry
            .outcome
            .get_or_try_init(|| {
                first = true;
                self.publish_once(key, publish)
            })
            .await?;
        Ok((accepted.clone(), *earlier || !first))
    }

    /// Claims the key in the store, publishes, and records the answer.
    async fn publish_once<E, Fut>(
        &self,
        key: &str,
        publish: impl FnOnce() -> Fut,
    ) -> Result<(Accepted, bool), E>
    where
        Fut: Future<Output = Result<Accepted, E>>,
        E: From<StoreError>,
    {
        let started = Instant::now();
        let mut poll = ELSEWHERE_POLL;
        loop {
            match self.store.claim(key).await? {
                Claim::Done(accepted) => return Ok((accepted, true)),
                Claim::Ours => break,
                Claim::Elsewhere if started.elapsed() < ELSEWHERE_WAIT => {
                    tokio::time::sleep(poll.next_wait()).await;
                }
                Claim::Elsewhere => {
                    return Err(StoreError::Unavailable(
                        "another node is publishing this id; retry".into(),
                    )
                    .into());
                }
            }
        }
        // The claim is renewed until the answer is recorded: a publication
        // that waits (for the log, for the broker's confirms, for its
        // answer's write) is not taken for a dead node's.
        let publication = async {
            match publish().await {
                Ok(accepted) => {
                    self.store.complete(key, &accepted).await?;
                    Ok(accepted)
                }
                Err(err) => {
                    self.store.release(key).await;
                    Err(err)
                }
            }
        };
        tokio::pin!(publication);
        let published = match self.store.renew_every() {
            None => publication.await,
            Some(every) => {
                let mut renewals =
                    tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                loop {
                    tokio::select! {
                        published = &mut publication => break published,
                        _ = renewals.tick() => self.store.renew(key).await,
                    }
                }
            }
        };
        published.map(|accepted| (accepted, false))
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
    use crate::store::EmbeddedKeys;

    fn idempotency() -> Idempotency {
        let dir = std::env::temp_dir().join(format!("idempotency-{}", crate::protocol::new_id()));
        let keys = EmbeddedKeys::open(&dir, Duration::from_secs(600)).unwrap();
        Idempotency::new(Arc::new(keys), Duration::from_secs(600))
    }

    fn accepted(n: usize) -> Accepted {
        Accepted {
            event_id: format!("e{n}"),
            recipients: n,
        }
    }

    #[tokio::test]
    async fn a_repeated_key_runs_once_and_answers_like_the_first() {
        let seen = idempotency();
        let runs = AtomicUsize::new(0);
        let publish = || async {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            Ok::<_, StoreError>(accepted(n))
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
        let seen = idempotency();
        assert_eq!(
            seen.run(Some("k"), || async {
                Err::<Accepted, _>(StoreError::Unavailable("down".into()))
            })
            .await
            .map_err(|err| err.to_string()),
            Err("store unavailable: down".to_owned())
        );
        assert_eq!(
            seen.run(Some("k"), || async { Ok::<_, StoreError>(accepted(1)) })
                .await,
            Ok((accepted(1), false))
        );
    }
}
