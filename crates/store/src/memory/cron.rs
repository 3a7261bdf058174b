//! Cron triggers' next ticks in memory. A transaction holds the whole state, so what it locks
//! nobody else sees until it ends, as `FOR UPDATE SKIP LOCKED` would have it.

use picloud_core::TriggerId;
use time::OffsetDateTime;

use super::{MemStore, MemTx, State};
use crate::cron::{DueCron, NextTick};
use crate::model::{Trigger, TriggerSpec};
use crate::{CronRepo, Result};

/// `t` at the microsecond precision Postgres keeps.
fn micros(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(t.nanosecond() / 1000 * 1000).expect("valid nanosecond")
}

/// The enabled cron triggers with their next tick: `None` when not computed yet.
fn enabled_cron(state: &State) -> impl Iterator<Item = (&Trigger, Option<NextTick>)> {
    state
        .triggers
        .values()
        .filter(|t| t.enabled && matches!(t.spec, TriggerSpec::Cron { .. }))
        .map(|t| (t, state.cron_ticks.get(&t.id).copied()))
}

impl CronRepo for MemStore {
    async fn lock_due_cron(&self, tx: &mut MemTx, now: OffsetDateTime, batch: u32) -> Result<Vec<DueCron>> {
        let now = micros(now);
        let state = &*tx.state;
        let mut due: Vec<DueCron> = enabled_cron(state)
            .filter_map(|(t, next)| {
                let next_tick_at = match next {
                    None => None,
                    Some(NextTick::At(at)) if at <= now => Some(at),
                    Some(_) => return None,
                };
                let TriggerSpec::Cron { schedule } = &t.spec else { return None };
                Some(DueCron {
                    trigger_id: t.id,
                    app_id: t.app_id,
                    app_slug: state.apps.get(&t.app_id)?.slug.clone(),
                    trigger_name: t.name.clone(),
                    schedule: schedule.clone(),
                    max_attempts: t.retry.max_attempts,
                    flow: t.flow,
                    next_tick_at,
                })
            })
            .collect();
        due.sort_by_key(|d| (d.next_tick_at.is_some(), d.next_tick_at, d.trigger_id));
        due.truncate(batch as usize);
        Ok(due)
    }

    async fn set_next_ticks(&self, tx: &mut MemTx, ticks: &[(TriggerId, NextTick)]) -> Result<()> {
        for (id, next) in ticks {
            if tx.state.triggers.contains_key(id) {
                tx.state.cron_ticks.insert(*id, *next);
            }
        }
        Ok(())
    }

    async fn next_cron_tick(&self, now: OffsetDateTime) -> Result<Option<OffsetDateTime>> {
        let now = micros(now);
        let state = self.lock().await;
        Ok(enabled_cron(&state)
            .filter_map(|(_, next)| match next {
                None => Some(now),
                Some(NextTick::At(at)) => Some(at),
                Some(NextTick::Never) => None,
            })
            .min())
    }
}
