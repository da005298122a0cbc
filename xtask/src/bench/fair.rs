//! The fair-run harness every benchmark shares: the sides run in alternating order (A B A B …)
//! for a number of rounds, each side timed the same way, and the report gives the median of the
//! rounds with their min–max, the ratio of the medians, the goal, and the machine, settings and
//! command the figures come from.
//!
//! A bench supplies one closure that runs side `side` once and returns the measurement it timed
//! (after checking its own results); the harness decides the order and does the arithmetic.

#![cfg_attr(not(feature = "bench"), allow(dead_code))]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;

/// Rounds (pairs, for two sides) when `--pairs` is not given: the least the fair-run rules allow.
pub const DEFAULT_PAIRS: u64 = 3;

/// The machine the figures come from: cores, CPU model and load averages, read now.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    format!("{cores} cores ({model}), {}", load())
}

/// The load averages (1, 5, 15 minutes) as `load a b c`, or `load unknown`.
pub fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .map_or_else(|| "load unknown".to_owned(), |l| format!("load {l}"))
}

/// Prints the header every bench starts with: what runs, on what, with which settings, and the
/// command that reproduces it.
pub fn header(title: &str, command: &str, server: &str, settings: &str) {
    println!("{title}");
    println!("  command:  {command}");
    println!("  machine:  {}", machine());
    println!("  server:   {server}");
    println!("  settings: {settings}");
    println!();
}

/// `flag N` from `args` (a positive whole number), or `default`; `usage` is shown when the value
/// is not one.
pub fn flag(args: &[String], flag: &str, default: u64, usage: &str) -> anyhow::Result<u64> {
    match args.iter().position(|a| a == flag) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .and_then(|n| n.parse().ok())
            .filter(|&n| n > 0)
            .with_context(|| format!("{flag} takes a positive whole number\n{usage}")),
    }
}

/// The server settings every side of a bench runs under, as `name=value` pairs.
pub async fn server_settings(pool: &sqlx::PgPool) -> anyhow::Result<String> {
    let settings: Vec<(String, String)> = sqlx::query_as(
        // `current_setting` gives each value with its unit as the server reads it (`1GB`);
        // `setting` is a count of the unit (`131072` of `8kB`), so the two may not be joined.
        "SELECT name, current_setting(name) FROM pg_settings WHERE name IN \
         ('shared_buffers', 'work_mem', 'fsync', 'synchronous_commit', 'full_page_writes', \
          'max_parallel_workers_per_gather', 'jit', 'autovacuum') ORDER BY name",
    )
    .fetch_all(pool)
    .await?;
    Ok(settings
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join(" "))
}

/// This process's resident memory, in KiB (0 when unknown).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4)
}

/// Samples this process's resident memory every 2 ms until stopped, so that every side's run
/// is sampled the same way.
pub struct RssSampler {
    before: u64,
    peak: Arc<AtomicU64>,
    running: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    /// Starts sampling.
    pub fn start() -> Self {
        let before = rss_kib();
        let peak = Arc::new(AtomicU64::new(before));
        let running = Arc::new(AtomicBool::new(true));
        let thread = {
            let (peak, running) = (peak.clone(), running.clone());
            std::thread::spawn(move || {
                while running.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_kib(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        Self {
            before,
            peak,
            running,
            thread: Some(thread),
        }
    }

    /// Stops sampling; the peak growth over the start, in KiB.
    pub fn stop(mut self) -> u64 {
        self.running.store(false, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.peak
            .load(Ordering::Relaxed)
            .max(rss_kib())
            .saturating_sub(self.before)
    }
}

/// Median, minimum and maximum of a set of samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    /// The median (the mean of the middle two for an even count).
    pub median: f64,
    /// The smallest sample.
    pub min: f64,
    /// The largest sample.
    pub max: f64,
}

impl Summary {
    /// Summarises `samples`; `None` when there are none (or one is not a number).
    pub fn of(samples: &[f64]) -> Option<Self> {
        if samples.is_empty() || samples.iter().any(|s| s.is_nan()) {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: sorted[0],
            max: sorted[n - 1],
        })
    }
}

/// The `p` quantile (0..=1) of `sorted` by the nearest rank; `None` when it is empty.
pub fn quantile(sorted: &[Duration], p: f64) -> Option<Duration> {
    let last = sorted.len().checked_sub(1)?;
    let rank = ((last as f64) * p.clamp(0.0, 1.0)).round() as usize;
    sorted.get(rank.min(last)).copied()
}

/// The order in which `sides` sides run in round `round`: always A B (C …), so over the rounds
/// the sides strictly alternate, A B A B …
pub fn order(sides: usize, _round: usize) -> Vec<usize> {
    (0..sides).collect()
}

/// Runs `rounds` rounds of `names.len()` sides in alternating order and returns each side's
/// measurements, one per round, in the order of `names`. `run(side, round)` runs one side once
/// and returns what it measured; the first error stops the bench.
pub async fn alternate<F>(names: &[&str], rounds: u64, mut run: F) -> anyhow::Result<Vec<Vec<f64>>>
where
    F: AsyncFnMut(usize, usize) -> anyhow::Result<f64>,
{
    let mut samples = vec![Vec::new(); names.len()];
    for round in 0..usize::try_from(rounds)? {
        for side in order(names.len(), round) {
            let value = run(side, round).await?;
            print_round(round, names[side], value);
            samples[side].push(value);
        }
    }
    Ok(samples)
}

/// Prints one side's figure for round `round` (counted from 0), with the load at that moment.
pub fn print_round(round: usize, name: &str, value: f64) {
    println!(
        "  round {}: {:<28} {:>12}   ({})",
        round + 1,
        name,
        figure(value),
        load()
    );
}

/// `value` with enough decimals to compare the sides: three below 10 (a p99 of 0.4 ms against
/// 0.5 ms differs by a quarter, which one decimal would hide), one above.
pub fn figure(value: f64) -> String {
    if value.abs() < 10.0 {
        format!("{value:.3}")
    } else {
        format!("{value:.1}")
    }
}

/// Whether a bigger or a smaller figure is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    /// Throughput: more is better.
    Higher,
    /// Time or latency: less is better.
    Lower,
}

/// Prints each side's median and min–max in `unit`, then the first side against the best of the
/// others (ratio of the medians, and the ratio's range over the rounds taken pair by pair), and
/// the goal. Returns the ratio of the medians, oriented so that above 1 means the first side is
/// ahead.
pub fn report(
    names: &[&str],
    samples: &[Vec<f64>],
    unit: &str,
    better: Better,
    goal: &str,
) -> Option<f64> {
    println!();
    let summaries: Vec<Option<Summary>> = samples.iter().map(|s| Summary::of(s)).collect();
    for (name, summary) in names.iter().zip(&summaries) {
        match summary {
            Some(s) => println!(
                "  {name:<28} median {:>12} {unit}   min–max {}–{}",
                figure(s.median),
                figure(s.min),
                figure(s.max)
            ),
            None => println!("  {name:<28} no figures"),
        }
    }
    let first = summaries.first().copied().flatten()?;
    let ahead = |ours: f64, theirs: f64| match better {
        Better::Higher => ours / theirs,
        Better::Lower => theirs / ours,
    };
    let (best, best_summary) = summaries
        .iter()
        .enumerate()
        .skip(1)
        .filter_map(|(i, s)| s.map(|s| (i, s)))
        .min_by(|(_, a), (_, b)| {
            ahead(first.median, a.median).total_cmp(&ahead(first.median, b.median))
        })?;
    let ratio = ahead(first.median, best_summary.median);
    let per_round: Vec<f64> = samples[0]
        .iter()
        .zip(&samples[best])
        .map(|(&ours, &theirs)| ahead(ours, theirs))
        .collect();
    let spread = Summary::of(&per_round);
    println!(
        "\n  {} against the best peer ({}): {ratio:.2}x (median of medians; per round {})",
        names[0],
        names[best],
        spread.map_or_else(
            || "n/a".to_owned(),
            |s| format!("{:.2}x–{:.2}x", s.min, s.max)
        )
    );
    println!("  goal: {goal}");
    println!("  after the runs: {}", load());
    Some(ratio)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_takes_the_middle_sample_and_the_extremes() {
        assert_eq!(
            Summary::of(&[3.0, 1.0, 2.0]),
            Some(Summary {
                median: 2.0,
                min: 1.0,
                max: 3.0
            })
        );
        assert_eq!(
            Summary::of(&[4.0, 1.0, 2.0, 3.0]).map(|s| s.median),
            Some(2.5)
        );
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn sides_alternate_a_b_a_b() {
        let runs: Vec<usize> = (0..3).flat_map(|round| order(2, round)).collect();
        assert_eq!(runs, [0, 1, 0, 1, 0, 1]);
    }

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let sorted: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&sorted, 0.5), Some(Duration::from_millis(51)));
        assert_eq!(quantile(&sorted, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn figures_under_ten_keep_the_digits_that_tell_the_sides_apart() {
        assert_eq!(figure(0.4321), "0.432");
        assert_eq!(figure(0.5), "0.500");
        assert_eq!(figure(5.745), "5.745");
        assert_eq!(figure(18_606.04), "18606.0");
        assert_eq!(figure(10.0), "10.0");
    }

    #[test]
    fn the_ratio_favours_the_first_side_when_it_is_ahead() {
        let names = ["keel", "slow peer", "fast peer"];
        let samples = vec![vec![30.0, 32.0, 31.0], vec![10.0; 3], vec![20.0; 3]];
        let ratio = report(&names, &samples, "rows/s", Better::Higher, "none").unwrap();
        assert!((ratio - 31.0 / 20.0).abs() < 1e-9, "{ratio}");
        let times = vec![vec![1.0; 3], vec![2.0; 3]];
        let ratio = report(&names[..2], &times, "ms", Better::Lower, "none").unwrap();
        assert!((ratio - 2.0).abs() < 1e-9, "{ratio}");
    }
}
