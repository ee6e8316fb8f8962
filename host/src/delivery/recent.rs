//! Delivery ids this node pushed recently, so that a delivery reaching the
//! node twice is pushed to its connections once: a copy from another node
//! published again after a reconnect, or an event processed again after
//! the node that first processed it died (its delivery ids are derived
//! from the event id, so they repeat). The second happens a node lease
//! after the first at the latest, so ids are kept for longer than that,
//! within a bound on their number.

use std::collections::{HashSet, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Most ids remembered (about 25 MB): beyond it the oldest go early.
const MAX_REMEMBERED: usize = 262_144;

/// Delivery ids pushed on this node within the retention.
#[derive(Debug)]
pub struct RecentDeliveries {
    retention: Duration,
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    order: VecDeque<(Instant, String)>,
    ids: HashSet<String>,
}

impl RecentDeliveries {
    /// Ids kept for `retention` (at most 262,144 of them).
    pub fn new(retention: Duration) -> Self {
        Self {
            retention,
            seen: Mutex::new(Seen::default()),
        }
    }

    /// Remembers `id`; false if it was pushed already.
    pub fn first_time(&self, id: &str) -> bool {
        self.first_time_at(id, Instant::now(), MAX_REMEMBERED)
    }

    fn first_time_at(&self, id: &str, now: Instant, capacity: usize) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.ids.contains(id) {
            return false;
        }
        while let Some((at, _)) = seen.order.front() {
            if seen.order.len() < capacity && now.duration_since(*at) < self.retention {
                break;
            }
            if let Some((_, oldest)) = seen.order.pop_front() {
                seen.ids.remove(&oldest);
            }
        }
        seen.order.push_back((now, id.to_owned()));
        seen.ids.insert(id.to_owned());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_refused_within_the_retention_and_the_count_bound() {
        let recent = RecentDeliveries::new(Duration::from_secs(60));
        let start = Instant::now();
        assert!(recent.first_time_at("a", start, 4));
        assert!(!recent.first_time_at("a", start + Duration::from_secs(59), 4));
        for n in 0..4 {
            recent.first_time_at(&n.to_string(), start, 4);
        }
        assert!(
            recent.first_time_at("a", start, 4),
            "the oldest id made room"
        );
        assert!(recent.first_time_at("late", start + Duration::from_secs(61), 4));
        assert_eq!(
            recent.seen.lock().unwrap().ids.len(),
            1,
            "ids past the retention are forgotten"
        );
    }
}
