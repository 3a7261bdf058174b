//! A relay's share of the flow limits (DESIGN §13): the slots of limited triggers it has in
//! flight, counted for [`OutboxRepo::claim_limited`], and whether it needs to claim limited rows
//! at all.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use picloud_core::TriggerId;
use picloud_store::{AppShare, Holder, LimitedClaim, OutboxRepo};
use tokio::time::Instant;
use uuid::Uuid;

use crate::complete::Done;

/// What one relay run holds of the triggers' limits.
#[derive(Debug)]
pub(crate) struct Limits {
    /// This run, as the holder of its slots.
    holder: Uuid,
    /// One claim of limited rows at a time: what it reports as in flight must include what the
    /// claim before it took.
    round: tokio::sync::Mutex<()>,
    /// Deliveries of each limited trigger claimed and not completed yet.
    busy: Mutex<HashMap<TriggerId, u32>>,
    /// Whether any trigger is limited, and when that was last asked.
    known: Mutex<Option<(Instant, bool)>>,
}

impl Limits {
    pub(crate) fn new() -> Self {
        Self {
            holder: Uuid::now_v7(),
            round: tokio::sync::Mutex::new(()),
            busy: Mutex::default(),
            known: Mutex::default(),
        }
    }

    /// Whether any trigger is limited, asked of the store at most once per `every`: a relay
    /// with no limited trigger pays nothing per claim. A store error counts as limits existing.
    pub(crate) async fn exist(&self, store: &impl OutboxRepo, every: Duration) -> bool {
        let known = *self.known.lock().expect("limits lock");
        if let Some((at, exist)) = known
            && at.elapsed() < every
        {
            return exist;
        }
        let exist = store.limits_exist().await.unwrap_or(true);
        *self.known.lock().expect("limits lock") = Some((Instant::now(), exist));
        exist
    }

    /// Claims up to `want` limited rows, each app within its room in `share`, counting them as
    /// in flight before another claim may count.
    pub(crate) async fn claim(
        &self,
        store: &impl OutboxRepo,
        want: u32,
        lease: Duration,
        node: &str,
        share: AppShare<'_>,
    ) -> picloud_store::Result<LimitedClaim> {
        let _round = self.round.lock().await;
        let busy: Vec<(TriggerId, u32)> =
            self.busy.lock().expect("limits lock").iter().map(|(t, n)| (*t, *n)).collect();
        let claimed =
            store.claim_limited(want, lease, Holder { id: self.holder, node, busy: &busy, share }).await?;
        let mut busy = self.busy.lock().expect("limits lock");
        for trigger in claimed.claim.rows.iter().filter_map(|r| r.trigger_id) {
            *busy.entry(trigger).or_default() += 1;
        }
        Ok(claimed)
    }

    /// Counts answered deliveries out (a slot is free once its handler answered or its deadline
    /// passed): whether any was limited, and the triggers of which none is left in flight.
    pub(crate) fn finished(&self, batch: &[Done]) -> (bool, Vec<TriggerId>) {
        let mut busy = self.busy.lock().expect("limits lock");
        let (mut any, mut idle) = (false, Vec::new());
        for trigger in batch.iter().filter(|d| d.gated).filter_map(|d| d.trigger_id) {
            any = true;
            if let Some(n) = busy.get_mut(&trigger) {
                *n -= 1;
                if *n == 0 {
                    busy.remove(&trigger);
                    idle.push(trigger);
                }
            }
        }
        (any, idle)
    }

    /// Gives back the slots this run holds of `triggers` that it still has nothing in flight of:
    /// its last claim of them counted deliveries that have ended since, and until it claims
    /// again, other relays would count them as in flight.
    pub(crate) async fn give_back(&self, store: &impl OutboxRepo, triggers: Vec<TriggerId>) {
        let _round = self.round.lock().await;
        let idle: Vec<TriggerId> = {
            let busy = self.busy.lock().expect("limits lock");
            triggers.into_iter().filter(|t| !busy.contains_key(t)).collect()
        };
        if idle.is_empty() {
            return;
        }
        if let Err(e) = store.release_slots(self.holder, Some(&idle)).await {
            tracing::warn!(error = %e, "giving back idle slots failed; they are free when their lease ends");
        }
    }

    /// Gives back this run's slots (the relay stops, nothing of it in flight).
    pub(crate) async fn release(&self, store: &impl OutboxRepo) {
        if let Err(e) = store.release_slots(self.holder, None).await {
            tracing::warn!(error = %e, "giving back the relay's slots failed; they are free when their lease ends");
        }
    }
}
