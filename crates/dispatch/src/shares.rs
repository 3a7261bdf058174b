//! A relay's slots per app (DESIGN §13, fairness between apps): how many deliveries of each app
//! it has in flight, bounded by `PICLOUD_RELAY_APP_SHARE`, and where its next claim's walk over
//! the apps starts.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use picloud_core::AppId;
use picloud_store::{AppShare, ClaimedDelivery, OutboxRepo, SharedClaim, Walk};

use crate::complete::Done;

/// What one relay run holds of each app.
#[derive(Debug)]
pub(crate) struct Shares {
    /// The most deliveries of one app in flight at once.
    share: u32,
    /// Deliveries of each app claimed and not answered yet.
    held: Mutex<HashMap<AppId, u32>>,
    /// One claiming round at a time, limited claim and plain claim together: a round's counts
    /// include what the round before it took. It keeps where the next walk starts.
    round: tokio::sync::Mutex<Option<AppId>>,
}

/// One claiming round ([`Shares::round`]).
pub(crate) struct Round<'a> {
    shares: &'a Shares,
    walk_from: tokio::sync::MutexGuard<'a, Option<AppId>>,
}

impl Shares {
    pub(crate) fn new(share: u32) -> Self {
        Self { share: share.max(1), held: Mutex::default(), round: tokio::sync::Mutex::new(None) }
    }

    /// Starts a claiming round, once the round before it has counted what it took.
    pub(crate) async fn round(&self) -> Round<'_> {
        Round { shares: self, walk_from: self.round.lock().await }
    }

    /// Counts answered deliveries out: whether an app that held its whole share has room again
    /// (its rows were left out of claims, and nothing else may say they are claimable).
    pub(crate) fn finished(&self, batch: &[Done]) -> bool {
        let mut held = self.held.lock().expect("shares lock");
        let mut freed = false;
        for done in batch {
            if let Some(n) = held.get_mut(&done.app_id) {
                freed |= *n == self.share;
                *n -= 1;
                if *n == 0 {
                    held.remove(&done.app_id);
                }
            }
        }
        freed
    }
}

impl Round<'_> {
    /// The deliveries in flight per app, as claims count them.
    pub(crate) fn held(&self) -> Vec<(AppId, u32)> {
        self.shares.held.lock().expect("shares lock").iter().map(|(app, n)| (*app, *n)).collect()
    }

    /// The relay's share, over `held`.
    pub(crate) fn share<'h>(&self, held: &'h [(AppId, u32)]) -> AppShare<'h> {
        AppShare { share: self.shares.share, held }
    }

    /// Counts claimed deliveries in.
    pub(crate) fn took(&self, rows: &[ClaimedDelivery]) {
        let mut held = self.shares.held.lock().expect("shares lock");
        for row in rows {
            *held.entry(row.app_id).or_default() += 1;
        }
    }

    /// Claims up to `want` plain rows shared among the apps, each within its room, going on
    /// with the walk where the last claim left it; counts them in.
    pub(crate) async fn claim_plain(
        &mut self,
        store: &impl OutboxRepo,
        want: u32,
        lease: Duration,
        node: &str,
    ) -> picloud_store::Result<SharedClaim> {
        let held = self.held();
        let walk = Walk { from: *self.walk_from, share: self.share(&held) };
        let claimed = store.claim_shared(want, lease, node, walk).await?;
        *self.walk_from = claimed.resume_at;
        self.took(&claimed.claim.rows);
        Ok(claimed)
    }
}
