//! Exponential backoff for reconnecting and retrying: each wait doubles,
//! from a minimum up to a maximum, plus optional random jitter so that
//! nodes restarted together do not retry in step; a success resets it.

use std::time::Duration;

/// Waits between attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    jitter_ms: u16,
    current: Duration,
}

impl Backoff {
    /// Doubling from `min` to `max`, each wait plus up to `jitter_ms`.
    pub const fn new(min: Duration, max: Duration, jitter_ms: u16) -> Self {
        Self {
            min,
            max,
            jitter_ms,
            current: min,
        }
    }

    /// The wait before the next attempt; the one after will be longer.
    pub fn next_wait(&mut self) -> Duration {
        let jitter = match self.jitter_ms {
            0 => 0,
            bound => u64::from(uuid::Uuid::new_v4().as_u128() as u16 % bound),
        };
        let wait = self.current + Duration::from_millis(jitter);
        self.current = (self.current * 2).min(self.max);
        wait
    }

    /// After a success: the next outage starts again from the shortest wait.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_maximum_and_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350), 0);
        let waits: Vec<u128> = (0..4).map(|_| backoff.next_wait().as_millis()).collect();
        assert_eq!(waits, [100, 200, 350, 350]);
        backoff.reset();
        assert_eq!(backoff.next_wait(), Duration::from_millis(100));
    }

    #[test]
    fn jitter_stays_within_its_bound() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(1), 250);
        for _ in 0..100 {
            let wait = backoff.next_wait();
            assert!(wait >= Duration::from_secs(1) && wait < Duration::from_millis(1250));
        }
    }
}
