//! The store's notion of "now": the database's clock in production (so every node agrees), or a
//! manual clock that tests move by hand.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;

/// A clock the store reads wherever a statement needs the current time.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// `None`: the system (for Postgres: the database's `now()`); `Some`: a manual time.
    manual: Option<Arc<Mutex<OffsetDateTime>>>,
}

impl Clock {
    /// The real clock.
    pub fn system() -> Self {
        Self { manual: None }
    }

    /// A clock standing at `at` until moved.
    pub fn manual(at: OffsetDateTime) -> Self {
        Self { manual: Some(Arc::new(Mutex::new(at))) }
    }

    /// Moves a manual clock forward; does nothing to the system clock.
    pub fn advance(&self, by: Duration) {
        if let Some(m) = &self.manual {
            let mut now = m.lock().expect("clock lock");
            *now += by;
        }
    }

    /// The manual time, or `None` for the system clock (Postgres then uses `now()`).
    pub fn fixed(&self) -> Option<OffsetDateTime> {
        self.manual.as_ref().map(|m| *m.lock().expect("clock lock"))
    }

    /// The current time by this clock.
    pub fn now(&self) -> OffsetDateTime {
        self.fixed().unwrap_or_else(OffsetDateTime::now_utc)
    }
}
