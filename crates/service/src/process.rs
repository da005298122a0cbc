//! The standard `process_*` metric families, read on each scrape from the kernel.
//!
//! Names and meanings follow the Prometheus client libraries' process collector, so existing
//! dashboards work: `process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds` and
//! `process_start_time_seconds`. A value the platform cannot provide is left out of the scrape
//! rather than reported as zero.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// A snapshot of the process figures; `None` where the platform does not provide one.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessStats {
    /// User plus system CPU time, in seconds.
    pub cpu_seconds: Option<f64>,
    /// Resident set size, in bytes.
    pub resident_memory_bytes: Option<f64>,
    /// Virtual memory size, in bytes.
    pub virtual_memory_bytes: Option<f64>,
    /// Open file descriptors.
    pub open_fds: Option<f64>,
    /// The soft limit on open file descriptors.
    pub max_fds: Option<f64>,
    /// When the process started, in seconds since the Unix epoch.
    pub start_time_seconds: Option<f64>,
}

impl ProcessStats {
    /// Reads the figures of the current process.
    pub fn read() -> Self {
        use nix::sys::resource::{Resource, UsageWho, getrlimit, getrusage};
        let cpu_seconds = getrusage(UsageWho::RUSAGE_SELF).ok().map(|usage| {
            let seconds = |t: nix::sys::time::TimeVal| {
                t.tv_sec() as f64 + f64::from(i32::try_from(t.tv_usec()).unwrap_or(0)) / 1e6
            };
            seconds(usage.user_time()) + seconds(usage.system_time())
        });
        let max_fds = getrlimit(Resource::RLIMIT_NOFILE)
            .ok()
            .map(|(soft, _)| soft as f64);
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|dir| dir.count() as f64);
        let stat = proc_stat();
        Self {
            cpu_seconds,
            resident_memory_bytes: stat.map(|s| s.resident_bytes),
            virtual_memory_bytes: stat.map(|s| s.virtual_bytes),
            open_fds,
            max_fds,
            start_time_seconds: stat.and_then(|s| s.start_time_seconds),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct ProcStat {
    resident_bytes: f64,
    virtual_bytes: f64,
    start_time_seconds: Option<f64>,
}

/// `/proc/self/stat` (Linux): fields after the parenthesised command name.
fn proc_stat() -> Option<ProcStat> {
    use nix::unistd::{SysconfVar, sysconf};
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after_name = &text[text.rfind(')')? + 2..];
    // after_name starts at field 3 (state); fields are numbered from 1 in proc(5).
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
    let ticks = sysconf(SysconfVar::CLK_TCK).ok().flatten()? as f64;
    let page = sysconf(SysconfVar::PAGE_SIZE).ok().flatten()? as f64;
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|stat| {
        stat.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|b| b.trim().parse::<f64>().ok())
    });
    Some(ProcStat {
        resident_bytes: field(24)? * page,
        virtual_bytes: field(23)?,
        start_time_seconds: boot
            .zip(field(22))
            .map(|(boot, start)| boot + start / ticks),
    })
}

/// Encodes [`ProcessStats::read`] on every scrape.
#[derive(Debug, Default)]
pub struct ProcessCollector;

impl ProcessCollector {
    /// A collector for the current process.
    pub fn new() -> Self {
        Self
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = ProcessStats::read();
        if let Some(cpu) = stats.cpu_seconds {
            let metric = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(cpu).encode(metric)?;
        }
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                stats.resident_memory_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                stats.virtual_memory_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                stats.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                stats.max_fds,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                stats.start_time_seconds,
            ),
        ] {
            if let Some(value) = value {
                let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                ConstGauge::new(value).encode(metric)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_current_process_reports_plausible_figures() {
        let stats = ProcessStats::read();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = stats.start_time_seconds.unwrap();
        assert!(
            start > 1.0e9 && start <= now + 1.0,
            "start {start}, now {now}"
        );
        assert!(stats.resident_memory_bytes.unwrap() > 0.0);
        assert!(stats.virtual_memory_bytes.unwrap() >= stats.resident_memory_bytes.unwrap());
        let open = stats.open_fds.unwrap();
        assert!(open >= 3.0 && open <= stats.max_fds.unwrap(), "{stats:?}");
        assert!(stats.cpu_seconds.unwrap() >= 0.0);
    }
}
