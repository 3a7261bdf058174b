//! The retry policy and backoff of a delivery: `min(max, base · 2^(attempt−1))` with ±20 %
//! jitter, overridden by a handler's retry-after (capped at the maximum).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How often and how far apart a delivery is attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; at least 1.
    pub max_attempts: u32,
    /// The delay after the first failed attempt.
    pub base: Duration,
    /// The cap on any delay.
    pub max: Duration,
}

/// A trigger's `retry` object: each field, when given, replaces the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryOverrides {
    /// Replaces [`RetryPolicy::max_attempts`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Replaces [`RetryPolicy::base`], in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_base_ms: Option<u64>,
    /// Replaces [`RetryPolicy::max`], in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_max_ms: Option<u64>,
}

/// The largest accepted attempt count.
pub const MAX_ATTEMPTS_LIMIT: u32 = 1000;
/// The largest accepted backoff, base or cap: one week.
pub const MAX_BACKOFF_MS: u64 = 7 * 24 * 3600 * 1000;

/// The relative jitter applied to a computed backoff.
const JITTER: f64 = 0.2;

impl RetryPolicy {
    /// A policy from its parts, checked: `1 ≤ max_attempts ≤ 1000`, `1 ms ≤ base ≤ max ≤ 7 days`.
    pub fn new(max_attempts: u32, base: Duration, max: Duration) -> Result<Self, String> {
        let policy = Self { max_attempts, base, max };
        policy.check()?;
        Ok(policy)
    }

    fn check(&self) -> Result<(), String> {
        if !(1..=MAX_ATTEMPTS_LIMIT).contains(&self.max_attempts) {
            return Err(format!("max_attempts must be between 1 and {MAX_ATTEMPTS_LIMIT}"));
        }
        let base = self.base.as_millis();
        let max = self.max.as_millis();
        if base < 1 || u128::from(MAX_BACKOFF_MS) < base {
            return Err(format!("backoff_base_ms must be between 1 and {MAX_BACKOFF_MS}"));
        }
        if max < base || u128::from(MAX_BACKOFF_MS) < max {
            return Err(format!("backoff_max_ms must be between backoff_base_ms and {MAX_BACKOFF_MS}"));
        }
        Ok(())
    }

    /// This policy with a trigger's overrides applied, checked as [`RetryPolicy::new`] does.
    pub fn with_overrides(&self, o: &RetryOverrides) -> Result<Self, String> {
        let policy = Self {
            max_attempts: o.max_attempts.unwrap_or(self.max_attempts),
            base: o.backoff_base_ms.map_or(self.base, Duration::from_millis),
            max: o.backoff_max_ms.map_or(self.max, Duration::from_millis),
        };
        policy.check()?;
        Ok(policy)
    }

    /// The backoff before the attempt after `attempt` (1-based), without jitter:
    /// `min(max, base · 2^(attempt−1))`.
    pub fn raw_backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(63);
        let factor = 1u128 << doublings;
        let millis = self.base.as_millis().saturating_mul(factor);
        Duration::from_millis(millis.min(self.max.as_millis()) as u64)
    }

    /// The backoff after `attempt` with jitter: `jitter` in `[-1, 1]` scales a ±20 % spread,
    /// and the result never exceeds the cap. Pure, so callers choose the random source.
    pub fn backoff(&self, attempt: u32, jitter: f64) -> Duration {
        let raw = self.raw_backoff(attempt).as_secs_f64();
        let spread = 1.0 + JITTER * jitter.clamp(-1.0, 1.0);
        Duration::from_secs_f64(raw * spread).min(self.max)
    }

    /// The delay before the next attempt after `attempt` failed: the handler's retry-after when
    /// it gave one (capped at the maximum), else the jittered backoff.
    pub fn next_delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        match retry_after {
            Some(after) => after.min(self.max),
            None => self.backoff(attempt, rand::random_range(-1.0..=1.0)),
        }
    }

    /// Whether another attempt may follow `attempt`.
    pub fn has_attempts_after(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn policy(max_attempts: u32, base_ms: u64, max_ms: u64) -> RetryPolicy {
        RetryPolicy::new(max_attempts, Duration::from_millis(base_ms), Duration::from_millis(max_ms)).unwrap()
    }

    #[test]
    fn backoff_doubles_from_the_base_until_the_cap() {
        let p = policy(8, 1000, 300_000);
        let raw: Vec<u64> = (1..=10).map(|a| p.raw_backoff(a).as_millis() as u64).collect();
        assert_eq!(raw, [1000, 2000, 4000, 8000, 16000, 32000, 64000, 128_000, 256_000, 300_000]);
    }

    #[test]
    fn a_retry_after_replaces_the_backoff_but_not_the_cap() {
        let p = policy(8, 1000, 10_000);
        assert_eq!(p.next_delay(1, Some(Duration::from_millis(42))), Duration::from_millis(42));
        assert_eq!(p.next_delay(1, Some(Duration::from_secs(3600))), Duration::from_secs(10));
    }

    #[test]
    fn overrides_replace_only_the_fields_given() {
        let p = policy(8, 1000, 300_000);
        let o = RetryOverrides { max_attempts: Some(3), backoff_base_ms: None, backoff_max_ms: Some(5000) };
        assert_eq!(p.with_overrides(&o).unwrap(), policy(3, 1000, 5000));
    }

    #[test]
    fn policies_out_of_bounds_are_refused_with_the_field_named() {
        let p = policy(8, 1000, 300_000);
        let zero = RetryOverrides { max_attempts: Some(0), ..Default::default() };
        assert!(p.with_overrides(&zero).unwrap_err().contains("max_attempts"));
        let inverted =
            RetryOverrides { backoff_base_ms: Some(10_000), backoff_max_ms: Some(10), ..Default::default() };
        assert!(p.with_overrides(&inverted).unwrap_err().contains("backoff_max_ms"));
        let no_base = RetryOverrides { backoff_base_ms: Some(0), ..Default::default() };
        assert!(p.with_overrides(&no_base).unwrap_err().contains("backoff_base_ms"));
    }

    #[test]
    fn the_last_attempt_has_none_after_it() {
        let p = policy(3, 1, 1);
        assert!(p.has_attempts_after(1));
        assert!(p.has_attempts_after(2));
        assert!(!p.has_attempts_after(3));
    }

    proptest! {
        #[test]
        fn jittered_backoff_stays_within_twenty_percent_and_under_the_cap(
            attempt in 1u32..80, base in 1u64..100_000, extra in 0u64..1_000_000, jitter in -1.0f64..=1.0,
        ) {
            let p = policy(100, base, base + extra);
            let raw = p.raw_backoff(attempt).as_secs_f64();
            let got = p.backoff(attempt, jitter).as_secs_f64();
            prop_assert!(got >= raw * 0.8 - 1e-9);
            prop_assert!(got <= raw * 1.2 + 1e-9);
            prop_assert!(got <= p.max.as_secs_f64() + 1e-9);
        }

        #[test]
        fn raw_backoff_never_decreases_with_the_attempt(attempt in 1u32..200, base in 1u64..10_000) {
            let p = policy(100, base, MAX_BACKOFF_MS);
            prop_assert!(p.raw_backoff(attempt + 1) >= p.raw_backoff(attempt));
        }
    }
}
