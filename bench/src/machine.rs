//! What the machine was, and what a proxy process cost: CPU seconds and resident memory from `/proc`.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The machine a run happened on, saved in every result file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineInfo {
    /// `model name` from /proc/cpuinfo.
    pub cpu: String,
    /// Logical CPUs available to this process.
    pub cores: usize,
    /// MemTotal in MiB.
    pub memory_mib: u64,
    /// Kernel release.
    pub kernel: String,
    /// Whether the run was as root.
    pub root: bool,
    /// Unix time of the run.
    pub unix_time: u64,
    /// Version of the harness.
    pub harness_version: String,
    /// Whether this harness was built with optimizations.
    pub release_build: bool,
    /// /proc/loadavg when the report was written: other work on the machine skews every figure.
    pub load_average: String,
}

fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Reads the machine description.
pub fn machine_info() -> MachineInfo {
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let memory_mib = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .unwrap_or(0);
    MachineInfo {
        cpu,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_mib,
        kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
        root: is_root(),
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        harness_version: env!("CARGO_PKG_VERSION").to_owned(),
        release_build: !cfg!(debug_assertions),
        load_average: read("/proc/loadavg").trim().to_owned(),
    }
}

/// Whether the effective user is root (from /proc/self/status, no libc call).
pub fn is_root() -> bool {
    read("/proc/self/status")
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0")
}

/// CPU and memory of one process at one moment.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct ProcSample {
    /// User + system CPU seconds since the process started.
    pub cpu_s: f64,
    /// Resident set size now, KiB (VmRSS).
    pub rss_kib: u64,
    /// Peak resident set size, KiB (VmHWM), since start or the last [`reset_peak`].
    pub peak_rss_kib: u64,
}

/// Clock ticks per second of /proc/PID/stat; 100 on every Linux the harness targets.
const CLK_TCK: f64 = 100.0;

/// Samples `/proc/PID/stat` and `/proc/PID/status`. CPU time comes from the threads' scheduler
/// statistics (nanoseconds) where the kernel keeps them: `stat` counts in 10 ms ticks, too coarse for a
/// short scenario of a few thousand requests at tens of microseconds each.
pub fn sample(pid: u32) -> anyhow::Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let mut s = parse_sample(&stat, &status)?;
    if let Some(ns) = runtime_ns(pid) {
        s.cpu_s = ns as f64 / 1e9;
    }
    Ok(s)
}

/// Time on CPU of every live thread of `pid`, from `/proc/PID/task/*/schedstat` (its first field).
/// Threads that exited are missing, which the proxies measured here (fixed thread counts) do not do.
fn runtime_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        let line = std::fs::read_to_string(path).ok()?;
        total += line.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    (total > 0).then_some(total)
}

fn parse_sample(stat: &str, status: &str) -> anyhow::Result<ProcSample> {
    // The command name (field 2) may hold spaces and parentheses: fields are counted after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow::anyhow!("malformed /proc stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': field 3 (state) is index 0, so utime (14) is index 11 and stime (15) index 12.
    let tick = |i: usize| -> anyhow::Result<u64> {
        Ok(fields
            .get(i)
            .ok_or_else(|| anyhow::anyhow!("short /proc stat"))?
            .parse()?)
    };
    let cpu_s = (tick(11)? + tick(12)?) as f64 / CLK_TCK;
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(ProcSample {
        cpu_s,
        rss_kib: kib("VmRSS:"),
        peak_rss_kib: kib("VmHWM:"),
    })
}

/// Resets a process's peak RSS (VmHWM) to its current RSS, so a phase's peak can be read on its own.
pub fn reset_peak(pid: u32) {
    if let Err(e) = std::fs::write(format!("/proc/{pid}/clear_refs"), "5") {
        tracing::debug!(pid, error = %e, "cannot reset peak RSS");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_a_strange_command_name() {
        let stat = "1234 (ha proxy) (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 2 0 77 1000 200";
        let status = "Name:\thaproxy\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        let s = parse_sample(stat, status).expect("parses");
        assert_eq!(s.cpu_s, 3.0);
        assert_eq!(s.rss_kib, 10240);
        assert_eq!(s.peak_rss_kib, 20480);
    }

    #[test]
    fn samples_this_process() {
        let s = sample(std::process::id()).expect("own /proc entry");
        assert!(s.rss_kib > 0 && s.peak_rss_kib >= s.rss_kib);
    }

    #[test]
    fn cpu_time_resolves_well_below_a_clock_tick() {
        let pid = std::process::id();
        let before = sample(pid).expect("own /proc entry").cpu_s;
        // About a millisecond of work: a tenth of one 10 ms tick.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(1) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let after = sample(pid).expect("own /proc entry").cpu_s;
        assert!(after > before, "{before} -> {after}");
    }
}
