//! The records the repositories read and write.

use picloud_core::names::{AppSlug, CollectionName, HandlerName, KvKey, QueueName, TriggerName};
use picloud_core::protocol::{EventKind, TriggerKind};
use picloud_core::{
    AppId, AttemptOutcome, Batch, CollectionPattern, CronSchedule, Flow, Latencies, PrincipalId,
    RetryOverrides, Role, ScopeSet, TriggerId,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::OffsetDateTime;
use uuid::Uuid;

/// A tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct App {
    /// Its id.
    pub id: AppId,
    /// Its unique slug.
    pub slug: AppSlug,
    /// When it was created.
    pub created_at: OffsetDateTime,
}

/// A user or service identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Its id.
    pub id: PrincipalId,
    /// A human-readable name.
    pub name: String,
    /// Platform admins satisfy every scope on every app.
    pub platform_admin: bool,
    /// When it was created.
    pub created_at: OffsetDateTime,
}

/// A principal's role on an app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// The app.
    pub app_id: AppId,
    /// The member.
    pub principal_id: PrincipalId,
    /// Its role there.
    pub role: Role,
}

/// A token to mint: the caller generated the secret and passes only its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewApiToken {
    /// The token's id.
    pub id: Uuid,
    /// Whom it authenticates.
    pub principal_id: PrincipalId,
    /// SHA-256 of the token text.
    pub token_hash: [u8; 32],
    /// The one app it is limited to, if any.
    pub app_id: Option<AppId>,
    /// The scopes it is narrowed to, if any.
    pub scopes: Option<ScopeSet>,
    /// When it stops working, if ever.
    pub expires_at: Option<OffsetDateTime>,
}

/// A deployment's first platform admin and its token, written together
/// ([`crate::AuthRepo::bootstrap_platform_admin`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPlatformAdmin {
    /// The principal's name.
    pub name: String,
    /// The token's id.
    pub token_id: Uuid,
    /// SHA-256 of the token text.
    pub token_hash: [u8; 32],
    /// When the token stops working, if ever.
    pub expires_at: Option<OffsetDateTime>,
}

/// A stored token (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    /// The token's id.
    pub id: Uuid,
    /// Whom it authenticates.
    pub principal_id: PrincipalId,
    /// The one app it is limited to, if any.
    pub app_id: Option<AppId>,
    /// The scopes it is narrowed to, if any.
    pub scopes: Option<ScopeSet>,
    /// When it stops working, if ever.
    pub expires_at: Option<OffsetDateTime>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<OffsetDateTime>,
    /// When it was minted.
    pub created_at: OffsetDateTime,
}

/// A KV operation, as triggers select them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvOp {
    /// An upsert.
    Put,
    /// A delete.
    Delete,
}

impl KvOp {
    /// The wire and storage name.
    pub fn as_str(self) -> &'static str {
        match self {
            KvOp::Put => "put",
            KvOp::Delete => "delete",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<KvOp> {
        [KvOp::Put, KvOp::Delete].into_iter().find(|op| op.as_str() == s)
    }
}

/// Where a trigger's deliveries go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handler {
    /// A function served by the app's workers over NATS.
    Function(HandlerName),
    /// A webhook, POSTed by the built-in executor and signed with the secret.
    Webhook {
        /// The URL.
        url: String,
        /// The `whsec_…` signing secret.
        secret: String,
    },
}

/// The kind of a trigger with its kind-specific fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TriggerSpec {
    /// KV puts/deletes in matching collections.
    Kv {
        /// The collection pattern.
        collection: CollectionPattern,
        /// The operations that fire it (not empty).
        ops: Vec<KvOp>,
    },
    /// Messages on matching topics.
    Pubsub {
        /// The topic pattern.
        topic: CollectionPattern,
    },
    /// Jobs on one queue.
    Queue {
        /// The queue.
        queue: QueueName,
    },
    /// Schedule ticks.
    Cron {
        /// A 5-field cron expression in an IANA time zone.
        schedule: CronSchedule,
    },
    /// Dead letters created in the app.
    DeadLetter {
        /// Only dead letters of this trigger, when given.
        source_trigger: Option<TriggerName>,
        /// Only dead letters of these kinds, when given.
        source_kinds: Option<Vec<EventKind>>,
    },
    /// Sync invocations.
    Http,
}

impl TriggerSpec {
    /// The trigger kind.
    pub fn kind(&self) -> TriggerKind {
        match self {
            TriggerSpec::Kv { .. } => TriggerKind::Kv,
            TriggerSpec::Pubsub { .. } => TriggerKind::Pubsub,
            TriggerSpec::Queue { .. } => TriggerKind::Queue,
            TriggerSpec::Cron { .. } => TriggerKind::Cron,
            TriggerSpec::DeadLetter { .. } => TriggerKind::DeadLetter,
            TriggerSpec::Http => TriggerKind::Http,
        }
    }
}

/// A trigger to register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTrigger {
    /// Its id.
    pub id: TriggerId,
    /// Its app.
    pub app_id: AppId,
    /// Its name, unique within the app.
    pub name: TriggerName,
    /// What fires it.
    pub spec: TriggerSpec,
    /// Where its deliveries go.
    pub handler: Handler,
    /// Its retry overrides.
    pub retry: RetryOverrides,
    /// How its deliveries flow (DESIGN §13); `None`: freely.
    pub flow: Option<Flow>,
    /// How many of its deliveries go to the handler at once (DESIGN §14); `None`: one at a time.
    pub batch: Option<Batch>,
    /// Whether it fires.
    pub enabled: bool,
    /// The principal it runs as.
    pub registered_by: PrincipalId,
}

impl NewTrigger {
    /// A trigger of `app_id` named `name`, fired by `spec`, delivered to `handler`, run as
    /// `registered_by`: enabled, with a fresh id, no retry overrides, no `flow` and no `batch`.
    pub fn new(
        app_id: AppId,
        name: TriggerName,
        spec: TriggerSpec,
        handler: Handler,
        registered_by: PrincipalId,
    ) -> Self {
        Self {
            id: TriggerId::new(),
            app_id,
            name,
            spec,
            handler,
            retry: RetryOverrides::default(),
            flow: None,
            batch: None,
            enabled: true,
            registered_by,
        }
    }
}

/// A registered trigger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    /// Its id.
    pub id: TriggerId,
    /// Its app.
    pub app_id: AppId,
    /// Its name, unique within the app.
    pub name: TriggerName,
    /// What fires it.
    pub spec: TriggerSpec,
    /// Where its deliveries go.
    pub handler: Handler,
    /// Its retry overrides.
    pub retry: RetryOverrides,
    /// How its deliveries flow (DESIGN §13); `None`: freely.
    pub flow: Option<Flow>,
    /// How many of its deliveries go to the handler at once (DESIGN §14); `None`: one at a time.
    pub batch: Option<Batch>,
    /// Whether it fires.
    pub enabled: bool,
    /// The principal it runs as.
    pub registered_by: PrincipalId,
    /// When it was registered.
    pub created_at: OffsetDateTime,
    /// When it last changed.
    pub updated_at: OffsetDateTime,
}

/// The fields of a trigger a PATCH may change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TriggerPatch {
    /// Enable or disable.
    pub enabled: Option<bool>,
    /// A new handler.
    pub handler: Option<Handler>,
    /// New retry overrides (replacing the old ones whole).
    pub retry: Option<RetryOverrides>,
    /// A new flow (`Some(None)` removes it). Deliveries written before keep the lane they were
    /// written in.
    pub flow: Option<Option<Flow>>,
    /// A new batch (`Some(None)` removes it).
    pub batch: Option<Option<Batch>>,
}

/// A delivery to write into the outbox.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    /// The delivery id, stable across attempts.
    pub id: Uuid,
    /// The app.
    pub app_id: AppId,
    /// The trigger (None only for emails).
    pub trigger_id: Option<TriggerId>,
    /// The event kind.
    pub kind: EventKind,
    /// The CloudEvents type.
    pub event_type: String,
    /// The CloudEvents source.
    pub source: String,
    /// The CloudEvents subject (the KV key), if any.
    pub subject: Option<String>,
    /// The event data.
    pub payload: Box<RawValue>,
    /// The event's depth.
    pub depth: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Delay before the first attempt.
    pub delay: std::time::Duration,
    /// A sync caller's inbox.
    pub reply_to: Option<String>,
    /// A job's idempotency key.
    pub idempotency_key: Option<String>,
    /// For deliveries of dead_letter triggers: the dead letter they report.
    pub dead_letter_id: Option<Uuid>,
    /// When the event happened; None means now.
    pub event_time: Option<OffsetDateTime>,
    /// The event's ordering key, if it has one.
    pub ordering_key: Option<String>,
    /// The lane the delivery waits its turn in, when its trigger orders deliveries
    /// ([`picloud_core::Flow::lane`]).
    pub lane: Option<String>,
    /// Whether it goes to the front of its lane, before the deliveries waiting there (the replay
    /// of a dead letter that held its lane); otherwise it goes to the back.
    pub front_of_lane: bool,
    /// Whether its trigger limits its deliveries ([`picloud_core::Flow::is_limited`]): then only
    /// [`crate::OutboxRepo::claim_limited`] claims it, within the trigger's limits.
    pub gated: bool,
    /// Whether its trigger debounces it (DESIGN §13, `debounce_ms`; its `delay` is the debounce
    /// at least): see [`NewDelivery::replaces_newest`].
    pub debounced: bool,
}

impl NewDelivery {
    /// Whether a relay may claim it as soon as it is committed: due at once, outside lanes and
    /// gates (what a wake-up may name, [`crate::Wakeup::Written`]).
    pub fn claimable_at_once(&self) -> bool {
        self.delay.is_zero() && self.lane.is_none() && !self.gated
    }

    /// The delivery as its trigger's `flow` has it flow: in the lane of its ordering key when the
    /// trigger orders deliveries, gated when it limits them, debounced (and due no sooner than
    /// the debounce) when it debounces them.
    pub fn flowing(self, flow: Option<&picloud_core::Flow>) -> Self {
        let Some(flow) = flow else { return self };
        let lane = flow.lane(self.ordering_key.as_deref()).map(str::to_owned);
        let debounce = flow
            .debounce_ms
            .filter(|_| lane.is_some())
            .map(|ms| std::time::Duration::from_millis(u64::from(ms)));
        Self {
            delay: debounce.map_or(self.delay, |d| d.max(self.delay)),
            lane,
            gated: flow.is_limited(),
            debounced: debounce.is_some(),
            ..self
        }
    }

    /// Whether, written, it gives its event to its lane's newest delivery when that one has not
    /// started (no attempt, no lease) and no idempotency key names it, instead of being a
    /// delivery of its own: a debounced row in a lane, unless it goes to the front of it.
    pub fn replaces_newest(&self) -> bool {
        self.debounced && !self.front_of_lane && self.trigger_id.is_some() && self.lane.is_some()
    }
}

/// A sync call to write (DESIGN §8): an invocation of the trigger named `trigger_name` in the
/// app, whose caller waits on `reply_to`. Never retried, never dead-lettered.
#[derive(Debug, Clone)]
pub struct NewSyncCall {
    /// The delivery id.
    pub id: Uuid,
    /// The app.
    pub app_id: AppId,
    /// The trigger's name: the row is written only if it names an enabled `http` trigger.
    pub trigger_name: String,
    /// The CloudEvents source.
    pub source: String,
    /// The call's body.
    pub payload: Box<RawValue>,
    /// The event's depth.
    pub depth: u32,
    /// The inbox the caller waits on.
    pub reply_to: String,
    /// The configuration epoch the caller's authorization was read at, when it was not read
    /// just now: the row is written only if the epoch is still that one.
    pub authorized_at: Option<i64>,
}

impl NewSyncCall {
    /// The outbox row of this call to trigger `trigger_id`: one attempt, answered on its inbox.
    pub fn delivery(&self, trigger_id: TriggerId) -> NewDelivery {
        let event = crate::events::Event {
            kind: EventKind::Http,
            event_type: picloud_core::protocol::event_type::HTTP_INVOKE,
            source: self.source.clone(),
            subject: None,
            payload: &self.payload,
            depth: self.depth,
            ordering_key: None,
        };
        NewDelivery {
            id: self.id,
            reply_to: Some(self.reply_to.clone()),
            ..event.delivery(self.app_id, Some(trigger_id), 1)
        }
    }
}

/// A delivery as a relay claimed it: the attempt is already counted.
#[derive(Debug, Clone)]
pub struct ClaimedDelivery {
    /// The delivery id.
    pub id: Uuid,
    /// The app.
    pub app_id: AppId,
    /// The trigger (None only for emails).
    pub trigger_id: Option<TriggerId>,
    /// The event kind.
    pub kind: EventKind,
    /// The CloudEvents type.
    pub event_type: String,
    /// The CloudEvents source.
    pub source: String,
    /// The CloudEvents subject, if any.
    pub subject: Option<String>,
    /// The event data.
    pub payload: Box<RawValue>,
    /// The event's depth.
    pub depth: u32,
    /// This attempt's number (1-based).
    pub attempt: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// A sync caller's inbox.
    pub reply_to: Option<String>,
    /// For deliveries of dead_letter triggers: the dead letter they report.
    pub dead_letter_id: Option<Uuid>,
    /// The last error recorded for this delivery.
    pub last_error: Option<String>,
    /// When the event happened.
    pub created_at: OffsetDateTime,
    /// The event's ordering key, if it has one.
    pub ordering_key: Option<String>,
    /// Whether it is the head of a lane: the lane's next row waits until this one has left the
    /// outbox.
    pub in_lane: bool,
    /// Whether it was claimed within its trigger's limits: it holds one of the relay's slots of
    /// the trigger until its answer (or its deadline) reaches the relay's completer.
    pub gated: bool,
}

/// A failed attempt to schedule again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reschedule {
    /// The delivery.
    pub id: Uuid,
    /// The attempt that failed; the row is only touched if it still has this attempt count.
    pub attempt: u32,
    /// Delay before the next attempt.
    pub delay: std::time::Duration,
    /// What went wrong.
    pub error: String,
    /// Give the attempt back (the count goes down by one): the attempt was not a try, as for an
    /// email that waits while no node sends email.
    pub refund_attempt: bool,
    /// The attempt, for the delivery's history (the last [`ATTEMPTS_KEPT`] are kept); `None`
    /// for a wait that was no attempt.
    pub record: Option<AttemptRecord>,
}

/// How many of a delivery's attempts its history keeps: the last ones.
pub const ATTEMPTS_KEPT: usize = 20;

/// One finished attempt of a delivery that is still in the outbox (DESIGN §15).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// Its number, from 1.
    pub attempt: u32,
    /// When the relay sent it.
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// When its outcome reached the relay.
    #[serde(with = "time::serde::rfc3339")]
    pub ended_at: OffsetDateTime,
    /// What it came to: `retry`, `timeout`, `no_responders`, `invalid`, `error`, `interrupted`.
    pub outcome: String,
    /// Its error.
    pub error: Option<String>,
    /// The node whose relay sent it.
    pub node: String,
}

/// A row in flight whose handler said `working` (DESIGN §14): its lease to move on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseExtension {
    /// The delivery.
    pub id: Uuid,
    /// The attempt in flight; the row is only touched if it still has this attempt count.
    pub attempt: u32,
    /// The lease from now on: leased until the store's now plus this, never earlier than it was.
    pub lease: std::time::Duration,
    /// The progress the handler last reported (0–100), if any: kept until another is.
    pub progress: Option<u8>,
}

/// Where a delivery in the outbox stands (DESIGN §15).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Due, and not leased: the next claim may take it.
    Pending,
    /// Not due yet: a first attempt delayed, or a retry in its backoff.
    Scheduled,
    /// Leased to a relay: an attempt runs.
    InFlight,
    /// Held by flow control: its lane's deliveries before it go first, or, due, it waits for its
    /// trigger's `concurrency` or `rate` to let it start.
    Waiting,
}

impl DeliveryState {
    /// Every state, in the order a delivery usually passes them.
    pub const ALL: [DeliveryState; 4] =
        [DeliveryState::Waiting, DeliveryState::Scheduled, DeliveryState::Pending, DeliveryState::InFlight];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Scheduled => "scheduled",
            DeliveryState::InFlight => "in_flight",
            DeliveryState::Waiting => "waiting",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == s)
    }
}

/// A delivery in the outbox, without its event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The delivery id.
    pub id: Uuid,
    /// The app.
    pub app_id: AppId,
    /// The trigger (None only for emails).
    pub trigger_id: Option<TriggerId>,
    /// The trigger's name, while it exists.
    pub trigger_name: Option<String>,
    /// The event kind.
    pub kind: EventKind,
    /// Attempts started.
    pub attempts: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// When it is due.
    pub due_at: OffsetDateTime,
    /// The end of the lease of the relay that holds it.
    pub leased_until: Option<OffsetDateTime>,
    /// Not its lane's head yet.
    pub waiting: bool,
    /// Its trigger limits its deliveries: it starts only within them.
    pub gated: bool,
    /// A sync call: its caller waits on it.
    pub sync: bool,
    /// The event's ordering key.
    pub ordering_key: Option<String>,
    /// The last attempt's error.
    pub last_error: Option<String>,
    /// When its event happened.
    pub created_at: OffsetDateTime,
    /// The progress its handler last reported in this attempt (DESIGN §14).
    pub progress: Option<u8>,
}

/// A delivery with its event and its finished attempts.
#[derive(Debug, Clone)]
pub struct DeliveryDetail {
    /// The delivery.
    pub delivery: Delivery,
    /// The event's CloudEvents context.
    pub headers: EventHeaders,
    /// The event data.
    pub payload: Box<RawValue>,
    /// Its last finished attempts that did not end it, oldest first.
    pub attempts: Vec<AttemptRecord>,
}

/// Which deliveries a list shows.
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    /// Only those of this trigger.
    pub trigger_id: Option<TriggerId>,
    /// Only those in this state.
    pub state: Option<DeliveryState>,
}

impl Delivery {
    /// Where it stands at `now`: a lease that ran out no longer counts. (Postgres lists by the
    /// same rule: `pg::rows::in_state`.)
    pub fn state(&self, now: OffsetDateTime) -> DeliveryState {
        if self.waiting {
            DeliveryState::Waiting
        } else if self.leased_until.is_some_and(|until| until > now) {
            DeliveryState::InFlight
        } else if self.due_at > now {
            DeliveryState::Scheduled
        } else if self.gated {
            DeliveryState::Waiting
        } else {
            DeliveryState::Pending
        }
    }
}

/// Why a delivery became a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterReason {
    /// Its attempts ran out.
    Exhausted,
    /// Its handler answered `fail`.
    Rejected,
    /// Its event was too deep.
    MaxDepth,
    /// Its registering principal lost the right.
    Unauthorized,
    /// Someone cancelled it (DESIGN §14); such a dead letter is resolved `ignored` at once.
    Cancelled,
}

impl DeadLetterReason {
    /// The wire and storage name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Exhausted => "exhausted",
            DeadLetterReason::Rejected => "rejected",
            DeadLetterReason::MaxDepth => "max_depth",
            DeadLetterReason::Unauthorized => "unauthorized",
            DeadLetterReason::Cancelled => "cancelled",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Exhausted, Self::Rejected, Self::MaxDepth, Self::Unauthorized, Self::Cancelled]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

/// How a dead letter was resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// Delivered again by an admin.
    Replayed,
    /// Dismissed by an admin.
    Ignored,
    /// A dead_letter trigger's delivery succeeded.
    HandledByScript,
    /// Every dead_letter trigger's delivery was exhausted.
    HandlerFailed,
}

impl Resolution {
    /// The wire and storage name.
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::Replayed => "replayed",
            Resolution::Ignored => "ignored",
            Resolution::HandledByScript => "handled_by_script",
            Resolution::HandlerFailed => "handler_failed",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Replayed, Self::Ignored, Self::HandledByScript, Self::HandlerFailed]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

/// The CloudEvents context of an event, kept with a dead letter so it can be replayed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventHeaders {
    /// The CloudEvents type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The CloudEvents source.
    pub source: String,
    /// The CloudEvents subject, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// When the event happened.
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// The event's depth.
    pub depth: u32,
    /// The event's ordering key, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering_key: Option<String>,
}

/// A dead letter to write directly (one not moved from the outbox, e.g. `max_depth`).
#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    /// Its id.
    pub id: Uuid,
    /// The app.
    pub app_id: AppId,
    /// The trigger, if any.
    pub trigger_id: Option<TriggerId>,
    /// The trigger's name, if any.
    pub trigger_name: Option<String>,
    /// The event kind.
    pub kind: EventKind,
    /// The delivery id the event had or would have had.
    pub delivery_id: Uuid,
    /// The event data.
    pub payload: Box<RawValue>,
    /// The event's CloudEvents context.
    pub headers: EventHeaders,
    /// Attempts made.
    pub attempts: u32,
    /// Why.
    pub reason: DeadLetterReason,
    /// The last error, if any.
    pub last_error: Option<String>,
}

/// A delivery to move from the outbox into the dead letters, in one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bury {
    /// The delivery.
    pub id: Uuid,
    /// The attempt that ended it; the row is only moved if it still has this attempt count.
    pub attempt: u32,
    /// Why.
    pub reason: DeadLetterReason,
    /// The last error.
    pub error: Option<String>,
}

/// A dead letter.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Its id.
    pub id: Uuid,
    /// The app.
    pub app_id: AppId,
    /// The trigger, while it exists.
    pub trigger_id: Option<TriggerId>,
    /// The trigger's name, kept after the trigger is deleted.
    pub trigger_name: Option<String>,
    /// The event kind.
    pub kind: EventKind,
    /// The delivery that died.
    pub delivery_id: Uuid,
    /// The event data.
    pub payload: Box<RawValue>,
    /// The event's CloudEvents context.
    pub headers: EventHeaders,
    /// Attempts made.
    pub attempts: u32,
    /// Why.
    pub reason: DeadLetterReason,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// How it was resolved, once it is.
    pub resolution: Option<Resolution>,
    /// When it was resolved.
    pub resolved_at: Option<OffsetDateTime>,
    /// The lane it keeps blocked until it is resolved (its trigger holds keys on dead letters).
    pub held_lane: Option<String>,
}

impl DeadLetter {
    /// Whether a replay can deliver it: an email (delivered without a trigger), or one whose
    /// trigger still exists (`events::replay`; Postgres: `replayable` of `pg/dead_letters.rs`).
    pub fn replayable(&self) -> bool {
        self.kind == EventKind::Email || self.trigger_id.is_some()
    }
}

/// Which dead letters a list, a count or a bulk action takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterFilter {
    /// `Some(None)`: unresolved only; `Some(Some(r))`: resolved as `r`; `None`: all.
    pub resolution: Option<Option<Resolution>>,
    /// Only those of the trigger with this name.
    pub trigger_name: Option<String>,
    /// Only those that died for this reason.
    pub reason: Option<DeadLetterReason>,
    /// Only those created after this time.
    pub created_after: Option<OffsetDateTime>,
    /// Only those created before this time.
    pub created_before: Option<OffsetDateTime>,
    /// Only those a replay can deliver ([`DeadLetter::replayable`]).
    pub replayable: bool,
}

/// Why a sync call's result found nobody waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AbandonReason {
    /// The inbox had no subscriber any more.
    NoResponders,
    /// The waiting node did not acknowledge in time (kept for older rows: a node now takes its
    /// own calls' results in memory, and relays never deliver a sync call).
    AckTimeout,
    /// The caller hung up.
    CallerGone,
    /// A relay found the call's row with its lease run out: the node that took it did not
    /// complete it, and the handler is not called again.
    LeaseExpired,
}

impl AbandonReason {
    /// The wire and storage name.
    pub fn as_str(self) -> &'static str {
        match self {
            AbandonReason::NoResponders => "no_responders",
            AbandonReason::AckTimeout => "ack_timeout",
            AbandonReason::CallerGone => "caller_gone",
            AbandonReason::LeaseExpired => "lease_expired",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::NoResponders, Self::AckTimeout, Self::CallerGone, Self::LeaseExpired]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

/// What a handler made of a sync call: `ok`, `retry`, `fail`, `error`, `timeout`, `no_handler`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HandlerStatus {
    /// Answered ok.
    Ok,
    /// Answered retry.
    Retry,
    /// Answered fail.
    Fail,
    /// Answered something unusable.
    Error,
    /// Did not answer in time.
    Timeout,
    /// Nobody served it.
    NoHandler,
    /// Not known: the call's row outlived its lease on the node that took it, which may have
    /// delivered it (and answered its caller) or died first.
    Unknown,
}

impl HandlerStatus {
    /// The wire and storage name.
    pub fn as_str(self) -> &'static str {
        match self {
            HandlerStatus::Ok => "ok",
            HandlerStatus::Retry => "retry",
            HandlerStatus::Fail => "fail",
            HandlerStatus::Error => "error",
            HandlerStatus::Timeout => "timeout",
            HandlerStatus::NoHandler => "no_handler",
            HandlerStatus::Unknown => "unknown",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Ok, Self::Retry, Self::Fail, Self::Error, Self::Timeout, Self::NoHandler, Self::Unknown]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

/// A sync result nobody was waiting for (DESIGN §8).
#[derive(Debug, Clone)]
pub struct AbandonedExecution {
    /// Its id.
    pub id: Uuid,
    /// The app.
    pub app_id: AppId,
    /// The trigger, while it exists.
    pub trigger_id: Option<TriggerId>,
    /// The trigger's name.
    pub trigger_name: String,
    /// The outbox row of the call.
    pub outbox_id: Uuid,
    /// The inbox that was gone.
    pub reply_to: String,
    /// Why it is abandoned.
    pub reason: AbandonReason,
    /// What the handler made of it.
    pub handler_status: HandlerStatus,
    /// The handler's body, if any.
    pub result: Option<Box<RawValue>>,
    /// The handler's error, if any.
    pub error: Option<String>,
    /// When it was recorded (ignored on insert: the store sets it).
    pub created_at: OffsetDateTime,
}

/// A KV entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    /// The collection.
    pub collection: CollectionName,
    /// The key.
    pub key: KvKey,
    /// The value.
    pub value: serde_json::Value,
    /// Its version, 1 on creation and +1 on every put.
    pub version: i64,
    /// When it was last written.
    pub updated_at: OffsetDateTime,
}

/// A listed KV key: what a list shows of an entry, without its value (a page of values could be
/// hundreds of megabytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvKeyInfo {
    /// The key.
    pub key: KvKey,
    /// Its version.
    pub version: i64,
    /// When it was last written.
    pub updated_at: OffsetDateTime,
}

/// What a KV put did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvPutResult {
    /// The new version.
    pub version: i64,
    /// The value it replaced, if any.
    pub previous: Option<serde_json::Value>,
}

/// A KV put that fires its triggers, as [`crate::KvRepo::kv_put_firing`] writes it.
#[derive(Debug, Clone, Copy)]
pub struct FiringPut<'a> {
    /// The app.
    pub app_id: AppId,
    /// The CloudEvents source of the event (`/apps/<app>/kv/<collection>`).
    pub source: &'a str,
    /// The collection.
    pub collection: &'a str,
    /// The key.
    pub key: &'a str,
    /// The event's ordering key (`<collection>/<key>`).
    pub ordering_key: &'a str,
    /// The new value.
    pub value: &'a serde_json::Value,
    /// The event's depth (below the limit: the caller checked).
    pub depth: u32,
    /// Attempts for triggers without an override.
    pub default_max_attempts: u32,
    /// The largest event data it may fire with ([`Error::TooLarge`](crate::Error::TooLarge)
    /// beyond, writing nothing).
    pub max_data_bytes: usize,
    /// The configuration epoch the writer was authorized at, when its authorization was kept
    /// from an earlier request: the put writes nothing and fails with
    /// [`Error::Stale`](crate::Error::Stale) once the epoch has moved.
    pub authorized_at: Option<i64>,
}

/// The event data of a KV change (DESIGN §3): `{collection, key, op, value, previous, version}`.
pub fn kv_event_data(
    collection: &str,
    key: &str,
    op: KvOp,
    value: Option<&serde_json::Value>,
    previous: Option<&serde_json::Value>,
    version: i64,
) -> Box<RawValue> {
    serde_json::value::to_raw_value(&serde_json::json!({
        "collection": collection, "key": key, "op": op.as_str(),
        "value": value, "previous": previous, "version": version,
    }))
    .expect("a JSON value serializes")
}

/// The event data of a debounced delivery whose event `newest` replaces the event data
/// `replaced` (DESIGN §13): the newest event's, except that a KV event keeps the `previous` of
/// the oldest event it replaced. (Postgres does the same in `pg/outbox.rs`'s `debounce`.)
pub fn debounced_data(kind: EventKind, newest: &RawValue, replaced: &RawValue) -> Box<RawValue> {
    if kind != EventKind::Kv {
        return newest.to_owned();
    }
    let parse = |raw: &RawValue| serde_json::from_str::<serde_json::Value>(raw.get()).ok();
    let (Some(mut data), Some(old)) = (parse(newest), parse(replaced)) else { return newest.to_owned() };
    if let Some(map) = data.as_object_mut() {
        map.insert("previous".to_owned(), old.get("previous").cloned().unwrap_or_default());
    }
    serde_json::value::to_raw_value(&data).expect("a JSON value serializes")
}

/// One page of a keyset-paged list.
#[derive(Debug, Clone)]
pub struct Page<T> {
    /// The items, at most the limit asked for.
    pub items: Vec<T>,
    /// Whether more items follow the last one.
    pub has_more: bool,
}

/// The most payload bytes one page of a list of payloads carries (dead letters, abandoned
/// executions): a page ends before the item that would pass it, and holds at least one item.
/// Without it, a page of 500 dead letters of a few megabytes each would be read and sent whole.
pub const PAGE_PAYLOAD_BYTES: usize = 4 * 1024 * 1024;

impl<T> Page<T> {
    /// A page out of the `limit + 1` items fetched.
    pub fn of(mut items: Vec<T>, limit: u32) -> Page<T> {
        let has_more = items.len() > limit as usize;
        items.truncate(limit as usize);
        Page { items, has_more }
    }

    /// A page out of the `limit + 1` items fetched, ending where their payloads (`size`) reach
    /// [`PAGE_PAYLOAD_BYTES`].
    pub fn capped(items: Vec<T>, limit: u32, size: impl Fn(&T) -> usize) -> Page<T> {
        let fetched = items.len();
        let mut carried = 0;
        let kept = items
            .into_iter()
            .take_while(|item| {
                let before = carried;
                carried += size(item);
                before < PAGE_PAYLOAD_BYTES
            })
            .collect();
        Self::after_cut(kept, fetched, limit)
    }

    /// A page out of `kept`, what a cut by [`PAGE_PAYLOAD_BYTES`] left of the `fetched` items
    /// (at most `limit + 1`).
    pub fn after_cut(mut kept: Vec<T>, fetched: usize, limit: u32) -> Page<T> {
        let has_more = kept.len() < fetched || kept.len() > limit as usize;
        kept.truncate(limit as usize);
        Page { items: kept, has_more }
    }
}

/// The attempts one completion batch counted for one trigger (DESIGN §15): added to the trigger's
/// statistics bucket of the minute they are written in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptStats {
    /// The trigger.
    pub trigger_id: TriggerId,
    /// How many attempts came to each outcome, in the order of `AttemptOutcome::ALL`.
    pub outcomes: [u64; 5],
    /// How long they took.
    pub latencies: Latencies,
}

impl AttemptStats {
    /// No attempts yet, of `trigger_id`.
    pub fn new(trigger_id: TriggerId) -> Self {
        Self { trigger_id, outcomes: [0; 5], latencies: Latencies::default() }
    }

    /// Counts one attempt.
    pub fn record(&mut self, outcome: AttemptOutcome, latency: std::time::Duration) {
        self.outcomes[outcome.index()] += 1;
        self.latencies.record(latency);
    }

    /// Adds another count's attempts to these.
    pub fn merge(&mut self, other: &AttemptStats) {
        for (mine, theirs) in self.outcomes.iter_mut().zip(other.outcomes) {
            *mine += theirs;
        }
        self.latencies.merge(&other.latencies);
    }
}

/// One bucket of a trigger's statistics: the attempts that ended from `start` on, for the
/// bucket's width.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsBucket {
    /// When it starts.
    pub start: OffsetDateTime,
    /// Its attempts (`trigger_id` is the trigger asked about).
    pub attempts: AttemptStats,
}

/// Where a trigger's deliveries are now (the states of [`DeliveryState`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TriggerBacklog {
    /// Due and waiting for a relay.
    pub pending: u64,
    /// Due later (a backoff, a delay).
    pub scheduled: u64,
    /// Claimed by a relay, under a lease.
    pub in_flight: u64,
    /// Held by flow control.
    pub waiting: u64,
    /// The due time of the oldest pending delivery.
    pub oldest_due: Option<OffsetDateTime>,
}

impl TriggerBacklog {
    /// Adds another's deliveries to these (an app's, from its triggers').
    pub fn add(&mut self, other: &TriggerBacklog) {
        self.pending += other.pending;
        self.scheduled += other.scheduled;
        self.in_flight += other.in_flight;
        self.waiting += other.waiting;
        self.oldest_due = match (self.oldest_due, other.oldest_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}
