//! Where a server's CPU went, from a `perf record` of it: the samples of
//! `perf report` (tab-separated `overhead,sample,comm,dso,sym` rows, see
//! `scripts/profile.sh`) summed by thread, by kind of code, and for the
//! WASM routing, as shares of all samples. This is what the README's
//! profile figures were once read from by hand.

use std::collections::BTreeMap;
use std::io::BufRead;

use serde_json::{Value, json};

/// How many of the costliest symbols the summary lists.
const TOP_SYMBOLS: usize = 15;

/// What a sample's code is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// The kernel, on the process's behalf (system calls, interrupts).
    Kernel,
    /// Plugin code that wasmtime compiled (perf's `[JIT] tid N` objects).
    Plugin,
    /// Wasmtime's own functions in the host binary: the host's side of
    /// every plugin call (lifting, lowering, entering the guest).
    Wasmtime,
    /// The rest of the host binary.
    Host,
    /// The C library (malloc, free, memmove) and libm.
    Libc,
    /// The vDSO (clock reads without a system call).
    Vdso,
    Other,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Kernel => "kernel",
            Kind::Plugin => "plugin_code",
            Kind::Wasmtime => "wasmtime",
            Kind::Host => "host",
            Kind::Libc => "libc",
            Kind::Vdso => "vdso",
            Kind::Other => "other",
        }
    }

    /// `host_binary` is the file name perf gives the server's executable.
    fn of(dso: &str, symbol: &str, host_binary: &str) -> Kind {
        if dso == "[kernel.kallsyms]" {
            Kind::Kernel
        } else if dso.starts_with("[JIT]") {
            Kind::Plugin
        } else if dso == host_binary {
            if symbol.contains("wasmtime") {
                Kind::Wasmtime
            } else {
                Kind::Host
            }
        } else if dso.starts_with("libc.so") || dso.starts_with("libm.so") {
            Kind::Libc
        } else if dso == "[vdso]" {
            Kind::Vdso
        } else {
            Kind::Other
        }
    }
}

/// One row of the report: the samples of one symbol in one thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub samples: u64,
    pub thread: String,
    pub dso: String,
    pub symbol: String,
}

/// Parses one row of `perf report --stdio -t '\t' -F
/// overhead,sample,comm,dso,sym`; headers, comments and blank lines give
/// `None`.
pub fn parse_row(line: &str) -> Option<Row> {
    if line.starts_with('#') {
        return None;
    }
    let mut fields = line.split('\t').map(str::trim);
    let _overhead = fields.next()?;
    let samples = fields.next()?.parse().ok()?;
    let thread = fields.next()?.to_owned();
    let dso = fields.next()?.to_owned();
    // "[k] name" for the kernel, "[.] name" for user space.
    let symbol = fields.next()?;
    let symbol = symbol
        .split_once("] ")
        .map_or(symbol, |(_, name)| name)
        .to_owned();
    Some(Row {
        samples,
        thread,
        dso,
        symbol,
    })
}

/// The summary of a report's rows, as one JSON object.
pub fn summarize(rows: &[Row], host_binary: &str) -> anyhow::Result<Value> {
    let total: u64 = rows.iter().map(|row| row.samples).sum();
    anyhow::ensure!(total > 0, "the report has no samples");
    let share = |samples: u64| (samples as f64 * 1000.0 / total as f64).round() / 10.0;

    let mut by_thread = BTreeMap::<&str, u64>::new();
    let mut by_kind = BTreeMap::<Kind, u64>::new();
    let mut kernel_by_thread = BTreeMap::<&str, u64>::new();
    for row in rows {
        let kind = Kind::of(&row.dso, &row.symbol, host_binary);
        *by_thread.entry(&row.thread).or_default() += row.samples;
        *by_kind.entry(kind).or_default() += row.samples;
        if kind == Kind::Kernel {
            *kernel_by_thread.entry(&row.thread).or_default() += row.samples;
        }
    }
    let shares_of = |counts: BTreeMap<&str, u64>| -> serde_json::Map<String, Value> {
        counts
            .into_iter()
            .map(|(name, samples)| (name.to_owned(), json!(share(samples))))
            .collect()
    };
    let kinds: serde_json::Map<String, Value> = by_kind
        .iter()
        .map(|(kind, &samples)| (kind.name().to_owned(), json!(share(samples))))
        .collect();
    let kind_samples = |kind| by_kind.get(&kind).copied().unwrap_or(0);

    let mut costliest: Vec<&Row> = rows.iter().collect();
    costliest.sort_by_key(|row| std::cmp::Reverse(row.samples));
    let top: Vec<Value> = costliest
        .iter()
        .take(TOP_SYMBOLS)
        .map(|row| {
            json!({
                "share_pct": share(row.samples),
                "thread": row.thread,
                "dso": row.dso,
                "symbol": row.symbol,
            })
        })
        .collect();

    Ok(json!({
        "run": "profile",
        "samples": total,
        "by_thread_pct": shares_of(by_thread),
        "by_kind_pct": kinds,
        "kernel_by_thread_pct": shares_of(kernel_by_thread),
        "wasm_routing_pct": share(kind_samples(Kind::Plugin) + kind_samples(Kind::Wasmtime)),
        "top": top,
    }))
}

/// Reads a report from `input` and summarizes it.
pub fn summarize_report(input: impl BufRead, host_binary: &str) -> anyhow::Result<Value> {
    let mut rows = Vec::new();
    for line in input.lines() {
        if let Some(row) = parse_row(&line?) {
            rows.push(row);
        }
    }
    summarize(&rows, host_binary)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The head of a real report (64-pair chat run, 2026-12-05), with its
    /// padding and tabs.
    const REPORT: &str = "\
# Samples: 3K of event 'cpu-clock:pppH'
#
# Overhead\t     Samples\tCommand        \tShared Object    \tSymbol
 11.23% \t 427        \ttokio-rt-worker\t[kernel.kallsyms]\t[k] _raw_spin_unlock_irqrestore
 3.00%  \t 114        \ttokio-rt-worker\tlibc.so.6        \t[.] malloc
 2.76%  \t 105        \ttokio-rt-worker\tsockets-host     \t[.] sockets_host::gateway::connection::Connection::read_loop::{{closure}}
 2.42%  \t 92         \tnotification-lo\t[kernel.kallsyms]\t[k] finish_task_switch.isra.0
 1.84%  \t 70         \ttokio-rt-worker\t[vdso]           \t[.] __vdso_clock_gettime
 1.16%  \t 44         \ttokio-rt-worker\tsockets-host     \t[.] wasmtime::runtime::component::instance::Instance::options_memory_raw
 0.32%  \t 12         \ttokio-rt-worker\t[JIT] tid 12646  \t[.] 0x00007f4f3e37e5fe
 0.29%  \t 11         \ttokio-rt-worker\t[JIT] tid 12646  \t[.] 0x00007f4f3e37e7a0

";

    #[test]
    fn rows_lose_their_padding_and_symbol_marks() {
        let row = parse_row(REPORT.lines().nth(3).unwrap()).unwrap();
        assert_eq!(
            row,
            Row {
                samples: 427,
                thread: "tokio-rt-worker".into(),
                dso: "[kernel.kallsyms]".into(),
                symbol: "_raw_spin_unlock_irqrestore".into(),
            }
        );
        assert_eq!(parse_row("# Overhead\tSamples"), None);
        assert_eq!(parse_row(""), None);
    }

    #[test]
    fn shares_add_up_by_thread_and_kind() {
        let summary = summarize_report(REPORT.as_bytes(), "sockets-host").unwrap();
        // 427 + 114 + 105 + 92 + 70 + 44 + 12 + 11 = 875 samples.
        assert_eq!(summary["samples"], 875);
        assert_eq!(summary["by_thread_pct"]["notification-lo"], 10.5); // 92
        assert_eq!(summary["by_thread_pct"]["tokio-rt-worker"], 89.5);
        assert_eq!(summary["by_kind_pct"]["kernel"], 59.3); // 519
        assert_eq!(summary["by_kind_pct"]["host"], 12.0); // 105
        assert_eq!(summary["by_kind_pct"]["wasmtime"], 5.0); // 44
        assert_eq!(summary["by_kind_pct"]["plugin_code"], 2.6); // 23
        assert_eq!(summary["by_kind_pct"]["libc"], 13.0); // 114
        assert_eq!(summary["by_kind_pct"]["vdso"], 8.0); // 70
        assert_eq!(summary["kernel_by_thread_pct"]["tokio-rt-worker"], 48.8); // 427
        assert_eq!(summary["wasm_routing_pct"], 7.7); // 44 + 23 = 67
        let top = summary["top"].as_array().unwrap();
        assert_eq!(top.len(), 8);
        assert_eq!(top[0]["symbol"], "_raw_spin_unlock_irqrestore");
        assert_eq!(top[0]["share_pct"], 48.8);
    }

    #[test]
    fn another_binary_name_is_not_the_host() {
        let summary = summarize_report(REPORT.as_bytes(), "other-binary").unwrap();
        assert_eq!(summary["by_kind_pct"]["other"], 17.0); // 105 + 44 = 149
        assert_eq!(summary["wasm_routing_pct"], 2.6);
    }

    #[test]
    fn an_empty_report_is_an_error() {
        assert!(summarize_report("# nothing\n".as_bytes(), "sockets-host").is_err());
    }
}
