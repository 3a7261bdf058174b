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
    /// The rows the claiming rounds under way may still take, all told: a round may take that
    /// many of one app, so each round leaves room for the others' ([`Shares::round`]).
    claiming: Mutex<u32>,
    /// Where the next walk over the apps starts.
    walk_from: Mutex<Option<AppId>>,
}

/// One claiming round ([`Shares::round`]): the claims of one claimer, up to `most` rows.
pub(crate) struct Round<'a> {
    shares: &'a Shares,
    /// The rows this round may take.
    most: u32,
    /// The rows other rounds under way may take when this one started.
    others: u32,
}

impl Drop for Round<'_> {
    fn drop(&mut self) {
        *self.shares.claiming.lock().expect("shares lock") -= self.most;
    }
}

impl Shares {
    pub(crate) fn new(share: u32) -> Self {
        Self {
            share: share.max(1),
            held: Mutex::default(),
            claiming: Mutex::default(),
            walk_from: Mutex::default(),
        }
    }

    /// Starts a claiming round of up to `most` rows. Rounds run side by side, and none waits for
    /// another: each leaves room in every app for what the rounds under way may take, so that
    /// together they never take an app past its share.
    pub(crate) fn round(&self, most: u32) -> Round<'_> {
        let mut claiming = self.claiming.lock().expect("shares lock");
        let others = *claiming;
        *claiming += most;
        Round { shares: self, most, others }
    }

    /// Counts answered deliveries out: whether an app that may have been left out of a claim
    /// for want of room has more room now (nothing else may say its rows are claimable). A
    /// round leaves room for another's `most`, so an app within `most` of its share may have
    /// had none.
    pub(crate) fn finished(&self, batch: &[Done], most: u32) -> bool {
        let mut held = self.held.lock().expect("shares lock");
        let mut freed = false;
        for done in batch {
            if let Some(n) = held.get_mut(&done.app_id) {
                freed |= *n + most >= self.share;
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

    /// The relay's share over `held`, less what the other rounds under way may take.
    pub(crate) fn share<'h>(&self, held: &'h [(AppId, u32)]) -> AppShare<'h> {
        AppShare { share: self.shares.share.saturating_sub(self.others), held }
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
        &self,
        store: &impl OutboxRepo,
        want: u32,
        lease: Duration,
        node: &str,
    ) -> picloud_store::Result<SharedClaim> {
        let held = self.held();
        let from = *self.shares.walk_from.lock().expect("shares lock");
        let claimed = store.claim_shared(want, lease, node, Walk { from, share: self.share(&held) }).await?;
        *self.shares.walk_from.lock().expect("shares lock") = claimed.resume_at;
        self.took(&claimed.claim.rows);
        Ok(claimed)
    }
}
