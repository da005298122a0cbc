//! Limits: a per-key rate limit (a token bucket per API key, on this instance) and the
//! configuration of the per-team quota and idempotency retention.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The limits the API applies.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Requests one key may make per minute on one instance (also the burst).
    pub requests_per_minute: u32,
    /// Live resources (pending, active, paused, suspended) one team may hold.
    pub team_quota: u32,
    /// How long an `Idempotency-Key`'s outcome is kept.
    pub idempotency_retention: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            requests_per_minute: 600,
            team_quota: 100,
            idempotency_retention: Duration::from_secs(24 * 3600),
        }
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets by key id.
#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// An empty limiter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one token from `key`'s bucket (of `per_minute` tokens, refilled continuously) at
    /// `now`; `Err(wait)` when it is empty, with the wait until a token is back.
    pub fn take(&self, key: &str, per_minute: u32, now: Instant) -> Result<(), Duration> {
        let capacity = f64::from(per_minute.max(1));
        let per_second = capacity / 60.0;
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Keys idle for a minute are full again: forget them, so the map stays small.
        if buckets.len() > 10_000 {
            buckets.retain(|_, b| now.duration_since(b.at) < Duration::from_secs(60));
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: capacity,
            at: now,
        });
        let elapsed = now.duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_second).min(capacity);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_its_burst_then_waits_and_keys_are_independent() {
        let limiter = RateLimiter::new();
        let start = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.take("a", 3, start), Ok(()));
        }
        let wait = limiter.take("a", 3, start).unwrap_err();
        assert_eq!(wait.as_secs_f64().round(), 20.0, "{wait:?}");
        assert_eq!(limiter.take("b", 3, start), Ok(()), "another key");
        let later = start + Duration::from_secs(21);
        assert_eq!(limiter.take("a", 3, later), Ok(()));
        assert!(limiter.take("a", 3, later).is_err());
    }
}
