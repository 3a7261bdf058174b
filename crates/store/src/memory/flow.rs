//! Flow limits in memory: what `pg/flow.rs` does, under the one lock.

use picloud_core::Flow;
use picloud_core::flow::Rate;

use super::*;

/// One limited trigger in a claim: the holder's slots (with a `concurrency`), its rate and
/// refilled tokens, and the rows it may claim, oldest first.
type Turn = (TriggerId, Option<Slots>, Option<(Rate, f64)>, Vec<Uuid>);

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
            self.flow_state.insert(trigger, (burst, now));
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
        // Each trigger's allowance, and its claimable rows oldest first within it.
        let mut turns: Vec<Turn> = Vec::new();
        for trigger in triggers {
            let Some(flow) = self.triggers.get(&trigger).and_then(|t| t.flow) else { continue };
            let mut due: Vec<(OffsetDateTime, Uuid)> = self
                .outbox
                .values()
                .filter(|r| Self::claimable(r, trigger, now))
                .map(|r| (r.due_at, r.new.id))
                .collect();
            if due.is_empty() {
                continue;
            }
            due.sort();
            let busy = holder.busy.iter().find(|(t, _)| *t == trigger).map_or(Busy::default(), |(_, b)| *b);
            let others: u32 = self
                .flow_slots
                .iter()
                .filter(|((t, h), (_, until))| *t == trigger && *h != holder.id && *until > now)
                .map(|(_, (held, _))| *held)
                .sum();
            let (tokens, refilled_at) = self.flow_state[&trigger];
            let elapsed = (now - refilled_at).max(time::Duration::ZERO).unsigned_abs();
            let tokens = flow.rate.zip(tokens).map(|(rate, tokens)| (rate, rate.refill(tokens, elapsed)));
            let slots = flow.concurrency.map(|concurrency| Slots {
                concurrency,
                others,
                busy: busy.claimed,
                running: busy.running,
            });
            let mut n = want;
            if let Some(slots) = slots {
                n = n.min(slots.claimable(flow.rate.is_some()));
            }
            if let Some((_, tokens)) = tokens {
                n = n.min(tokens.floor() as u32);
            }
            due.truncate(n as usize);
            turns.push((trigger, slots, tokens, due.into_iter().map(|(_, id)| id).collect()));
        }
        // Turn by turn across the triggers, as Postgres orders them, each app within its room.
        let mut picked: Vec<Uuid> = Vec::new();
        let mut taken: HashMap<AppId, u32> = HashMap::new();
        let longest = turns.iter().map(|t| t.3.len()).max().unwrap_or(0);
        for turn in 0..longest {
            for (trigger, .., ids) in &turns {
                let Some(id) = ids.get(turn) else { continue };
                let app = self.triggers[trigger].app_id;
                let taken = taken.entry(app).or_default();
                if *taken < holder.share.room(app) {
                    *taken += 1;
                    picked.push(*id);
                }
            }
        }
        picked.truncate(want as usize);
        let rows: Vec<ClaimedDelivery> = picked
            .iter()
            .map(|id| lease_row(self.outbox.get_mut(id).expect("row just listed"), now, lease, holder.node))
            .collect();
        let mut next_token_in: Option<Duration> = None;
        let mut held_slots = Vec::new();
        for (trigger, slots, tokens, _) in turns {
            let claimed = rows.iter().filter(|r| r.trigger_id == Some(trigger)).count() as u32;
            let left = tokens.map(|(rate, tokens)| (rate, tokens - f64::from(claimed)));
            if let Some((rate, left)) = left.filter(|(_, left)| *left < 1.0) {
                let wait = rate.until_one(left);
                next_token_in = Some(next_token_in.map_or(wait, |w| w.min(wait)));
            }
            let held = slots.map(|slots| slots.held(claimed));
            if let Some(held) = held {
                held_slots.push((trigger, held));
            }
            let recorded = self.flow_slots.get(&(trigger, holder.id)).map_or(0, |(held, _)| *held);
            if claimed == 0 && recorded == held.unwrap_or(0) {
                // As Postgres: nothing claimed and the holder's slots as recorded.
                continue;
            }
            if let Some((_, left)) = left {
                self.flow_state.insert(trigger, (Some(left), now));
            }
            let keep = held.is_some();
            self.flow_slots
                .retain(|(t, h), (_, until)| *t != trigger || (keep && *h != holder.id && *until > now));
            if let Some(held) = held.filter(|held| *held > 0) {
                self.flow_slots.insert((trigger, holder.id), (held, now + lease));
            }
        }
        let config_epoch = (!rows.is_empty()).then_some(self.config_epoch);
        LimitedClaim { claim: Claim { rows, config_epoch }, next_token_in, slots: held_slots }
    }
}
