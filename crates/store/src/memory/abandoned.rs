//! Abandoned executions in memory.

use super::*;

impl AbandonedRepo for MemStore {
    async fn insert_abandoned(&self, row: &AbandonedExecution) -> Result<AbandonedExecution> {
        let now = self.now();
        let mut s = self.lock().await;
        let stored = AbandonedExecution {
            trigger_id: row.trigger_id.filter(|id| s.triggers.contains_key(id)),
            created_at: now,
            ..row.clone()
        };
        s.abandoned.insert(stored.id, stored.clone());
        Ok(stored)
    }

    async fn list_abandoned(
        &self,
        app_id: AppId,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Page<AbandonedExecution>> {
        let s = self.lock().await;
        let found: Vec<AbandonedExecution> = s
            .abandoned
            .values()
            .rev()
            .filter(|a| a.app_id == app_id && after.is_none_or(|after| a.id < after))
            .take(limit as usize + 1)
            .cloned()
            .collect();
        Ok(Page::capped(found, limit, |a| a.result.as_ref().map_or(0, |r| r.get().len())))
    }

    async fn gc_abandoned(&self, older_than: Duration, batch: u32) -> Result<u64> {
        let cutoff = self.now() - older_than;
        let mut s = self.lock().await;
        let doomed: Vec<Uuid> = s
            .abandoned
            .values()
            .filter(|a| a.created_at < cutoff)
            .map(|a| a.id)
            .take(batch as usize)
            .collect();
        for id in &doomed {
            s.abandoned.remove(id);
        }
        Ok(doomed.len() as u64)
    }
}
