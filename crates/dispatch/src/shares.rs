//! A relay's slots per app (DESIGN §13, fairness between apps): how many deliveries of each app
//! it has in flight, bounded by `PICLOUD_RELAY_APP_SHARE`, and where its next claim's walk over
//! the apps starts.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use picloud_core::AppId;
use picloud_store::{AppShare, Claim, ClaimedDelivery, OutboxRepo, Walk};

use uuid::Uuid;

use crate::complete::Done;

/// What one relay run holds of each app.
#[derive(Debug)]
pub(crate) struct Shares {
    /// The most deliveries of one app in flight at once.
    share: u32,
    /// Deliveries of each app claimed and not answered yet.
    held: Mutex<HashMap<AppId, u32>>,
    /// One claiming round at a time (the limited claim, then the plain one): a round counts
    /// what the round before it took, so no app passes its share. It keeps the pass of walks
    /// over the apps under way.
    round: tokio::sync::Mutex<Pass>,
    /// Rows were written since the pass under way last looked.
    written: AtomicBool,
}

/// A pass of walks over the apps, from the first app to the last, one claim at a time.
#[derive(Debug, Default)]
struct Pass {
    /// Where the next claim's walk starts (`None`: a new pass, from the first app).
    from: Option<AppId>,
    /// Whether a claim of this pass took rows or left some, or rows were written meanwhile:
    /// the apps before where the pass started may have rows due, so the next pass looks.
    found: bool,
}

/// One claiming round ([`Shares::round`]).
pub(crate) struct Round<'a> {
    shares: &'a Shares,
    pass: tokio::sync::MutexGuard<'a, Pass>,
}

impl Shares {
    pub(crate) fn new(share: u32) -> Self {
        Self {
            share: share.max(1),
            held: Mutex::default(),
            round: tokio::sync::Mutex::default(),
            written: AtomicBool::new(false),
        }
    }

    /// Starts a claiming round, once the round before it has counted what it took.
    pub(crate) async fn round(&self) -> Round<'_> {
        Round { shares: self, pass: self.round.lock().await }
    }

    /// Rows were written: the pass under way looks at the apps before its start again when it
    /// ends.
    pub(crate) fn written(&self) {
        self.written.store(true, Ordering::Release);
    }

    /// Whether `more` deliveries of whatever apps keep every app within its share: the relay
    /// holds fewer than one app's share in all. A claim that does not look at apps (the rows
    /// notifications named) is made only then.
    pub(crate) fn room_for_any(&self, more: usize) -> bool {
        let held: u64 = self.held.lock().expect("shares lock").values().map(|n| u64::from(*n)).sum();
        held + more as u64 <= u64::from(self.share)
    }

    /// Counts answered deliveries out: whether an app that held its whole share has room again
    /// (its rows were left out of claims, and nothing else may say they are claimable).
    pub(crate) fn finished(&self, batch: &[Done]) -> bool {
        let mut held = self.held.lock().expect("shares lock");
        let mut freed = false;
        for done in batch {
            if let Some(n) = held.get_mut(&done.app_id) {
                freed |= *n >= self.share;
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

    /// The relay's share over `held`.
    pub(crate) fn share<'h>(&self, held: &'h [(AppId, u32)]) -> AppShare<'h> {
        AppShare { per_app: self.shares.share, held }
    }

    /// Counts claimed deliveries in.
    pub(crate) fn took(&self, rows: &[ClaimedDelivery]) {
        let mut held = self.shares.held.lock().expect("shares lock");
        for row in rows {
            *held.entry(row.app_id).or_default() += 1;
        }
    }

    /// Claims those of `rows` that are claimable, by their ids, and counts them in.
    pub(crate) async fn claim_written(
        &self,
        store: &impl OutboxRepo,
        rows: &[Uuid],
        lease: Duration,
        node: &str,
    ) -> picloud_store::Result<Claim> {
        let claim = store.claim_written(rows, lease, node).await?;
        self.took(&claim.rows);
        Ok(claim)
    }

    /// Claims up to `want` plain rows shared among the apps, each within its room, going on
    /// with the walk where the last claim left it; counts them in. Says too whether to claim
    /// again at once: rows of the apps it visited may be left, the walk stopped before the last
    /// app, or it reached the last app of a pass that did not start at the first and found rows.
    pub(crate) async fn claim_plain(
        &mut self,
        store: &impl OutboxRepo,
        want: u32,
        lease: Duration,
        node: &str,
    ) -> picloud_store::Result<(Claim, bool)> {
        let held = self.held();
        let from = self.pass.from;
        let claimed = store.claim_shared(want, lease, node, Walk { from, share: self.share(&held) }).await?;
        self.took(&claimed.claim.rows);
        let pass = &mut self.pass;
        pass.found |= self.shares.written.swap(false, Ordering::AcqRel)
            || claimed.more
            || !claimed.claim.rows.is_empty();
        let wrapped = from.is_some() && claimed.resume_at.is_none() && pass.found;
        if claimed.resume_at.is_none() {
            pass.found = false;
        }
        pass.from = claimed.resume_at;
        Ok((claimed.claim, claimed.more || claimed.resume_at.is_some() || wrapped))
    }
}

#[cfg(test)]
mod tests {
    use picloud_store::APPS_PER_CLAIM;

    use super::*;
    use crate::testing::apps_with_rows;

    #[tokio::test]
    async fn rows_are_claimed_without_looking_at_their_apps_only_while_no_app_could_pass_its_share() {
        let (store, _) = apps_with_rows(&[2, 1], None).await;
        let shares = Shares::new(4);
        assert!(shares.room_for_any(4), "a relay that holds nothing");
        let (claim, _) =
            shares.round().await.claim_plain(&store, 10, Duration::from_secs(30), "n").await.unwrap();
        assert_eq!(claim.rows.len(), 3);
        assert!(shares.room_for_any(1));
        assert!(!shares.room_for_any(2), "two more rows of one app could take it past its share");
    }

    #[tokio::test]
    async fn a_pass_over_more_apps_than_a_walk_takes_comes_back_for_the_rows_it_left_behind() {
        let apps = APPS_PER_CLAIM as usize + 2;
        let (store, _) = apps_with_rows(&vec![3; apps], None).await;
        let shares = Shares::new(u32::MAX);
        let want = APPS_PER_CLAIM;
        let mut claimed = 0;
        let mut claims = 0;
        loop {
            let mut round = shares.round().await;
            let (claim, again) = round.claim_plain(&store, want, Duration::from_secs(30), "n").await.unwrap();
            claimed += claim.rows.len();
            claims += 1;
            if !again {
                break;
            }
            assert!(claims < 20, "the claims go on and on");
        }
        assert_eq!(claimed, apps * 3, "every row was claimed before the claimer would idle");
        // Everything is in flight: the claimer finishes the pass it starts, and stops.
        for pass in 1.. {
            let mut round = shares.round().await;
            let (claim, again) = round.claim_plain(&store, want, Duration::from_secs(30), "n").await.unwrap();
            assert!(claim.rows.is_empty());
            if !again {
                assert_eq!(pass, 2, "one walk of the first apps, one of the rest");
                break;
            }
            assert!(pass < 2, "a pass that found nothing is not walked again");
        }
    }
}
