//! What the server process costs (and the load generator itself), read from
//! `/proc/<pid>` (Linux): resident memory and the CPU time of all its
//! threads, in total (user and kernel apart) and by thread name.

use std::collections::BTreeMap;
use std::time::Duration;

/// `/proc` counts CPU time in clock ticks of 1/100 s (`USER_HZ`, fixed at 100
/// for user space on Linux whatever the kernel's tick rate).
const TICKS_PER_SECOND: u64 = 100;

/// The resident set of a process, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for {pid}"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("bad VmRSS line"))?
        .parse()?)
}

/// CPU time a process has used, split as the kernel counts it: in its own
/// code and libraries (user) and in system calls and interrupts on its
/// behalf (kernel).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTime {
    pub user: Duration,
    pub kernel: Duration,
}

impl CpuTime {
    pub fn total(self) -> Duration {
        self.user + self.kernel
    }

    /// What was spent since `before`.
    pub fn since(self, before: Self) -> Self {
        Self {
            user: self.user.saturating_sub(before.user),
            kernel: self.kernel.saturating_sub(before.kernel),
        }
    }
}

/// CPU time the process has used so far (all threads).
pub fn cpu_time(pid: u32) -> anyhow::Result<CpuTime> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_cpu_time(&stat).ok_or_else(|| anyhow::anyhow!("bad /proc/{pid}/stat: {stat}"))
}

/// CPU time so far of the process's live threads, summed by thread name
/// (`tokio-rt-worker`, `notification-log`, Node's `node`, …; the kernel keeps
/// the first 15 bytes of a name). Threads that ended are not counted.
pub fn cpu_time_by_thread(pid: u32) -> anyhow::Result<BTreeMap<String, Duration>> {
    let mut by_name = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        // A thread may end between the listing and the read.
        let Ok(stat) = std::fs::read_to_string(task?.path().join("stat")) else {
            continue;
        };
        if let (Some(name), Some(cpu)) = (thread_name(&stat), parse_cpu_time(&stat)) {
            *by_name.entry(name.to_owned()).or_default() += cpu.total();
        }
    }
    Ok(by_name)
}

/// Field 2 of a stat line: the name between the first `(` and the last `)`.
fn thread_name(stat: &str) -> Option<&str> {
    stat.get(stat.find('(')? + 1..stat.rfind(')')?)
}

/// Fields 14 and 15 (`utime`, `stime`) of a `/proc/<pid>/stat` line. The
/// command name (field 2) may hold spaces and parentheses, so fields are
/// counted after its closing parenthesis, which is the line's last one.
fn parse_cpu_time(stat: &str) -> Option<CpuTime> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let mut next_ticks = || -> Option<Duration> {
        let ticks: u64 = fields.next()?.parse().ok()?;
        Some(Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND))
    };
    Some(CpuTime {
        user: next_ticks()?,
        kernel: next_ticks()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_counts_fields_after_the_command_name() {
        let stat = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 1200 0 0 0 \
                    250 75 0 0 20 0 3 0 100 1000000 500 18446744073709551615";
        let cpu = parse_cpu_time(stat).unwrap();
        assert_eq!(cpu.user, Duration::from_millis(2_500));
        assert_eq!(cpu.kernel, Duration::from_millis(750));
        assert_eq!(cpu.total(), Duration::from_millis(3_250));
        assert_eq!(parse_cpu_time("garbage"), None);
        assert_eq!(thread_name(stat), Some("tokio (rt) x"));
    }

    #[test]
    fn reads_this_process() {
        assert!(rss_kib(std::process::id()).unwrap() > 0);
        let spent = cpu_time(std::process::id()).unwrap();
        // Spin until this thread has had 50 ms of CPU, not 50 ms of wall
        // time: on a loaded machine the thread may wait for a core.
        let this_thread = || {
            let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
            parse_cpu_time(&stat).unwrap().total()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while this_thread() < Duration::from_millis(50) {
            assert!(std::time::Instant::now() < deadline, "no CPU in 30 s");
        }
        assert!(cpu_time(std::process::id()).unwrap().total() > spent.total());
        let threads = cpu_time_by_thread(std::process::id()).unwrap();
        assert!(threads.values().sum::<Duration>() >= Duration::from_millis(50));
    }
}
