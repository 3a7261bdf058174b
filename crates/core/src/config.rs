//! Typed configuration parsed from a lookup function (the environment in binaries, a map in
//! tests). A bad value is an error naming the variable and what it accepts.

use std::str::FromStr;
use std::time::Duration;

use crate::retry::{MAX_ATTEMPTS_LIMIT, MAX_BACKOFF_MS, RetryPolicy};

/// A configuration variable that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}={value:?} is invalid: expected {accepts}")]
pub struct ConfigError {
    /// The variable's name.
    pub variable: String,
    /// The value it had.
    pub value: String,
    /// What it accepts, in words.
    pub accepts: String,
}

/// A configuration value that must never reach a log: its `Debug` shows `<hidden>`, and the
/// value is read only through [`Secret::expose`], where it is used.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Keeps `value` hidden.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<hidden>")
    }
}

/// Reads one variable through `lookup`: the default when unset or empty, else the parsed value if
/// `valid` accepts it, else a [`ConfigError`] saying what `accepts`.
pub fn parse_var<T: FromStr>(
    lookup: &dyn Fn(&str) -> Option<String>,
    variable: &str,
    default: T,
    accepts: &str,
    valid: impl Fn(&T) -> bool,
) -> Result<T, ConfigError> {
    match lookup(variable).filter(|v| !v.trim().is_empty()) {
        None => Ok(default),
        Some(value) => match value.trim().parse::<T>() {
            Ok(parsed) if valid(&parsed) => Ok(parsed),
            _ => Err(ConfigError { variable: variable.to_owned(), value, accepts: accepts.to_owned() }),
        },
    }
}

/// The delivery rules every trigger shares unless it overrides them (DESIGN §4, §7, §8, §10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TriggerConfig {
    /// `PICLOUD_MAX_TRIGGER_DEPTH`: events at this depth or deeper fire no trigger.
    pub max_depth: u32,
    /// `PICLOUD_TRIGGER_RETRY_*`: the default retry policy.
    pub retry: RetryPolicy,
    /// `PICLOUD_DEAD_LETTER_RETENTION_DAYS`: how long resolved dead letters are kept.
    pub dead_letter_retention: Duration,
    /// `PICLOUD_ABANDONED_EXECUTIONS_RETENTION_DAYS`: how long abandoned executions are kept.
    pub abandoned_retention: Duration,
    /// The largest event data a write may produce (DESIGN §10): derived from
    /// `PICLOUD_MAX_PAYLOAD_BYTES` by [`crate::protocol::max_event_data_bytes`], so that every
    /// accepted event fits the NATS server's `max_payload` once in its envelope.
    pub max_event_data_bytes: usize,
}

const DAY: Duration = Duration::from_secs(24 * 3600);

impl Default for TriggerConfig {
    fn default() -> Self {
        Self {
            max_depth: 16,
            retry: RetryPolicy {
                max_attempts: 8,
                base: Duration::from_secs(1),
                max: Duration::from_secs(300),
            },
            dead_letter_retention: 30 * DAY,
            abandoned_retention: 7 * DAY,
            max_event_data_bytes: crate::protocol::max_event_data_bytes(
                crate::protocol::DEFAULT_MAX_PAYLOAD_BYTES,
            ),
        }
    }
}

impl TriggerConfig {
    /// Parses the variables through `lookup`, with the defaults of DESIGN §10 for unset ones.
    pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let lookup: &dyn Fn(&str) -> Option<String> = &lookup;
        let d = Self::default();
        let max_depth =
            parse_var(lookup, "PICLOUD_MAX_TRIGGER_DEPTH", d.max_depth, "an integer from 1 to 1000", |v| {
                (1..=1000).contains(v)
            })?;
        let max_attempts = parse_var(
            lookup,
            "PICLOUD_TRIGGER_RETRY_MAX_ATTEMPTS",
            d.retry.max_attempts,
            &format!("an integer from 1 to {MAX_ATTEMPTS_LIMIT}"),
            |v| (1..=MAX_ATTEMPTS_LIMIT).contains(v),
        )?;
        let ms_range = format!("milliseconds from 1 to {MAX_BACKOFF_MS}");
        let base_ms = parse_var(lookup, "PICLOUD_TRIGGER_RETRY_BASE_MS", 1000u64, &ms_range, |v| {
            (1..=MAX_BACKOFF_MS).contains(v)
        })?;
        let max_ms = parse_var(
            lookup,
            "PICLOUD_TRIGGER_RETRY_MAX_MS",
            300_000u64,
            &format!("milliseconds from PICLOUD_TRIGGER_RETRY_BASE_MS ({base_ms}) to {MAX_BACKOFF_MS}"),
            |v| (base_ms..=MAX_BACKOFF_MS).contains(v),
        )?;
        let days = |variable, default: u64| {
            parse_var(lookup, variable, default, "a whole number of days from 1 to 36500", |v| {
                (1..=36_500).contains(v)
            })
            .map(|d| DAY * d as u32)
        };
        Ok(Self {
            max_depth,
            retry: RetryPolicy {
                max_attempts,
                base: Duration::from_millis(base_ms),
                max: Duration::from_millis(max_ms),
            },
            dead_letter_retention: days("PICLOUD_DEAD_LETTER_RETENTION_DAYS", 30)?,
            abandoned_retention: days("PICLOUD_ABANDONED_EXECUTIONS_RETENTION_DAYS", 7)?,
            max_event_data_bytes: d.max_event_data_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn an_empty_environment_gives_the_documented_defaults() {
        let c = TriggerConfig::from_env(env(&[])).unwrap();
        assert_eq!(c.max_depth, 16);
        assert_eq!(c.retry.max_attempts, 8);
        assert_eq!(c.retry.base, Duration::from_millis(1000));
        assert_eq!(c.retry.max, Duration::from_millis(300_000));
        assert_eq!(c.dead_letter_retention, Duration::from_secs(30 * 86_400));
        assert_eq!(c.abandoned_retention, Duration::from_secs(7 * 86_400));
        assert_eq!(c, TriggerConfig::default());
    }

    #[test]
    fn every_variable_is_read() {
        let c = TriggerConfig::from_env(env(&[
            ("PICLOUD_MAX_TRIGGER_DEPTH", "4"),
            ("PICLOUD_TRIGGER_RETRY_MAX_ATTEMPTS", "3"),
            ("PICLOUD_TRIGGER_RETRY_BASE_MS", "10"),
            ("PICLOUD_TRIGGER_RETRY_MAX_MS", "20"),
            ("PICLOUD_DEAD_LETTER_RETENTION_DAYS", "2"),
            ("PICLOUD_ABANDONED_EXECUTIONS_RETENTION_DAYS", "1"),
        ]))
        .unwrap();
        assert_eq!(c.max_depth, 4);
        assert_eq!(
            c.retry,
            RetryPolicy::new(3, Duration::from_millis(10), Duration::from_millis(20)).unwrap()
        );
        assert_eq!(c.dead_letter_retention, Duration::from_secs(2 * 86_400));
        assert_eq!(c.abandoned_retention, Duration::from_secs(86_400));
    }

    #[test]
    fn a_bad_value_names_the_variable_and_what_it_accepts() {
        let cases = [
            ("PICLOUD_MAX_TRIGGER_DEPTH", "deep", "integer from 1 to 1000"),
            ("PICLOUD_MAX_TRIGGER_DEPTH", "0", "integer from 1 to 1000"),
            ("PICLOUD_TRIGGER_RETRY_MAX_ATTEMPTS", "-1", "integer from 1 to 1000"),
            ("PICLOUD_TRIGGER_RETRY_BASE_MS", "1.5", "milliseconds"),
            ("PICLOUD_TRIGGER_RETRY_MAX_MS", "5", "from PICLOUD_TRIGGER_RETRY_BASE_MS"),
            ("PICLOUD_DEAD_LETTER_RETENTION_DAYS", "0", "days"),
            ("PICLOUD_ABANDONED_EXECUTIONS_RETENTION_DAYS", "week", "days"),
        ];
        for (variable, value, accepts) in cases {
            let err = TriggerConfig::from_env(env(&[(variable, value)])).unwrap_err();
            assert_eq!(err.variable, variable);
            let text = err.to_string();
            assert!(text.starts_with(&format!("{variable}=")), "{text}");
            assert!(text.contains(accepts), "{text}");
        }
    }

    #[test]
    fn a_secret_is_hidden_from_debug_output() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "<hidden>");
        assert_eq!(format!("{:?}", Some(("user", secret.clone()))), "Some((\"user\", <hidden>))");
        assert_eq!(secret.expose(), "hunter2");
    }
}
