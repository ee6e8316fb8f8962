//! How long the embedded log waits from one sync to the next.
//!
//! A sync costs about the same CPU whatever it carries (with its write,
//! ~120–260 µs of the log thread's CPU on this project's VM, more than half
//! of it in the kernel): syncing as soon as the previous one ended made it
//! 2,900 syncs/s and a quarter of the host's core under load (tests/loadgen/HISTORY.md,
//! "Profile-driven fixes"). But every ack waits for its sync, so waiting
//! longer between syncs saves CPU and adds latency: worth it only when the
//! CPU is needed. So the wait is [`SHORT`] while the process has cores to
//! spare and grows to [`LONG`] as it gets busy; a lone append after a quiet
//! spell does not wait at all. Measured (docs/benchmarks.md, "Why not 5×"): a fixed
//! 1 ms lifted a latency-bound chat run by ~40% but cost a CPU-bound one
//! 5–9%; 2 ms is the reverse.

use std::time::{Duration, Instant};

use cpu_time::ProcessTime;

/// The wait while the process has CPU to spare.
const SHORT: Duration = Duration::from_millis(1);
/// The wait once the process is busy.
const LONG: Duration = Duration::from_millis(2);
/// Share of the usable cores the process may use before the wait grows.
const SPARE_BELOW: f64 = 0.85;
/// Share of the usable cores from which the wait is [`LONG`].
const BUSY_FROM: f64 = 0.95;
/// How often the process's CPU use is read again.
const WINDOW: Duration = Duration::from_millis(20);

/// The sync interval, from the process's CPU use over the last window.
pub(super) struct SyncPace {
    /// Cores the process may run on (its affinity and CPU quota).
    cores: f64,
    window_started: Instant,
    /// `None` when the process's CPU clock cannot be read: then [`LONG`].
    cpu_at_window_start: Option<ProcessTime>,
    interval: Duration,
}

impl SyncPace {
    /// A pace for this process's usable cores.
    pub(super) fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Self::with_cores(cores as f64)
    }

    fn with_cores(cores: f64) -> Self {
        Self {
            cores,
            window_started: Instant::now(),
            cpu_at_window_start: ProcessTime::try_now().ok(),
            interval: LONG,
        }
    }

    /// The least time from the previous sync to the next one.
    pub(super) fn interval(&mut self) -> Duration {
        let now = Instant::now();
        let wall = now.duration_since(self.window_started);
        if wall >= WINDOW {
            let cpu_now = ProcessTime::try_now().ok();
            self.interval = match (self.cpu_at_window_start, cpu_now) {
                (Some(start), Some(end)) => {
                    let used = end.duration_since(start);
                    interval_for(used.as_secs_f64() / (wall.as_secs_f64() * self.cores))
                }
                _ => LONG,
            };
            self.window_started = now;
            self.cpu_at_window_start = cpu_now;
        }
        self.interval
    }
}

/// The wait for a process using `busy` of its usable cores: [`SHORT`] up
/// to [`SPARE_BELOW`], [`LONG`] from [`BUSY_FROM`], in proportion between.
fn interval_for(busy: f64) -> Duration {
    let grown = ((busy - SPARE_BELOW) / (BUSY_FROM - SPARE_BELOW)).clamp(0.0, 1.0);
    SHORT + (LONG - SHORT).mul_f64(grown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_grows_with_the_share_of_the_cores_in_use() {
        assert_eq!(interval_for(0.0), SHORT);
        assert_eq!(interval_for(SPARE_BELOW), SHORT);
        assert_eq!(interval_for(BUSY_FROM), LONG);
        assert_eq!(interval_for(3.0), LONG);
        let between = interval_for((SPARE_BELOW + BUSY_FROM) / 2.0);
        assert!(SHORT < between && between < LONG, "{between:?}");
        assert!(interval_for(0.88) < interval_for(0.92));
    }

    #[test]
    fn the_process_cpu_clock_sets_the_wait_once_a_window_has_passed() {
        // A sliver of a core: whatever this thread spends is "all of it".
        let mut busy = SyncPace::with_cores(1e-6);
        busy.interval = SHORT;
        // So many cores that whatever the tests run meanwhile is a sliver.
        let mut idle = SyncPace::with_cores(1e6);
        idle.interval = LONG;
        let spin_until = Instant::now() + WINDOW + Duration::from_millis(5);
        while Instant::now() < spin_until {
            std::hint::spin_loop();
        }
        assert_eq!(busy.interval(), LONG);
        assert_eq!(idle.interval(), SHORT);
    }
}
