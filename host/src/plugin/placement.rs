//! Where a plugin call runs: on the async worker thread that handles the
//! event, unless the plugin version showed that it must not.
//!
//! A warm call takes a microsecond or two. Handing the worker's other tasks
//! to a fresh thread around every call (`block_in_place`) cost ~30% of chat
//! throughput (docs/benchmarks.md). Two kinds of plugin version leave the
//! workers:
//! - for good, one that uses WASI's blocking I/O (printing, e.g. its panic
//!   message): wasmtime-wasi runs it by blocking on the ambient tokio
//!   runtime, which a worker may not do. Tokio panics, the panic unwinds
//!   out of the guest, and the abandoned call is made again off the worker,
//!   on a fresh instance (an unwound instance is never reused).
//! - for `SLOW_OFF_FOR`, one whose calls were slow: a busy worker stalls
//!   every connection it serves. Slow means CPU time of the calling thread,
//!   not wall time: on a loaded machine a thread can be preempted in the
//!   middle of a quick call. Reading that clock is a syscall, which around
//!   every call cost 14% of the host's CPU in the chat benchmark; the wall
//!   clock is read from memory, and a call never uses more CPU than wall
//!   time. So the CPU clock is read only while a version is watched: for
//!   the next `WATCHED_CALLS` calls after one took longer than `SLOW_CALL`
//!   of wall time. Its first slow call stays on the worker; the
//!   `SLOW_CALLS_TO_LEAVE`th call measured slow in that window moves it.
//!   The watch ends because on a busy core every version is eventually
//!   preempted mid-call: a watch for good made every call of every plugin
//!   read the clock again within seconds.
//!
//! The thread's CPU clock also counts work that is not the plugin's
//! (interrupts served meanwhile, on kernels without IRQ time accounting
//! like the benchmark VM's; a recycled instance's fresh page faults). One
//! slow call moved the chat plugin (~2 us a call) for good in two of ~40
//! chat benchmark runs, one of which then cost ~2.7x the server CPU per
//! message; three in one watch still moved it in two of eight runs of a
//! build with mimalloc as the host's allocator (cause not pinned down; few
//! page faults). Hence the return after `SLOW_OFF_FOR`: a quick plugin
//! misjudged is slower for a minute, not until it is reloaded, and a slow
//! one is moved again a few calls after its return.

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cpu_time::ThreadTime;
use tokio::runtime::{Handle, RuntimeFlavor};

/// A call that used more CPU than this moves the plugin version off the
/// workers.
const SLOW_CALL: Duration = Duration::from_millis(2);

/// Calls whose CPU time is measured after one took longer than `SLOW_CALL`
/// of wall time: enough to catch a plugin that is often slow, few enough
/// that an occasional preemption costs next to nothing.
const WATCHED_CALLS: u32 = 1_000;

/// Calls measured slow in one watch that move the version off the workers:
/// a one-off (an interrupt, a fresh instance's page faults) does not.
const SLOW_CALLS_TO_LEAVE: u32 = 3;

/// How long a version moved off the workers for slow calls stays off
/// before its calls are made on the workers again. A slow plugin is moved
/// again a few calls later: it stalls the worker for those few calls a
/// minute.
const SLOW_OFF_FOR: Duration = Duration::from_secs(60);

/// The instant [`Placement::off_until`] counts from.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// What tokio says when something blocks on it from one of its workers.
const BLOCKED_ON_WORKER: &str = "Cannot start a runtime from within a runtime";

/// One plugin version's choice of thread.
#[derive(Debug)]
pub(crate) struct Placement {
    /// For good: the version uses WASI's blocking I/O.
    blocks_on_runtime: AtomicBool,
    /// Until when calls run off the workers because they were slow, in
    /// nanoseconds since `EPOCH` (0: they do not).
    off_until: AtomicU64,
    /// How long slow calls keep the version off the workers.
    slow_off_for: Duration,
    /// Calls left that have their CPU time measured (a call took longer
    /// than `SLOW_CALL` of wall time shortly before).
    watch_left: AtomicU32,
    /// Calls measured slow since the watch began.
    slow_in_watch: AtomicU32,
}

impl Default for Placement {
    fn default() -> Self {
        Self::with_slow_off_for(SLOW_OFF_FOR)
    }
}

impl Placement {
    fn with_slow_off_for(slow_off_for: Duration) -> Self {
        Self {
            blocks_on_runtime: AtomicBool::new(false),
            off_until: AtomicU64::new(0),
            slow_off_for,
            watch_left: AtomicU32::new(0),
            slow_in_watch: AtomicU32::new(0),
        }
    }

    /// Runs `call` (twice, if the first attempt had to be abandoned);
    /// returns its result and the wall time it took.
    pub(crate) fn run<R>(&self, plugin: &str, call: impl Fn() -> R) -> (R, Duration) {
        let started = Instant::now();
        let timed = |result| (result, started.elapsed());
        // Outside a multi-threaded runtime there is no worker to protect
        // (and none to hand over).
        if !on_worker() {
            return timed(call());
        }
        if self.stays_off_workers(plugin, started) {
            return timed(tokio::task::block_in_place(call));
        }
        let cpu_started = self
            .watch_this_call()
            .then(ThreadTime::try_now)
            .and_then(Result::ok);
        match panic::catch_unwind(AssertUnwindSafe(&call)) {
            Ok(result) => {
                let took = started.elapsed();
                if took > SLOW_CALL {
                    self.judge_slow_call(plugin, took, cpu_started);
                }
                (result, took)
            }
            Err(panic) if blocked_on_worker(&*panic) => {
                self.leave_workers_for_good(plugin);
                // The worker hands its tasks to another thread first.
                timed(tokio::task::block_in_place(call))
            }
            Err(panic) => panic::resume_unwind(panic),
        }
    }

    /// After a call that took longer than `SLOW_CALL` of wall time: opens a
    /// watch if none was on (the call's CPU time was not measured), or
    /// counts it if it also used that much CPU, and leaves the workers at
    /// `SLOW_CALLS_TO_LEAVE`. Either way the watch runs its full length
    /// from here.
    fn judge_slow_call(&self, plugin: &str, took: Duration, cpu_started: Option<ThreadTime>) {
        match cpu_started.map(|started| started.try_elapsed()) {
            None => self.slow_in_watch.store(0, Ordering::Relaxed),
            Some(Ok(used)) if used > SLOW_CALL => {
                let slow = self.slow_in_watch.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::debug!(%plugin, ?used, ?took, slow, "plugin call used more than 2 ms of CPU");
                if slow >= SLOW_CALLS_TO_LEAVE {
                    self.leave_workers_for_a_while(plugin, used, took);
                }
            }
            Some(_) => {}
        }
        self.watch_left.store(WATCHED_CALLS, Ordering::Relaxed);
    }

    /// Whether this call has its CPU time measured; counts it against the
    /// watch. One load while unwatched, the common case.
    fn watch_this_call(&self) -> bool {
        self.watch_left.load(Ordering::Relaxed) > 0
            && self
                .watch_left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                    left.checked_sub(1)
                })
                .is_ok()
    }

    /// Whether calls run off the async workers now.
    pub(crate) fn is_off_worker(&self) -> bool {
        self.blocks_on_runtime.load(Ordering::Relaxed)
            || since_epoch(Instant::now()) < self.off_until.load(Ordering::Relaxed)
    }

    /// Whether a call starting at `now` runs off the workers; the first
    /// call after a stay off for slow calls ends it.
    fn stays_off_workers(&self, plugin: &str, now: Instant) -> bool {
        if self.blocks_on_runtime.load(Ordering::Relaxed) {
            return true;
        }
        let until = self.off_until.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if since_epoch(now) < until {
            return true;
        }
        if self
            .off_until
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            // Judged afresh: the calls that moved it do not count again.
            self.watch_left.store(0, Ordering::Relaxed);
            self.slow_in_watch.store(0, Ordering::Relaxed);
            tracing::info!(%plugin, "plugin calls run on the async workers again");
        }
        false
    }

    /// Whether calls have their CPU time measured.
    #[cfg(test)]
    fn is_watched(&self) -> bool {
        self.watch_left.load(Ordering::Relaxed) > 0
    }

    fn leave_workers_for_good(&self, plugin: &str) {
        if !self.blocks_on_runtime.swap(true, Ordering::Relaxed) {
            tracing::warn!(%plugin, "plugin calls now run off the async workers (slower): it uses WASI's blocking I/O (it prints?)");
        }
    }

    /// `used` and `took`: the CPU and wall time of the call that tipped it,
    /// for the log.
    fn leave_workers_for_a_while(&self, plugin: &str, used: Duration, took: Duration) {
        let until = since_epoch(Instant::now()).saturating_add(nanos(self.slow_off_for));
        if self.off_until.swap(until, Ordering::Relaxed) == 0 {
            let off_for = self.slow_off_for;
            tracing::warn!(%plugin, "plugin calls now run off the async workers (slower) for {off_for:?}: {SLOW_CALLS_TO_LEAVE} calls used more than 2 ms of CPU (the last {used:?} in {took:?})");
        }
    }
}

/// `at` in nanoseconds since `EPOCH`, at least 1 (0 means "not off").
fn since_epoch(at: Instant) -> u64 {
    nanos(at.saturating_duration_since(*EPOCH)).max(1)
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Whether this thread is a worker of a multi-threaded runtime (or a
/// blocking thread of one: there, a direct call is fine too).
fn on_worker() -> bool {
    Handle::try_current().is_ok_and(|handle| handle.runtime_flavor() == RuntimeFlavor::MultiThread)
}

fn blocked_on_worker(panic: &(dyn Any + Send)) -> bool {
    let message = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str));
    message.is_some_and(|message| message.contains(BLOCKED_ON_WORKER))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_call_that_blocks_on_the_runtime_is_made_again_off_the_worker() {
        let placement = Placement::default();
        let attempts = AtomicUsize::new(0);
        let (answer, _) = placement.run("printer", || {
            attempts.fetch_add(1, Ordering::Relaxed);
            // What wasmtime-wasi does for a guest's print.
            Handle::current().block_on(async { 42 })
        });
        assert_eq!(answer, 42);
        assert_eq!(attempts.load(Ordering::Relaxed), 2);
        assert!(placement.is_off_worker());
        // From now on, at once off the worker.
        assert_eq!(
            placement
                .run("printer", || Handle::current().block_on(async { 7 }))
                .0,
            7
        );
        assert_eq!(attempts.load(Ordering::Relaxed), 2);
    }

    /// Keeps the calling thread's CPU busy for twice `SLOW_CALL` of CPU
    /// time (not wall time: on a loaded machine the thread may be
    /// preempted meanwhile).
    fn compute() {
        let started = ThreadTime::now();
        while started.elapsed() < SLOW_CALL * 2 {
            std::hint::black_box(());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn fast_calls_stay_on_the_worker_unwatched() {
        let placement = Placement::default();
        for _ in 0..3 {
            assert_eq!(placement.run("quick", || 1).0, 1);
        }
        assert!(!placement.is_watched());
        assert!(!placement.is_off_worker());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn waiting_is_watched_but_not_slow() {
        let placement = Placement::default();
        for _ in 0..3 {
            let ((), took) = placement.run("sleepy", || std::thread::sleep(SLOW_CALL * 2));
            assert!(took >= SLOW_CALL * 2, "{took:?}");
        }
        assert!(placement.is_watched());
        assert!(!placement.is_off_worker());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_plugin_whose_calls_are_measured_slow_again_and_again_leaves() {
        let placement = Placement::default();
        placement.run("busy", compute);
        assert!(placement.is_watched());
        placement.run("busy", || 1);
        for _ in 1..SLOW_CALLS_TO_LEAVE {
            placement.run("busy", compute);
            assert!(!placement.is_off_worker());
        }
        placement.run("busy", compute);
        assert!(placement.is_off_worker());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_plugin_moved_for_slow_calls_returns_to_the_workers_after_a_while() {
        let off_for = Duration::from_millis(50);
        let placement = Placement::with_slow_off_for(off_for);
        let move_off = || {
            // The first opens the watch, the others are measured slow.
            for _ in 0..=SLOW_CALLS_TO_LEAVE {
                assert!(!placement.is_off_worker());
                placement.run("busy", compute);
            }
            assert!(placement.is_off_worker());
        };
        move_off();
        assert!(placement.stays_off_workers("busy", Instant::now()));
        std::thread::sleep(off_for);
        assert!(!placement.is_off_worker());
        assert!(!placement.stays_off_workers("busy", Instant::now()));
        // Back on the workers it is judged afresh, and moved again.
        move_off();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_plugin_that_blocks_on_the_runtime_stays_off_for_good() {
        let placement = Placement::with_slow_off_for(Duration::ZERO);
        placement.run("printer", || Handle::current().block_on(async {}));
        std::thread::sleep(Duration::from_millis(1));
        assert!(placement.is_off_worker());
        assert!(placement.stays_off_workers("printer", Instant::now()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn slow_calls_in_different_watches_do_not_add_up() {
        let placement = Placement::default();
        for _ in 0..3 {
            // Opens a watch, then is measured slow once less than it
            // takes to leave.
            placement.run("sometimes slow", compute);
            for _ in 1..SLOW_CALLS_TO_LEAVE {
                placement.run("sometimes slow", compute);
            }
            while placement.is_watched() {
                placement.run("sometimes slow", || 1);
            }
        }
        assert!(!placement.is_off_worker());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_watch_ends_after_its_calls() {
        let placement = Placement::default();
        placement.run("preempted", || std::thread::sleep(SLOW_CALL * 2));
        // Counted directly: a quick call preempted on a busy machine would
        // open a new watch.
        for _ in 0..WATCHED_CALLS {
            assert!(placement.watch_this_call());
        }
        assert!(!placement.watch_this_call());
        assert!(!placement.is_watched());
        assert!(!placement.is_off_worker());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    #[should_panic(expected = "a host bug")]
    async fn other_panics_are_not_swallowed() {
        Placement::default().run("any", || panic!("a host bug"));
    }
}
