//! Batches (DESIGN §14): the deliveries of a trigger with `batch` go to its handler many at a
//! time, in one request whose body is a CloudEvents batch.
//!
//! The claimed rows of such a trigger wait in a gathering per trigger, app and depth (rows that
//! share a plan and a delivery token) until `max_size` of them are there, the first of them has
//! waited `max_wait_ms`, the relay has too few free slots for a claim to add to them, or no row
//! could join them (a trigger ordered as a whole); then they go as one batch. They are claimed rows all along: they hold their leases (moved first when the wait
//! could outlast them) and their slots, so nothing else delivers them meanwhile. Rows in lanes
//! are claimed one per lane at a time, so a batch holds at most one delivery of each ordering
//! key and a key's next delivery waits for the batch's answer: order holds within and across
//! batches.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use picloud_core::{AppId, Batch, TriggerId};
use picloud_store::{ClaimedDelivery, DeliveryTarget};
use tokio::time::Instant;

/// The rows that may share a batch: those of one trigger, app and depth.
pub(super) type BatchKey = (TriggerId, AppId, u32);

/// Rows of batch triggers waiting for their batch to fill.
#[derive(Debug, Default)]
pub(super) struct Gathering {
    waiting: HashMap<BatchKey, Gathered>,
    /// The relay stopped: every batch goes at once.
    closed: bool,
}

#[derive(Debug)]
struct Gathered {
    target: DeliveryTarget,
    rows: Vec<ClaimedDelivery>,
    /// When the first of them has waited `max_wait_ms`.
    send_at: Instant,
}

/// A batch to send now: its trigger's target and its rows, in claim order.
#[derive(Debug)]
pub(super) struct Ready {
    pub(super) target: DeliveryTarget,
    pub(super) rows: Vec<ClaimedDelivery>,
}

impl Gathering {
    /// Adds claimed `rows` of `key`, whose trigger batches as `batch`: returns the batches that
    /// go now, and whether rows now wait for a time no timer knew of (a new wait, or one made
    /// shorter by a shorter `max_wait_ms`). With `no_more` (no row could
    /// join them: the trigger orders all its deliveries) nothing waits. A row never waits longer
    /// than its trigger's `max_wait_ms` as it was when the row was claimed, and a batch goes with
    /// the target read last.
    pub(super) fn add(
        &mut self,
        key: BatchKey,
        target: &DeliveryTarget,
        batch: Batch,
        rows: Vec<ClaimedDelivery>,
        now: Instant,
        no_more: bool,
    ) -> (Vec<Ready>, bool) {
        let size = batch.max_size.max(1) as usize;
        let (gathered, new) = match self.waiting.entry(key) {
            Entry::Occupied(entry) => {
                let gathered = entry.into_mut();
                let send_at = now + batch.max_wait();
                let sooner = send_at < gathered.send_at;
                gathered.send_at = gathered.send_at.min(send_at);
                gathered.target = target.clone();
                (gathered, sooner)
            }
            Entry::Vacant(entry) => {
                let send_at = now + batch.max_wait();
                (
                    entry.insert(Gathered {
                        target: target.clone(),
                        rows: Vec::with_capacity(size),
                        send_at,
                    }),
                    true,
                )
            }
        };
        gathered.rows.extend(rows);
        let mut ready = Vec::new();
        while gathered.rows.len() >= size {
            let rest = gathered.rows.split_off(size);
            let full = std::mem::replace(&mut gathered.rows, rest);
            ready.push(Ready { target: gathered.target.clone(), rows: full });
        }
        let go_now = self.closed || no_more || gathered.send_at <= now;
        if go_now && !gathered.rows.is_empty() {
            let rows = std::mem::take(&mut gathered.rows);
            ready.push(Ready { target: gathered.target.clone(), rows });
        }
        if gathered.rows.is_empty() {
            self.waiting.remove(&key);
            return (ready, false);
        }
        (ready, new)
    }

    /// Takes the batches whose first row has waited long enough by `now`; returns them and when
    /// the next one is due, or `None` once the gathering is closed (nothing waits in it any
    /// more).
    pub(super) fn due(&mut self, now: Instant) -> (Vec<Ready>, Option<Option<Instant>>) {
        let ready = self
            .waiting
            .extract_if(|_, gathered| gathered.send_at <= now)
            .map(|(_, Gathered { target, rows, .. })| Ready { target, rows })
            .collect();
        let next = (!self.closed).then(|| self.waiting.values().map(|g| g.send_at).min());
        (ready, next)
    }

    /// Takes every batch, full or not: no claim can add to them until slots come free.
    pub(super) fn take_all(&mut self) -> Vec<Ready> {
        self.waiting.drain().map(|(_, Gathered { target, rows, .. })| Ready { target, rows }).collect()
    }

    /// Closes the gathering (the relay stops) and takes every batch: from now on, rows added go
    /// at once.
    pub(super) fn close(&mut self) -> Vec<Ready> {
        self.closed = true;
        self.take_all()
    }
}
