//! Firing cron ticks (DESIGN §3): one transaction per batch locks the due cron triggers
//! (`FOR UPDATE SKIP LOCKED`), writes one `picloud.cron.tick` delivery per trigger and moves each
//! trigger's next tick to the first one strictly after `now`. Whichever node locks a trigger fires
//! its tick and no other node sees it due any more, so a tick is delivered once cluster-wide however
//! many schedulers run; ticks missed while no scheduler ran fire once, as the latest of them, not as
//! a backlog.

use picloud_core::protocol::{EventKind, event_type, rfc3339_millis, source};
use picloud_core::{AppId, AppSlug, CronSchedule, TriggerConfig, TriggerId, TriggerName};
use serde_json::json;
use time::OffsetDateTime;

use crate::events::{Event, commit_and_wake};
use crate::model::NewDelivery;
use crate::{Result, Store};

/// A cron trigger that is due (or has no next tick yet), as [`crate::CronRepo::lock_due_cron`]
/// locked it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueCron {
    /// The trigger.
    pub trigger_id: TriggerId,
    /// Its app.
    pub app_id: AppId,
    /// The app's slug (for the CloudEvents source).
    pub app_slug: AppSlug,
    /// The trigger's name (for the CloudEvents source).
    pub trigger_name: TriggerName,
    /// The schedule, as stored (it may not parse: [`CronSchedule::unparsed`]).
    pub schedule: CronSchedule,
    /// The trigger's attempts override, if any.
    pub max_attempts: Option<u32>,
    /// The trigger's flow (ticks are in its lane when it is ordered as a whole).
    pub flow: Option<picloud_core::Flow>,
    /// The tick that is due; `None` when none was computed yet (a new or re-enabled trigger).
    pub next_tick_at: Option<OffsetDateTime>,
}

/// Where a cron trigger's next tick is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextTick {
    /// At this instant.
    At(OffsetDateTime),
    /// Never: the stored schedule does not parse (another version stored it) or has no tick to
    /// come. The trigger stays parked until it is disabled and enabled again.
    Never,
}

/// What one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CronPass {
    /// Triggers the batch took: when it is the batch size, more may be due.
    pub triggers: usize,
    /// Ticks delivered (outbox rows written); the other triggers got their first tick computed.
    pub fired: usize,
    /// Triggers parked because their schedule gives no tick to come.
    pub parked: usize,
}

/// Fires the due ticks of up to `batch` cron triggers at `now`, in one transaction, and wakes the
/// relays when it wrote deliveries. A trigger whose next tick is not computed yet gets its first
/// tick after `now` without firing. Each delivery's event time and its data's `scheduled_at` are
/// the latest tick at or before `now` (`{"scheduled_at", "schedule", "timezone"}`); the
/// delivery is due at once by the store's clock, like every other event.
pub async fn fire_due_ticks<S: Store>(
    s: &S,
    now: OffsetDateTime,
    batch: u32,
    config: &TriggerConfig,
) -> Result<CronPass> {
    let mut tx = s.begin().await?;
    let due = s.lock_due_cron(&mut tx, now, batch).await?;
    let mut pass = CronPass { triggers: due.len(), ..CronPass::default() };
    let mut rows = Vec::new();
    let mut next = Vec::with_capacity(due.len());
    for d in &due {
        if let Some(e) = d.schedule.unparsed() {
            tracing::warn!(trigger_id = %d.trigger_id, error = %e, "cron trigger parked: its schedule does not parse");
            pass.parked += 1;
            next.push((d.trigger_id, NextTick::Never));
            continue;
        }
        let schedule = &d.schedule;
        if let Some(due_at) = d.next_tick_at {
            let tick = schedule.last_at_or_before(now).filter(|t| *t >= due_at).unwrap_or(due_at);
            rows.push(tick_delivery(d, tick, config));
            pass.fired += 1;
        }
        let following = schedule.next_after(now);
        if following.is_none() {
            tracing::warn!(
                trigger_id = %d.trigger_id, "cron trigger parked: its schedule has no tick to come"
            );
            pass.parked += 1;
        }
        next.push((d.trigger_id, following.map_or(NextTick::Never, NextTick::At)));
    }
    s.insert_deliveries(&mut tx, &rows).await?;
    s.set_next_ticks(&mut tx, &next).await?;
    if rows.is_empty() {
        s.commit(tx).await?;
    } else {
        commit_and_wake(s, tx).await?;
    }
    Ok(pass)
}

fn tick_delivery(d: &DueCron, tick: OffsetDateTime, config: &TriggerConfig) -> NewDelivery {
    let data = json!({
        "scheduled_at": rfc3339_millis(tick),
        "schedule": d.schedule.expression(),
        "timezone": d.schedule.timezone(),
    });
    let payload = serde_json::value::to_raw_value(&data).expect("a JSON value serializes");
    let event = Event {
        kind: EventKind::Cron,
        event_type: event_type::CRON_TICK,
        source: source::trigger(d.app_slug.as_str(), d.trigger_name.as_str()),
        subject: None,
        payload: &payload,
        depth: 0,
        ordering_key: None,
    };
    let max_attempts = d.max_attempts.unwrap_or(config.retry.max_attempts);
    NewDelivery { event_time: Some(tick), ..event.delivery(d.app_id, Some(d.trigger_id), max_attempts) }
        .flowing(d.flow.as_ref())
}
