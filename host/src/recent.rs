//! Delivery ids this node pushed recently (bounded), so that a delivery
//! reaching the node twice is pushed to its connections once: a copy from
//! another node published again after a reconnect, or an event processed
//! again after the node that first processed it died (its delivery ids
//! are derived from the event id, so they repeat).

use std::collections::{HashSet, VecDeque};
use std::sync::{Mutex, PoisonError};

/// Delivery ids remembered.
const REMEMBERED: usize = 8_192;

/// The most recent [`REMEMBERED`] delivery ids pushed on this node.
#[derive(Debug, Default)]
pub struct RecentDeliveries {
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    order: VecDeque<String>,
    ids: HashSet<String>,
}

impl RecentDeliveries {
    /// Remembers `id`; false if it was pushed already.
    pub fn first_time(&self, id: &str) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.ids.contains(id) {
            return false;
        }
        if seen.order.len() == REMEMBERED
            && let Some(oldest) = seen.order.pop_front()
        {
            seen.ids.remove(&oldest);
        }
        seen.order.push_back(id.to_owned());
        seen.ids.insert(id.to_owned());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_bounded_and_repeats_refused() {
        let recent = RecentDeliveries::default();
        assert!(recent.first_time("a"));
        assert!(!recent.first_time("a"));
        for n in 0..REMEMBERED {
            recent.first_time(&n.to_string());
        }
        assert_eq!(recent.seen.lock().unwrap().ids.len(), REMEMBERED);
        assert!(recent.first_time("a"), "the oldest id was forgotten");
    }
}
