//! Flow limits in memory: what `pg/flow.rs` does, under the one lock.

use picloud_core::Flow;

use super::*;

impl State {
    /// Keeps a trigger's limits in step with its new `flow` (`pg::flow::set_limits`).
    pub(super) fn set_limits(
        &mut self,
        trigger: TriggerId,
        flow: Option<&Flow>,
        now: OffsetDateTime,
        changed: bool,
    ) {
        let limited = flow.is_some_and(Flow::is_limited);
        if limited {
            let burst = flow.and_then(|f| f.rate).map(|rate| f64::from(rate.burst));
            let tokens = match (self.flow_state.get(&trigger), burst) {
                (Some((Some(held), _)), Some(burst)) => Some(held.min(burst)),
                (_, burst) => burst,
            };
            self.flow_state.insert(trigger, (tokens, now));
        } else if changed {
            self.flow_state.remove(&trigger);
            self.flow_slots.retain(|(t, _), _| *t != trigger);
        }
        if changed {
            for row in self.outbox.values_mut().filter(|r| r.new.trigger_id == Some(trigger)) {
                row.new.gated = limited;
            }
        }
    }

    fn claimable(row: &OutboxRow, trigger: TriggerId, now: OffsetDateTime) -> bool {
        row.new.trigger_id == Some(trigger)
            && row.new.gated
            && !row.waiting
            && row.due_at <= now
            && row.leased_until.is_none_or(|l| l <= now)
    }

    /// [`OutboxRepo::claim_limited`], under the lock.
    pub(super) fn claim_limited(
        &mut self,
        want: u32,
        lease: Duration,
        holder: Holder<'_>,
        now: OffsetDateTime,
    ) -> LimitedClaim {
        let mut triggers: Vec<TriggerId> = self.flow_state.keys().copied().collect();
        triggers.sort_unstable();
        let mut rows = Vec::new();
        let mut next_token_in: Option<Duration> = None;
        for trigger in triggers {
            if !self.outbox.values().any(|r| Self::claimable(r, trigger, now)) {
                continue;
            }
            let Some(flow) = self.triggers.get(&trigger).and_then(|t| t.flow) else { continue };
            let busy = holder.busy.iter().find(|(t, _)| *t == trigger).map_or(0, |(_, n)| *n);
            let others: u32 = self
                .flow_slots
                .iter()
                .filter(|((t, h), (_, until))| *t == trigger && *h != holder.id && *until > now)
                .map(|(_, (held, _))| *held)
                .sum();
            let (tokens, refilled_at) = self.flow_state[&trigger];
            let tokens = flow
                .rate
                .zip(tokens)
                .map(|(rate, tokens)| (rate, rate.refill(tokens, (now - refilled_at).unsigned_abs())));
            let mut n = want.saturating_sub(rows.len() as u32);
            if let Some(limit) = flow.concurrency {
                n = n.min(limit.saturating_sub(others + busy));
            }
            if let Some((_, tokens)) = tokens {
                n = n.min(tokens.floor() as u32);
            }
            let mut due: Vec<(OffsetDateTime, Uuid)> = self
                .outbox
                .values()
                .filter(|r| Self::claimable(r, trigger, now))
                .map(|r| (r.due_at, r.new.id))
                .collect();
            due.sort();
            due.truncate(n as usize);
            let claimed = due.len() as u32;
            for (_, id) in due {
                rows.push(lease_row(self.outbox.get_mut(&id).expect("row just listed"), now, lease));
            }
            if let Some((rate, tokens)) = tokens {
                let left = tokens - f64::from(claimed);
                self.flow_state.insert(trigger, (Some(left), now));
                if left < 1.0 {
                    let wait = rate.until_one(left);
                    next_token_in = Some(next_token_in.map_or(wait, |w| w.min(wait)));
                }
            }
            if flow.concurrency.is_some() {
                self.flow_slots
                    .retain(|(t, h), (_, until)| *t != trigger || (*h != holder.id && *until > now));
                if busy + claimed > 0 {
                    self.flow_slots.insert((trigger, holder.id), (busy + claimed, now + lease));
                }
            }
        }
        let config_epoch = (!rows.is_empty()).then_some(self.config_epoch);
        LimitedClaim { claim: Claim { rows, config_epoch }, next_token_in }
    }
}
