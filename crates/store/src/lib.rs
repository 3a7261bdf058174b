//! Repository traits of picloud-router, with a Postgres implementation ([`PgStore`], sqlx) and an
//! in-memory one ([`MemStore`]); one conformance suite (`tests/it/conformance.rs`) runs against
//! both, and the in-memory store exists only because it passes it.
//!
//! Writes that must commit together with other writes (a KV change and its outbox rows, a dead
//! letter and its dead-letter-trigger deliveries) take the caller's transaction `&mut Self::Tx`;
//! for [`PgStore`] that is a plain `sqlx::Transaction<'static, Postgres>`, so an application sharing
//! the database can pass its own. Reads and the relay's single-statement paths (claim) use the
//! store's own connections.
//!
//! It depends on `core` only of the picloud crates: no NATS client and no HTTP server; the relay,
//! the API and the binary reach the database through it.
#![warn(missing_docs)]

use std::future::Future;
use std::time::Duration;

use picloud_core::names::AppSlug;
use picloud_core::protocol::EventKind;
use picloud_core::{AppId, PrincipalId, Role, TriggerId};
use time::OffsetDateTime;
use uuid::Uuid;

mod clock;
pub mod cron;
mod error;
pub mod events;
pub mod memory;
pub mod model;
pub mod pg;

pub use clock::Clock;
pub use error::{Error, Result};
pub use memory::MemStore;
pub use model::*;
pub use pg::PgStore;

/// Limits every list: the default page size and the cap (DESIGN §5).
pub const DEFAULT_PAGE: u32 = 50;
/// The largest page a list returns.
pub const MAX_PAGE: u32 = 500;

/// A store with transactions. Dropping a transaction without [`Transactional::commit`] rolls it
/// back.
pub trait Transactional: Clone + Send + Sync + 'static {
    /// An open transaction.
    type Tx: Send;

    /// Opens a transaction.
    fn begin(&self) -> impl Future<Output = Result<Self::Tx>> + Send;

    /// Commits a transaction.
    fn commit(&self, tx: Self::Tx) -> impl Future<Output = Result<()>> + Send;

    /// The store's clock.
    fn clock(&self) -> &Clock;
}

/// A principal's standing on an app, as authorization needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// Platform admins satisfy every scope.
    pub platform_admin: bool,
    /// The role on the app, if a member.
    pub role: Option<Role>,
}

/// Who a token or principal is, resolved together with the app a request names: everything
/// authorization needs, in one look-up.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// The principal.
    pub principal: model::Principal,
    /// The API token used, when it was one (revoked and expired tokens included: the caller checks).
    pub token: Option<model::ApiToken>,
    /// The app the request names, if it exists.
    pub app: Option<model::App>,
    /// The principal's role on that app.
    pub role: Option<Role>,
    /// The configuration epoch this was read at: while the epoch stays the same (revoking a
    /// token moves it too), reading it again would find the same.
    pub config_epoch: i64,
}

/// Apps, principals, memberships and API tokens: what authentication and authorization read.
pub trait AuthRepo: Transactional {
    /// The token with this hash, its principal, and — when `app` is given — that app and the
    /// principal's role on it, in one round trip.
    fn authenticate_token(
        &self,
        hash: &[u8; 32],
        app: Option<&str>,
    ) -> impl Future<Output = Result<Option<Authenticated>>> + Send;
    /// A principal (acting through a delivery token) and — when `app` is given — that app and
    /// the principal's role on it, in one round trip.
    fn authenticate_principal(
        &self,
        principal: PrincipalId,
        app: Option<&str>,
    ) -> impl Future<Output = Result<Option<Authenticated>>> + Send;
    /// The configuration epoch as `tx` sees it ([`Authenticated::config_epoch`]): a write made
    /// on an authorization read earlier checks it first.
    fn config_epoch(&self, tx: &mut Self::Tx) -> impl Future<Output = Result<i64>> + Send;
    /// Creates an app. Fails with [`Error::DuplicateApp`] if the slug is taken.
    fn create_app(&self, slug: &AppSlug) -> impl Future<Output = Result<model::App>> + Send;
    /// The app with this slug.
    fn app_by_slug(&self, slug: &str) -> impl Future<Output = Result<Option<model::App>>> + Send;
    /// The app with this id.
    fn app_by_id(&self, id: AppId) -> impl Future<Output = Result<Option<model::App>>> + Send;
    /// Apps by slug, after `after`: all of them, or those `member` belongs to.
    fn list_apps(
        &self,
        member: Option<PrincipalId>,
        after: Option<&str>,
        limit: u32,
    ) -> impl Future<Output = Result<model::Page<model::App>>> + Send;
    /// Deletes an app and everything of it. Whether it existed.
    fn delete_app(&self, id: AppId) -> impl Future<Output = Result<bool>> + Send;
    /// Creates a principal.
    fn create_principal(
        &self,
        name: &str,
        platform_admin: bool,
    ) -> impl Future<Output = Result<model::Principal>> + Send;
    /// The principal with this id.
    fn principal(&self, id: PrincipalId) -> impl Future<Output = Result<Option<model::Principal>>> + Send;
    /// Gives a principal a role on an app (replacing any other role there).
    fn set_role(
        &self,
        app_id: AppId,
        principal_id: PrincipalId,
        role: Role,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Removes a principal's role on an app. Whether it had one.
    fn remove_member(
        &self,
        app_id: AppId,
        principal_id: PrincipalId,
    ) -> impl Future<Output = Result<bool>> + Send;
    /// A principal's standing on an app; `None` if the principal does not exist.
    fn standing(
        &self,
        app_id: AppId,
        principal_id: PrincipalId,
    ) -> impl Future<Output = Result<Option<Standing>>> + Send;
    /// Stores a token (its hash only).
    fn create_token(
        &self,
        token: &model::NewApiToken,
    ) -> impl Future<Output = Result<model::ApiToken>> + Send;
    /// The token with this hash and its principal, revoked and expired ones included.
    fn token_by_hash(
        &self,
        hash: &[u8; 32],
    ) -> impl Future<Output = Result<Option<(model::ApiToken, model::Principal)>>> + Send;
    /// The token with this id.
    fn token(&self, id: Uuid) -> impl Future<Output = Result<Option<model::ApiToken>>> + Send;
    /// Revokes a token. Whether it existed and was not revoked yet.
    fn revoke_token(&self, id: Uuid) -> impl Future<Output = Result<bool>> + Send;
    /// Creates a platform-admin principal and a token of it (neither limited to an app nor
    /// narrowed) in the caller's transaction: a deployment's first admin. Unless `force`, fails
    /// with [`Error::PlatformAdminExists`] when a platform admin exists; bootstraps at once take
    /// turns, so of two unforced ones only the first finds none.
    fn bootstrap_platform_admin(
        &self,
        tx: &mut Self::Tx,
        admin: &model::NewPlatformAdmin,
        force: bool,
    ) -> impl Future<Output = Result<(model::Principal, model::ApiToken)>> + Send;
}

/// A trigger with what the relay needs to deliver for it: the app's slug and the registering
/// principal's standing on the app.
#[derive(Debug, Clone)]
pub struct DeliveryTarget {
    /// The trigger.
    pub trigger: model::Trigger,
    /// Its app's slug.
    pub app_slug: AppSlug,
    /// Its registering principal's standing on the app now (`None`: the principal is gone).
    pub standing: Option<Standing>,
}

/// What writing a sync call found (see [`OutboxRepo::insert_sync_call`]).
#[derive(Debug, Clone)]
pub enum SyncCallWrite {
    /// The app has no trigger by that name: nothing was written.
    NoTrigger,
    /// The trigger cannot be invoked (not an `http` trigger, or disabled): nothing was written.
    Refused(model::Trigger),
    /// The configuration epoch is no longer the call's `authorized_at`: the caller's
    /// authorization may have changed, and nothing was written.
    Stale,
    /// The row, written claimed by the node, and the target to deliver it to.
    Written {
        /// The row, at its first attempt.
        row: model::ClaimedDelivery,
        /// Its trigger, with the registering principal's standing read in the same statement.
        target: Box<DeliveryTarget>,
    },
}

/// Delivery targets as of one configuration epoch.
#[derive(Debug, Clone)]
pub struct Targets {
    /// The targets found.
    pub targets: Vec<DeliveryTarget>,
    /// The configuration epoch they were read at (`None` when none was found).
    pub config_epoch: Option<i64>,
}

/// What one claim took.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The claimed deliveries.
    pub rows: Vec<model::ClaimedDelivery>,
    /// The configuration epoch at the claim (`None` when nothing was claimed): targets read at
    /// the same epoch are still exact.
    pub config_epoch: Option<i64>,
}

/// What one claim of limited deliveries took ([`OutboxRepo::claim_limited`]).
#[derive(Debug, Clone)]
pub struct LimitedClaim {
    /// The claimed deliveries, each `gated`.
    pub claim: Claim,
    /// When a trigger with due rows ran out of rate tokens: how long until it has one again.
    pub next_token_in: Option<Duration>,
    /// The slots the holder holds after the claim of each trigger with a `concurrency` that
    /// had claimable rows ([`Slots::held`]): how many of its deliveries it may have in flight.
    /// Rows claimed beyond them wait at the holder for its deliveries to end.
    pub slots: Vec<(TriggerId, u32)>,
}

/// Rows a holder may claim ahead of each of its slots of a trigger with a `concurrency` and no
/// `rate` ([`Slots::claimable`]). Three: a claim then refills the rows ahead while they last
/// (a claim per slot freed would cost a statement per delivery), and a row waits about three
/// of its trigger's deliveries for a slot.
pub const AHEAD_PER_SLOT: u32 = 3;

/// A holder's slots of one trigger with a `concurrency`, at one claim: the rule both stores
/// claim by (the Postgres claim computes the same in its statement).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slots {
    /// The trigger's `concurrency`.
    pub concurrency: u32,
    /// The slots other holders hold, unexpired.
    pub others: u32,
    /// The holder's rows of the trigger claimed and not completed.
    pub busy: u32,
    /// Of those, the ones in flight.
    pub running: u32,
}

impl Slots {
    /// The slots nobody else holds.
    fn open(self) -> u32 {
        self.concurrency.saturating_sub(self.others)
    }

    /// How many rows the holder may claim: as many as it has open slots, and, unless the trigger
    /// has a `rate` (whose tokens are spent at the claim, so its rows start at once),
    /// [`AHEAD_PER_SLOT`] more per slot, to start as its deliveries end without a claim's round
    /// trip between them.
    pub fn claimable(self, rated: bool) -> u32 {
        let ahead = if rated { 0 } else { self.open().saturating_mul(AHEAD_PER_SLOT) };
        (self.open().saturating_add(ahead)).saturating_sub(self.busy)
    }

    /// The slots the holder holds after claiming `claimed` rows: one for each row it has, as
    /// far as the open slots go, and never fewer than it has in flight (when the trigger's
    /// `concurrency` was lowered, other holders must go on counting those).
    pub fn held(self, claimed: u32) -> u32 {
        self.running.max(self.open().min(self.busy + claimed))
    }
}

/// What a holder has of one limited trigger from earlier claims.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Busy {
    /// Rows claimed and not completed yet: in flight, or waiting ahead of a slot.
    pub claimed: u32,
    /// Of those, the deliveries in flight.
    pub running: u32,
}

/// The slots of limited triggers one relay has in flight: what [`OutboxRepo::claim_limited`]
/// counts as the holder's own.
#[derive(Debug, Clone, Copy)]
pub struct Holder<'a> {
    /// The relay's run (a fresh id per run, so two relays never share slots).
    pub id: Uuid,
    /// The node, for `leased_by`.
    pub node: &'a str,
    /// What it has of each trigger from earlier claims.
    pub busy: &'a [(TriggerId, Busy)],
    /// How many rows of each app it may take.
    pub share: AppShare<'a>,
}

/// Apps one claim visits at most: a claim costs the same however many apps have rows, and the
/// next claim goes on where it stopped ([`SharedClaim::resume_at`]).
pub const APPS_PER_CLAIM: u32 = 64;

/// A relay's in-flight slots per app (DESIGN §13): how many deliveries one app may have in
/// flight at the relay, and how many each app has.
#[derive(Debug, Clone, Copy)]
pub struct AppShare<'a> {
    /// The most deliveries of one app in flight at the relay (`PICLOUD_RELAY_APP_SHARE`).
    pub per_app: u32,
    /// The relay's deliveries in flight per app, claimed and not completed yet.
    pub held: &'a [(AppId, u32)],
}

impl AppShare<'_> {
    /// No app bounded.
    pub const UNBOUNDED: AppShare<'static> = AppShare { per_app: u32::MAX, held: &[] };

    /// How many more deliveries of `app` the relay may have in flight.
    pub fn room(&self, app: AppId) -> u32 {
        let held = self.held.iter().find(|(a, _)| *a == app).map_or(0, |(_, n)| *n);
        self.per_app.saturating_sub(held)
    }
}

/// Where a claim shared among apps starts, and how much of each app it may take.
#[derive(Debug, Clone, Copy)]
pub struct Walk<'a> {
    /// The first app id the walk visits (`None`: from the lowest).
    pub from: Option<AppId>,
    /// The relay's slots per app.
    pub share: AppShare<'a>,
}

/// What one claim shared among apps took ([`OutboxRepo::claim_shared`]).
#[derive(Debug, Clone)]
pub struct SharedClaim {
    /// The claimed deliveries.
    pub claim: Claim,
    /// Whether more rows of the apps it visited may be due: an app gave all its part, or the
    /// claim took all it wanted.
    pub more: bool,
    /// Where the next claim's walk starts ([`SharedClaim::resume_at`]; `None`: from the first
    /// app).
    pub resume_at: Option<AppId>,
}

impl SharedClaim {
    /// Where the walk after this claim starts, from what the claim saw: how many apps it
    /// visited and the last of them, and the last app it took rows of if it took all it
    /// wanted. A walk cut at [`APPS_PER_CLAIM`] goes on past its last app; a full claim that
    /// left visited apps without their turn goes on past the last app it took rows of (the
    /// apps after it take their turn first next time); otherwise the next walk starts over.
    pub fn resume_at(
        visited: u32,
        last_visited: Option<AppId>,
        last_taken_of_full: Option<AppId>,
    ) -> Option<AppId> {
        let past = |last: AppId| {
            last.as_uuid().as_u128().checked_add(1).map(|n| AppId::from_uuid(Uuid::from_u128(n)))
        };
        if visited >= APPS_PER_CLAIM {
            return last_visited.and_then(past);
        }
        last_taken_of_full.filter(|taken| Some(*taken) != last_visited).and_then(past)
    }
}

/// One claim's part of each app it visited, in the order given: `(room, due)` per app, where
/// `room` is what the app may still have in flight and `due` whether it has a due row. Every
/// due app with room gets an equal part of `want`, rounded up, and no more than its room; the
/// others get nothing. (The Postgres claim computes the same in its statement.)
pub fn quotas(want: u32, apps: &[(u32, bool)]) -> Vec<u32> {
    let sharing = apps.iter().filter(|(room, due)| *due && *room > 0).count().max(1) as u32;
    let part = want.div_ceil(sharing);
    apps.iter().map(|&(room, due)| if due { room.min(part) } else { 0 }).collect()
}

/// Triggers: CRUD and the matching that writes use.
pub trait TriggerRepo: Transactional {
    /// Registers a trigger with its kind's details.
    fn create_trigger(&self, new: &model::NewTrigger) -> impl Future<Output = Result<model::Trigger>> + Send;
    /// The trigger with this name in the app.
    fn trigger(
        &self,
        app_id: AppId,
        name: &str,
    ) -> impl Future<Output = Result<Option<model::Trigger>>> + Send;
    /// The app's triggers by name, after `after`.
    fn list_triggers(
        &self,
        app_id: AppId,
        after: Option<&str>,
        limit: u32,
    ) -> impl Future<Output = Result<model::Page<model::Trigger>>> + Send;
    /// Changes a trigger's enabled flag, handler or retry overrides.
    fn update_trigger(
        &self,
        app_id: AppId,
        name: &str,
        patch: &model::TriggerPatch,
    ) -> impl Future<Output = Result<model::Trigger>> + Send;
    /// The app's trigger with id `id`, read in the caller's transaction (so a transaction that
    /// holds a lock never waits for a second connection to read it).
    fn trigger_by_id(
        &self,
        tx: &mut Self::Tx,
        app_id: AppId,
        id: TriggerId,
    ) -> impl Future<Output = Result<Option<model::Trigger>>> + Send;
    /// Deletes a trigger. Whether it existed. Its dead letters stay.
    fn delete_trigger(&self, app_id: AppId, name: &str) -> impl Future<Output = Result<bool>> + Send;
    /// Enabled `kv` triggers of the app whose pattern matches `collection` and whose ops hold `op`.
    fn list_matching_kv(
        &self,
        tx: &mut Self::Tx,
        app_id: AppId,
        collection: &str,
        op: model::KvOp,
    ) -> impl Future<Output = Result<Vec<model::Trigger>>> + Send;
    /// Enabled `pubsub` triggers of the app whose pattern matches `topic`.
    fn list_matching_pubsub(
        &self,
        tx: &mut Self::Tx,
        app_id: AppId,
        topic: &str,
    ) -> impl Future<Output = Result<Vec<model::Trigger>>> + Send;
    /// The `queue` trigger of the app's `queue`, enabled or not.
    fn queue_trigger(
        &self,
        tx: &mut Self::Tx,
        app_id: AppId,
        queue: &str,
    ) -> impl Future<Output = Result<Option<model::Trigger>>> + Send;
    /// Enabled `dead_letter` triggers of the app that select a dead letter of `source_trigger`
    /// (by name) and `kind`.
    fn list_matching_dead_letter(
        &self,
        tx: &mut Self::Tx,
        app_id: AppId,
        source_trigger: Option<&str>,
        kind: EventKind,
    ) -> impl Future<Output = Result<Vec<model::Trigger>>> + Send;
    /// The triggers with these ids, with what delivering for them needs; missing ones are left out.
    fn delivery_targets(&self, ids: &[TriggerId]) -> impl Future<Output = Result<Targets>> + Send;
}

/// Wake-ups of a relay: an item whenever deliveries may have been written (an error when the
/// notification channel broke; the relay then polls).
pub type Wakeups = futures::stream::BoxStream<'static, Result<Wakeup>>;

/// The rows a node's writers wrote, handed to the node's relay in memory
/// ([`PgStore::hand_written`]): the ids of each write's rows, as [`Wakeup::Written`] names them.
pub type WrittenHere = tokio::sync::mpsc::UnboundedReceiver<Vec<Uuid>>;

/// What a wake-up says was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wakeup {
    /// Deliveries may have been written, of any app and in any state.
    Any,
    /// These deliveries were written, due at once, outside lanes and gates: a relay may claim
    /// them by their ids ([`OutboxRepo::claim_written`]) rather than walk the apps for them.
    Written(Vec<Uuid>),
}

/// The outbox: one row per delivery.
pub trait OutboxRepo: Transactional {
    /// Subscribes to wake-ups (Postgres: `LISTEN picloud_outbox`).
    fn listen(&self) -> impl Future<Output = Result<Wakeups>> + Send;
    /// Wakes every listening relay: call it after committing deliveries (relays also poll, so a
    /// missed wake-up only delays). Postgres: a `NOTIFY picloud_outbox` sent soon after by a
    /// background task, one at a time, in a transaction of its own — a `NOTIFY` inside the
    /// writer's transaction would hold Postgres' global notify lock through that transaction's
    /// commit and so serialize every writer's commit.
    fn wake_relays(&self) -> impl Future<Output = Result<()>> + Send;
    /// [`OutboxRepo::wake_relays`] for `written`, deliveries just committed, due at once, outside
    /// lanes and gates: the wake-up names them ([`Wakeup::Written`]) when it names nothing else,
    /// and is [`Wakeup::Any`] otherwise (as the in-memory store's always are). No rows, no
    /// wake-up.
    fn wake_relays_for(&self, written: Vec<Uuid>) -> impl Future<Output = Result<()>> + Send;
    /// How long until the earliest delivery that is not due yet becomes due, if there is one.
    fn next_due_in(&self) -> impl Future<Output = Result<Option<Duration>>> + Send;
    /// Releases up to `batch` of the lanes that completions and resolutions noted because a
    /// writer held their lock (a completion releases the others itself: `delete_delivered`,
    /// `delete_deliveries`, `bury`, `resolve`): each lane's first row becomes its head, unless
    /// it is the head already or a dead letter holds the lane. Never waits for a lock: a lane a
    /// writer holds stays noted for the next call. Returns how many lanes it released.
    fn release_lanes(&self, batch: u32) -> impl Future<Output = Result<u64>> + Send;
    /// Inserts deliveries in the caller's transaction. A repeated idempotency key fails with
    /// [`Error::DuplicateIdempotencyKey`]. Returns the delivery each row is, in the order given:
    /// its own id, or, for a row that replaced the event of its lane's newest delivery
    /// ([`model::NewDelivery::replaces_newest`]), that delivery's.
    fn insert_deliveries(
        &self,
        tx: &mut Self::Tx,
        rows: &[model::NewDelivery],
    ) -> impl Future<Output = Result<Vec<Uuid>>> + Send;
    /// Inserts one delivery that carries an idempotency key, unless its trigger has a delivery
    /// with that key already: returns the id that holds the key and whether it is the new row.
    fn insert_idempotent(
        &self,
        tx: &mut Self::Tx,
        row: &model::NewDelivery,
    ) -> impl Future<Output = Result<(Uuid, bool)>> + Send;
    /// Claims up to `want` due, unleased deliveries, in one statement, sharing the claim among
    /// apps (DESIGN §13): it walks the apps with rows in order of their ids, starting at
    /// `walk.from` and visiting [`APPS_PER_CLAIM`] at most, and takes of each app with due rows
    /// its oldest due first, as many as [`quotas`] gives it: an equal part of `want`, and no
    /// more than its room in `walk.share`. Counts the attempt and leases the rows to `node` for
    /// `lease`. Rows locked by a concurrent claim are skipped, never waited for. Reports the
    /// configuration epoch too (any change to apps, principals, memberships or triggers moves
    /// it), whether more rows may be due, and where the next claim's walk goes on.
    fn claim_shared(
        &self,
        want: u32,
        lease: Duration,
        node: &str,
        walk: Walk<'_>,
    ) -> impl Future<Output = Result<SharedClaim>> + Send;
    /// Claims those of the deliveries `ids` that are claimable now (due, unleased, not waiting
    /// in a lane, not gated), as [`OutboxRepo::claim_shared`] claims a row, in one statement; rows locked
    /// by a concurrent claim are skipped. No app's share is looked at: a relay claims so only
    /// while it holds too little for any app to pass its share.
    fn claim_written(
        &self,
        ids: &[Uuid],
        lease: Duration,
        node: &str,
    ) -> impl Future<Output = Result<Claim>> + Send;
    /// [`OutboxRepo::claim_shared`] of every app from the first, without bounds on any (for
    /// tests and tools: a relay claims with its shares).
    fn claim_due(
        &self,
        batch: u32,
        lease: Duration,
        node: &str,
    ) -> impl Future<Output = Result<Claim>> + Send {
        async move {
            let walk = Walk { from: None, share: AppShare::UNBOUNDED };
            Ok(self.claim_shared(batch, lease, node, walk).await?.claim)
        }
    }
    /// Claims up to `want` due, unleased deliveries of limited triggers (DESIGN §13), oldest due
    /// first per trigger and the triggers taking turns, within each trigger's limits,
    /// cluster-wide: no more than [`Slots::claimable`] (its `concurrency` less the slots other
    /// holders hold until their lease ends, rows ahead of them, less the holder's own `busy`);
    /// no more than its rate's tokens, one spent per row. Then, of each trigger it looked at
    /// (one with claimable rows), the holder holds [`Slots::held`] slots, for `lease`. A
    /// trigger another relay claims for at this moment is skipped, never waited for.
    fn claim_limited(
        &self,
        want: u32,
        lease: Duration,
        holder: Holder<'_>,
    ) -> impl Future<Output = Result<LimitedClaim>> + Send;
    /// Whether any trigger limits its deliveries: a relay claims limited rows only then.
    fn limits_exist(&self) -> impl Future<Output = Result<bool>> + Send;
    /// Gives back the slots `holder` holds of `triggers` (`None`: of every trigger, a relay that
    /// stops).
    fn release_slots(
        &self,
        holder: Uuid,
        triggers: Option<&[TriggerId]>,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Keeps the slots `holder` holds of `triggers` until now + `lease` at least: its deliveries
    /// of them work longer (DESIGN §14), and the slots must not come free under them. Returns
    /// the triggers whose slots it kept (a slot already gone is not taken back).
    fn extend_slots(
        &self,
        holder: Uuid,
        triggers: &[TriggerId],
        lease: Duration,
    ) -> impl Future<Output = Result<Vec<TriggerId>>> + Send;
    /// Looks up the trigger `call` names and, if it is an enabled `http` trigger, writes the
    /// call's row already claimed by `node` (attempt 1, leased), so the API node that waits on
    /// the call delivers it without a second round trip, and any relay delivers it after the
    /// lease if that node dies. One statement, which also reads the delivery target (the
    /// registering principal's standing), and whose commit does not wait for the WAL flush: the
    /// row is not acknowledged work (the caller learns the outcome from the call, and a crash
    /// that loses the row also fails the call), so it does not pay for an fsync.
    fn insert_sync_call(
        &self,
        call: &model::NewSyncCall,
        lease: Duration,
        node: &str,
    ) -> impl Future<Output = Result<SyncCallWrite>> + Send;
    /// Deletes delivered rows.
    fn delete_deliveries(&self, tx: &mut Self::Tx, ids: &[Uuid]) -> impl Future<Output = Result<u64>> + Send;
    /// Deletes delivered rows in a statement of its own (the common completion, in one round trip).
    fn delete_delivered(&self, ids: &[Uuid]) -> impl Future<Output = Result<u64>> + Send;
    /// Schedules failed attempts again, releasing their lease. Rows whose attempt count moved on
    /// (claimed again after the lease ran out) are left alone.
    fn reschedule(
        &self,
        tx: &mut Self::Tx,
        rows: &[model::Reschedule],
    ) -> impl Future<Output = Result<u64>> + Send;
    /// Moves the leases of rows in flight whose handlers said `working` (DESIGN §14), in one
    /// statement: only a row still leased by `node` with the attempt given is touched. Returns
    /// the ids whose lease it moved.
    fn extend_leases(
        &self,
        node: &str,
        rows: &[model::LeaseExtension],
    ) -> impl Future<Output = Result<Vec<Uuid>>> + Send;
    /// The app's deliveries in the outbox that `filter` lets through, oldest first (by id), after
    /// the cursor id, without their events (DESIGN §15).
    fn list_deliveries(
        &self,
        app_id: AppId,
        filter: &model::DeliveryFilter,
        after: Option<Uuid>,
        limit: u32,
    ) -> impl Future<Output = Result<model::Page<model::Delivery>>> + Send;
    /// One delivery of the app in the outbox, with its event and its finished attempts.
    fn delivery(
        &self,
        app_id: AppId,
        id: Uuid,
    ) -> impl Future<Output = Result<Option<model::DeliveryDetail>>> + Send;
    /// One delivery of the app, locked until `tx` ends, with its lane (taken first, as writers
    /// take it): a claim skips it meanwhile, a completion of it waits, and no sweep releases its
    /// lane under it.
    fn lock_delivery(
        &self,
        tx: &mut Self::Tx,
        app_id: AppId,
        id: Uuid,
    ) -> impl Future<Output = Result<Option<model::Delivery>>> + Send;
    /// How many deliveries still report `dead_letter_id`, other than `except`.
    fn pending_for_dead_letter(
        &self,
        tx: &mut Self::Tx,
        dead_letter_id: Uuid,
        except: Uuid,
    ) -> impl Future<Output = Result<u64>> + Send;
}

/// Dead letters.
pub trait DeadLetterRepo: Transactional {
    /// Writes dead letters directly (for events that never reached the outbox, e.g. `max_depth`).
    fn insert_dead_letters(
        &self,
        tx: &mut Self::Tx,
        rows: &[model::NewDeadLetter],
    ) -> impl Future<Output = Result<Vec<model::DeadLetter>>> + Send;
    /// Moves deliveries from the outbox into the dead letters; rows whose attempt count moved on
    /// are left alone. Returns the dead letters written.
    fn bury(
        &self,
        tx: &mut Self::Tx,
        rows: &[model::Bury],
    ) -> impl Future<Output = Result<Vec<model::DeadLetter>>> + Send;
    /// One dead letter of the app.
    fn dead_letter(
        &self,
        app_id: AppId,
        id: Uuid,
    ) -> impl Future<Output = Result<Option<model::DeadLetter>>> + Send;
    /// One dead letter of the app, locked until `tx` ends: whoever changes it meanwhile waits.
    fn lock_dead_letter(
        &self,
        tx: &mut Self::Tx,
        app_id: AppId,
        id: Uuid,
    ) -> impl Future<Output = Result<Option<model::DeadLetter>>> + Send;
    /// The app's dead letters, newest first, after the cursor id.
    fn list_dead_letters(
        &self,
        app_id: AppId,
        filter: &model::DeadLetterFilter,
        after: Option<Uuid>,
        limit: u32,
    ) -> impl Future<Output = Result<model::Page<model::DeadLetter>>> + Send;
    /// How many of the app's dead letters are unresolved (the badge).
    fn unresolved_count(&self, app_id: AppId) -> impl Future<Output = Result<u64>> + Send;
    /// How many of the app's dead letters `filter` takes.
    fn count_dead_letters(
        &self,
        app_id: AppId,
        filter: &model::DeadLetterFilter,
    ) -> impl Future<Output = Result<u64>> + Send;
    /// The ids of up to `limit` of the app's dead letters that `filter` takes, oldest first,
    /// after the cursor id, locked until `tx` ends. A dead letter another transaction holds is
    /// waited for, not skipped, and taken only if `filter` still takes it once it is free: a bulk
    /// action racing another, or a single replay, finds it changed, so each is acted on once.
    /// Ids only: a batch of dead letters with their events could be too large to hold at once.
    fn lock_dead_letters(
        &self,
        tx: &mut Self::Tx,
        app_id: AppId,
        filter: &model::DeadLetterFilter,
        after: Option<Uuid>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Uuid>>> + Send;
    /// Sets a dead letter's resolution, only if it has none yet when `only_unresolved`.
    /// Returns the dead letter if it changed.
    fn resolve(
        &self,
        tx: &mut Self::Tx,
        app_id: AppId,
        id: Uuid,
        resolution: model::Resolution,
        only_unresolved: bool,
    ) -> impl Future<Output = Result<Option<model::DeadLetter>>> + Send;
    /// Deletes up to `batch` resolved dead letters resolved more than `older_than` ago; returns
    /// how many. Unresolved ones are kept however old.
    fn gc_dead_letters(&self, older_than: Duration, batch: u32) -> impl Future<Output = Result<u64>> + Send;
}

/// The forensic log of sync results nobody waited for.
pub trait AbandonedRepo: Transactional {
    /// Records one.
    fn insert_abandoned(
        &self,
        row: &model::AbandonedExecution,
    ) -> impl Future<Output = Result<model::AbandonedExecution>> + Send;
    /// The app's records, newest first, after the cursor id.
    fn list_abandoned(
        &self,
        app_id: AppId,
        after: Option<Uuid>,
        limit: u32,
    ) -> impl Future<Output = Result<model::Page<model::AbandonedExecution>>> + Send;
    /// Deletes up to `batch` records older than `older_than`; returns how many.
    fn gc_abandoned(&self, older_than: Duration, batch: u32) -> impl Future<Output = Result<u64>> + Send;
}

/// Statistics of the attempts of each trigger (DESIGN §15), in buckets of a minute per node.
pub trait StatsRepo: Transactional {
    /// Adds each trigger's attempts to its bucket of the current minute as `node` counted them:
    /// one upsert per trigger (each trigger at most once in `stats`).
    fn record_attempts(
        &self,
        node: &str,
        stats: &[model::AttemptStats],
    ) -> impl Future<Output = Result<()>> + Send;
    /// The trigger's attempts from `since` on, merged into buckets `step` wide that start at
    /// `since`, oldest first; buckets without attempts are left out.
    fn attempt_stats(
        &self,
        trigger_id: TriggerId,
        since: OffsetDateTime,
        step: Duration,
    ) -> impl Future<Output = Result<Vec<model::StatsBucket>>> + Send;
    /// Where the app's deliveries are now, per trigger (`None`: its emails), in one read: the
    /// outbox has no index by trigger, so one read of the app's rows serves every trigger.
    fn backlogs(
        &self,
        app_id: AppId,
    ) -> impl Future<Output = Result<Vec<(Option<TriggerId>, model::TriggerBacklog)>>> + Send;
    /// Deletes up to `batch` minutes of statistics older than `older_than`; returns how many.
    fn gc_stats(&self, older_than: Duration, batch: u32) -> impl Future<Output = Result<u64>> + Send;
}

/// KV entries with a version per key.
pub trait KvRepo: Transactional {
    /// One entry.
    fn kv_get(
        &self,
        app_id: AppId,
        collection: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<model::KvEntry>>> + Send;
    /// Upserts an entry; with `expected`, only if its current version is that (a key that does
    /// not exist has no version, so any `expected` fails for it).
    fn kv_put(
        &self,
        tx: &mut Self::Tx,
        app_id: AppId,
        collection: &str,
        key: &str,
        value: &serde_json::Value,
        expected: Option<i64>,
    ) -> impl Future<Output = Result<model::KvPutResult>> + Send;
    /// Upserts an entry and, in the same step, writes one `picloud.kv.put` delivery per enabled
    /// `kv` trigger of the app whose pattern matches the collection and whose ops hold `put`,
    /// with the event data of DESIGN §3. In `tx`, or in a statement of its own when `tx` is
    /// `None` (for Postgres one round trip: the write path of a single KV put). A concurrent
    /// first write of the same key fails with [`Error::Conflict`]; try again. Returns the put and
    /// the ids of the deliveries it wrote; `None`, having written nothing, when a trigger it fires has
    /// a `flow` (lanes and gated rows are written by [`OutboxRepo::insert_deliveries`]); and
    /// [`Error::Stale`], having written nothing, when the configuration epoch is no longer the
    /// put's `authorized_at`. Postgres also answers `None` without asking the database for a
    /// second (by the store's clock) after refusing a put to the collection for a flow, and then
    /// checks no epoch: a caller given `None` writes the put in several statements, which check
    /// it ([`crate::events::kv_put_now`] does).
    fn kv_put_firing(
        &self,
        tx: Option<&mut Self::Tx>,
        put: &model::FiringPut<'_>,
    ) -> impl Future<Output = Result<Option<(model::KvPutResult, Vec<Uuid>)>>> + Send;
    /// Deletes an entry, returning it; `None` if it did not exist. With `expected`, only if its
    /// version is that.
    fn kv_delete(
        &self,
        tx: &mut Self::Tx,
        app_id: AppId,
        collection: &str,
        key: &str,
        expected: Option<i64>,
    ) -> impl Future<Output = Result<Option<model::KvEntry>>> + Send;
    /// Keys of a collection by key, those starting with `prefix`, after `after`; their values
    /// are not read.
    fn kv_list(
        &self,
        app_id: AppId,
        collection: &str,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> impl Future<Output = Result<model::Page<model::KvKeyInfo>>> + Send;
}

/// The next ticks of cron triggers: what [`cron::fire_due_ticks`] locks and advances. The time is
/// always the caller's (`now`), never the store's clock, so a scheduler decides on one clock.
pub trait CronRepo: Transactional {
    /// Up to `batch` enabled cron triggers whose next tick is due at `now` or not computed yet
    /// (those first, then the earliest), locked until `tx` ends. Triggers locked by another
    /// transaction are skipped, never waited for, so concurrent schedulers take disjoint sets.
    fn lock_due_cron(
        &self,
        tx: &mut Self::Tx,
        now: OffsetDateTime,
        batch: u32,
    ) -> impl Future<Output = Result<Vec<cron::DueCron>>> + Send;
    /// Sets the next tick of cron triggers, in `tx`. Moving a next tick is bookkeeping, not
    /// configuration: it leaves the configuration epoch as it is.
    fn set_next_ticks(
        &self,
        tx: &mut Self::Tx,
        ticks: &[(TriggerId, cron::NextTick)],
    ) -> impl Future<Output = Result<()>> + Send;
    /// The earliest next tick of the enabled cron triggers, with `now` standing for a trigger
    /// whose next tick is not computed yet; `None` when no enabled trigger has a tick to come.
    fn next_cron_tick(
        &self,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<Option<OffsetDateTime>>> + Send;
}

/// Every repository at once: what the relay, the API and the tests take.
pub trait Store:
    AuthRepo + TriggerRepo + OutboxRepo + DeadLetterRepo + AbandonedRepo + KvRepo + CronRepo + StatsRepo
{
}

impl<S: AuthRepo + TriggerRepo + OutboxRepo + DeadLetterRepo + AbandonedRepo + KvRepo + CronRepo + StatsRepo>
    Store for S
{
}

/// Clamps a requested page size to `1..=MAX_PAGE`, defaulting to [`DEFAULT_PAGE`].
pub fn page_limit(limit: Option<u32>) -> u32 {
    limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE)
}
