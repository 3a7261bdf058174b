//! The outbox in memory: inserts, claims, completions.

use super::*;

impl OutboxRepo for MemStore {
    async fn listen(&self) -> Result<Wakeups> {
        let rx = self.wake.subscribe();
        Ok(futures::stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            Some((Ok(()), rx))
        })
        .boxed())
    }

    async fn wake_relays(&self) -> Result<()> {
        self.wake.send_modify(|n| *n += 1);
        Ok(())
    }

    async fn next_due_in(&self) -> Result<Option<Duration>> {
        let now = self.now();
        let s = self.lock().await;
        Ok(s.outbox
            .values()
            .filter(|r| r.due_at > now)
            .map(|r| r.due_at)
            .min()
            .map(|due| (due - now).unsigned_abs()))
    }

    async fn insert_deliveries(&self, tx: &mut MemTx, rows: &[NewDelivery]) -> Result<()> {
        let now = self.now();
        for row in rows {
            if let Some(key) = &row.idempotency_key {
                let taken = tx.state.outbox.values().any(|r| {
                    r.new.trigger_id == row.trigger_id && r.new.idempotency_key.as_ref() == Some(key)
                });
                if taken {
                    return Err(Error::DuplicateIdempotencyKey(key.clone()));
                }
            }
            tx.state.outbox.insert(
                row.id,
                OutboxRow {
                    new: row.clone(),
                    attempts: 0,
                    due_at: now + row.delay,
                    leased_until: None,
                    last_error: None,
                    created_at: row.event_time.unwrap_or(now),
                },
            );
        }
        Ok(())
    }

    async fn insert_idempotent(&self, tx: &mut MemTx, row: &NewDelivery) -> Result<(Uuid, bool)> {
        let key = row.idempotency_key.as_ref().expect("insert_idempotent needs an idempotency key");
        let existing = tx
            .state
            .outbox
            .values()
            .find(|r| r.new.trigger_id == row.trigger_id && r.new.idempotency_key.as_ref() == Some(key))
            .map(|r| r.new.id);
        if let Some(id) = existing {
            return Ok((id, false));
        }
        self.insert_deliveries(tx, std::slice::from_ref(row)).await?;
        Ok((row.id, true))
    }

    async fn claim_due(&self, batch: u32, lease: Duration, _node: &str) -> Result<Claim> {
        let now = self.now();
        let mut s = self.lock().await;
        let mut due: Vec<(OffsetDateTime, Uuid)> = s
            .outbox
            .values()
            .filter(|r| r.due_at <= now && r.leased_until.is_none_or(|l| l <= now))
            .map(|r| (r.due_at, r.new.id))
            .collect();
        due.sort();
        due.truncate(batch as usize);
        let claimed: Vec<ClaimedDelivery> = due
            .into_iter()
            .map(|(_, id)| lease_row(s.outbox.get_mut(&id).expect("row just listed"), now, lease))
            .collect();
        let config_epoch = (!claimed.is_empty()).then_some(s.config_epoch);
        Ok(Claim { rows: claimed, config_epoch })
    }

    async fn insert_sync_call(
        &self,
        call: &NewSyncCall,
        lease: Duration,
        _node: &str,
    ) -> Result<SyncCallWrite> {
        let now = self.now();
        let mut s = self.lock().await;
        if call.authorized_at.is_some_and(|epoch| epoch != s.config_epoch) {
            return Ok(SyncCallWrite::Stale);
        }
        let Some(trigger) =
            s.triggers.values().find(|t| t.app_id == call.app_id && t.name.as_str() == call.trigger_name)
        else {
            return Ok(SyncCallWrite::NoTrigger);
        };
        if !(trigger.enabled && trigger.spec.kind() == TriggerKind::Http) {
            return Ok(SyncCallWrite::Refused(trigger.clone()));
        }
        let Some(target) = target(&s, trigger) else { return Ok(SyncCallWrite::NoTrigger) };
        let row = call.delivery(trigger.id);
        let mut stored = OutboxRow {
            new: row,
            attempts: 0,
            due_at: now,
            leased_until: None,
            last_error: None,
            created_at: now,
        };
        let claimed = lease_row(&mut stored, now, lease);
        s.outbox.insert(call.id, stored);
        Ok(SyncCallWrite::Written { row: claimed, target: Box::new(target) })
    }

    async fn delete_deliveries(&self, tx: &mut MemTx, ids: &[Uuid]) -> Result<u64> {
        Ok(ids.iter().filter(|id| tx.state.outbox.remove(id).is_some()).count() as u64)
    }

    async fn delete_delivered(&self, ids: &[Uuid]) -> Result<u64> {
        let mut s = self.lock().await;
        Ok(ids.iter().filter(|id| s.outbox.remove(id).is_some()).count() as u64)
    }

    async fn reschedule(&self, tx: &mut MemTx, rows: &[Reschedule]) -> Result<u64> {
        let now = self.now();
        let mut done = 0;
        for r in rows {
            if let Some(row) = tx.state.outbox.get_mut(&r.id).filter(|row| row.attempts == r.attempt) {
                row.due_at = now + r.delay;
                row.leased_until = None;
                row.last_error = Some(r.error.clone());
                row.attempts -= u32::from(r.refund_attempt);
                done += 1;
            }
        }
        Ok(done)
    }

    async fn pending_for_dead_letter(
        &self,
        tx: &mut MemTx,
        dead_letter_id: Uuid,
        except: Uuid,
    ) -> Result<u64> {
        Ok(tx
            .state
            .outbox
            .values()
            .filter(|r| r.new.dead_letter_id == Some(dead_letter_id) && r.new.id != except)
            .count() as u64)
    }
}
