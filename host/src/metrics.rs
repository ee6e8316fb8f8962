//! Counters and the plugin latency histogram, rendered in the Prometheus
//! text format for `GET /metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::plugin::{LoadedPlugin, PluginSet};

/// Upper bounds (seconds) of the plugin dispatch latency buckets.
const DISPATCH_BUCKETS: [f64; 14] = [
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
    0.01, 0.025, 0.05, 0.1,
];

/// The host's counters; all lock-free.
#[derive(Debug, Default)]
pub struct Metrics {
    connections_opened: AtomicU64,
    connections_closed: AtomicU64,
    frames_in: AtomicU64,
    frames_out: AtomicU64,
    frames_rate_limited: AtomicU64,
    deliveries: AtomicU64,
    emitted: AtomicU64,
    emitted_dropped: AtomicU64,
    cluster_sent: AtomicU64,
    cluster_received: AtomicU64,
    cluster_dropped: AtomicU64,
    presence_received: AtomicU64,
    presence_sent: AtomicU64,
    cluster_unroutable: AtomicU64,
    connections_over_cap: AtomicU64,
    connection_panics: AtomicU64,
    cluster_rejected: AtomicU64,
    resumes: AtomicU64,
    replayed: AtomicU64,
    dispatch_buckets: [AtomicU64; DISPATCH_BUCKETS.len()],
    dispatch_count: AtomicU64,
    dispatch_nanos: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Metrics {
    /// A connection was accepted.
    pub fn connection_opened(&self) {
        add(&self.connections_opened, 1);
    }

    /// A connection ended.
    pub fn connection_closed(&self) {
        add(&self.connections_closed, 1);
    }

    /// A connection beyond `SOCKETS_MAX_CONNECTIONS` was answered `503`.
    pub fn connection_refused_over_cap(&self) {
        add(&self.connections_over_cap, 1);
    }

    /// A connection's task panicked (it was closed with 1011 and
    /// unregistered all the same).
    pub fn connection_panicked(&self) {
        add(&self.connection_panics, 1);
    }

    /// A cluster message without a valid cluster key signature was ignored.
    pub fn cluster_message_rejected(&self) {
        add(&self.cluster_rejected, 1);
    }

    /// A client frame arrived.
    pub fn frame_in(&self) {
        add(&self.frames_in, 1);
    }

    /// `count` frames were written to a client.
    pub fn frames_out(&self, count: u64) {
        add(&self.frames_out, count);
    }

    /// A `resume` sent `pushes` again.
    pub fn resumed(&self, pushes: usize) {
        add(&self.resumes, 1);
        add(&self.replayed, pushes as u64);
    }

    /// A client frame was refused by the rate limiter.
    pub fn frame_rate_limited(&self) {
        add(&self.frames_rate_limited, 1);
    }

    /// A plugin emitted an event.
    pub fn emitted(&self) {
        add(&self.emitted, 1);
    }

    /// An emitted event was dropped (too deep a chain, or the queue full).
    pub fn emitted_dropped(&self) {
        add(&self.emitted_dropped, 1);
    }

    /// Pushes queued to connections.
    pub fn add_deliveries(&self, n: usize) {
        add(&self.deliveries, n as u64);
    }

    /// The broker confirmed delivery copies for other nodes.
    pub fn cluster_copies_sent(&self, n: usize) {
        add(&self.cluster_sent, n as u64);
    }

    /// A delivery copy from another node arrived.
    pub fn cluster_copy_received(&self) {
        add(&self.cluster_received, 1);
    }

    /// A delivery copy for other nodes was dropped: the broker stayed
    /// unreachable while the outbox was full.
    pub fn cluster_copies_dropped(&self, n: usize) {
        add(&self.cluster_dropped, n as u64);
    }

    /// A presence announcement from another node arrived.
    pub fn presence_announcement_received(&self) {
        add(&self.presence_received, 1);
    }

    /// Copies for another node came back: its queue was gone.
    pub fn cluster_copies_unroutable(&self, n: usize) {
        add(&self.cluster_unroutable, n as u64);
    }

    /// This node published a presence message (announcement, heartbeat,
    /// table, answer or request).
    pub fn presence_message_sent(&self) {
        add(&self.presence_sent, 1);
    }

    /// One event's plugin dispatch took `elapsed`.
    pub fn observe_dispatch(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Some(bucket) = DISPATCH_BUCKETS.iter().position(|bound| seconds <= *bound) {
            add(&self.dispatch_buckets[bucket], 1);
        }
        add(&self.dispatch_count, 1);
        add(
            &self.dispatch_nanos,
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
        );
    }

    /// Renders every metric; `live_connections` and `plugins` are read at
    /// scrape time.
    pub fn render(
        &self,
        live_connections: usize,
        plugins: &PluginSet,
        load_failures: u64,
    ) -> String {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        metric(
            "sockets_connections",
            "gauge",
            "Live WebSocket connections on this node.",
            live_connections as u64,
        );
        metric(
            "sockets_connections_opened_total",
            "counter",
            "WebSocket connections accepted.",
            read(&self.connections_opened),
        );
        metric(
            "sockets_connections_closed_total",
            "counter",
            "WebSocket connections ended.",
            read(&self.connections_closed),
        );
        metric(
            "sockets_connections_over_capacity_total",
            "counter",
            "Connections answered 503 because SOCKETS_MAX_CONNECTIONS were open.",
            read(&self.connections_over_cap),
        );
        metric(
            "sockets_connection_panics_total",
            "counter",
            "Connection tasks that panicked (closed with 1011).",
            read(&self.connection_panics),
        );
        metric(
            "sockets_cluster_messages_rejected_total",
            "counter",
            "Cluster messages ignored: no valid signature with the cluster key, or malformed.",
            read(&self.cluster_rejected),
        );
        metric(
            "sockets_frames_in_total",
            "counter",
            "Client frames received.",
            read(&self.frames_in),
        );
        metric(
            "sockets_frames_out_total",
            "counter",
            "Frames written to clients.",
            read(&self.frames_out),
        );
        metric(
            "sockets_frames_rate_limited_total",
            "counter",
            "Client frames refused by the rate limiter.",
            read(&self.frames_rate_limited),
        );
        metric(
            "sockets_deliveries_total",
            "counter",
            "Pushes queued to connections.",
            read(&self.deliveries),
        );
        metric(
            "sockets_plugin_emitted_total",
            "counter",
            "Events emitted by plugins.",
            read(&self.emitted),
        );
        metric(
            "sockets_plugin_emitted_dropped_total",
            "counter",
            "Events emitted by plugins and dropped: too deep a chain, or the router's queue full.",
            read(&self.emitted_dropped),
        );
        metric(
            "sockets_resumes_total",
            "counter",
            "`resume` events answered with a replay.",
            read(&self.resumes),
        );
        metric(
            "sockets_replayed_pushes_total",
            "counter",
            "Pushes sent again from the notification log by `resume`.",
            read(&self.replayed),
        );
        metric(
            "sockets_cluster_copies_sent_total",
            "counter",
            "Delivery copies for other nodes confirmed by the broker.",
            read(&self.cluster_sent),
        );
        metric(
            "sockets_cluster_copies_received_total",
            "counter",
            "Delivery copies received from other nodes.",
            read(&self.cluster_received),
        );
        metric(
            "sockets_cluster_copies_dropped_total",
            "counter",
            "Delivery copies for other nodes dropped while the broker was unreachable.",
            read(&self.cluster_dropped),
        );
        metric(
            "sockets_cluster_presence_received_total",
            "counter",
            "Presence messages (announcements, heartbeats, tables) received from other nodes.",
            read(&self.presence_received),
        );
        metric(
            "sockets_cluster_copies_unroutable_total",
            "counter",
            "Delivery copies for another node that came back unroutable: that node's queue was gone.",
            read(&self.cluster_unroutable),
        );
        metric(
            "sockets_cluster_presence_sent_total",
            "counter",
            "Presence messages this node published: announcements, heartbeats, tables, answers.",
            read(&self.presence_sent),
        );
        metric(
            "sockets_plugin_load_failures_total",
            "counter",
            "Plugin versions that failed to load (the previous version kept serving).",
            load_failures,
        );

        let _ = writeln!(
            out,
            "# HELP sockets_plugin_dispatch_seconds Time to decide one event (all subscribed plugins).\n# TYPE sockets_plugin_dispatch_seconds histogram"
        );
        let mut cumulative = 0;
        for (bound, bucket) in DISPATCH_BUCKETS.iter().zip(&self.dispatch_buckets) {
            cumulative += read(bucket);
            let _ = writeln!(
                out,
                "sockets_plugin_dispatch_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = read(&self.dispatch_count);
        let _ = writeln!(
            out,
            "sockets_plugin_dispatch_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "sockets_plugin_dispatch_seconds_sum {}\nsockets_plugin_dispatch_seconds_count {count}",
            read(&self.dispatch_nanos) as f64 / 1e9
        );

        per_plugin(
            &mut out,
            plugins,
            ("sockets_plugin_calls_total", "counter"),
            "Calls to a plugin's handle.",
            |plugin| plugin.stats().snapshot().calls,
        );
        let _ = writeln!(
            out,
            "# HELP sockets_plugin_failures_total Failed plugin calls, by kind.\n# TYPE sockets_plugin_failures_total counter"
        );
        for plugin in plugins.iter() {
            let stats = plugin.stats().snapshot();
            for (kind, value) in [
                ("refused", stats.refused),
                ("timeout", stats.timeouts),
                ("out_of_memory", stats.out_of_memory),
                ("trap", stats.traps),
                ("invalid_outcome", stats.invalid_outcomes),
            ] {
                let _ = writeln!(
                    out,
                    "sockets_plugin_failures_total{{plugin=\"{}\",kind=\"{kind}\"}} {value}",
                    plugin.label()
                );
            }
        }
        per_plugin(
            &mut out,
            plugins,
            ("sockets_plugin_log_lines_dropped_total", "counter"),
            "Plugin log lines dropped by the per-plugin log rate limit.",
            LoadedPlugin::log_lines_dropped,
        );
        per_plugin(
            &mut out,
            plugins,
            ("sockets_plugin_off_workers", "gauge"),
            "1 while a plugin's calls run off the async workers (slower): for good if it printed, for a minute after slow calls.",
            |plugin| u8::from(plugin.runs_off_workers()),
        );
        per_plugin(
            &mut out,
            plugins,
            ("sockets_plugin_busy_seconds_total", "counter"),
            "Time spent inside a plugin.",
            |plugin| plugin.stats().snapshot().busy_nanos as f64 / 1e9,
        );
        out
    }
}

/// Writes a metric with one series per plugin version.
fn per_plugin<V: std::fmt::Display>(
    out: &mut String,
    plugins: &PluginSet,
    (name, kind): (&str, &str),
    help: &str,
    value: impl Fn(&LoadedPlugin) -> V,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for plugin in plugins.iter() {
        let _ = writeln!(
            out,
            "{name}{{plugin=\"{}\"}} {}",
            plugin.label(),
            value(plugin)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histogram_is_cumulative() {
        let metrics = Metrics::default();
        metrics.observe_dispatch(Duration::from_micros(3));
        metrics.observe_dispatch(Duration::from_millis(2));
        let text = metrics.render(0, &PluginSet::default(), 0);
        assert!(
            text.contains("sockets_plugin_dispatch_seconds_bucket{le=\"0.000005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("sockets_plugin_dispatch_seconds_bucket{le=\"0.0025\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("sockets_plugin_dispatch_seconds_count 2\n"),
            "{text}"
        );
    }
}
