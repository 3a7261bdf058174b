//! Dead letters in memory.

use std::ops::Bound;

use super::*;

impl DeadLetterRepo for MemStore {
    async fn insert_dead_letters(&self, tx: &mut MemTx, rows: &[NewDeadLetter]) -> Result<Vec<DeadLetter>> {
        let now = self.now();
        let written: Vec<DeadLetter> = rows
            .iter()
            .map(|r| DeadLetter {
                id: r.id,
                app_id: r.app_id,
                trigger_id: r.trigger_id,
                trigger_name: r.trigger_name.clone(),
                kind: r.kind,
                delivery_id: r.delivery_id,
                payload: payload_clone(&r.payload),
                headers: r.headers.clone(),
                attempts: r.attempts,
                reason: r.reason,
                last_error: r.last_error.clone(),
                created_at: now,
                resolution: None,
                resolved_at: None,
                held_lane: None,
            })
            .collect();
        for d in &written {
            tx.state.dead_letters.insert(d.id, d.clone());
        }
        Ok(written)
    }

    async fn bury(&self, tx: &mut MemTx, rows: &[Bury]) -> Result<Vec<DeadLetter>> {
        let now = self.now();
        let mut written = Vec::new();
        for b in rows {
            let matches = tx.state.outbox.get(&b.id).is_some_and(|r| r.attempts == b.attempt);
            if !matches {
                continue;
            }
            let row = tx.state.outbox.remove(&b.id).expect("row just checked");
            let trigger = row.new.trigger_id.and_then(|id| tx.state.triggers.get(&id));
            let holds = trigger.and_then(|t| t.flow).is_some_and(|f| f.hold_on_dead_letter);
            let dead = DeadLetter {
                id: Uuid::now_v7(),
                app_id: row.new.app_id,
                trigger_id: trigger.map(|t| t.id),
                trigger_name: trigger.map(|t| t.name.to_string()),
                kind: row.new.kind,
                delivery_id: row.new.id,
                payload: row.new.payload,
                headers: EventHeaders {
                    event_type: row.new.event_type,
                    source: row.new.source,
                    subject: row.new.subject,
                    time: row.created_at,
                    depth: row.new.depth,
                    ordering_key: row.new.ordering_key.clone(),
                },
                attempts: row.attempts,
                reason: b.reason,
                last_error: b.error.clone().or(row.last_error),
                created_at: now,
                resolution: None,
                resolved_at: None,
                held_lane: row.new.lane.clone().filter(|_| holds),
            };
            tx.state.dead_letters.insert(dead.id, dead.clone());
            if dead.held_lane.is_none() {
                let lane = row.new.trigger_id.zip(row.new.lane.clone());
                tx.state.release(lane);
            }
            written.push(dead);
        }
        Ok(written)
    }

    async fn dead_letter(&self, app_id: AppId, id: Uuid) -> Result<Option<DeadLetter>> {
        Ok(self.lock().await.dead_letters.get(&id).filter(|d| d.app_id == app_id).cloned())
    }

    async fn lock_dead_letter(&self, tx: &mut MemTx, app_id: AppId, id: Uuid) -> Result<Option<DeadLetter>> {
        Ok(tx.state.dead_letters.get(&id).filter(|d| d.app_id == app_id).cloned())
    }

    async fn list_dead_letters(
        &self,
        app_id: AppId,
        filter: &DeadLetterFilter,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Page<DeadLetter>> {
        let s = self.lock().await;
        let found: Vec<DeadLetter> = s
            .dead_letters
            .values()
            .rev()
            .filter(|d| d.app_id == app_id && after.is_none_or(|a| d.id < a) && takes(filter, d))
            .take(limit as usize + 1)
            .cloned()
            .collect();
        Ok(Page::capped(found, limit, |d| d.payload.get().len()))
    }

    async fn unresolved_count(&self, app_id: AppId) -> Result<u64> {
        self.count_dead_letters(app_id, &DeadLetterFilter { resolution: Some(None), ..Default::default() })
            .await
    }

    async fn count_dead_letters(&self, app_id: AppId, filter: &DeadLetterFilter) -> Result<u64> {
        let s = self.lock().await;
        Ok(s.dead_letters.values().filter(|d| d.app_id == app_id && takes(filter, d)).count() as u64)
    }

    async fn lock_dead_letters(
        &self,
        tx: &mut MemTx,
        app_id: AppId,
        filter: &DeadLetterFilter,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<Uuid>> {
        // The transaction holds the whole state: nothing else changes a dead letter meanwhile.
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(tx
            .state
            .dead_letters
            .range((from, Bound::Unbounded))
            .map(|(_, d)| d)
            .filter(|d| d.app_id == app_id && takes(filter, d))
            .map(|d| d.id)
            .take(limit as usize)
            .collect())
    }

    async fn resolve(
        &self,
        tx: &mut MemTx,
        app_id: AppId,
        id: Uuid,
        resolution: Resolution,
        only_unresolved: bool,
    ) -> Result<Option<DeadLetter>> {
        let now = self.now();
        let Some(d) = tx.state.dead_letters.get_mut(&id).filter(|d| d.app_id == app_id) else {
            return Ok(None);
        };
        if only_unresolved && d.resolution.is_some() {
            return Ok(None);
        }
        d.resolution = Some(resolution);
        d.resolved_at = Some(now);
        let released = d.trigger_id.zip(d.held_lane.take());
        let resolved = d.clone();
        tx.state.release(released);
        Ok(Some(resolved))
    }

    async fn gc_dead_letters(&self, older_than: Duration, batch: u32) -> Result<u64> {
        let cutoff = self.now() - older_than;
        let mut s = self.lock().await;
        let doomed: Vec<Uuid> = s
            .dead_letters
            .values()
            .filter(|d| d.resolution.is_some() && d.resolved_at.is_some_and(|t| t < cutoff))
            .map(|d| d.id)
            .take(batch as usize)
            .collect();
        for id in &doomed {
            s.dead_letters.remove(id);
        }
        Ok(doomed.len() as u64)
    }
}

/// Whether `filter` takes `d` (Postgres: `filter_sql` of `pg/dead_letters.rs`).
fn takes(filter: &DeadLetterFilter, d: &DeadLetter) -> bool {
    filter.resolution.is_none_or(|r| d.resolution == r)
        && filter.trigger_name.as_ref().is_none_or(|n| d.trigger_name.as_ref() == Some(n))
        && filter.reason.is_none_or(|r| d.reason == r)
        && filter.created_after.is_none_or(|t| d.created_at > t)
        && filter.created_before.is_none_or(|t| d.created_at < t)
        && (!filter.replayable || d.replayable())
}
