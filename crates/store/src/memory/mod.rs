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
use picloud_core::{AppSlug, Role};
use serde_json::value::RawValue;
use time::OffsetDateTime;
use tokio::sync::{Mutex, OwnedMutexGuard, watch};
use uuid::Uuid;

use crate::cron::NextTick;
use crate::events::Event;
use crate::model::*;
use crate::{
    AbandonedRepo, AuthRepo, Authenticated, Claim, Clock, DeadLetterRepo, DeliveryTarget, Error, KvRepo,
    OutboxRepo, Result, Standing, SyncCallWrite, Targets, Transactional, TriggerRepo, Wakeups,
};

mod cron;

/// An outbox row.
#[derive(Debug, Clone)]
struct OutboxRow {
    new: NewDelivery,
    attempts: u32,
    due_at: OffsetDateTime,
    leased_until: Option<OffsetDateTime>,
    last_error: Option<String>,
    created_at: OffsetDateTime,
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
    apps: HashMap<Uuid, App>,
    principals: HashMap<Uuid, Principal>,
    members: HashMap<(Uuid, Uuid), Role>,
    tokens: HashMap<Uuid, (ApiToken, [u8; 32])>,
    kv: BTreeMap<(Uuid, String, String), KvRow>,
    triggers: HashMap<Uuid, Trigger>,
    outbox: HashMap<Uuid, OutboxRow>,
    dead_letters: BTreeMap<Uuid, DeadLetter>,
    abandoned: BTreeMap<Uuid, AbandonedExecution>,
    /// The next tick of each cron trigger that has one computed (Postgres:
    /// `cron_trigger_details.next_tick_at`, NULL when absent here).
    cron_ticks: HashMap<Uuid, NextTick>,
    /// Bumped by every change to apps, principals, memberships and triggers.
    config_epoch: i64,
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

/// Counts an attempt and leases the row, as a claim does.
fn lease_row(r: &mut OutboxRow, now: OffsetDateTime, lease: Duration) -> ClaimedDelivery {
    r.attempts += 1;
    r.leased_until = Some(now + lease);
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
            Principal { id: Uuid::now_v7(), name: name.to_owned(), platform_admin, created_at: now };
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

impl AuthRepo for MemStore {
    async fn authenticate_token(&self, hash: &[u8; 32], app: Option<&str>) -> Result<Option<Authenticated>> {
        let s = self.lock().await;
        Ok(s.tokens.values().find(|(_, h)| h == hash).and_then(|(token, _)| {
            s.principals.get(&token.principal_id).map(|p| s.authenticated(p, Some(token.clone()), app))
        }))
    }

    async fn authenticate_principal(
        &self,
        principal: Uuid,
        app: Option<&str>,
    ) -> Result<Option<Authenticated>> {
        let s = self.lock().await;
        Ok(s.principals.get(&principal).map(|p| s.authenticated(p, None, app)))
    }

    async fn create_app(&self, slug: &AppSlug) -> Result<App> {
        let mut s = self.lock().await;
        if s.apps.values().any(|a| a.slug == *slug) {
            return Err(Error::DuplicateApp(slug.to_string()));
        }
        let app = App { id: Uuid::now_v7(), slug: slug.clone(), created_at: self.now() };
        s.apps.insert(app.id, app.clone());
        s.config_epoch += 1;
        Ok(app)
    }

    async fn app_by_slug(&self, slug: &str) -> Result<Option<App>> {
        Ok(self.lock().await.apps.values().find(|a| a.slug.as_str() == slug).cloned())
    }

    async fn app_by_id(&self, id: Uuid) -> Result<Option<App>> {
        Ok(self.lock().await.apps.get(&id).cloned())
    }

    async fn list_apps(&self, member: Option<Uuid>, after: Option<&str>, limit: u32) -> Result<Page<App>> {
        let s = self.lock().await;
        let mut apps: Vec<App> = s
            .apps
            .values()
            .filter(|a| member.is_none_or(|p| s.members.contains_key(&(a.id, p))))
            .filter(|a| after.is_none_or(|after| a.slug.as_str() > after))
            .cloned()
            .collect();
        apps.sort_by(|a, b| a.slug.cmp(&b.slug));
        apps.truncate(limit as usize + 1);
        Ok(Page::of(apps, limit))
    }

    async fn delete_app(&self, id: Uuid) -> Result<bool> {
        let mut s = self.lock().await;
        if s.apps.remove(&id).is_none() {
            return Ok(false);
        }
        s.members.retain(|(app, _), _| *app != id);
        s.tokens.retain(|_, (t, _)| t.app_id != Some(id));
        s.kv.retain(|(app, _, _), _| *app != id);
        s.triggers.retain(|_, t| t.app_id != id);
        let State { triggers, cron_ticks, .. } = &mut *s;
        cron_ticks.retain(|trigger, _| triggers.contains_key(trigger));
        s.outbox.retain(|_, r| r.new.app_id != id);
        s.dead_letters.retain(|_, d| d.app_id != id);
        s.abandoned.retain(|_, a| a.app_id != id);
        s.config_epoch += 1;
        Ok(true)
    }

    async fn create_principal(&self, name: &str, platform_admin: bool) -> Result<Principal> {
        let now = self.now();
        Ok(self.lock().await.insert_principal(name, platform_admin, now))
    }

    async fn principal(&self, id: Uuid) -> Result<Option<Principal>> {
        Ok(self.lock().await.principals.get(&id).cloned())
    }

    async fn set_role(&self, app_id: Uuid, principal_id: Uuid, role: Role) -> Result<()> {
        let mut s = self.lock().await;
        if !s.principals.contains_key(&principal_id) {
            return Err(Error::PrincipalNotFound(principal_id));
        }
        if !s.apps.contains_key(&app_id) {
            return Err(Error::AppNotFound(app_id.to_string()));
        }
        s.members.insert((app_id, principal_id), role);
        s.config_epoch += 1;
        Ok(())
    }

    async fn remove_member(&self, app_id: Uuid, principal_id: Uuid) -> Result<bool> {
        let mut s = self.lock().await;
        s.config_epoch += 1;
        Ok(s.members.remove(&(app_id, principal_id)).is_some())
    }

    async fn standing(&self, app_id: Uuid, principal_id: Uuid) -> Result<Option<Standing>> {
        let s = self.lock().await;
        Ok(s.principals.get(&principal_id).map(|p| Standing {
            platform_admin: p.platform_admin,
            role: s.members.get(&(app_id, principal_id)).copied(),
        }))
    }

    async fn create_token(&self, token: &NewApiToken) -> Result<ApiToken> {
        let now = self.now();
        self.lock().await.insert_token(token, now)
    }

    async fn token_by_hash(&self, hash: &[u8; 32]) -> Result<Option<(ApiToken, Principal)>> {
        let s = self.lock().await;
        Ok(s.tokens
            .values()
            .find(|(_, h)| h == hash)
            .and_then(|(t, _)| s.principals.get(&t.principal_id).map(|p| (t.clone(), p.clone()))))
    }

    async fn token(&self, id: Uuid) -> Result<Option<ApiToken>> {
        Ok(self.lock().await.tokens.get(&id).map(|(t, _)| t.clone()))
    }

    async fn revoke_token(&self, id: Uuid) -> Result<bool> {
        let now = self.now();
        let mut s = self.lock().await;
        match s.tokens.get_mut(&id) {
            Some((t, _)) if t.revoked_at.is_none() => {
                t.revoked_at = Some(now);
                s.config_epoch += 1;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn bootstrap_platform_admin(
        &self,
        tx: &mut MemTx,
        admin: &NewPlatformAdmin,
        force: bool,
    ) -> Result<(Principal, ApiToken)> {
        let s = &mut *tx.state;
        if !force && s.principals.values().any(|p| p.platform_admin) {
            return Err(Error::PlatformAdminExists);
        }
        let now = self.now();
        let principal = s.insert_principal(&admin.name, true, now);
        let token = s.insert_token(
            &NewApiToken {
                id: admin.token_id,
                principal_id: principal.id,
                token_hash: admin.token_hash,
                app_id: None,
                scopes: None,
                expires_at: admin.expires_at,
            },
            now,
        )?;
        Ok((principal, token))
    }
}

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
            enabled: new.enabled,
            registered_by: new.registered_by,
            created_at: now,
            updated_at: now,
        };
        s.triggers.insert(trigger.id, trigger.clone());
        s.config_epoch += 1;
        Ok(trigger)
    }

    async fn trigger(&self, app_id: Uuid, name: &str) -> Result<Option<Trigger>> {
        let s = self.lock().await;
        Ok(s.triggers.values().find(|t| t.app_id == app_id && t.name.as_str() == name).cloned())
    }

    async fn trigger_by_id(&self, tx: &mut MemTx, app_id: Uuid, id: Uuid) -> Result<Option<Trigger>> {
        Ok(tx.state.triggers.get(&id).filter(|t| t.app_id == app_id).cloned())
    }

    async fn list_triggers(&self, app_id: Uuid, after: Option<&str>, limit: u32) -> Result<Page<Trigger>> {
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

    async fn update_trigger(&self, app_id: Uuid, name: &str, patch: &TriggerPatch) -> Result<Trigger> {
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
        trigger.updated_at = now;
        let updated = trigger.clone();
        if forget_tick {
            s.cron_ticks.remove(&updated.id);
        }
        s.config_epoch += 1;
        Ok(updated)
    }

    async fn delete_trigger(&self, app_id: Uuid, name: &str) -> Result<bool> {
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
        Ok(true)
    }

    async fn list_matching_kv(
        &self,
        tx: &mut MemTx,
        app_id: Uuid,
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

    async fn list_matching_pubsub(&self, tx: &mut MemTx, app_id: Uuid, topic: &str) -> Result<Vec<Trigger>> {
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

    async fn queue_trigger(&self, tx: &mut MemTx, app_id: Uuid, queue: &str) -> Result<Option<Trigger>> {
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
        app_id: Uuid,
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

    async fn delivery_targets(&self, ids: &[Uuid]) -> Result<Targets> {
        let s = self.lock().await;
        let targets: Vec<DeliveryTarget> =
            ids.iter().filter_map(|id| s.triggers.get(id)).filter_map(|t| target(&s, t)).collect();
        let config_epoch = (!targets.is_empty()).then_some(s.config_epoch);
        Ok(Targets { targets, config_epoch })
    }
}

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
                },
                attempts: row.attempts,
                reason: b.reason,
                last_error: b.error.clone().or(row.last_error),
                created_at: now,
                resolution: None,
                resolved_at: None,
            };
            tx.state.dead_letters.insert(dead.id, dead.clone());
            written.push(dead);
        }
        Ok(written)
    }

    async fn dead_letter(&self, app_id: Uuid, id: Uuid) -> Result<Option<DeadLetter>> {
        Ok(self.lock().await.dead_letters.get(&id).filter(|d| d.app_id == app_id).cloned())
    }

    async fn lock_dead_letter(&self, tx: &mut MemTx, app_id: Uuid, id: Uuid) -> Result<Option<DeadLetter>> {
        Ok(tx.state.dead_letters.get(&id).filter(|d| d.app_id == app_id).cloned())
    }

    async fn list_dead_letters(
        &self,
        app_id: Uuid,
        filter: &DeadLetterFilter,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Page<DeadLetter>> {
        let s = self.lock().await;
        let found: Vec<DeadLetter> = s
            .dead_letters
            .values()
            .rev()
            .filter(|d| d.app_id == app_id && after.is_none_or(|a| d.id < a))
            .filter(|d| filter.trigger_name.as_ref().is_none_or(|n| d.trigger_name.as_ref() == Some(n)))
            .filter(|d| filter.resolution.is_none_or(|r| d.resolution == r))
            .take(limit as usize + 1)
            .cloned()
            .collect();
        Ok(Page::capped(found, limit, |d| d.payload.get().len()))
    }

    async fn unresolved_count(&self, app_id: Uuid) -> Result<u64> {
        let s = self.lock().await;
        Ok(s.dead_letters.values().filter(|d| d.app_id == app_id && d.resolution.is_none()).count() as u64)
    }

    async fn resolve(
        &self,
        tx: &mut MemTx,
        app_id: Uuid,
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
        Ok(Some(d.clone()))
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
        app_id: Uuid,
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

fn kv_entry(collection: &str, key: &str, row: &KvRow) -> Result<KvEntry> {
    let corrupt = |e: picloud_core::NameError| Error::Corrupt { table: "kv_entries", detail: e.to_string() };
    Ok(KvEntry {
        collection: picloud_core::CollectionName::parse(collection).map_err(corrupt)?,
        key: picloud_core::KvKey::parse(key).map_err(corrupt)?,
        value: row.value.clone(),
        version: row.version,
        updated_at: row.updated_at,
    })
}

impl MemStore {
    /// [`KvRepo::kv_put_firing`] inside a transaction.
    async fn put_firing(&self, tx: &mut MemTx, put: &FiringPut<'_>) -> Result<(KvPutResult, usize)> {
        let result = self.kv_put(tx, put.app_id, put.collection, put.key, put.value, None).await?;
        let triggers = self.list_matching_kv(tx, put.app_id, put.collection, KvOp::Put).await?;
        let data = kv_event_data(
            put.collection,
            put.key,
            KvOp::Put,
            Some(put.value),
            result.previous.as_ref(),
            result.version,
        );
        if !triggers.is_empty() && data.get().len() > put.max_data_bytes {
            return Err(Error::TooLarge { max: put.max_data_bytes });
        }
        let event = Event {
            kind: EventKind::Kv,
            event_type: picloud_core::protocol::event_type::KV_PUT,
            source: put.source.to_owned(),
            subject: Some(put.key),
            payload: &data,
            depth: put.depth,
        };
        let rows: Vec<NewDelivery> = triggers
            .iter()
            .map(|t| {
                event.delivery(
                    put.app_id,
                    Some(t.id),
                    t.retry.max_attempts.unwrap_or(put.default_max_attempts),
                )
            })
            .collect();
        self.insert_deliveries(tx, &rows).await?;
        Ok((result, rows.len()))
    }
}

impl KvRepo for MemStore {
    async fn kv_get(&self, app_id: Uuid, collection: &str, key: &str) -> Result<Option<KvEntry>> {
        let s = self.lock().await;
        s.kv.get(&(app_id, collection.to_owned(), key.to_owned()))
            .map(|r| kv_entry(collection, key, r))
            .transpose()
    }

    async fn kv_put(
        &self,
        tx: &mut MemTx,
        app_id: Uuid,
        collection: &str,
        key: &str,
        value: &serde_json::Value,
        expected: Option<i64>,
    ) -> Result<KvPutResult> {
        let now = self.now();
        let slot = (app_id, collection.to_owned(), key.to_owned());
        let current = tx.state.kv.get(&slot);
        if let Some(expected) = expected
            && current.map(|r| r.version) != Some(expected)
        {
            return Err(Error::VersionMismatch { expected, current: current.map(|r| r.version) });
        }
        let previous = current.map(|r| r.value.clone());
        let version = current.map_or(1, |r| r.version + 1);
        tx.state.kv.insert(slot, KvRow { value: value.clone(), version, updated_at: now });
        Ok(KvPutResult { version, previous })
    }

    async fn kv_put_firing(
        &self,
        tx: Option<&mut MemTx>,
        put: &FiringPut<'_>,
    ) -> Result<(KvPutResult, usize)> {
        match tx {
            Some(tx) => self.put_firing(tx, put).await,
            None => {
                let mut tx = self.begin().await?;
                let done = self.put_firing(&mut tx, put).await?;
                self.commit(tx).await?;
                Ok(done)
            }
        }
    }

    async fn kv_delete(
        &self,
        tx: &mut MemTx,
        app_id: Uuid,
        collection: &str,
        key: &str,
        expected: Option<i64>,
    ) -> Result<Option<KvEntry>> {
        let slot = (app_id, collection.to_owned(), key.to_owned());
        let Some(current) = tx.state.kv.get(&slot) else { return Ok(None) };
        if let Some(expected) = expected
            && current.version != expected
        {
            return Err(Error::VersionMismatch { expected, current: Some(current.version) });
        }
        let removed = tx.state.kv.remove(&slot).expect("row just read");
        kv_entry(collection, key, &removed).map(Some)
    }

    async fn kv_list(
        &self,
        app_id: Uuid,
        collection: &str,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Page<KvKeyInfo>> {
        let s = self.lock().await;
        let found =
            s.kv.iter()
                .filter(|((app, c, k), _)| {
                    *app == app_id
                        && c == collection
                        && k.starts_with(prefix)
                        && after.is_none_or(|a| k.as_str() > a)
                })
                .take(limit as usize + 1)
                .map(|((_, c, k), r)| {
                    kv_entry(c, k, r).map(|e| KvKeyInfo {
                        key: e.key,
                        version: e.version,
                        updated_at: e.updated_at,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
        Ok(Page::of(found, limit))
    }
}
