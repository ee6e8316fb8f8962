//! Per-plugin-version counters, updated lock-free on every call.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use super::error::CallError;

/// Counters of one loaded plugin version.
#[derive(Debug, Default)]
pub struct PluginStats {
    calls: AtomicU64,
    refused: AtomicU64,
    timeouts: AtomicU64,
    out_of_memory: AtomicU64,
    traps: AtomicU64,
    invalid_outcomes: AtomicU64,
    busy_nanos: AtomicU64,
}

/// A point-in-time copy of [`PluginStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsSnapshot {
    /// Calls to `handle`.
    pub calls: u64,
    /// Events the plugin refused (bad request, forbidden, …).
    pub refused: u64,
    /// Calls interrupted at the deadline.
    pub timeouts: u64,
    /// Calls that hit the memory limit.
    pub out_of_memory: u64,
    /// Calls that trapped.
    pub traps: u64,
    /// Calls whose outcome was rejected.
    pub invalid_outcomes: u64,
    /// Total time spent in calls, in nanoseconds.
    pub busy_nanos: u64,
}

impl StatsSnapshot {
    /// Calls that failed through the plugin's fault (not refusals).
    pub fn malfunctions(&self) -> u64 {
        self.timeouts + self.out_of_memory + self.traps + self.invalid_outcomes
    }
}

impl PluginStats {
    /// Records one call, its duration and how it ended.
    pub(crate) fn record(&self, elapsed: Duration, result: Result<(), &CallError>) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.busy_nanos.fetch_add(nanos, Ordering::Relaxed);
        let counter = match result {
            Ok(()) => return,
            Err(CallError::Refused { .. }) => &self.refused,
            Err(CallError::Timeout(_)) => &self.timeouts,
            Err(CallError::OutOfMemory(_)) => &self.out_of_memory,
            Err(CallError::Trapped(_)) => &self.traps,
            Err(CallError::InvalidOutcome(_)) => &self.invalid_outcomes,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        StatsSnapshot {
            calls: read(&self.calls),
            refused: read(&self.refused),
            timeouts: read(&self.timeouts),
            out_of_memory: read(&self.out_of_memory),
            traps: read(&self.traps),
            invalid_outcomes: read(&self.invalid_outcomes),
            busy_nanos: read(&self.busy_nanos),
        }
    }
}
