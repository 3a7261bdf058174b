//! Waiting in tests for a condition, never for a fixed time.

use std::future::Future;
use std::time::Duration;

/// How long [`eventually`] waits: long enough for a loaded CI machine.
pub const EVENTUALLY: Duration = Duration::from_secs(30);

/// How often a condition is checked again.
const POLL: Duration = Duration::from_millis(20);

/// Checks `check` every 20 ms until it gives a value, and returns that value; panics naming
/// `what` once 30 s have passed.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(what, EVENTUALLY, check).await
}

/// [`eventually`], giving up after `within`.
pub async fn eventually_within<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}
