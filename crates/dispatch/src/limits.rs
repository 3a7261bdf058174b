//! A relay's share of the flow limits (DESIGN §13): the slots of limited triggers it holds, the
//! deliveries it has in flight in them, the rows it claimed ahead of a slot, and whether it needs
//! to claim limited rows at all.
//!
//! A claim may take more rows of a trigger with a `concurrency` than the relay has slots
//! ([`picloud_store::Slots::claimable`]): those wait here, and each starts as soon as one of the
//! trigger's deliveries ends, without a claim's round trip in between. A row waits at most half
//! of what its lease allows beyond the handler's timeout (the lease margin), so that it and the
//! slot it runs in end before their leases do; one that cannot start in time is given back.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use picloud_core::TriggerId;
use picloud_store::{AHEAD_PER_SLOT, AppShare, Busy, Claim, ClaimedDelivery, Holder, OutboxRepo};
use tokio::time::Instant;
use uuid::Uuid;

use crate::complete::Done;

/// What one relay run holds of the triggers' limits.
#[derive(Debug)]
pub(crate) struct Limits {
    /// This run, as the holder of its slots.
    holder: Uuid,
    /// How long a row claimed ahead of a slot may wait for one.
    start_within: Duration,
    /// One claim of limited rows at a time: what it reports as claimed must include what the
    /// claim before it took.
    round: tokio::sync::Mutex<()>,
    /// What the run holds of each limited trigger it claimed rows of.
    held: Mutex<Held>,
    /// Rows taken from the queues ahead that are being delivered (see [`Limits::starting`]).
    starting: AtomicUsize,
    /// Whether any trigger is limited, and when that was last asked.
    known: Mutex<Option<(Instant, bool)>>,
}

#[derive(Debug, Default)]
struct Held {
    triggers: HashMap<TriggerId, Trigger>,
    /// The relay stops: no row starts from a queue any more.
    closed: bool,
}

/// One limited trigger's rows at this run.
#[derive(Debug, Default)]
struct Trigger {
    /// Claimed and not completed: in flight, or waiting ahead.
    claimed: u32,
    /// In flight.
    running: u32,
    /// The slots the run holds, as its last claim of the trigger recorded them (`None`: the
    /// trigger has no `concurrency`, and its rows start as soon as they are claimed).
    slots: Option<u32>,
    /// Rows claimed ahead of a slot, oldest first.
    ahead: VecDeque<Ahead>,
}

#[derive(Debug)]
struct Ahead {
    row: ClaimedDelivery,
    /// The configuration epoch its claim saw.
    epoch: Option<i64>,
    /// The latest it may start.
    start_by: Instant,
}

/// Rows of limited triggers that may start now, and rows that waited too long to.
#[derive(Debug, Default)]
pub(crate) struct Started {
    /// To deliver, in claims of one configuration epoch each.
    pub(crate) start: Vec<Claim>,
    /// To give back: claimed ahead of a slot, they can no longer start within their lease.
    pub(crate) expired: Vec<ClaimedDelivery>,
}

/// What a claim of limited rows came to.
#[derive(Debug)]
pub(crate) struct Claimed {
    /// Rows it took.
    pub(crate) rows: usize,
    /// When a trigger that ran out of rate tokens has one again.
    pub(crate) next_token_in: Option<Duration>,
    /// What starts now.
    pub(crate) started: Started,
    /// Triggers of which the run has nothing claimed (their slots to give back).
    pub(crate) idle: Vec<TriggerId>,
}

/// What ended deliveries of limited triggers came to.
#[derive(Debug, Default)]
pub(crate) struct Finished {
    /// Whether to claim limited rows again: slots are free of a trigger with few or no rows
    /// waiting ahead of them.
    pub(crate) claim_more: bool,
    /// Triggers of which the run has nothing claimed any more.
    pub(crate) idle: Vec<TriggerId>,
    /// What starts in the slots they left.
    pub(crate) started: Started,
}

impl Trigger {
    /// Whether its rows ahead of the slots are running low (no more than half of what it may
    /// hold ahead of its slots): a claim now refills them before the slots run dry, and takes
    /// many rows at once.
    fn running_low(&self) -> bool {
        self.slots.is_none_or(|slots| self.ahead.len() as u32 <= slots * AHEAD_PER_SLOT / 2)
    }

    /// Gives back the rows ahead that can no longer start in time (all of them once the relay
    /// stops), whether or not a slot is free, and takes the rows that have a slot now, oldest
    /// first, into `started`.
    fn start(&mut self, now: Instant, closed: bool, started: &mut Started) {
        // Rows ahead are in claim order, so the late ones are at the front.
        while self.ahead.front().is_some_and(|ahead| closed || now > ahead.start_by) {
            let ahead = self.ahead.pop_front().expect("a row is ahead");
            self.claimed -= 1;
            started.expired.push(ahead.row);
        }
        while self.slots.is_none_or(|slots| self.running < slots) {
            let Some(ahead) = self.ahead.pop_front() else { return };
            self.running += 1;
            started.add(ahead.row, ahead.epoch);
        }
    }
}

impl Held {
    /// Goes over every trigger (after a claim: its slots may have changed, and rows ahead may
    /// have waited too long while none of its deliveries ended): what starts now, what is given
    /// back, and the triggers of which nothing is claimed any more, forgotten.
    fn settle(&mut self, now: Instant, started: &mut Started) -> Vec<TriggerId> {
        let mut idle = Vec::new();
        for (trigger, entry) in &mut self.triggers {
            entry.start(now, self.closed, started);
            if entry.claimed == 0 {
                idle.push(*trigger);
            }
        }
        for trigger in &idle {
            self.triggers.remove(trigger);
        }
        idle
    }
}

impl Started {
    /// Adds a row to start, to the claim of its configuration epoch.
    fn add(&mut self, row: ClaimedDelivery, epoch: Option<i64>) {
        match self.start.iter_mut().find(|claim| claim.config_epoch == epoch) {
            Some(claim) => claim.rows.push(row),
            None => self.start.push(Claim { rows: vec![row], config_epoch: epoch }),
        }
    }
}

impl Limits {
    /// `start_within`: how long a row claimed ahead of a slot may wait for one (less than the
    /// lease margin, so that the row, sent at the end of it, is answered or timed out before its
    /// lease ends).
    pub(crate) fn new(start_within: Duration) -> Self {
        Self {
            holder: Uuid::now_v7(),
            start_within,
            round: tokio::sync::Mutex::new(()),
            held: Mutex::default(),
            starting: AtomicUsize::new(0),
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

    /// Claims up to `want` limited rows, each app within its room in `share`, and counts them
    /// before another claim may count (`took` sees every row claimed). The rows with a slot
    /// start; the others wait ahead.
    pub(crate) async fn claim(
        &self,
        store: &impl OutboxRepo,
        want: u32,
        lease: Duration,
        node: &str,
        share: AppShare<'_>,
        took: impl FnOnce(&[ClaimedDelivery]),
    ) -> picloud_store::Result<Claimed> {
        let _round = self.round.lock().await;
        let asked = Instant::now();
        let busy: Vec<(TriggerId, Busy)> = self
            .held
            .lock()
            .expect("limits lock")
            .triggers
            .iter()
            .map(|(t, held)| (*t, Busy { claimed: held.claimed, running: held.running }))
            .collect();
        let holder = Holder { id: self.holder, node, busy: &busy, share };
        let claimed = store.claim_limited(want, lease, holder).await?;
        took(&claimed.claim.rows);
        let rows = claimed.claim.rows.len();
        let mut held = self.held.lock().expect("limits lock");
        let mut started = Started::default();
        for (trigger, slots) in claimed.slots {
            held.triggers.entry(trigger).or_default().slots = Some(slots);
        }
        for row in claimed.claim.rows {
            let Some(trigger) = row.trigger_id else {
                // Not a limited row after all (none is without a trigger): it starts.
                started.add(row, claimed.claim.config_epoch);
                continue;
            };
            let entry = held.triggers.entry(trigger).or_default();
            entry.claimed += 1;
            entry.ahead.push_back(Ahead {
                row,
                epoch: claimed.claim.config_epoch,
                start_by: asked + self.start_within,
            });
        }
        let idle = held.settle(Instant::now(), &mut started);
        self.count_starting(&started);
        Ok(Claimed { rows, next_token_in: claimed.next_token_in, started, idle })
    }

    /// Counts ended deliveries out (a slot is free once its handler answered or its deadline
    /// passed) and starts the rows ahead that have a slot now.
    pub(crate) fn finished(&self, batch: &[Done]) -> Finished {
        self.finished_at(batch, Instant::now())
    }

    fn finished_at(&self, batch: &[Done], now: Instant) -> Finished {
        let mut held = self.held.lock().expect("limits lock");
        let closed = held.closed;
        let mut finished = Finished::default();
        let mut ended = Vec::new();
        for trigger in batch.iter().filter(|d| d.gated).filter_map(|d| d.trigger_id) {
            if let Some(entry) = held.triggers.get_mut(&trigger) {
                entry.claimed -= 1;
                entry.running -= 1;
                if !ended.contains(&trigger) {
                    ended.push(trigger);
                }
            }
        }
        for trigger in ended {
            let Some(entry) = held.triggers.get_mut(&trigger) else { continue };
            entry.start(now, closed, &mut finished.started);
            finished.claim_more |= entry.running_low();
            if entry.claimed == 0 {
                held.triggers.remove(&trigger);
                finished.idle.push(trigger);
            }
        }
        self.count_starting(&finished.started);
        finished
    }

    fn count_starting(&self, started: &Started) {
        let n: usize = started.start.iter().map(|c| c.rows.len()).sum();
        self.starting.fetch_add(n, Ordering::AcqRel);
    }

    /// `rows` taken from the queues ahead were delivered (in flight now, or answered for good).
    pub(crate) fn delivered(&self, rows: usize) {
        self.starting.fetch_sub(rows, Ordering::AcqRel);
    }

    /// Whether rows taken from the queues ahead are still on their way to the in-flight table.
    pub(crate) fn starting(&self) -> bool {
        self.starting.load(Ordering::Acquire) > 0
    }

    /// The relay stops claiming: every row waiting ahead, to give back, and none starts from
    /// now on.
    pub(crate) fn close(&self) -> Vec<ClaimedDelivery> {
        let mut held = self.held.lock().expect("limits lock");
        held.closed = true;
        let mut rows = Vec::new();
        for entry in held.triggers.values_mut() {
            entry.claimed -= entry.ahead.len() as u32;
            rows.extend(entry.ahead.drain(..).map(|ahead| ahead.row));
        }
        rows
    }

    /// Gives back the slots this run holds of `triggers` that it still has nothing claimed of:
    /// its last claim of them counted deliveries that have ended since, and until it claims
    /// again, other relays would count them as in flight.
    pub(crate) async fn give_back(&self, store: &impl OutboxRepo, triggers: Vec<TriggerId>) {
        let _round = self.round.lock().await;
        let idle: Vec<TriggerId> = {
            let held = self.held.lock().expect("limits lock");
            triggers.into_iter().filter(|t| !held.triggers.contains_key(t)).collect()
        };
        if idle.is_empty() {
            return;
        }
        if let Err(e) = store.release_slots(self.holder, Some(&idle)).await {
            tracing::warn!(error = %e, "giving back idle slots failed; they are free when their lease ends");
        }
    }

    /// Keeps this run's slots of `triggers` until now + `lease` at least: deliveries of theirs
    /// work longer (DESIGN §14). Returns the triggers whose slots it kept.
    pub(crate) async fn extend(
        &self,
        store: &impl OutboxRepo,
        triggers: &[TriggerId],
        lease: Duration,
    ) -> picloud_store::Result<Vec<TriggerId>> {
        store.extend_slots(self.holder, triggers, lease).await
    }

    /// Gives back this run's slots (the relay stops, nothing of it in flight).
    pub(crate) async fn release(&self, store: &impl OutboxRepo) {
        if let Err(e) = store.release_slots(self.holder, None).await {
            tracing::warn!(error = %e, "giving back the relay's slots failed; they are free when their lease ends");
        }
    }
}

#[cfg(test)]
mod tests {
    use picloud_core::TriggerConfig;
    use picloud_core::flow::Flow;
    use picloud_store::MemStore;

    use super::*;
    use crate::Answer;
    use crate::relay::done_for;
    use crate::testing::apps_with_rows;

    const MARGIN: Duration = Duration::from_secs(10);

    /// A trigger with `concurrency: 1` and three due rows, claimed: the limits, the store, the
    /// trigger and the row in the slot (the other two wait ahead of it).
    async fn one_slot() -> (Limits, MemStore, TriggerId, ClaimedDelivery) {
        let flow = Flow { concurrency: Some(1), ..Flow::default() };
        let (store, triggers) = apps_with_rows(&[3], Some(flow)).await;
        let limits = Limits::new(MARGIN);
        let claimed = limits
            .claim(&store, 10, Duration::from_secs(30), "n", AppShare::UNBOUNDED, |_| {})
            .await
            .unwrap();
        assert_eq!(claimed.rows, 3, "one for the slot, the others ahead of it");
        assert!(claimed.started.expired.is_empty());
        let mut started: Vec<ClaimedDelivery> =
            claimed.started.start.into_iter().flat_map(|c| c.rows).collect();
        assert_eq!(started.len(), 1, "only the slot's row starts");
        limits.delivered(1);
        (limits, store, triggers[0], started.remove(0))
    }

    fn ended(row: &ClaimedDelivery) -> Done {
        done_for(row, TriggerConfig::default().retry, Answer::Ok(Default::default()))
    }

    #[tokio::test]
    async fn a_row_ahead_starts_when_the_slot_is_free_and_the_trigger_is_idle_once_nothing_is_claimed() {
        let (limits, _store, trigger, first) = one_slot().await;
        let mut running = first;
        let mut seen = vec![running.id];
        for left_ahead in [1, 0] {
            let finished = limits.finished_at(&[ended(&running)], Instant::now());
            assert!(finished.claim_more, "few rows are left ahead");
            assert!(finished.idle.is_empty(), "a row is claimed still");
            let mut next: Vec<ClaimedDelivery> =
                finished.started.start.into_iter().flat_map(|c| c.rows).collect();
            assert_eq!(next.len(), 1, "one slot, one row in it ({left_ahead} left ahead)");
            running = next.remove(0);
            assert!(!seen.contains(&running.id));
            seen.push(running.id);
            assert!(limits.starting(), "on its way until delivered");
            limits.delivered(1);
        }
        let finished = limits.finished_at(&[ended(&running)], Instant::now());
        assert!(finished.started.start.is_empty());
        assert_eq!(finished.idle, vec![trigger], "nothing of it claimed any more");
    }

    #[tokio::test]
    async fn a_row_ahead_that_cannot_start_within_its_lease_is_given_back() {
        let (limits, _store, trigger, first) = one_slot().await;
        let late = Instant::now() + MARGIN + Duration::from_millis(1);
        let finished = limits.finished_at(&[ended(&first)], late);
        assert!(finished.started.start.is_empty(), "it would outlive its lease");
        assert_eq!(finished.started.expired.len(), 2);
        assert_eq!(finished.idle, vec![trigger]);
    }

    #[tokio::test]
    async fn rows_ahead_that_waited_too_long_are_given_back_though_no_slot_freed() {
        let (limits, _store, trigger, first) = one_slot().await;
        let late = Instant::now() + MARGIN + Duration::from_millis(1);
        let mut started = Started::default();
        let idle = limits.held.lock().unwrap().settle(late, &mut started);
        assert!(started.start.is_empty(), "the slot is taken");
        assert_eq!(started.expired.len(), 2);
        assert!(idle.is_empty(), "the row in the slot is claimed still");
        let finished = limits.finished_at(&[ended(&first)], late);
        assert_eq!(finished.idle, vec![trigger]);
    }

    #[tokio::test]
    async fn a_relay_that_stops_gives_back_its_rows_ahead_and_starts_none() {
        let flow = Flow { concurrency: Some(1), ..Flow::default() };
        let (store, _) = apps_with_rows(&[6], Some(flow)).await;
        let limits = Limits::new(MARGIN);
        let lease = Duration::from_secs(30);
        let claimed = limits.claim(&store, 2, lease, "n", AppShare::UNBOUNDED, |_| {}).await.unwrap();
        let first = claimed.started.start.into_iter().flat_map(|c| c.rows).next().unwrap();
        limits.delivered(1);
        assert_eq!(limits.close().len(), 1, "the row ahead");
        let late = limits.claim(&store, 10, lease, "n", AppShare::UNBOUNDED, |_| {}).await.unwrap();
        assert_eq!(late.rows, 3, "a claim under way as the relay stops");
        assert!(late.started.start.is_empty(), "what it took does not start");
        assert_eq!(late.started.expired.len(), 3, "it goes back");
        let finished = limits.finished_at(&[ended(&first)], Instant::now());
        assert!(finished.started.start.is_empty() && finished.started.expired.is_empty());
        assert!(!limits.starting());
    }
}
