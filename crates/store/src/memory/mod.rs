//! The in-memory implementation of the repositories: one mutex-guarded state, where a
//! transaction holds the lock and a snapshot to restore if it is dropped uncommitted.
//!
//! It exists for tests that need a store without Postgres, and only because it passes the same
//! conformance suite as [`crate::PgStore`]; anything it does differently is a bug in it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use picloud_core::protocol::{EventKind, TriggerKind};
use picloud_core::{AppId, AppSlug, PrincipalId, Role, TriggerId};
use serde_json::value::RawValue;
use time::OffsetDateTime;
use tokio::sync::{Mutex, OwnedMutexGuard, watch};
use uuid::Uuid;

use crate::cron::NextTick;
use crate::events::Event;
use crate::model::*;
use crate::{
    APPS_PER_CLAIM, AbandonedRepo, AuthRepo, Authenticated, Busy, Claim, Clock, DeadLetterRepo,
    DeliveryTarget, Error, Holder, KvRepo, LimitedClaim, OutboxRepo, Result, SharedClaim, Slots, Standing,
    SyncCallWrite, Targets, Transactional, TriggerRepo, Wakeup, Wakeups, Walk, quotas,
};

mod abandoned;
mod auth;
mod cron;
mod dead_letters;
mod flow;
mod kv;
mod outbox;
mod stats;
mod triggers;

/// An outbox row.
#[derive(Debug, Clone)]
struct OutboxRow {
    new: NewDelivery,
    attempts: u32,
    due_at: OffsetDateTime,
    leased_until: Option<OffsetDateTime>,
    /// The node its lease is of (Postgres: `leased_by`).
    leased_by: Option<String>,
    last_error: Option<String>,
    created_at: OffsetDateTime,
    /// Its place in its lane (Postgres: `lane_seq`), when it is in one.
    lane_seq: Option<i64>,
    /// Not its lane's head yet.
    waiting: bool,
    /// The progress its handler last reported in this attempt.
    progress: Option<u8>,
    /// Its finished attempts that did not end it, the last [`ATTEMPTS_KEPT`].
    attempt_log: Vec<AttemptRecord>,
}

#[derive(Debug, Clone)]
struct KvRow {
    value: serde_json::Value,
    version: i64,
    updated_at: OffsetDateTime,
}

/// Every table.
#[derive(Debug, Clone, Default)]
struct State {
    apps: HashMap<AppId, App>,
    principals: HashMap<PrincipalId, Principal>,
    members: HashMap<(AppId, PrincipalId), Role>,
    tokens: HashMap<Uuid, (ApiToken, [u8; 32])>,
    kv: BTreeMap<(AppId, String, String), KvRow>,
    triggers: HashMap<TriggerId, Trigger>,
    outbox: HashMap<Uuid, OutboxRow>,
    dead_letters: BTreeMap<Uuid, DeadLetter>,
    abandoned: BTreeMap<Uuid, AbandonedExecution>,
    /// The next tick of each cron trigger that has one computed (Postgres:
    /// `cron_trigger_details.next_tick_at`, NULL when absent here).
    cron_ticks: HashMap<TriggerId, NextTick>,
    /// Bumped by every change to apps, principals, memberships and triggers.
    config_epoch: i64,
    /// The last lane place handed out (Postgres: the sequence `outbox_lane_seq`).
    lane_seq: i64,
    /// Each limited trigger's rate bucket: tokens (`None` without a rate) as of a time.
    flow_state: HashMap<TriggerId, (Option<f64>, OffsetDateTime)>,
    /// The slots each holder holds of a trigger, and until when.
    flow_slots: HashMap<(TriggerId, Uuid), (u32, OffsetDateTime)>,
    /// The attempts counted per trigger, minute and node.
    stats: HashMap<(TriggerId, OffsetDateTime, String), AttemptStats>,
}

/// The in-memory store.
#[derive(Debug, Clone)]
pub struct MemStore {
    /// All state; a transaction holds this lock from begin to commit or drop.
    state: Arc<Mutex<State>>,
    /// Bumped by `wake_relays`; listeners watch it.
    wake: Arc<watch::Sender<u64>>,
    clock: Clock,
}

impl Default for MemStore {
    fn default() -> Self {
        Self { state: Arc::default(), wake: Arc::new(watch::channel(0).0), clock: Clock::default() }
    }
}

/// An in-memory transaction: the whole state, locked, with the snapshot taken at begin.
#[derive(Debug)]
pub struct MemTx {
    state: OwnedMutexGuard<State>,
    /// Restored on drop unless the transaction committed.
    snapshot: Option<State>,
}

impl Drop for MemTx {
    fn drop(&mut self) {
        if let Some(snapshot) = self.snapshot.take() {
            *self.state = snapshot;
        }
    }
}

impl MemStore {
    /// An empty store on the system clock.
    pub fn new() -> Self {
        Self::default()
    }

    /// The same store on another clock.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Now, at the microsecond precision Postgres keeps.
    fn now(&self) -> OffsetDateTime {
        let t = self.clock.now();
        t.replace_nanosecond(t.nanosecond() / 1000 * 1000).expect("valid nanosecond")
    }

    async fn lock(&self) -> OwnedMutexGuard<State> {
        self.state.clone().lock_owned().await
    }
}

impl Transactional for MemStore {
    type Tx = MemTx;

    async fn begin(&self) -> Result<MemTx> {
        let state = self.lock().await;
        let snapshot = Some(state.clone());
        Ok(MemTx { state, snapshot })
    }

    async fn commit(&self, mut tx: MemTx) -> Result<()> {
        tx.snapshot = None;
        Ok(())
    }

    fn clock(&self) -> &Clock {
        &self.clock
    }
}

/// Counts an attempt and leases the row to `node`, as a claim does.
fn lease_row(r: &mut OutboxRow, now: OffsetDateTime, lease: Duration, node: &str) -> ClaimedDelivery {
    r.attempts += 1;
    r.leased_until = Some(now + lease);
    r.leased_by = Some(node.to_owned());
    r.progress = None;
    ClaimedDelivery {
        id: r.new.id,
        app_id: r.new.app_id,
        trigger_id: r.new.trigger_id,
        kind: r.new.kind,
        event_type: r.new.event_type.clone(),
        source: r.new.source.clone(),
        subject: r.new.subject.clone(),
        payload: payload_clone(&r.new.payload),
        depth: r.new.depth,
        attempt: r.attempts,
        max_attempts: r.new.max_attempts,
        reply_to: r.new.reply_to.clone(),
        dead_letter_id: r.new.dead_letter_id,
        last_error: r.last_error.clone(),
        created_at: r.created_at,
        ordering_key: r.new.ordering_key.clone(),
        in_lane: r.new.lane.is_some(),
        gated: r.new.gated,
    }
}

/// `trigger` with its app's slug and its registering principal's standing (`None` when its app
/// is gone).
fn target(s: &State, trigger: &Trigger) -> Option<DeliveryTarget> {
    let app = s.apps.get(&trigger.app_id)?;
    Some(DeliveryTarget {
        trigger: trigger.clone(),
        app_slug: app.slug.clone(),
        standing: s.principals.get(&trigger.registered_by).map(|p| Standing {
            platform_admin: p.platform_admin,
            role: s.members.get(&(trigger.app_id, p.id)).copied(),
        }),
    })
}

fn payload_clone(p: &RawValue) -> Box<RawValue> {
    p.to_owned()
}

impl State {
    fn insert_principal(&mut self, name: &str, platform_admin: bool, now: OffsetDateTime) -> Principal {
        let principal =
            Principal { id: PrincipalId::new(), name: name.to_owned(), platform_admin, created_at: now };
        self.principals.insert(principal.id, principal.clone());
        self.config_epoch += 1;
        principal
    }

    fn insert_token(&mut self, token: &NewApiToken, now: OffsetDateTime) -> Result<ApiToken> {
        if !self.principals.contains_key(&token.principal_id) {
            return Err(Error::PrincipalNotFound(token.principal_id));
        }
        if let Some(app) = token.app_id.filter(|a| !self.apps.contains_key(a)) {
            return Err(Error::AppNotFound(app.to_string()));
        }
        let stored = ApiToken {
            id: token.id,
            principal_id: token.principal_id,
            app_id: token.app_id,
            scopes: token.scopes,
            expires_at: token.expires_at,
            revoked_at: None,
            created_at: now,
        };
        self.tokens.insert(token.id, (stored.clone(), token.token_hash));
        Ok(stored)
    }

    fn authenticated(
        &self,
        principal: &Principal,
        token: Option<ApiToken>,
        app: Option<&str>,
    ) -> Authenticated {
        let app = app.and_then(|slug| self.apps.values().find(|a| a.slug.as_str() == slug)).cloned();
        let role = app.as_ref().and_then(|a| self.members.get(&(a.id, principal.id)).copied());
        Authenticated { principal: principal.clone(), token, app, role, config_epoch: self.config_epoch }
    }
}
