//! The retry budget and backoff schedule, as data.

use std::collections::BTreeMap;

use time::Duration;

use crate::model::PropagationKind;

/// How often and how long a propagation is retried.
///
/// `schedule[i]` is the wait after the `i+1`-th failed attempt; past the end of the schedule its
/// last entry repeats. A propagation dead-letters when its `max_attempts`-th attempt fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    schedule: Vec<Duration>,
    max_attempts: u32,
    jitter_percent: u8,
}

/// A retry policy that cannot work.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// No delays given.
    #[error("a retry schedule needs at least one delay")]
    EmptySchedule,
    /// A zero or negative delay.
    #[error("retry delays must be positive; delay {index} is {delay}")]
    NonPositiveDelay {
        /// Position in the schedule.
        index: usize,
        /// The delay given.
        delay: Duration,
    },
    /// `max_attempts` of zero.
    #[error("max_attempts must be at least 1")]
    NoAttempts,
    /// A delay longer than [`MAX_RETRY_DELAY`]: a row waiting that long looks like one another
    /// writer pushed out of reach, and housekeeping makes it due again.
    #[error("retry delays are at most one day; delay {index} is {delay}")]
    DelayTooLong {
        /// Position in the schedule.
        index: usize,
        /// The delay given.
        delay: Duration,
    },
}

/// The longest delay a retry schedule may hold (one day). With the largest jitter (50%) no row
/// this crate schedules waits longer than [`MAX_WAIT`](crate::MAX_WAIT) for its next attempt.
pub const MAX_RETRY_DELAY: Duration = Duration::days(1);

impl RetryPolicy {
    /// A policy from explicit delays and an attempt budget.
    pub fn new(schedule: Vec<Duration>, max_attempts: u32) -> Result<Self, PolicyError> {
        if schedule.is_empty() {
            return Err(PolicyError::EmptySchedule);
        }
        if let Some((index, &delay)) = schedule.iter().enumerate().find(|(_, d)| !d.is_positive()) {
            return Err(PolicyError::NonPositiveDelay { index, delay });
        }
        if let Some((index, &delay)) = schedule
            .iter()
            .enumerate()
            .find(|(_, d)| **d > MAX_RETRY_DELAY)
        {
            return Err(PolicyError::DelayTooLong { index, delay });
        }
        if max_attempts == 0 {
            return Err(PolicyError::NoAttempts);
        }
        Ok(Self {
            schedule,
            max_attempts,
            jitter_percent: 0,
        })
    }

    /// The default: 1m, 5m, 15m, 30m, 1h, 2h, 4h, 8h, then 8h42m, with 10 attempts. The 10th
    /// attempt, where a persistently failing row dead-letters, falls 24h33m after the first —
    /// the figure the existing dead-letter alert was tuned for.
    pub fn standard() -> Self {
        let minutes = [1, 5, 15, 30, 60, 120, 240, 480, 522];
        Self {
            schedule: minutes.iter().map(|&m| Duration::minutes(m)).collect(),
            max_attempts: 10,
            jitter_percent: 10,
        }
    }

    /// Spreads each delay by up to ± `percent` % (at most 50), so rows that failed together do
    /// not retry in lockstep. [`RetryPolicy::standard`] uses 10 %.
    #[must_use]
    pub fn with_jitter(mut self, percent: u8) -> Self {
        self.jitter_percent = percent.min(50);
        self
    }

    /// The jitter, in percent of each delay.
    pub fn jitter_percent(&self) -> u8 {
        self.jitter_percent
    }

    /// The delay after failed attempt `attempt` for the row `seed` identifies: the nominal
    /// [`RetryPolicy::delay_after`] moved by a deterministic fraction of the jitter (the same
    /// row and attempt always get the same delay; different rows spread out). Always within
    /// `delay_after(attempt) × (1 ± jitter)`, and never below one second.
    pub fn delay_for(&self, attempt: u32, seed: u64) -> Duration {
        let nominal = self.delay_after(attempt);
        if self.jitter_percent == 0 {
            return nominal;
        }
        // splitmix64: a well-mixed value from (seed, attempt), with no global state.
        let mut z = seed
            .wrapping_add(u64::from(attempt).wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // A fraction in [-1, 1].
        let unit = (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
        let spread = nominal.as_seconds_f64() * f64::from(self.jitter_percent) / 100.0 * unit;
        // Whole milliseconds: the database keeps microseconds, so the stored due time is exact.
        let spread = Duration::milliseconds((spread * 1000.0).round() as i64);
        (nominal + spread).max(Duration::SECOND)
    }

    /// The attempt budget.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// How long to wait after failed attempt `attempt` (from 1).
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let index = (attempt.max(1) - 1) as usize;
        self.schedule
            .get(index)
            .or(self.schedule.last())
            .copied()
            .unwrap_or(Duration::MINUTE)
    }

    /// How long after the first attempt attempt `n` runs, if every earlier one failed.
    pub fn offset_of_attempt(&self, n: u32) -> Duration {
        (1..n).map(|a| self.delay_after(a)).sum()
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::standard()
    }
}

/// Retry policies per propagation kind, with a default.
#[derive(Clone, Debug, Default)]
pub struct RetryPolicies {
    default: RetryPolicy,
    per_kind: BTreeMap<PropagationKind, RetryPolicy>,
}

impl RetryPolicies {
    /// Every kind uses `default`.
    pub fn new(default: RetryPolicy) -> Self {
        Self {
            default,
            per_kind: BTreeMap::new(),
        }
    }

    /// `kind` uses `policy` instead of the default.
    pub fn with(mut self, kind: PropagationKind, policy: RetryPolicy) -> Self {
        self.per_kind.insert(kind, policy);
        self
    }

    /// The policy for `kind`.
    pub fn for_kind(&self, kind: PropagationKind) -> &RetryPolicy {
        self.per_kind.get(&kind).unwrap_or(&self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A retry delay longer than a day is refused: housekeeping would take a row waiting that
    /// long for one another writer pushed out of reach.
    #[test]
    fn a_retry_delay_longer_than_a_day_is_refused() {
        let err = RetryPolicy::new(vec![Duration::minutes(1), Duration::days(2)], 3).unwrap_err();
        assert_eq!(
            err,
            PolicyError::DelayTooLong {
                index: 1,
                delay: Duration::days(2)
            }
        );
        assert!(RetryPolicy::new(vec![MAX_RETRY_DELAY], 3).is_ok());
        // The longest delay with the largest jitter stays within the wait housekeeping keeps.
        let policy = RetryPolicy::new(vec![MAX_RETRY_DELAY], 3)
            .unwrap()
            .with_jitter(50);
        for seed in [0, 1, u64::MAX / 2, u64::MAX] {
            assert!(policy.delay_for(1, seed) <= crate::MAX_WAIT);
        }
    }

    #[test]
    fn standard_schedule_dead_letters_about_24h33m_after_the_first_attempt() {
        let policy = RetryPolicy::standard();
        assert_eq!(policy.max_attempts(), 10);
        assert_eq!(policy.delay_after(1), Duration::minutes(1));
        assert_eq!(policy.delay_after(2), Duration::minutes(5));
        assert_eq!(policy.delay_after(3), Duration::minutes(15));
        assert_eq!(
            policy.offset_of_attempt(10),
            Duration::hours(24) + Duration::minutes(33)
        );
    }

    #[test]
    fn jitter_spreads_rows_within_its_bounds_and_keeps_the_24h33m_figure() {
        let policy = RetryPolicy::standard();
        assert_eq!(policy.jitter_percent(), 10);
        let mut distinct = std::collections::BTreeSet::new();
        for seed in 0..200u64 {
            let mut total = Duration::ZERO;
            for attempt in 1..policy.max_attempts() {
                let nominal = policy.delay_after(attempt);
                let delay = policy.delay_for(attempt, seed);
                assert_eq!(delay, policy.delay_for(attempt, seed), "deterministic");
                assert!(
                    delay >= nominal * 0.9 && delay <= nominal * 1.1,
                    "{seed} {attempt}"
                );
                total += delay;
            }
            let pinned = Duration::hours(24) + Duration::minutes(33);
            assert!(
                total >= pinned * 0.9 && total <= pinned * 1.1,
                "{seed}: {total}"
            );
            distinct.insert(policy.delay_for(1, seed).whole_milliseconds());
        }
        assert!(
            distinct.len() > 100,
            "rows failing together must not retry in lockstep"
        );
        let exact = RetryPolicy::new(vec![Duration::minutes(1)], 3).unwrap();
        assert_eq!(exact.delay_for(1, 42), Duration::minutes(1));
    }

    #[test]
    fn past_the_schedule_the_last_delay_repeats() {
        let policy = RetryPolicy::new(vec![Duration::seconds(1), Duration::seconds(7)], 5).unwrap();
        assert_eq!(policy.delay_after(2), Duration::seconds(7));
        assert_eq!(policy.delay_after(9), Duration::seconds(7));
    }

    #[test]
    fn impossible_policies_are_refused() {
        assert_eq!(RetryPolicy::new(vec![], 3), Err(PolicyError::EmptySchedule));
        assert_eq!(
            RetryPolicy::new(vec![Duration::ZERO], 3),
            Err(PolicyError::NonPositiveDelay {
                index: 0,
                delay: Duration::ZERO
            })
        );
        assert_eq!(
            RetryPolicy::new(vec![Duration::SECOND], 0),
            Err(PolicyError::NoAttempts)
        );
    }

    #[test]
    fn policies_are_configurable_per_kind() {
        let fast = RetryPolicy::new(vec![Duration::seconds(1)], 2).unwrap();
        let policies = RetryPolicies::default().with(PropagationKind::TierElevation, fast.clone());
        assert_eq!(policies.for_kind(PropagationKind::TierElevation), &fast);
    }
}
