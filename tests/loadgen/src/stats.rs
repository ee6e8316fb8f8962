//! Latency samples and their summary.

use serde_json::{Value, json};

/// Latencies in microseconds.
#[derive(Debug, Default)]
pub struct Latencies(Vec<u64>);

impl Latencies {
    pub fn push(&mut self, micros: u64) {
        self.0.push(micros);
    }

    pub fn extend(&mut self, other: Latencies) {
        self.0.extend(other.0);
    }

    /// `{"p50_ms", "p99_ms", "max_ms"}`, or nulls without samples.
    pub fn summary(mut self) -> Value {
        if self.0.is_empty() {
            return json!({"p50_ms": null, "p99_ms": null, "max_ms": null});
        }
        self.0.sort_unstable();
        let at = |q: usize| self.0[(self.0.len() * q / 100).min(self.0.len() - 1)];
        let ms = |micros: u64| micros as f64 / 1000.0;
        json!({
            "p50_ms": ms(at(50)),
            "p99_ms": ms(at(99)),
            "max_ms": ms(*self.0.last().expect("not empty")),
        })
    }
}
