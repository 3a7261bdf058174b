//! The claimer: claims limited rows and plain rows in turns, delivers them, and idles until
//! something may have become claimable.

use super::*;

/// Which claims may find rows: set by whatever may have made rows claimable (a notification,
/// a completion, a timer), cleared by the claim that looks. A claimer skips a claim that has
/// found nothing since, so a relay busy with limited rows does not ask for plain ones on every
/// round, nor the other way round.
#[derive(Debug)]
pub(super) struct Claimable {
    plain: AtomicBool,
    limited: AtomicBool,
    /// Rows named since the last plain claim (by notifications, [`Wakeup::Written`], or handed
    /// over by this node's writers): while no other rows may be claimable, the plain claim takes
    /// these by their ids.
    named: Mutex<Vec<Uuid>>,
    /// When a claimer last walked the apps: claims of named rows find nothing else (rows coming
    /// due, leases running out), so the relay walks once a poll interval at least however often
    /// it is woken.
    walked: Mutex<Instant>,
}

/// The most rows [`Claimable::named`] keeps: beyond them the relay walks instead (it claims
/// slower than rows are named, and a walk finds them all).
const NAMED_AT_MOST: usize = 4096;

impl Claimable {
    /// Everything may be claimable: a relay that starts looks.
    pub(super) fn new() -> Self {
        Self {
            plain: AtomicBool::new(true),
            limited: AtomicBool::new(true),
            named: Mutex::default(),
            walked: Mutex::new(Instant::now()),
        }
    }

    /// A claimer walks the apps now.
    fn walking(&self) {
        *self.walked.lock().expect("claimable lock") = Instant::now();
    }

    /// When a claimer last walked the apps.
    fn walked(&self) -> Instant {
        *self.walked.lock().expect("claimable lock")
    }

    /// These plain rows were written, due at once, outside lanes and gates.
    pub(super) fn named(&self, rows: Vec<Uuid>) {
        let mut named = self.named.lock().expect("claimable lock");
        named.extend(rows);
        if named.len() > NAMED_AT_MOST {
            named.clear();
            self.plain();
        }
    }

    /// Forgets the rows named: whether there were any.
    pub(super) fn forget_named(&self) -> bool {
        let mut named = self.named.lock().expect("claimable lock");
        let any = !named.is_empty();
        named.clear();
        any
    }

    /// The plain claim's turn, and what it takes: a walk over the apps when anything but the
    /// rows notifications named may be claimable (it finds those too: they were committed before
    /// their notification came); otherwise up to `want` of those rows (`None`: no turn).
    fn plain_turn(&self, want: u32) -> Option<PlainTurn> {
        let mut named = self.named.lock().expect("claimable lock");
        if self.plain.swap(false, Ordering::AcqRel) {
            named.clear();
            self.walking();
            return Some(PlainTurn::Walk);
        }
        if named.is_empty() {
            return None;
        }
        let taken = named.len().min(want as usize);
        let rest = named.split_off(taken);
        Some(PlainTurn::Named(std::mem::replace(&mut *named, rest)))
    }

    pub(super) fn all(&self) {
        self.plain.store(true, Ordering::Release);
        self.limited.store(true, Ordering::Release);
    }

    /// Plain rows may have become due (lanes released their next rows).
    pub(super) fn plain(&self) {
        self.plain.store(true, Ordering::Release);
    }

    /// Limited rows may be claimable (slots were freed).
    pub(super) fn limited(&self) {
        self.limited.store(true, Ordering::Release);
    }

    pub(super) fn any(&self) -> bool {
        self.plain.load(Ordering::Acquire)
            || self.limited.load(Ordering::Acquire)
            || !self.named.lock().expect("claimable lock").is_empty()
    }
}

/// What a round's plain claim takes.
enum PlainTurn {
    /// Whatever is due, walking the apps.
    Walk,
    /// These rows, by their ids.
    Named(Vec<Uuid>),
}

pub(super) async fn claim_loop<S: Store>(
    shared: Arc<Shared<S>>,
    done: mpsc::UnboundedSender<Done>,
    mut shutdown: Shutdown,
) {
    let batch = claim_batch(&shared.config);
    let lease = shared.config.node.lease();
    let mut failures = 0u32;
    let mut next_due = None;
    let mut lanes_swept = Instant::now();
    loop {
        if shutdown.is_shutdown() {
            return;
        }
        if shared.slots.available_permits() < batch as usize {
            // No claim can add to the batches filling until slots come free: they go now.
            let waiting = shared.gathering.lock().expect("gathering lock").take_all();
            send_ready(&shared, waiting, &done).await;
        }
        let slots = tokio::select! {
            slots = shared.slots.clone().acquire_many_owned(batch) => slots.expect("the slot semaphore is never closed"),
            () = shutdown.recv() => return,
        };
        slots.forget();
        if shared.claimable.walked().elapsed() >= shared.config.poll_interval {
            shared.claimable.all();
        }
        // Limited rows first, within their limits and half the batch at most; the plain claim
        // fills what is left, so that neither kind starves the other. Both within each app's
        // share, counted in before the other claimer's round counts.
        let claimable = &shared.claimable;
        let mut round = shared.shares.round().await;
        let limited_turn = claimable.limited.swap(false, Ordering::AcqRel)
            && shared.limits.exist(&shared.store, shared.config.poll_interval).await;
        let (limited, next_token, started) = if limited_turn {
            claim_limited(&shared, &round, batch.div_ceil(2)).await
        } else {
            (0, None, Started::default())
        };
        let free = batch - limited as u32;
        let plain = match (free, claimable.plain_turn(free)) {
            (0, Some(turn)) => {
                // No free slot left this round: the plain claim's turn stays.
                match turn {
                    PlainTurn::Walk => claimable.plain(),
                    PlainTurn::Named(rows) => claimable.named(rows),
                }
                Ok((Claim { rows: Vec::new(), config_epoch: None }, false))
            }
            (_, Some(turn)) => {
                let claiming = tracing::enabled!(tracing::Level::TRACE).then(Instant::now);
                let node = &shared.config.node.node_id;
                let plain = match turn {
                    PlainTurn::Named(rows) if shared.shares.room_for_any(rows.len()) => round
                        .claim_written(&shared.store, &rows, lease, node)
                        .await
                        .map(|claim| (claim, false)),
                    _ => {
                        claimable.walking();
                        round.claim_plain(&shared.store, free, lease, node).await
                    }
                };
                if let (Some(claiming), Ok((claim, _))) = (claiming, &plain) {
                    trace_claimed(claiming, claim);
                }
                plain
            }
            (_, None) => Ok((Claim { rows: Vec::new(), config_epoch: None }, false)),
        };
        drop(round);
        start(&shared, started, &done).await;
        match plain {
            Ok((claim, again)) => {
                failures = 0;
                if again {
                    claimable.plain();
                }
                let claimed = limited + deliver_claimed(&shared, claim, &done).await;
                shared.slots.add_permits(batch as usize - claimed);
                // Lanes noted because a writer held them, by this relay or by one that died
                // before it released them: at most a poll interval late, however busy the relay.
                if lanes_swept.elapsed() >= shared.config.poll_interval {
                    lanes_swept = Instant::now();
                    if release_lanes(&shared).await {
                        claimable.plain();
                        continue;
                    }
                }
                if !claimable.any() {
                    idle(&shared, &mut shutdown, claimed == 0, &mut next_due, next_token).await;
                }
            }
            Err(e) => {
                claimable.plain();
                shared.slots.add_permits(free as usize);
                failures += 1;
                let pause = backoff(failures);
                tracing::warn!(error = %e, ?pause, "claiming failed");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    () = shutdown.recv() => {}
                }
            }
        }
    }
}

/// How many slots a claimer takes for one round, and so how many free slots a relay needs to
/// claim at once.
pub(super) fn claim_batch(config: &RelayConfig) -> u32 {
    config.batch_size.clamp(1, config.max_in_flight.max(1) as u32)
}

/// Delivers the rows a claim took: how many.
async fn deliver_claimed<S: Store>(
    shared: &Shared<S>,
    claim: Claim,
    done: &mpsc::UnboundedSender<Done>,
) -> usize {
    let claimed = claim.rows.len();
    if claimed > 0 {
        shared.metrics.claimed(claimed);
        deliver(shared, claim, done).await;
    }
    claimed
}

/// Claims up to `want` rows of limited triggers within the round's shares: how many rows it
/// claimed, when a trigger that ran out of rate tokens has one again, and the rows that start
/// now (the others wait ahead of a slot). A failure is logged; the next round tries again.
async fn claim_limited<S: Store>(
    shared: &Shared<S>,
    round: &Round<'_>,
    want: u32,
) -> (usize, Option<Instant>, Started) {
    let node = &shared.config.node;
    let held = round.held();
    let claimed = shared
        .limits
        .claim(&shared.store, want, node.lease(), &node.node_id, round.share(&held), |rows| round.took(rows))
        .await;
    match claimed {
        Ok(claimed) => {
            if claimed.rows == want as usize {
                // A full claim: more rows may be claimable.
                shared.claimable.limited();
            }
            shared.metrics.claimed(claimed.rows);
            if !claimed.idle.is_empty() {
                shared.limits.give_back(&shared.store, claimed.idle).await;
            }
            (claimed.rows, claimed.next_token_in.map(|d| Instant::now() + d), claimed.started)
        }
        Err(e) => {
            tracing::warn!(error = %e, "claiming within flow limits failed");
            shared.claimable.limited();
            (0, None, Started::default())
        }
    }
}

/// Waits for a notification, the next delayed row, a rate token, the poll interval since the
/// last walk, or the stop signal.
///
/// `next_due` remembers when the earliest delayed row comes due. It is asked of the store only
/// after a claim found nothing: while claims find rows, wake-ups keep coming and every claim
/// takes the delayed rows that came due, so the query would only cost a round trip per event.
async fn idle<S: Store>(
    shared: &Shared<S>,
    shutdown: &mut Shutdown,
    found_nothing: bool,
    next_due: &mut Option<Instant>,
    next_token: Option<Instant>,
) {
    if found_nothing {
        *next_due = match shared.store.next_due_in().await {
            Ok(due) => due.map(|d| Instant::now() + d),
            Err(_) => None,
        };
    }
    let poll = shared.claimable.walked() + shared.config.poll_interval;
    let until = [*next_due, next_token].into_iter().flatten().fold(poll, Instant::min);
    tokio::select! {
        _ = shared.wake.notified() => {}
        // Rows came due, a token is there, or it is time to look anyway.
        _ = tokio::time::sleep_until(until) => shared.claimable.all(),
        () = shutdown.recv() => {}
    }
}

/// The trace of a plain claim that took rows, begun at `claiming`: its time, and its rows' ids and
/// subjects (see docs/benchmarks.md, "The async path, timed").
fn trace_claimed(claiming: Instant, claim: &Claim) {
    if !claim.rows.is_empty() {
        tracing::trace!(
            took_us = claiming.elapsed().as_micros() as u64,
            ids = ?claim.rows.iter().map(|r| r.id).collect::<Vec<_>>(),
            subjects = ?claim.rows.iter().map(|r| r.subject.as_deref()).collect::<Vec<_>>(),
            "claimed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_turn_takes_the_rows_named_up_to_its_want_unless_a_walk_is_due_which_finds_them_too() {
        let claimable = Claimable::new();
        let rows: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
        claimable.named(rows.clone());
        assert!(matches!(claimable.plain_turn(8), Some(PlainTurn::Walk)), "a relay that starts walks");
        assert!(claimable.plain_turn(8).is_none(), "the walk was to find the rows named before it");

        claimable.named(rows.clone());
        let Some(PlainTurn::Named(first)) = claimable.plain_turn(3) else { panic!("the rows named") };
        assert_eq!(first, rows[..3]);
        assert!(claimable.any(), "rows named are left");
        let Some(PlainTurn::Named(rest)) = claimable.plain_turn(3) else { panic!("the rows named") };
        assert_eq!(rest, rows[3..]);
        assert!(claimable.plain_turn(3).is_none());
    }
}
