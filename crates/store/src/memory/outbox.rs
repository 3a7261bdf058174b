//! The outbox in memory: inserts, claims, completions.

use super::*;

/// An app a claim's walk visits: whether it has a due row, and its claimable rows.
type WalkedApp = (bool, Vec<(OffsetDateTime, Uuid)>);

impl State {
    /// `row` as the deliveries API shows it.
    pub(super) fn delivery_of(&self, row: &OutboxRow) -> Delivery {
        Delivery {
            id: row.new.id,
            app_id: row.new.app_id,
            trigger_id: row.new.trigger_id,
            trigger_name: row.new.trigger_id.and_then(|t| self.triggers.get(&t)).map(|t| t.name.to_string()),
            kind: row.new.kind,
            attempts: row.attempts,
            max_attempts: row.new.max_attempts,
            due_at: row.due_at,
            leased_until: row.leased_until,
            waiting: row.waiting,
            gated: row.new.gated,
            sync: row.new.reply_to.is_some(),
            ordering_key: row.new.ordering_key.clone(),
            last_error: row.last_error.clone(),
            created_at: row.created_at,
            progress: row.progress,
        }
    }

    /// The first row of a lane: its head, or the row that becomes head next.
    fn lane_first(&self, trigger: TriggerId, lane: &str) -> Option<&OutboxRow> {
        self.outbox
            .values()
            .filter(|r| r.new.trigger_id == Some(trigger) && r.new.lane.as_deref() == Some(lane))
            .min_by_key(|r| r.lane_seq)
    }

    fn lane_held(&self, trigger: TriggerId, lane: &str) -> bool {
        self.dead_letters
            .values()
            .any(|d| d.trigger_id == Some(trigger) && d.held_lane.as_deref() == Some(lane))
    }

    /// Gives the newest delivery of the lane of `row` the event of `row`, if it has not started
    /// (`debounce` of Postgres): the delivery it replaced the event of, if it did.
    fn debounce(&mut self, row: &NewDelivery, now: OffsetDateTime) -> Option<Uuid> {
        let (Some(trigger), Some(lane)) = (row.trigger_id, row.lane.as_deref()) else { return None };
        let newest = self
            .outbox
            .values()
            .filter(|r| r.new.trigger_id == Some(trigger) && r.new.lane.as_deref() == Some(lane))
            .max_by_key(|r| r.lane_seq)
            .filter(|r| r.attempts == 0 && r.leased_until.is_none() && r.new.idempotency_key.is_none())
            .map(|r| r.new.id);
        let old = self.outbox.get_mut(&newest?)?;
        old.new.payload = debounced_data(old.new.kind, &row.payload, &old.new.payload);
        old.new.event_type.clone_from(&row.event_type);
        old.new.subject.clone_from(&row.subject);
        old.new.source.clone_from(&row.source);
        old.new.depth = row.depth;
        old.due_at = now + row.delay;
        old.created_at = row.event_time.unwrap_or(now);
        Some(old.new.id)
    }

    /// Writes a delivery, in its lane as `insert_deliveries` of Postgres does: the delivery it is.
    fn insert_row(&mut self, row: &NewDelivery, now: OffsetDateTime) -> Uuid {
        if row.replaces_newest()
            && let Some(replaced) = self.debounce(row, now)
        {
            return replaced;
        }
        let (lane_seq, waiting) = match (row.trigger_id, row.lane.as_deref()) {
            (Some(trigger), Some(lane)) => {
                let first = self.lane_first(trigger, lane).map(|r| (r.lane_seq, r.waiting));
                let at_front = row.front_of_lane && first.is_none_or(|(_, waiting)| waiting);
                match first {
                    Some((Some(seq), true)) if at_front => (Some(seq - 1), false),
                    _ if at_front => (Some(self.next_lane_seq()), false),
                    _ => {
                        let waiting = first.is_some() || self.lane_held(trigger, lane);
                        (Some(self.next_lane_seq()), waiting)
                    }
                }
            }
            _ => (None, false),
        };
        self.outbox.insert(
            row.id,
            OutboxRow {
                new: row.clone(),
                attempts: 0,
                due_at: now + row.delay,
                leased_until: None,
                leased_by: None,
                last_error: None,
                created_at: row.event_time.unwrap_or(now),
                lane_seq,
                waiting,
                progress: None,
                attempt_log: Vec::new(),
            },
        );
        row.id
    }

    fn next_lane_seq(&mut self) -> i64 {
        self.lane_seq += 1;
        self.lane_seq
    }

    /// Releases lanes whose head left or whose dead letter was resolved: makes each one's first
    /// row its head when it waits and no dead letter holds the lane. (Postgres notes a lane a
    /// writer holds for a later release; here no writer holds one while this runs.)
    pub(super) fn release(&mut self, lanes: impl IntoIterator<Item = (TriggerId, String)>) {
        for (trigger, lane) in lanes {
            if self.lane_held(trigger, &lane) {
                continue;
            }
            let first = self.lane_first(trigger, &lane).filter(|r| r.waiting).map(|r| r.new.id);
            if let Some(row) = first.and_then(|id| self.outbox.get_mut(&id)) {
                row.waiting = false;
            }
        }
    }

    /// Deletes rows, releasing the lanes they headed.
    fn delete_rows(&mut self, ids: &[Uuid]) -> u64 {
        let gone: Vec<OutboxRow> = ids.iter().filter_map(|id| self.outbox.remove(id)).collect();
        self.release(gone.iter().filter_map(|r| Some((r.new.trigger_id?, r.new.lane.clone()?))));
        gone.len() as u64
    }
}

impl OutboxRepo for MemStore {
    async fn listen(&self) -> Result<Wakeups> {
        let rx = self.wake.subscribe();
        Ok(futures::stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            Some((Ok(Wakeup::Any), rx))
        })
        .boxed())
    }

    async fn wake_relays(&self) -> Result<()> {
        self.wake.send_modify(|n| *n += 1);
        Ok(())
    }

    async fn wake_relays_for(&self, written: Vec<Uuid>) -> Result<()> {
        if written.is_empty() {
            return Ok(());
        }
        self.wake_relays().await
    }

    async fn next_due_in(&self) -> Result<Option<Duration>> {
        let now = self.now();
        let s = self.lock().await;
        // As Postgres: a gated row counts only while its trigger has limits (the claim within
        // them is the only one that takes it).
        let claimable = |r: &OutboxRow| {
            !r.waiting && (!r.new.gated || r.new.trigger_id.is_some_and(|t| s.flow_state.contains_key(&t)))
        };
        Ok(s.outbox
            .values()
            .filter(|r| r.due_at > now && claimable(r))
            .map(|r| r.due_at)
            .min()
            .map(|due| (due - now).unsigned_abs()))
    }

    async fn release_lanes(&self, _batch: u32) -> Result<u64> {
        Ok(0)
    }

    async fn insert_deliveries(&self, tx: &mut MemTx, rows: &[NewDelivery]) -> Result<Vec<Uuid>> {
        let now = self.now();
        let mut landed = Vec::with_capacity(rows.len());
        for row in rows {
            if let Some(key) = &row.idempotency_key {
                let taken = tx.state.outbox.values().any(|r| {
                    r.new.trigger_id == row.trigger_id && r.new.idempotency_key.as_ref() == Some(key)
                });
                if taken {
                    return Err(Error::DuplicateIdempotencyKey(key.clone()));
                }
            }
            landed.push(tx.state.insert_row(row, now));
        }
        Ok(landed)
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

    async fn claim_shared(
        &self,
        want: u32,
        lease: Duration,
        node: &str,
        walk: Walk<'_>,
    ) -> Result<SharedClaim> {
        let now = self.now();
        let mut s = self.lock().await;
        // Each app with rows in the plain claim's index, from `walk.from`, and its due rows
        // oldest first: what the walk of Postgres visits.
        let mut apps: BTreeMap<AppId, WalkedApp> = BTreeMap::new();
        for r in s.outbox.values().filter(|r| !r.waiting && !r.new.gated) {
            if walk.from.is_some_and(|from| r.new.app_id < from) {
                continue;
            }
            let (due, rows) = apps.entry(r.new.app_id).or_default();
            *due |= r.due_at <= now;
            if r.due_at <= now && r.leased_until.is_none_or(|l| l <= now) {
                rows.push((r.due_at, r.new.id));
            }
        }
        let visited: Vec<(AppId, WalkedApp)> = apps.into_iter().take(APPS_PER_CLAIM as usize).collect();
        let rooms: Vec<(u32, bool)> =
            visited.iter().map(|(app, (due, _))| (walk.share.room(*app), *due)).collect();
        let quotas = quotas(want, &rooms);
        let (visits, last_visited) = (visited.len() as u32, visited.last().map(|(app, _)| *app));
        let mut picked = Vec::new();
        let mut more = false;
        for ((_, (_, mut rows)), quota) in visited.into_iter().zip(quotas) {
            rows.sort();
            if quota > 0 && rows.len() >= quota as usize {
                more = true;
            }
            picked.extend(rows.into_iter().take(quota as usize).map(|(_, id)| id));
        }
        picked.truncate(want as usize);
        let full = picked.len() >= want as usize;
        more |= full;
        let last_taken = picked.last().and_then(|id| s.outbox.get(id)).map(|r| r.new.app_id).filter(|_| full);
        let resume_at = SharedClaim::resume_at(visits, last_visited, last_taken);
        let claimed: Vec<ClaimedDelivery> = picked
            .iter()
            .map(|id| lease_row(s.outbox.get_mut(id).expect("row just listed"), now, lease, node))
            .collect();
        let config_epoch = (!claimed.is_empty()).then_some(s.config_epoch);
        Ok(SharedClaim { claim: Claim { rows: claimed, config_epoch }, more, resume_at })
    }

    async fn claim_written(&self, ids: &[Uuid], lease: Duration, node: &str) -> Result<Claim> {
        let now = self.now();
        let mut s = self.lock().await;
        let claimable = |r: &OutboxRow| {
            !r.waiting && !r.new.gated && r.due_at <= now && r.leased_until.is_none_or(|l| l <= now)
        };
        let rows: Vec<ClaimedDelivery> = ids
            .iter()
            .filter_map(|id| {
                s.outbox.get_mut(id).filter(|r| claimable(r)).map(|r| lease_row(r, now, lease, node))
            })
            .collect();
        let config_epoch = (!rows.is_empty()).then_some(s.config_epoch);
        Ok(Claim { rows, config_epoch })
    }

    async fn claim_limited(&self, want: u32, lease: Duration, holder: Holder<'_>) -> Result<LimitedClaim> {
        let mut s = self.lock().await;
        // The clock is read under the lock: claims spend tokens in the order of their times.
        let now = self.now();
        Ok(s.claim_limited(want, lease, holder, now))
    }

    async fn limits_exist(&self) -> Result<bool> {
        Ok(!self.lock().await.flow_state.is_empty())
    }

    async fn release_slots(&self, holder: Uuid, triggers: Option<&[TriggerId]>) -> Result<()> {
        let of = |t: &TriggerId| triggers.is_none_or(|ts| ts.contains(t));
        self.lock().await.flow_slots.retain(|(t, h), _| *h != holder || !of(t));
        Ok(())
    }

    async fn extend_slots(
        &self,
        holder: Uuid,
        triggers: &[TriggerId],
        lease: Duration,
    ) -> Result<Vec<TriggerId>> {
        let now = self.now();
        let mut kept = Vec::new();
        for ((trigger, h), (_, end)) in self.lock().await.flow_slots.iter_mut() {
            if *h == holder && triggers.contains(trigger) && *end > now {
                *end = (*end).max(now + lease);
                kept.push(*trigger);
            }
        }
        Ok(kept)
    }

    async fn insert_sync_call(
        &self,
        call: &NewSyncCall,
        lease: Duration,
        node: &str,
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
            leased_by: None,
            last_error: None,
            created_at: now,
            lane_seq: None,
            waiting: false,
            progress: None,
            attempt_log: Vec::new(),
        };
        let claimed = lease_row(&mut stored, now, lease, node);
        s.outbox.insert(call.id, stored);
        Ok(SyncCallWrite::Written { row: claimed, target: Box::new(target) })
    }

    async fn delete_deliveries(&self, tx: &mut MemTx, ids: &[Uuid]) -> Result<u64> {
        Ok(tx.state.delete_rows(ids))
    }

    async fn delete_delivered(&self, ids: &[Uuid]) -> Result<u64> {
        Ok(self.lock().await.delete_rows(ids))
    }

    async fn reschedule(&self, tx: &mut MemTx, rows: &[Reschedule]) -> Result<u64> {
        let now = self.now();
        let mut done = 0;
        for r in rows {
            if let Some(row) = tx.state.outbox.get_mut(&r.id).filter(|row| row.attempts == r.attempt) {
                row.due_at = now + r.delay;
                row.leased_until = None;
                row.leased_by = None;
                row.last_error = Some(r.error.clone());
                row.attempts -= u32::from(r.refund_attempt);
                if let Some(record) = &r.record {
                    if row.attempt_log.len() >= ATTEMPTS_KEPT {
                        row.attempt_log.remove(0);
                    }
                    row.attempt_log.push(record.clone());
                }
                done += 1;
            }
        }
        Ok(done)
    }

    async fn extend_leases(&self, node: &str, rows: &[LeaseExtension]) -> Result<Vec<Uuid>> {
        let now = self.now();
        let mut state = self.lock().await;
        let mut extended = Vec::with_capacity(rows.len());
        for r in rows {
            let row = state
                .outbox
                .get_mut(&r.id)
                .filter(|row| row.attempts == r.attempt && row.leased_by.as_deref() == Some(node));
            if let Some(row) = row.filter(|row| row.leased_until.is_some()) {
                row.leased_until = row.leased_until.map(|until| until.max(now + r.lease));
                row.progress = r.progress.or(row.progress);
                extended.push(r.id);
            }
        }
        Ok(extended)
    }

    async fn list_deliveries(
        &self,
        app_id: AppId,
        filter: &DeliveryFilter,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Page<Delivery>> {
        let now = self.now();
        let s = self.lock().await;
        let mut found: Vec<Delivery> = s
            .outbox
            .values()
            .filter(|r| r.new.app_id == app_id && after.is_none_or(|a| r.new.id > a))
            .filter(|r| filter.trigger_id.is_none_or(|t| r.new.trigger_id == Some(t)))
            .map(|r| s.delivery_of(r))
            .filter(|d| filter.state.is_none_or(|state| d.state(now) == state))
            .collect();
        found.sort_by_key(|d| d.id);
        found.truncate(limit as usize + 1);
        Ok(Page::of(found, limit))
    }

    async fn delivery(&self, app_id: AppId, id: Uuid) -> Result<Option<DeliveryDetail>> {
        let s = self.lock().await;
        let Some(row) = s.outbox.get(&id).filter(|r| r.new.app_id == app_id) else { return Ok(None) };
        Ok(Some(DeliveryDetail {
            delivery: s.delivery_of(row),
            headers: EventHeaders {
                event_type: row.new.event_type.clone(),
                source: row.new.source.clone(),
                subject: row.new.subject.clone(),
                time: row.created_at,
                depth: row.new.depth,
                ordering_key: row.new.ordering_key.clone(),
            },
            payload: payload_clone(&row.new.payload),
            attempts: row.attempt_log.clone(),
        }))
    }

    async fn lock_delivery(&self, tx: &mut MemTx, app_id: AppId, id: Uuid) -> Result<Option<Delivery>> {
        let row = tx.state.outbox.get(&id).filter(|r| r.new.app_id == app_id);
        Ok(row.map(|row| tx.state.delivery_of(row)))
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
