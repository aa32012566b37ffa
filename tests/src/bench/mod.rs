//! Benchmarks: each measures keyward next to a baseline run in the same process, and prints
//! min, median and max over repeated runs with the ratio to the baseline.
//!
//! - [`provision`]: container create to running, and destroy to wiped, against `docker build` +
//!   `docker run` and `docker rm -f` + `docker rmi`.
//! - [`issuance`]: a rollout issuing and storing many signed generations, against the raw
//!   ed25519 signing rate.
//! - [`fanout`]: revocation fan-out to many long-polling agents, against a bare TLS long-poll
//!   server.
//! - [`scale`]: server memory per idle watcher, handshake rate, a reconnect storm.
//! - [`footprint`]: the idle agent's memory and CPU with containers under management.
//! - [`fleet`]: simulated agents and the bare TLS server the load benchmarks compare against.
//!
//! Sizes are parameters; `keyward-bench --smoke` runs each with tiny sizes (the test suite does,
//! so the benchmarks keep building and running).

pub mod fanout;
pub mod fleet;
pub mod footprint;
pub mod issuance;
pub mod provision;
pub mod scale;

use std::time::Duration;

/// Summary of a series of measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Smallest value.
    pub min: f64,
    /// Median.
    pub median: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Largest value.
    pub max: f64,
}

/// Summarizes `values` (at least one).
pub fn summarize(values: &[f64]) -> Summary {
    assert!(!values.is_empty(), "no measurements");
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank =
        |q: f64| sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
    let median = if sorted.len() % 2 == 1 {
        sorted[sorted.len() / 2]
    } else {
        (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2.0
    };
    Summary {
        min: sorted[0],
        median,
        p99: rank(0.99),
        max: sorted[sorted.len() - 1],
    }
}

/// Seconds as milliseconds for printing.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Prints a header for one benchmark.
pub fn header(title: &str) {
    println!();
    println!("## {title}");
    println!();
}

/// Prints one row comparing a measured series with its baseline series (same unit).
pub fn compare(name: &str, unit: &str, measured: &[f64], baseline: &[f64]) {
    let m = summarize(measured);
    let b = summarize(baseline);
    println!(
        "{name:<34} {unit:>4}  min {:>9.1}  median {:>9.1}  max {:>9.1}  | baseline min {:>9.1}  median {:>9.1}  max {:>9.1}  | median ratio {:.3}",
        m.min,
        m.median,
        m.max,
        b.min,
        b.median,
        b.max,
        m.median / b.median
    );
}

/// Prints one row of a series without a baseline (its baseline is printed on another row).
pub fn row(name: &str, unit: &str, measured: &[f64]) {
    let m = summarize(measured);
    println!(
        "{name:<34} {unit:>4}  min {:>9.1}  median {:>9.1}  p99 {:>9.1}  max {:>9.1}  (n={})",
        m.min,
        m.median,
        m.p99,
        m.max,
        measured.len()
    );
}

/// Resident memory of process `pid` in KiB (`VmRSS` in `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// CPU time (user + system) of process `pid` so far.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may contain spaces.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of /proc/PID/stat, 12 and 13 after the name.
    let total = ticks(11) + ticks(12);
    // USER_HZ, the unit of these fields, is 100 on Linux.
    let hz = 100;
    Duration::from_millis(total * 1000 / hz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_use_the_median_and_nearest_rank_percentiles() {
        let s = summarize(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!(
            s,
            Summary {
                min: 1.0,
                median: 3.0,
                p99: 5.0,
                max: 5.0
            }
        );
        let s = summarize(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(s.median, 2.5);
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(summarize(&hundred).p99, 99.0);
    }

    #[test]
    fn this_process_has_memory_and_cpu_time() {
        let pid = std::process::id();
        assert!(rss_kib(pid) > 0);
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(50) {}
        assert!(cpu_time(pid) > Duration::ZERO);
    }
}
