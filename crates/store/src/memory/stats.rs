//! Trigger statistics in memory.

use std::collections::HashMap;
use std::time::Duration;

use picloud_core::{AppId, TriggerId};
use time::OffsetDateTime;

use super::MemStore;
use crate::model::{AttemptStats, DeliveryState, StatsBucket, TriggerBacklog};
use crate::{Result, StatsRepo};

impl StatsRepo for MemStore {
    async fn record_attempts(&self, node: &str, stats: &[AttemptStats]) -> Result<()> {
        let now = self.now();
        let minute = now.replace_second(0).and_then(|t| t.replace_nanosecond(0)).expect("a whole minute");
        let mut s = self.lock().await;
        for counted in stats {
            s.stats
                .entry((counted.trigger_id, minute, node.to_owned()))
                .or_insert_with(|| AttemptStats::new(counted.trigger_id))
                .merge(counted);
        }
        Ok(())
    }

    async fn attempt_stats(
        &self,
        trigger_id: TriggerId,
        since: OffsetDateTime,
        step: Duration,
    ) -> Result<Vec<StatsBucket>> {
        let s = self.lock().await;
        let mut buckets: Vec<StatsBucket> = Vec::new();
        let mut minutes: Vec<_> =
            s.stats.iter().filter(|((t, minute, _), _)| *t == trigger_id && *minute >= since).collect();
        minutes.sort_by_key(|((_, minute, _), _)| *minute);
        for ((_, minute, _), counted) in minutes {
            let steps = ((*minute - since).as_seconds_f64() / step.as_secs_f64()).floor();
            let start = since + step.mul_f64(steps);
            match buckets.last_mut() {
                Some(last) if last.start == start => last.attempts.merge(counted),
                _ => buckets.push(StatsBucket { start, attempts: counted.clone() }),
            }
        }
        Ok(buckets)
    }

    async fn backlogs(&self, app_id: AppId) -> Result<Vec<(Option<TriggerId>, TriggerBacklog)>> {
        let now = self.now();
        let s = self.lock().await;
        let mut per_trigger: HashMap<Option<TriggerId>, TriggerBacklog> = HashMap::new();
        for row in s.outbox.values().filter(|r| r.new.app_id == app_id) {
            let delivery = s.delivery_of(row);
            let backlog = per_trigger.entry(row.new.trigger_id).or_default();
            match delivery.state(now) {
                DeliveryState::Pending => {
                    backlog.pending += 1;
                    backlog.add(&TriggerBacklog {
                        oldest_due: Some(delivery.due_at),
                        ..TriggerBacklog::default()
                    });
                }
                DeliveryState::Scheduled => backlog.scheduled += 1,
                DeliveryState::InFlight => backlog.in_flight += 1,
                DeliveryState::Waiting => backlog.waiting += 1,
            }
        }
        Ok(per_trigger.into_iter().collect())
    }

    async fn gc_stats(&self, older_than: Duration, batch: u32) -> Result<u64> {
        let cutoff = self.now() - older_than;
        let mut s = self.lock().await;
        let doomed: Vec<_> =
            s.stats.keys().filter(|(_, minute, _)| *minute < cutoff).take(batch as usize).cloned().collect();
        for key in &doomed {
            s.stats.remove(key);
        }
        Ok(doomed.len() as u64)
    }
}
