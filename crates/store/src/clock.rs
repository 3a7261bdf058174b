//! The store's notion of "now", which the cron scheduler and the API's token checks read too:
//! the system clock in production (Postgres statements then use the database's `now()`, so every
//! node agrees on what they write), or a manual clock that tests move by hand and that wakes its
//! sleepers when moved.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::watch;

/// A clock the store reads wherever a statement needs the current time, and that the scheduler
/// sleeps on. Clones share the time.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// `None`: the system (for Postgres: the database's `now()`); `Some`: a manual time, which
    /// sleepers watch.
    manual: Option<Arc<watch::Sender<OffsetDateTime>>>,
}

impl Clock {
    /// The real clock.
    pub fn system() -> Self {
        Self { manual: None }
    }

    /// A clock standing at `at` until moved.
    pub fn manual(at: OffsetDateTime) -> Self {
        Self { manual: Some(Arc::new(watch::Sender::new(at))) }
    }

    /// Moves a manual clock forward, waking whoever sleeps until a time it now reads; does
    /// nothing to the system clock.
    pub fn advance(&self, by: Duration) {
        if let Some(manual) = &self.manual {
            manual.send_modify(|now| *now += by);
        }
    }

    /// The manual time, or `None` for the system clock (Postgres then uses `now()`).
    pub fn fixed(&self) -> Option<OffsetDateTime> {
        self.manual.as_ref().map(|manual| *manual.borrow())
    }

    /// The current time by this clock.
    pub fn now(&self) -> OffsetDateTime {
        self.fixed().unwrap_or_else(OffsetDateTime::now_utc)
    }

    /// Resolves once this clock reads `at` or later.
    pub async fn sleep_until(&self, at: OffsetDateTime) {
        match &self.manual {
            None => {
                let wait = at - OffsetDateTime::now_utc();
                if wait.is_positive() {
                    tokio::time::sleep(wait.unsigned_abs()).await;
                }
            }
            Some(manual) => {
                let mut now = manual.subscribe();
                // The sender lives as long as this clock: waiting cannot fail.
                let _ = now.wait_for(|now| *now >= at).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[tokio::test]
    async fn a_manual_clock_wakes_a_sleeper_once_moved_to_its_time_and_not_before() {
        let start = datetime!(2026-01-01 00:00:00 UTC);
        let clock = Clock::manual(start);
        let sleeper = tokio::spawn({
            let clock = clock.clone();
            async move { clock.sleep_until(start + Duration::from_secs(120)).await }
        });
        clock.advance(Duration::from_secs(60));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished(), "woke at 60 s of 120");
        clock.advance(Duration::from_secs(60));
        tokio::time::timeout(Duration::from_secs(5), sleeper).await.expect("woke at 120 s").unwrap();
        assert_eq!(clock.now(), start + Duration::from_secs(120));
    }
}
