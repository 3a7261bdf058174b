//! Attempt statistics (DESIGN §15): the outcomes an attempt is counted under, the fixed latency
//! histogram each statistics bucket keeps, and the windows the API reads them in.
//!
//! The histogram's buckets are the same everywhere and for all time, so buckets merge by adding
//! their counts: a day's p99 is read from the merged minutes exactly as if the day had been one
//! histogram. A bucket's bounds grow by a quarter from one to the next (from 100 µs to about ten
//! minutes), so a quantile read from it is within a quarter of the true one.

use std::time::Duration;

/// What an attempt came to, as the statistics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttemptOutcome {
    /// The handler answered `ok`.
    Ok,
    /// The handler answered `retry`.
    Retry,
    /// The attempt failed: the handler answered `fail` or something that is not an answer, or
    /// the delivery could not be sent.
    Fail,
    /// No answer came before the deadline.
    Timeout,
    /// No handler was listening.
    NoHandler,
}

impl AttemptOutcome {
    /// Every outcome, in the order the statistics keep their counts.
    pub const ALL: [AttemptOutcome; 5] = [Self::Ok, Self::Retry, Self::Fail, Self::Timeout, Self::NoHandler];

    /// Its name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Retry => "retry",
            Self::Fail => "fail",
            Self::Timeout => "timeout",
            Self::NoHandler => "no_handler",
        }
    }

    /// Its place in [`AttemptOutcome::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether it counts as an error (everything but `ok` and `retry`, which the handler chose).
    pub fn is_error(self) -> bool {
        matches!(self, Self::Fail | Self::Timeout | Self::NoHandler)
    }
}

/// How many buckets a latency histogram has.
pub const LATENCY_BUCKETS: usize = 72;
/// The upper bound of the first bucket.
const FIRST_BOUND_MICROS: f64 = 100.0;
/// How much each bucket's upper bound exceeds the one before it.
const GROWTH: f64 = 1.25;

/// A latency histogram in the fixed buckets every statistics row shares: bucket 0 holds what took
/// less than 100 µs, bucket `i` what took from `100 µs × 1.25^(i−1)` up to `100 µs × 1.25^i`, and
/// the last one everything longer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Latencies {
    counts: [u64; LATENCY_BUCKETS],
}

impl Default for Latencies {
    fn default() -> Self {
        Self { counts: [0; LATENCY_BUCKETS] }
    }
}

impl Latencies {
    /// The histogram of these counts, as [`Latencies::counts`] gave them; `None` unless there are
    /// exactly [`LATENCY_BUCKETS`] of them.
    pub fn from_counts(counts: &[u64]) -> Option<Self> {
        Some(Self { counts: counts.try_into().ok()? })
    }

    /// The count of each bucket.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// How many latencies it holds.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Counts one latency.
    pub fn record(&mut self, latency: Duration) {
        self.counts[bucket_of(latency)] += 1;
    }

    /// Adds another histogram's counts to this one.
    pub fn merge(&mut self, other: &Latencies) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts) {
            *mine += theirs;
        }
    }

    /// The latency below which a share `q` (0 to 1) of those counted fall, interpolated within
    /// its bucket; `None` when nothing was counted.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut below = 0;
        for (i, &count) in self.counts.iter().enumerate() {
            if below + count >= rank {
                let (low, high) = bounds(i);
                let Some(high) = high else { return Some(micros(low)) };
                let share = (rank - below) as f64 / count as f64;
                return Some(micros(low + share * (high - low)));
            }
            below += count;
        }
        unreachable!("the rank is at most the total")
    }
}

/// The bucket a latency is counted in.
pub fn bucket_of(latency: Duration) -> usize {
    let us = latency.as_secs_f64() * 1e6;
    if us < FIRST_BOUND_MICROS {
        return 0;
    }
    let i = 1 + ((us / FIRST_BOUND_MICROS).ln() / GROWTH.ln()).floor() as usize;
    i.min(LATENCY_BUCKETS - 1)
}

/// A bucket's bounds in microseconds: from the first, up to the second (none for the last).
fn bounds(i: usize) -> (f64, Option<f64>) {
    let upper = |i: usize| FIRST_BOUND_MICROS * GROWTH.powi(i as i32);
    let low = if i == 0 { 0.0 } else { upper(i - 1) };
    (low, (i < LATENCY_BUCKETS - 1).then(|| upper(i)))
}

fn micros(us: f64) -> Duration {
    Duration::from_secs_f64(us / 1e6)
}

/// A span of statistics the API shows, in buckets of a fixed width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsWindow {
    /// The last hour, by the minute.
    Hour,
    /// The last day, by ten minutes.
    Day,
    /// The last week, by the hour.
    Week,
}

impl StatsWindow {
    /// Every window, shortest first.
    pub const ALL: [StatsWindow; 3] = [Self::Hour, Self::Day, Self::Week];

    /// The window the API names `1h`, `24h` or `7d`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|w| w.as_str() == name)
    }

    /// Its name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hour => "1h",
            Self::Day => "24h",
            Self::Week => "7d",
        }
    }

    /// The width of one of its buckets.
    pub fn step(self) -> Duration {
        Duration::from_secs(match self {
            Self::Hour => 60,
            Self::Day => 600,
            Self::Week => 3600,
        })
    }

    /// How many buckets it shows.
    pub fn buckets(self) -> u32 {
        match self {
            Self::Hour => 60,
            Self::Day => 144,
            Self::Week => 168,
        }
    }
}

/// How long statistics are kept: the longest window and one of its buckets, which the window
/// shows in part.
pub const STATS_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600 + 3600);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn histogram(latencies: &[Duration]) -> Latencies {
        let mut h = Latencies::default();
        latencies.iter().for_each(|l| h.record(*l));
        h
    }

    #[test]
    fn buckets_start_at_100_microseconds_and_grow_by_a_quarter() {
        assert_eq!(bucket_of(Duration::from_micros(99)), 0);
        assert_eq!(bucket_of(Duration::from_micros(100)), 1);
        assert_eq!(bucket_of(Duration::from_micros(124)), 1);
        assert_eq!(bucket_of(Duration::from_micros(126)), 2);
        assert_eq!(bucket_of(Duration::from_secs(86_400)), LATENCY_BUCKETS - 1);
        assert!(
            bounds(LATENCY_BUCKETS - 2).1.unwrap() > 600e6,
            "the last bounded bucket reaches ten minutes"
        );
    }

    #[test]
    fn an_empty_histogram_has_no_quantile() {
        assert_eq!(Latencies::default().quantile(0.5), None);
    }

    #[test]
    fn counts_come_back_only_whole() {
        let h = histogram(&[Duration::from_millis(3)]);
        assert_eq!(Latencies::from_counts(h.counts()), Some(h));
        assert_eq!(Latencies::from_counts(&[1, 2, 3]), None);
    }

    #[test]
    fn a_latency_past_the_last_bound_reads_as_the_last_bucket_start() {
        let h = histogram(&[Duration::from_secs(3600)]);
        assert_eq!(h.quantile(0.99), Some(micros(bounds(LATENCY_BUCKETS - 1).0)));
    }

    proptest! {
        #[test]
        fn a_quantile_falls_in_the_bucket_of_the_true_one(
            samples in prop::collection::vec(1u64..5_000_000, 1..300),
            q in 0.01f64..1.0,
        ) {
            let latencies: Vec<Duration> = samples.iter().map(|&us| Duration::from_micros(us)).collect();
            let mut sorted = latencies.clone();
            sorted.sort();
            let truth = sorted[((q * sorted.len() as f64).ceil() as usize).max(1) - 1];
            let read = histogram(&latencies).quantile(q).unwrap();
            let (low, high) = bounds(bucket_of(truth));
            prop_assert!(read >= micros(low) && read <= micros(high.unwrap()), "{read:?} outside the bucket of {truth:?}");
        }

        #[test]
        fn merged_histograms_read_as_one_histogram_of_every_latency(
            a in prop::collection::vec(1u64..5_000_000, 0..100),
            b in prop::collection::vec(1u64..5_000_000, 0..100),
        ) {
            let us = |v: &[u64]| v.iter().map(|&us| Duration::from_micros(us)).collect::<Vec<_>>();
            let mut merged = histogram(&us(&a));
            merged.merge(&histogram(&us(&b)));
            prop_assert_eq!(merged, histogram(&us(&[a, b].concat())));
        }
    }
}
