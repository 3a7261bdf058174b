//! Completing finished attempts in one transaction per batch: delete delivered rows, reschedule
//! retries with backoff, move exhausted and rejected deliveries into the dead letters (fanning them
//! out to dead-letter triggers), resolve dead letters whose dead-letter deliveries ended, and put
//! back emails that wait for a node that sends email.

use std::collections::HashMap;
use std::time::Duration;

use picloud_core::protocol::EventKind;
use picloud_core::{AppId, AppSlug, RetryPolicy, TriggerConfig, TriggerId};
use picloud_store::events::fan_out_dead_letters;
use picloud_store::{AttemptRecord, Bury, DeadLetterReason, Reschedule, Resolution, Store};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::answer::Answer;

/// One finished attempt, with what completing it needs.
#[derive(Debug, Clone)]
pub struct Done {
    /// The delivery.
    pub id: Uuid,
    /// Its app.
    pub app_id: AppId,
    /// Its app's slug, when the app still exists.
    pub app_slug: Option<AppSlug>,
    /// Its trigger (None for emails).
    pub trigger_id: Option<TriggerId>,
    /// Its trigger's name.
    pub trigger_name: Option<String>,
    /// Its event kind.
    pub kind: EventKind,
    /// The attempt that finished.
    pub attempt: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// A sync caller's inbox: such a row is deleted whatever the answer.
    pub reply_to: Option<String>,
    /// For a dead_letter delivery: the dead letter it reports.
    pub dead_letter_id: Option<Uuid>,
    /// The trigger's retry policy now.
    pub policy: RetryPolicy,
    /// What the attempt came to.
    pub answer: Answer,
    /// For an email: when it was written (a waiting email's backoff grows with its age).
    pub email_written_at: Option<OffsetDateTime>,
    /// Whether the row heads a lane (its trigger orders deliveries).
    pub in_lane: bool,
    /// Whether it was claimed within its trigger's limits (it holds one of the relay's slots).
    pub gated: bool,
    /// When the attempt was sent.
    pub started_at: OffsetDateTime,
    /// How long after its publishing its answer came (or its deadline passed); none for a row
    /// that was never sent.
    pub latency: Option<Duration>,
}

/// What one completion batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Completed {
    /// Rows deleted after `ok`.
    pub delivered: usize,
    /// Rows scheduled for another attempt.
    pub retried: usize,
    /// Dead letters written.
    pub dead_lettered: usize,
    /// Deliveries to dead-letter triggers written for them.
    pub fanned_out: usize,
    /// Sync rows whose result went to their caller.
    pub answered: usize,
    /// Rows dropped because their trigger or app is gone.
    pub orphaned: usize,
    /// Dead-letter deliveries that ended without success.
    pub dead_letter_deliveries_failed: usize,
    /// Emails put back to wait, without using up an attempt, because no node sends email.
    pub waiting: usize,
    /// Heads of lanes that left the outbox (delivered, dead-lettered, dropped): the next row of
    /// each lane may have become due.
    pub lanes_moved: usize,
}

/// The longest an interrupted attempt waits before its row is due again: it was the platform's
/// failure, not the delivery's, so the trigger's backoff does not apply (only its jitter, below).
const GIVEN_BACK_WITHIN: Duration = Duration::from_secs(1);

/// How a row ends.
enum Fate {
    Delete,
    /// Another attempt after `delay`; `refund` gives back the attempt the row was claimed with
    /// (the platform, not the delivery, cut it short).
    Retry {
        delay: Duration,
        refund: bool,
    },
    /// An email nobody took: no node runs the email executor. It waits, keeping its attempts.
    Wait(OffsetDateTime),
    Bury(DeadLetterReason),
}

fn fate(d: &Done) -> Fate {
    match (&d.answer, d.email_written_at) {
        (Answer::Ok(_) | Answer::Orphaned, _) => Fate::Delete,
        _ if d.reply_to.is_some() => Fate::Delete,
        (Answer::NoResponders, Some(written)) => Fate::Wait(written),
        (Answer::Fail(_), _) => Fate::Bury(DeadLetterReason::Rejected),
        (Answer::Unauthorized(_), _) => Fate::Bury(DeadLetterReason::Unauthorized),
        (Answer::Interrupted(_), _) => {
            Fate::Retry { delay: d.policy.next_delay(1, None).min(GIVEN_BACK_WITHIN), refund: true }
        }
        (Answer::Retry { after, .. }, _) if d.attempt < d.max_attempts => {
            Fate::Retry { delay: d.policy.next_delay(d.attempt, *after), refund: false }
        }
        (Answer::Invalid(_) | Answer::Timeout | Answer::NoResponders | Answer::Failed(_), _)
            if d.attempt < d.max_attempts =>
        {
            Fate::Retry { delay: d.policy.next_delay(d.attempt, None), refund: false }
        }
        _ => Fate::Bury(DeadLetterReason::Exhausted),
    }
}

/// How long an email that found no email executor waits before it is offered again: as long as
/// it has waited so far, within the policy's base and cap. The backoff doubles from round to
/// round without a count of the rounds, which are not attempts.
fn email_wait(policy: &RetryPolicy, waited: Duration) -> Duration {
    waited.clamp(policy.base, policy.max)
}

/// Completes a batch of finished attempts in one transaction.
///
/// Deliveries of `dead_letter` triggers never become dead letters: when one ends without
/// success it is deleted, and once none of its siblings is left the dead letter it reports is
/// resolved `handler_failed` (unless a sibling succeeded: then it is `handled_by_script`).
///
/// An email that met "no responders" waits for a node that sends email (DESIGN §10: emails wait
/// while `PICLOUD_SMTP_URL` is unset) and never becomes an exhausted dead letter for it: it is
/// rescheduled with the attempt it was claimed with given back (`Reschedule::refund_attempt`).
/// A rescheduled attempt goes into its delivery's history, noted as made by `node`.
pub async fn complete<S: Store>(
    store: &S,
    config: &TriggerConfig,
    handler_timeout: Duration,
    node: &str,
    batch: &[Done],
) -> picloud_store::Result<Completed> {
    let mut stats = Completed::default();
    let mut deletes = Vec::new();
    let mut retries = Vec::new();
    let mut waits = Vec::new();
    let mut buries = Vec::new();
    let mut handled = Vec::new();
    let mut failed_reports = Vec::new();
    let now = store.clock().now();
    for d in batch {
        let fate = fate(d);
        if d.in_lane && matches!(fate, Fate::Delete | Fate::Bury(_)) {
            stats.lanes_moved += 1;
        }
        let error = || d.answer.error(handler_timeout);
        match (fate, d.kind) {
            (Fate::Delete, _) => {
                deletes.push(d.id);
                match &d.answer {
                    _ if d.reply_to.is_some() => stats.answered += 1,
                    Answer::Orphaned => stats.orphaned += 1,
                    _ => stats.delivered += 1,
                }
                if let (Answer::Ok(_), Some(dl)) = (&d.answer, d.dead_letter_id) {
                    handled.push((d.app_id, dl));
                }
            }
            (Fate::Retry { delay, refund }, _) => {
                let error = error();
                retries.push(Reschedule {
                    id: d.id,
                    attempt: d.attempt,
                    delay,
                    error: error.clone().unwrap_or_default(),
                    refund_attempt: refund,
                    record: Some(AttemptRecord {
                        attempt: d.attempt,
                        started_at: d.started_at,
                        ended_at: now,
                        outcome: d.answer.outcome().to_owned(),
                        error,
                        node: node.to_owned(),
                    }),
                });
            }
            (Fate::Wait(written), _) => {
                let waited = (now - written).try_into().unwrap_or(Duration::ZERO);
                let delay = email_wait(&d.policy, waited);
                tracing::warn!(
                    delivery_id = %d.id,
                    app_id = %d.app_id,
                    wait = ?delay,
                    "an email waits: no node sends email (PICLOUD_SMTP_URL is unset everywhere); it keeps its attempts"
                );
                waits.push(Reschedule {
                    id: d.id,
                    attempt: d.attempt,
                    delay,
                    error: error().unwrap_or_default(),
                    refund_attempt: true,
                    record: None,
                });
            }
            (Fate::Bury(_), EventKind::DeadLetter) => {
                deletes.push(d.id);
                stats.dead_letter_deliveries_failed += 1;
                if let Some(dl) = d.dead_letter_id {
                    failed_reports.push((d.app_id, dl, d.id));
                }
            }
            (Fate::Bury(reason), _) => {
                buries.push(Bury { id: d.id, attempt: d.attempt, reason, error: error() });
            }
        }
    }

    // Rows outside lanes are deleted in one statement; a head of a lane is deleted in the
    // transaction that makes the lane's next row head.
    if retries.is_empty()
        && waits.is_empty()
        && buries.is_empty()
        && handled.is_empty()
        && failed_reports.is_empty()
        && stats.lanes_moved == 0
    {
        store.delete_delivered(&deletes).await?;
        return Ok(stats);
    }
    let mut tx = store.begin().await?;
    store.delete_deliveries(&mut tx, &deletes).await?;
    stats.retried = store.reschedule(&mut tx, &retries).await? as usize;
    stats.waiting = store.reschedule(&mut tx, &waits).await? as usize;
    let dead = store.bury(&mut tx, &buries).await?;
    stats.dead_lettered = dead.len();
    let slugs: HashMap<AppId, &AppSlug> =
        batch.iter().filter_map(|d| d.app_slug.as_ref().map(|slug| (d.app_id, slug))).collect();
    for (app_id, slug) in &slugs {
        let of_app: Vec<_> = dead.iter().filter(|d| d.app_id == *app_id).cloned().collect();
        if !of_app.is_empty() {
            stats.fanned_out += fan_out_dead_letters(store, &mut tx, slug, &of_app, config).await?;
        }
    }
    for (app_id, dl) in handled {
        store.resolve(&mut tx, app_id, dl, Resolution::HandledByScript, true).await?;
    }
    for (app_id, dl, row) in failed_reports {
        if store.pending_for_dead_letter(&mut tx, dl, row).await? == 0 {
            store.resolve(&mut tx, app_id, dl, Resolution::HandlerFailed, true).await?;
        }
    }
    store.commit(tx).await?;
    for dl in &dead {
        tracing::info!(
            delivery_id = %dl.delivery_id,
            dead_letter_id = %dl.id,
            reason = dl.reason.as_str(),
            attempts = dl.attempts,
            "delivery dead-lettered"
        );
    }
    if stats.fanned_out > 0 {
        store.wake_relays().await?;
    }
    Ok(stats)
}
