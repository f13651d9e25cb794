//! What Linux says about a process: resident memory and CPU time, from `/proc`.

use anyhow::Context as _;

/// `USER_HZ`: the unit of utime and stime in `/proc/<pid>/stat` on every Linux target.
const TICKS_PER_SECOND: f64 = 100.0;

/// Resident set size in KiB (`VmRSS` of `/proc/<pid>/status`); `pid` may be `self`.
pub(super) fn rss_kib(pid: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_rss(&status).with_context(|| format!("no VmRSS in {path}"))
}

fn parse_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User plus system CPU time of all the process's threads, in seconds.
pub(super) fn cpu_seconds(pid: &str) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let ticks = parse_cpu_ticks(&stat).with_context(|| format!("cannot parse {path}"))?;
    Ok(ticks as f64 / TICKS_PER_SECOND)
}

/// Fields 14 (utime) and 15 (stime); the command name (field 2) may hold spaces and
/// parentheses, so count from the last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The sum over several processes (nginx: master and worker).
pub(super) fn rss_kib_sum(pids: &[u32]) -> anyhow::Result<u64> {
    pids.iter().map(|p| rss_kib(&p.to_string())).sum()
}

pub(super) fn cpu_seconds_sum(pids: &[u32]) -> anyhow::Result<f64> {
    pids.iter().map(|p| cpu_seconds(&p.to_string())).sum()
}

/// CPU time of this process and of the servers, read together at the edges of a window.
#[derive(Debug, Clone, Copy)]
pub(super) struct CpuSample {
    at: std::time::Instant,
    own: f64,
    server: Option<f64>,
}

impl CpuSample {
    pub(super) fn take(pids: &[u32]) -> Self {
        let server = if pids.is_empty() { None } else { cpu_seconds_sum(pids).ok() };
        Self { at: std::time::Instant::now(), own: cpu_seconds("self").unwrap_or(0.0), server }
    }

    /// (load generator CPU %, server CPU seconds) between `self` and `later`.
    pub(super) fn until(&self, later: &CpuSample) -> (f64, Option<f64>) {
        let wall = later.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let server = match (self.server, later.server) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        (100.0 * (later.own - self.own) / wall, server)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stat_with_an_awkward_name() {
        let stat = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 36 0 0 20 0 1 0 5 1000 10";
        assert_eq!(parse_cpu_ticks(stat), Some(286));
    }

    #[test]
    fn reads_rss() {
        assert_eq!(parse_rss("Name:\tx\nVmRSS:\t   12345 kB\nVmSwap:\t0 kB\n"), Some(12345));
        assert!(rss_kib("self").expect("own status") > 0);
        assert!(cpu_seconds("self").expect("own stat") >= 0.0);
    }
}
