//! The JSON shapes of the API: what routes answer, and the bodies they take.

use picloud_core::batch::{MAX_BATCH_SIZE, MAX_BATCH_WAIT_MS, MIN_BATCH_SIZE};
use picloud_core::flow::{MAX_CONCURRENCY, MAX_DEBOUNCE_MS, MAX_RATE};
use picloud_core::retry::{MAX_ATTEMPTS_LIMIT, MAX_BACKOFF_MS};
use picloud_core::{AttemptOutcome, Batch, Flow, RetryOverrides, Role, Scope, TriggerId};
use picloud_store::{
    AbandonedExecution, ApiToken, App, AttemptStats, DeadLetter, Delivery, DeliveryDetail, DeliveryState,
    EventHeaders, Handler, Principal, Trigger, TriggerBacklog, TriggerSpec,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::OffsetDateTime;
use utoipa::ToSchema;
use utoipa::openapi::schema::{
    AdditionalProperties, ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type,
};
use uuid::Uuid;

/// RFC 3339 UTC, as every time in the API.
pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    picloud_core::protocol::rfc3339_millis(t)
}

/// An app.
#[derive(Debug, Serialize, ToSchema)]
pub struct AppView {
    /// Its id.
    pub id: Uuid,
    /// Its slug.
    pub slug: String,
    /// When it was created (RFC 3339).
    pub created_at: String,
}

impl From<App> for AppView {
    fn from(a: App) -> Self {
        Self { id: a.id.as_uuid(), slug: a.slug.into_string(), created_at: rfc3339(a.created_at) }
    }
}

/// `POST /v1/apps`
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApp {
    /// `[a-z][a-z0-9-]{0,62}`
    #[schema(pattern = "^[a-z][a-z0-9-]{0,62}$")]
    pub slug: String,
}

/// A principal.
#[derive(Debug, Serialize, ToSchema)]
pub struct PrincipalView {
    /// Its id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// Whether it is a platform admin.
    pub platform_admin: bool,
    /// When it was created (RFC 3339).
    pub created_at: String,
}

impl From<Principal> for PrincipalView {
    fn from(p: Principal) -> Self {
        Self {
            id: p.id.as_uuid(),
            name: p.name,
            platform_admin: p.platform_admin,
            created_at: rfc3339(p.created_at),
        }
    }
}

/// `POST /v1/principals`
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePrincipal {
    /// A name, 1–200 characters.
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
    /// Make it a platform admin.
    #[serde(default)]
    pub platform_admin: bool,
}

/// `PUT /v1/apps/{app}/members/{principal_id}`
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetRole {
    /// `viewer`, `developer` or `admin`.
    #[schema(pattern = "^(viewer|developer|admin)$")]
    pub role: String,
}

/// A membership.
#[derive(Debug, Serialize, ToSchema)]
pub struct MemberView {
    /// The app's slug.
    pub app: String,
    /// The member.
    pub principal_id: Uuid,
    /// Its role.
    #[schema(value_type = String)]
    pub role: Role,
}

/// `POST /v1/tokens`
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Whom the token authenticates (default: the caller).
    pub principal_id: Option<Uuid>,
    /// Limit the token to this app (slug).
    pub app: Option<String>,
    /// Narrow the token to these scopes.
    pub scopes: Option<Vec<String>>,
    /// Let the token expire after this many seconds: at most 10 years.
    #[schema(minimum = 1, maximum = 315_360_000)]
    pub expires_in_s: Option<u64>,
}

/// A token as minted: the secret is shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenCreated {
    /// The token's id (for revocation).
    pub id: Uuid,
    /// The secret: `pcr_…`. Never shown again.
    pub token: String,
    /// Whom it authenticates.
    pub principal_id: Uuid,
    /// The app it is limited to, if any.
    pub app: Option<String>,
    /// The scopes it is narrowed to, if any.
    pub scopes: Option<Vec<String>>,
    /// When it expires, if ever.
    pub expires_at: Option<String>,
    /// When it was minted.
    pub created_at: String,
}

impl TokenCreated {
    /// The view of a stored token and its secret.
    pub fn new(token: &ApiToken, secret: String, app: Option<String>) -> Self {
        Self {
            id: token.id,
            token: secret,
            principal_id: token.principal_id.as_uuid(),
            app,
            scopes: token.scopes.map(|s| s.iter().map(|scope: Scope| scope.as_str().to_owned()).collect()),
            expires_at: token.expires_at.map(rfc3339),
            created_at: rfc3339(token.created_at),
        }
    }
}

/// `{version}`
#[derive(Debug, Serialize, ToSchema)]
pub struct VersionView {
    /// The entry's version.
    pub version: i64,
}

/// `{value, version}`
#[derive(Debug, Serialize, ToSchema)]
pub struct KvValue {
    /// The value.
    #[schema(value_type = Value)]
    pub value: serde_json::Value,
    /// Its version.
    pub version: i64,
}

/// A key of a collection.
#[derive(Debug, Serialize, ToSchema)]
pub struct KvKeyView {
    /// The key.
    pub key: String,
    /// Its version.
    pub version: i64,
    /// When it was last written.
    pub updated_at: String,
}

/// `{id, deliveries}`
#[derive(Debug, Serialize, ToSchema)]
pub struct Published {
    /// The message's id.
    pub id: Uuid,
    /// Deliveries written (one per matching trigger).
    pub deliveries: usize,
}

/// `{id}`
#[derive(Debug, Serialize, ToSchema)]
pub struct IdView {
    /// The id.
    pub id: Uuid,
}

/// `POST /v1/apps/{app}/queues/{queue}/jobs`
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnqueueJob {
    /// The job's data: any JSON value.
    #[schema(value_type = Value)]
    pub payload: Box<RawValue>,
    /// Wait this long before the first attempt: at most a year.
    #[schema(maximum = 31_536_000_000_u64)]
    pub delay_ms: Option<u64>,
    /// Enqueueing the same key again while the job is pending returns the first job.
    pub idempotency_key: Option<String>,
    /// 1-200 bytes: with `flow.ordering: key`, jobs sharing it run one at a time, in order.
    pub ordering_key: Option<String>,
}

/// `POST /v1/apps/{app}/emails`
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendEmail {
    /// An address or a list of addresses.
    #[schema(schema_with = recipients)]
    pub to: serde_json::Value,
    /// The subject line.
    pub subject: String,
    /// The plain-text body.
    pub text: String,
    /// An HTML body, sent as the alternative.
    pub html: Option<String>,
}

/// The schema of [`SendEmail::to`]: an address, or a list of addresses.
fn recipients() -> Schema {
    let address = || ObjectBuilder::new().schema_type(Type::String);
    OneOfBuilder::new()
        .item(address().description(Some("an address")))
        .item(ArrayBuilder::new().items(address()).description(Some("a list of addresses")))
        .description(Some("An address or a list of addresses."))
        .build()
        .into()
}

/// The schema of a trigger's `retry` ([`RetryOverrides`]): each field, when given, replaces the
/// node's default.
fn retry_overrides() -> Schema {
    let millis = |description: &str| {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(1))
            .maximum(Some(MAX_BACKOFF_MS))
            .description(Some(description))
    };
    ObjectBuilder::new()
        .property(
            "max_attempts",
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(1))
                .maximum(Some(MAX_ATTEMPTS_LIMIT))
                .description(Some("Attempts before the delivery becomes a dead letter.")),
        )
        .property("backoff_base_ms", millis("The backoff after the first attempt, doubled after each."))
        .property("backoff_max_ms", millis("The longest backoff: at least backoff_base_ms."))
        .additional_properties(Some(AdditionalProperties::FreeForm(false)))
        .description(Some("Retry overrides: each field, when given, replaces the node's default."))
        .build()
        .into()
}

/// An integer from `min` to `max`, of a trigger's `flow` or `batch`.
fn integer(min: u32, max: u32, description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(min))
        .maximum(Some(max))
        .description(Some(description))
}

/// The schema of a trigger's `flow` ([`Flow`], DESIGN §13).
fn flow() -> Schema {
    ObjectBuilder::new()
        .property(
            "ordering",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["none", "key", "trigger"]))
                .description(Some("none (default), key: one at a time per ordering key, in write order; trigger: one at a time for the whole trigger.")),
        )
        .property("concurrency", integer(1, MAX_CONCURRENCY, "At most this many deliveries in flight at once, cluster-wide."))
        .property(
            "rate",
            ObjectBuilder::new()
                .property("per_second", integer(1, MAX_RATE, "Attempts started per second."))
                .required("per_second")
                .property("burst", integer(1, MAX_RATE, "The bucket's size (default per_second)."))
                .additional_properties(Some(AdditionalProperties::FreeForm(false)))
                .description(Some("A token bucket: attempts started per second, cluster-wide.")),
        )
        .property(
            "debounce_ms",
            integer(1, MAX_DEBOUNCE_MS, "With ordering key: a burst of writes to one key reaches the handler once, with the last value."),
        )
        .property(
            "hold_on_dead_letter",
            ObjectBuilder::new()
                .schema_type(Type::Boolean)
                .description(Some("With ordering: a dead letter keeps its key blocked until it is resolved.")),
        )
        .additional_properties(Some(AdditionalProperties::FreeForm(false)))
        .description(Some("How the trigger's deliveries flow (DESIGN §13)."))
        .build()
        .into()
}

/// The schema of a trigger's `batch` ([`Batch`], DESIGN §14).
fn batch() -> Schema {
    ObjectBuilder::new()
        .property("max_size", integer(MIN_BATCH_SIZE, MAX_BATCH_SIZE, "Deliveries in one request, at most."))
        .required("max_size")
        .property(
            "max_wait_ms",
            integer(0, MAX_BATCH_WAIT_MS, "How long the oldest delivery of an unfilled batch waits for more."),
        )
        .required("max_wait_ms")
        .additional_properties(Some(AdditionalProperties::FreeForm(false)))
        .description(Some(
            "The trigger's deliveries go to its function handler as batches: one request of up to max_size, sent when that many are due or the oldest has waited max_wait_ms (DESIGN §14). Not for http triggers or webhook handlers.",
        ))
        .build()
        .into()
}

/// `{count}`
#[derive(Debug, Serialize, ToSchema)]
pub struct CountView {
    /// How many.
    pub count: u64,
}

/// `POST /v1/apps/{app}/dead-letters/replay` and `…/ignore`: which dead letters the action
/// takes, every field narrowing them further.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkDeadLetters {
    /// `unresolved` (the default); a replay also takes `ignored`, `handled_by_script` or
    /// `handler_failed` (never `replayed`: a dead letter is replayed once), an ignore only
    /// `unresolved`.
    #[schema(pattern = "^(unresolved|replayed|ignored|handled_by_script|handler_failed)$")]
    pub resolution: Option<String>,
    /// Only those of this trigger (by name; the dead letters of a deleted trigger keep its name).
    #[schema(pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub trigger: Option<String>,
    /// Only those that died for this reason.
    #[schema(pattern = "^(exhausted|rejected|max_depth|unauthorized|cancelled)$")]
    pub reason: Option<String>,
    /// Only those created after this time (RFC 3339).
    #[schema(format = DateTime)]
    pub created_after: Option<String>,
    /// Only those created before this time (RFC 3339), later than `created_after`.
    #[schema(format = DateTime)]
    pub created_before: Option<String>,
    /// Count what the action would take, and change nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// Where a trigger delivers, as the API shows it (a webhook's secret is never shown).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HandlerBody {
    /// `{"function": "<name>"}`
    Function(String),
    /// `{"webhook": {"url": "https://…", "secret": "whsec_…"}}`
    Webhook(WebhookBody),
}

/// A webhook target.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookBody {
    /// The URL, `http://` or `https://`, to a public address. Shown whole only to callers who may
    /// manage the app's triggers; others see `scheme://host[:port]`.
    pub url: String,
    /// The Standard Webhooks signing secret, `whsec_…`: required to register, never shown (the
    /// views leave it empty, and an empty secret is not written out).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schema(write_only)]
    pub secret: String,
}

/// `POST /v1/apps/{app}/triggers`
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterTrigger {
    /// `[a-z0-9][a-z0-9_-]{0,62}`, unique in the app.
    #[schema(pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub name: String,
    /// `kv`, `pubsub`, `queue`, `cron`, `dead_letter` or `http`.
    #[schema(pattern = "^(kv|pubsub|queue|cron|dead_letter|http)$")]
    pub kind: String,
    /// kv: the collection pattern (`*`, `prefix*` or a name).
    pub collection: Option<String>,
    /// kv: `put` and/or `delete` (default both).
    pub ops: Option<Vec<String>>,
    /// pubsub: the topic pattern.
    pub topic: Option<String>,
    /// queue: the queue.
    pub queue: Option<String>,
    /// cron: a 5-field schedule.
    pub schedule: Option<String>,
    /// cron: an IANA time zone (default UTC).
    pub timezone: Option<String>,
    /// dead_letter: only dead letters of this trigger.
    pub source_trigger: Option<String>,
    /// dead_letter: only dead letters of these event kinds.
    pub source_kinds: Option<Vec<String>>,
    /// Where deliveries go.
    pub handler: HandlerBody,
    /// Retry overrides.
    #[schema(schema_with = retry_overrides)]
    pub retry: Option<RetryOverrides>,
    /// How deliveries flow (DESIGN §13); checked field by field, so that a refusal names the field.
    #[schema(schema_with = flow)]
    pub flow: Option<serde_json::Value>,
    /// How deliveries batch (DESIGN §14); checked field by field, so that a refusal names the field.
    #[schema(schema_with = batch)]
    pub batch: Option<serde_json::Value>,
    /// Whether it fires (default true).
    pub enabled: Option<bool>,
}

/// `PATCH /v1/apps/{app}/triggers/{name}`
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchTrigger {
    /// Enable or disable.
    pub enabled: Option<bool>,
    /// A new handler.
    pub handler: Option<HandlerBody>,
    /// New retry overrides (replacing the old ones).
    #[schema(schema_with = retry_overrides)]
    pub retry: Option<RetryOverrides>,
    /// A new flow (replacing the old one); `null` removes it.
    #[serde(default, deserialize_with = "present")]
    #[schema(schema_with = flow)]
    pub flow: Option<serde_json::Value>,
    /// A new batch (replacing the old one); `null` removes it.
    #[serde(default, deserialize_with = "present")]
    #[schema(schema_with = batch)]
    pub batch: Option<serde_json::Value>,
}

/// A field that may be `null`: given (`Some`, `null` included) or absent (`None`, by default).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

/// A trigger.
#[derive(Debug, Serialize, ToSchema)]
pub struct TriggerView {
    /// Its id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: String,
    /// kv: the collection pattern.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collection: Option<String>,
    /// kv: the ops.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ops: Option<Vec<String>>,
    /// pubsub: the topic pattern.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// queue: the queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// cron: the schedule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// cron: the time zone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// dead_letter: the source trigger.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_trigger: Option<String>,
    /// dead_letter: the source kinds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_kinds: Option<Vec<String>>,
    /// Where deliveries go.
    pub handler: HandlerBody,
    /// Retry overrides.
    #[schema(schema_with = retry_overrides)]
    pub retry: RetryOverrides,
    /// How deliveries flow; absent when freely.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = flow)]
    pub flow: Option<Flow>,
    /// How deliveries batch; absent when one at a time.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = batch)]
    pub batch: Option<Batch>,
    /// Whether it fires.
    pub enabled: bool,
    /// The principal it runs as.
    pub registered_by: Uuid,
    /// When it was registered.
    pub created_at: String,
    /// When it last changed.
    pub updated_at: String,
}

impl TriggerView {
    /// The view a reader gets: a webhook's URL whole when `whole_webhook_url`, else only its
    /// `scheme://host[:port]` (DESIGN §11).
    pub fn shown_to(trigger: Trigger, whole_webhook_url: bool) -> Self {
        let mut view = Self::from(trigger);
        if !whole_webhook_url && let HandlerBody::Webhook(hook) = &mut view.handler {
            hook.url = origin(&hook.url);
        }
        view
    }
}

/// `scheme://host[:port]` of a URL (the port when it is not the scheme's default), without its
/// userinfo, path, query and fragment; nothing of a URL that does not parse.
fn origin(url: &str) -> String {
    url::Url::parse(url).map(|u| u.origin().ascii_serialization()).unwrap_or_default()
}

/// The whole view, webhook URL included: for callers who may manage the app's triggers (and the
/// platform's own admin commands); other readers get [`TriggerView::shown_to`].
impl From<Trigger> for TriggerView {
    fn from(t: Trigger) -> Self {
        let mut view = TriggerView {
            id: t.id.as_uuid(),
            name: t.name.to_string(),
            kind: t.spec.kind().as_str().to_owned(),
            collection: None,
            ops: None,
            topic: None,
            queue: None,
            schedule: None,
            timezone: None,
            source_trigger: None,
            source_kinds: None,
            handler: match t.handler {
                Handler::Function(name) => HandlerBody::Function(name.into_string()),
                Handler::Webhook { url, .. } => {
                    HandlerBody::Webhook(WebhookBody { url, secret: String::new() })
                }
            },
            retry: t.retry,
            flow: t.flow,
            batch: t.batch,
            enabled: t.enabled,
            registered_by: t.registered_by.as_uuid(),
            created_at: rfc3339(t.created_at),
            updated_at: rfc3339(t.updated_at),
        };
        match t.spec {
            TriggerSpec::Kv { collection, ops } => {
                view.collection = Some(collection.to_string());
                view.ops = Some(ops.iter().map(|op| op.as_str().to_owned()).collect());
            }
            TriggerSpec::Pubsub { topic } => view.topic = Some(topic.to_string()),
            TriggerSpec::Queue { queue } => view.queue = Some(queue.into_string()),
            TriggerSpec::Cron { schedule } => {
                view.schedule = Some(schedule.expression().to_owned());
                view.timezone = Some(schedule.timezone().to_owned());
            }
            TriggerSpec::DeadLetter { source_trigger, source_kinds } => {
                view.source_trigger = source_trigger.map(|n| n.into_string());
                view.source_kinds = source_kinds.map(|ks| ks.iter().map(|k| k.as_str().to_owned()).collect());
            }
            TriggerSpec::Http => {}
        }
        view
    }
}

/// The event a dead letter or a delivery carries.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadEvent {
    /// CloudEvents type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// CloudEvents source.
    pub source: String,
    /// CloudEvents subject.
    pub subject: Option<String>,
    /// When it happened.
    pub time: String,
    /// Its depth.
    pub depth: u32,
    /// Its data: any JSON value.
    #[schema(value_type = Value)]
    pub data: Box<RawValue>,
}

/// A dead letter.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterView {
    /// Its id.
    pub id: Uuid,
    /// The trigger's name (kept after the trigger is deleted).
    pub trigger: Option<String>,
    /// The trigger's id, while it exists.
    pub trigger_id: Option<Uuid>,
    /// The event kind.
    pub kind: String,
    /// The delivery that died.
    pub delivery_id: Uuid,
    /// `exhausted`, `rejected`, `max_depth`, `unauthorized` or `cancelled`.
    pub reason: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last error.
    pub last_error: Option<String>,
    /// When it died.
    pub created_at: String,
    /// `replayed`, `ignored`, `handled_by_script`, `handler_failed`, or null.
    pub resolution: Option<String>,
    /// When it was resolved.
    pub resolved_at: Option<String>,
    /// The event.
    pub event: DeadEvent,
}

impl From<DeadLetter> for DeadLetterView {
    fn from(d: DeadLetter) -> Self {
        Self {
            id: d.id,
            trigger: d.trigger_name,
            trigger_id: d.trigger_id.map(TriggerId::as_uuid),
            kind: d.kind.as_str().to_owned(),
            delivery_id: d.delivery_id,
            reason: d.reason.as_str().to_owned(),
            attempts: d.attempts,
            last_error: d.last_error,
            created_at: rfc3339(d.created_at),
            resolution: d.resolution.map(|r| r.as_str().to_owned()),
            resolved_at: d.resolved_at.map(rfc3339),
            event: DeadEvent::new(d.headers, d.payload),
        }
    }
}

impl DeadEvent {
    fn new(headers: EventHeaders, data: Box<RawValue>) -> Self {
        DeadEvent {
            event_type: headers.event_type,
            source: headers.source,
            subject: headers.subject,
            time: rfc3339(headers.time),
            depth: headers.depth,
            data,
        }
    }
}

/// A delivery in the outbox (DESIGN §15), without its event.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryView {
    /// Its id, stable across attempts.
    pub id: Uuid,
    /// The trigger's name, while it exists (null for emails).
    pub trigger: Option<String>,
    /// The trigger's id (null for emails).
    pub trigger_id: Option<Uuid>,
    /// The event kind.
    pub kind: String,
    /// `pending` (due), `scheduled` (not due yet), `in_flight` (an attempt runs) or `waiting`
    /// (held by flow control: behind its lane's earlier deliveries, or due and waiting for its
    /// trigger's `concurrency` or `rate`).
    pub state: String,
    /// Attempts started.
    pub attempts: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// When it is, or was, due.
    pub due_at: String,
    /// While in flight: when its lease ends.
    pub leased_until: Option<String>,
    /// While in flight: the progress its handler last reported (0–100).
    pub progress: Option<u8>,
    /// The event's ordering key.
    pub ordering_key: Option<String>,
    /// The last attempt's error.
    pub last_error: Option<String>,
    /// When its event happened.
    pub created_at: String,
}

impl DeliveryView {
    /// `d` as it stands at `now`.
    pub fn at(d: Delivery, now: OffsetDateTime) -> Self {
        let state = d.state(now);
        let in_flight = state == DeliveryState::InFlight;
        DeliveryView {
            id: d.id,
            trigger: d.trigger_name,
            trigger_id: d.trigger_id.map(TriggerId::as_uuid),
            kind: d.kind.as_str().to_owned(),
            state: state.as_str().to_owned(),
            attempts: d.attempts,
            max_attempts: d.max_attempts,
            due_at: rfc3339(d.due_at),
            leased_until: d.leased_until.filter(|_| in_flight).map(rfc3339),
            progress: d.progress.filter(|_| in_flight),
            ordering_key: d.ordering_key,
            last_error: d.last_error,
            created_at: rfc3339(d.created_at),
        }
    }
}

/// One finished attempt of a delivery.
#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptView {
    /// Its number, from 1.
    pub attempt: u32,
    /// When the relay sent it.
    pub started_at: String,
    /// When its outcome reached the relay.
    pub ended_at: String,
    /// `retry`, `timeout`, `no_responders`, `invalid`, `error` or `interrupted`.
    pub outcome: String,
    /// Its error.
    pub error: Option<String>,
    /// The node whose relay sent it.
    pub node: String,
}

/// A delivery in the outbox with its event and its history.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryDetailView {
    /// The delivery.
    #[serde(flatten)]
    pub delivery: DeliveryView,
    /// Its event.
    pub event: DeadEvent,
    /// Its last finished attempts (at most 20), oldest first; an attempt in flight is not among
    /// them.
    pub attempt_history: Vec<AttemptView>,
}

impl DeliveryDetailView {
    /// `d` as it stands at `now`.
    pub fn at(d: DeliveryDetail, now: OffsetDateTime) -> Self {
        DeliveryDetailView {
            delivery: DeliveryView::at(d.delivery, now),
            event: DeadEvent::new(d.headers, d.payload),
            attempt_history: d
                .attempts
                .into_iter()
                .map(|a| AttemptView {
                    attempt: a.attempt,
                    started_at: rfc3339(a.started_at),
                    ended_at: rfc3339(a.ended_at),
                    outcome: a.outcome,
                    error: a.error,
                    node: a.node,
                })
                .collect(),
        }
    }
}

/// A replayed dead letter and the new delivery.
#[derive(Debug, Serialize, ToSchema)]
pub struct Replayed {
    /// The dead letter, now `replayed`.
    pub dead_letter: DeadLetterView,
    /// The id of the new delivery.
    pub delivery_id: Uuid,
}

/// An abandoned execution.
#[derive(Debug, Serialize, ToSchema)]
pub struct AbandonedView {
    /// Its id.
    pub id: Uuid,
    /// The trigger's name.
    pub trigger: String,
    /// The trigger's id, while it exists.
    pub trigger_id: Option<Uuid>,
    /// The sync call's delivery id.
    pub outbox_id: Uuid,
    /// The inbox nobody waited on any more.
    pub reply_to: String,
    /// `no_responders` (the caller's wait ran out), `caller_gone` (it hung up), `lease_expired`
    /// (the call's row outlived its lease on the node that took it: never run again), or
    /// `ack_timeout` (older rows).
    pub reason: String,
    /// What the handler made of it: `ok`, `retry`, `fail`, `error`, `timeout`, `no_handler`, or
    /// `unknown` for `lease_expired`.
    pub handler_status: String,
    /// The handler's body: any JSON value.
    #[schema(value_type = Option<Value>)]
    pub result: Option<Box<RawValue>>,
    /// The handler's error.
    pub error: Option<String>,
    /// When it was recorded.
    pub created_at: String,
}

impl From<AbandonedExecution> for AbandonedView {
    fn from(a: AbandonedExecution) -> Self {
        Self {
            id: a.id,
            trigger: a.trigger_name,
            trigger_id: a.trigger_id.map(TriggerId::as_uuid),
            outbox_id: a.outbox_id,
            reply_to: a.reply_to,
            reason: a.reason.as_str().to_owned(),
            handler_status: a.handler_status.as_str().to_owned(),
            result: a.result,
            error: a.error,
            created_at: rfc3339(a.created_at),
        }
    }
}

/// `/healthz`, `/readyz`
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` or `unavailable`.
    pub status: String,
    /// What is down, when something is.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub down: Vec<String>,
}

/// `GET /v1/apps/{app}/triggers/{name}/stats` (DESIGN §15): a trigger's attempts over a window,
/// and where its deliveries are now.
#[derive(Debug, Serialize, ToSchema)]
pub struct TriggerStatsView {
    /// `1h`, `24h` or `7d`.
    pub window: String,
    /// The width of each bucket, in seconds: 60, 600 or 3600.
    pub bucket_seconds: u64,
    /// Every bucket of the window, oldest first, the current one last (empty ones too).
    pub buckets: Vec<StatsBucketView>,
    /// The whole window's attempts, its latency quantiles read from every bucket's histogram
    /// merged.
    pub total: AttemptsView,
    /// Where the trigger's deliveries are now.
    pub backlog: BacklogView,
}

/// One bucket of a trigger's statistics.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatsBucketView {
    /// When it starts.
    pub start: String,
    /// The attempts that ended in it.
    #[serde(flatten)]
    pub attempts: AttemptsView,
}

/// Attempts by outcome, with their latency from the delivery's publishing to its answer (or its
/// deadline).
#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptsView {
    /// The handler answered `ok`.
    pub ok: u64,
    /// The handler answered `retry`.
    pub retry: u64,
    /// The handler answered `fail`, or something that is not an answer, or the delivery could
    /// not be sent.
    pub fail: u64,
    /// No answer before the deadline.
    pub timeout: u64,
    /// No handler was listening.
    pub no_handler: u64,
    /// The median latency in milliseconds (within a quarter of the true one); null without
    /// attempts.
    pub p50_ms: Option<f64>,
    /// The 99th percentile of the latency in milliseconds; null without attempts.
    pub p99_ms: Option<f64>,
}

impl From<&AttemptStats> for AttemptsView {
    fn from(a: &AttemptStats) -> Self {
        let count = |o: AttemptOutcome| a.outcomes[o.index()];
        let ms = |q: f64| a.latencies.quantile(q).map(|d| (d.as_secs_f64() * 1e6).round() / 1e3);
        AttemptsView {
            ok: count(AttemptOutcome::Ok),
            retry: count(AttemptOutcome::Retry),
            fail: count(AttemptOutcome::Fail),
            timeout: count(AttemptOutcome::Timeout),
            no_handler: count(AttemptOutcome::NoHandler),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
        }
    }
}

/// Where a trigger's deliveries are now.
#[derive(Debug, Serialize, ToSchema)]
pub struct BacklogView {
    /// Due, waiting for a relay.
    pub pending: u64,
    /// Due later (a backoff or a delay).
    pub scheduled: u64,
    /// An attempt runs.
    pub in_flight: u64,
    /// Held by flow control.
    pub waiting: u64,
    /// How long the oldest pending delivery has been due, in milliseconds; null when none is.
    pub oldest_due_age_ms: Option<u64>,
}

impl BacklogView {
    /// `b` as it stands at `now`.
    pub fn at(b: TriggerBacklog, now: OffsetDateTime) -> Self {
        BacklogView {
            pending: b.pending,
            scheduled: b.scheduled,
            in_flight: b.in_flight,
            waiting: b.waiting,
            oldest_due_age_ms: b.oldest_due.map(|due| (now - due).whole_milliseconds().max(0) as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use picloud_core::protocol::TriggerKind;
    use picloud_core::{AppSlug, Role, TriggerName};
    use proptest::prelude::*;
    use utoipa::PartialSchema;

    use super::*;

    /// The `pattern` the OpenAPI document gives `field` of `T`: a literal there (utoipa takes no
    /// expression), so these tests hold it to the rule that is enforced.
    fn pattern<T: PartialSchema>(field: &str) -> regex::Regex {
        let schema = serde_json::to_value(T::schema()).expect("a schema serializes");
        let pattern = schema["properties"][field]["pattern"].as_str().expect("a documented pattern");
        regex::Regex::new(pattern).expect("a pattern that compiles")
    }

    /// Names that are mostly of the allowed characters, some not, some too long.
    fn names() -> impl Strategy<Value = String> {
        prop_oneof!["[a-z0-9_-]{0,66}", "[a-zA-Z0-9_ .-]{0,10}", "[a-z][a-z0-9-]{60,64}"]
    }

    proptest! {
        #[test]
        fn the_documented_name_patterns_accept_exactly_what_the_rules_accept(name in names()) {
            let slug = AppSlug::parse(name.clone()).is_ok();
            prop_assert_eq!(pattern::<CreateApp>("slug").is_match(&name), slug, "slug {:?}", name);
            let trigger = TriggerName::parse(name.clone()).is_ok();
            prop_assert_eq!(pattern::<RegisterTrigger>("name").is_match(&name), trigger, "trigger {:?}", name);
        }
    }

    #[test]
    fn the_documented_roles_and_kinds_are_the_ones_parsed() {
        let (roles, kinds) = (pattern::<SetRole>("role"), pattern::<RegisterTrigger>("kind"));
        let words = ["viewer", "developer", "admin", "owner", "Admin", "admins", "", "kv", "pubsub", "queue"];
        let words = words.into_iter().chain(["cron", "dead_letter", "http", "email", "dead-letter", "kv "]);
        for word in words {
            assert_eq!(roles.is_match(word), Role::parse(word).is_some(), "role {word:?}");
            assert_eq!(kinds.is_match(word), TriggerKind::parse(word).is_some(), "kind {word:?}");
        }
    }
}
