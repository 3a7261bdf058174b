//! Triggers in memory.

use super::*;

fn sorted_by_name(mut triggers: Vec<Trigger>) -> Vec<Trigger> {
    triggers.sort_by(|a, b| a.name.cmp(&b.name));
    triggers
}

impl TriggerRepo for MemStore {
    async fn create_trigger(&self, new: &NewTrigger) -> Result<Trigger> {
        let now = self.now();
        let mut s = self.lock().await;
        if s.triggers.values().any(|t| t.app_id == new.app_id && t.name == new.name) {
            return Err(Error::DuplicateTrigger(new.name.to_string()));
        }
        if !s.apps.contains_key(&new.app_id) {
            return Err(Error::AppNotFound(new.app_id.to_string()));
        }
        if !s.principals.contains_key(&new.registered_by) {
            return Err(Error::UnknownPrincipal(new.registered_by));
        }
        if let TriggerSpec::Queue { queue } = &new.spec {
            let taken = s.triggers.values().any(|t| {
                t.app_id == new.app_id && matches!(&t.spec, TriggerSpec::Queue { queue: q } if q == queue)
            });
            if taken {
                return Err(Error::QueueTaken(queue.to_string()));
            }
        }
        let trigger = Trigger {
            id: new.id,
            app_id: new.app_id,
            name: new.name.clone(),
            spec: new.spec.clone(),
            handler: new.handler.clone(),
            retry: new.retry,
            flow: new.flow,
            batch: new.batch,
            enabled: new.enabled,
            registered_by: new.registered_by,
            created_at: now,
            updated_at: now,
        };
        s.triggers.insert(trigger.id, trigger.clone());
        s.set_limits(trigger.id, trigger.flow.as_ref(), now, false);
        s.config_epoch += 1;
        Ok(trigger)
    }

    async fn trigger(&self, app_id: AppId, name: &str) -> Result<Option<Trigger>> {
        let s = self.lock().await;
        Ok(s.triggers.values().find(|t| t.app_id == app_id && t.name.as_str() == name).cloned())
    }

    async fn trigger_by_id(&self, tx: &mut MemTx, app_id: AppId, id: TriggerId) -> Result<Option<Trigger>> {
        Ok(tx.state.triggers.get(&id).filter(|t| t.app_id == app_id).cloned())
    }

    async fn list_triggers(&self, app_id: AppId, after: Option<&str>, limit: u32) -> Result<Page<Trigger>> {
        let s = self.lock().await;
        let mut found = sorted_by_name(
            s.triggers
                .values()
                .filter(|t| t.app_id == app_id && after.is_none_or(|a| t.name.as_str() > a))
                .cloned()
                .collect(),
        );
        found.truncate(limit as usize + 1);
        Ok(Page::of(found, limit))
    }

    async fn update_trigger(&self, app_id: AppId, name: &str, patch: &TriggerPatch) -> Result<Trigger> {
        let now = self.now();
        let mut s = self.lock().await;
        let trigger = s
            .triggers
            .values_mut()
            .find(|t| t.app_id == app_id && t.name.as_str() == name)
            .ok_or_else(|| Error::TriggerNotFound(name.to_owned()))?;
        if let Some(enabled) = patch.enabled {
            trigger.enabled = enabled;
        }
        let forget_tick = patch.enabled == Some(false);
        if let Some(handler) = &patch.handler {
            trigger.handler = handler.clone();
        }
        if let Some(retry) = patch.retry {
            trigger.retry = retry;
        }
        if let Some(flow) = patch.flow {
            trigger.flow = flow;
        }
        if let Some(batch) = patch.batch {
            trigger.batch = batch;
        }
        trigger.updated_at = now;
        let updated = trigger.clone();
        if forget_tick {
            s.cron_ticks.remove(&updated.id);
        }
        if patch.flow.is_some() {
            s.set_limits(updated.id, updated.flow.as_ref(), now, true);
        }
        s.config_epoch += 1;
        Ok(updated)
    }

    async fn delete_trigger(&self, app_id: AppId, name: &str) -> Result<bool> {
        let now = self.now();
        let mut s = self.lock().await;
        let Some(id) =
            s.triggers.values().find(|t| t.app_id == app_id && t.name.as_str() == name).map(|t| t.id)
        else {
            return Ok(false);
        };
        s.triggers.remove(&id);
        s.cron_ticks.remove(&id);
        s.config_epoch += 1;
        for d in s.dead_letters.values_mut().filter(|d| d.trigger_id == Some(id)) {
            d.trigger_id = None;
        }
        for a in s.abandoned.values_mut().filter(|a| a.trigger_id == Some(id)) {
            a.trigger_id = None;
        }
        for row in s.outbox.values_mut().filter(|r| r.new.trigger_id == Some(id)) {
            row.new.lane = None;
            row.lane_seq = None;
            row.waiting = false;
            row.new.gated = false;
        }
        s.set_limits(id, None, now, true);
        Ok(true)
    }

    async fn list_matching_kv(
        &self,
        tx: &mut MemTx,
        app_id: AppId,
        collection: &str,
        op: KvOp,
    ) -> Result<Vec<Trigger>> {
        Ok(sorted_by_name(
            tx.state
                .triggers
                .values()
                .filter(|t| t.app_id == app_id && t.enabled)
                .filter(|t| {
                    matches!(&t.spec, TriggerSpec::Kv { collection: p, ops } if ops.contains(&op) && p.matches(collection))
                })
                .cloned()
                .collect(),
        ))
    }

    async fn list_matching_pubsub(&self, tx: &mut MemTx, app_id: AppId, topic: &str) -> Result<Vec<Trigger>> {
        Ok(sorted_by_name(
            tx.state
                .triggers
                .values()
                .filter(|t| t.app_id == app_id && t.enabled)
                .filter(|t| matches!(&t.spec, TriggerSpec::Pubsub { topic: p } if p.matches(topic)))
                .cloned()
                .collect(),
        ))
    }

    async fn queue_trigger(&self, tx: &mut MemTx, app_id: AppId, queue: &str) -> Result<Option<Trigger>> {
        Ok(tx
            .state
            .triggers
            .values()
            .find(|t| {
                t.app_id == app_id
                    && matches!(&t.spec, TriggerSpec::Queue { queue: q } if q.as_str() == queue)
            })
            .cloned())
    }

    async fn list_matching_dead_letter(
        &self,
        tx: &mut MemTx,
        app_id: AppId,
        source_trigger: Option<&str>,
        kind: EventKind,
    ) -> Result<Vec<Trigger>> {
        Ok(sorted_by_name(
            tx.state
                .triggers
                .values()
                .filter(|t| t.app_id == app_id && t.enabled)
                .filter(|t| match &t.spec {
                    TriggerSpec::DeadLetter { source_trigger: st, source_kinds } => {
                        st.as_ref().is_none_or(|st| Some(st.as_str()) == source_trigger)
                            && source_kinds.as_ref().is_none_or(|ks| ks.contains(&kind))
                    }
                    _ => false,
                })
                .cloned()
                .collect(),
        ))
    }

    async fn delivery_targets(&self, ids: &[TriggerId]) -> Result<Targets> {
        let s = self.lock().await;
        let targets: Vec<DeliveryTarget> =
            ids.iter().filter_map(|id| s.triggers.get(id)).filter_map(|t| target(&s, t)).collect();
        let config_epoch = (!targets.is_empty()).then_some(s.config_epoch);
        Ok(Targets { targets, config_epoch })
    }
}
