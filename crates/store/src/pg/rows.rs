//! Reading rows into records: the shared decoding of stored enums, JSON and scopes.

use picloud_core::ids::Id;
use picloud_core::names::{CollectionName, HandlerName, KvKey, QueueName, TriggerName};
use picloud_core::protocol::EventKind;
use picloud_core::{
    AppSlug, Batch, CollectionPattern, CronSchedule, Flow, RetryOverrides, Role, Scope, ScopeSet,
};
use serde_json::value::RawValue;
use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use crate::model::*;
use crate::{Error, Result};

pub(super) fn corrupt(table: &'static str, detail: impl Into<String>) -> Error {
    Error::Corrupt { table, detail: detail.into() }
}

/// A UUID column read as one of core's typed ids (`AppId`, …), which sqlx cannot decode itself.
pub(super) fn id<T: Id>(row: &PgRow, column: &str) -> Result<T> {
    Ok(T::from_uuid(row.try_get::<Uuid, _>(column)?))
}

/// A nullable UUID column read as one of core's typed ids.
pub(super) fn opt_id<T: Id>(row: &PgRow, column: &str) -> Result<Option<T>> {
    Ok(row.try_get::<Option<Uuid>, _>(column)?.map(T::from_uuid))
}

pub(super) fn raw_json(table: &'static str, text: String) -> Result<Box<RawValue>> {
    RawValue::from_string(text).map_err(|e| corrupt(table, format!("bad JSON: {e}")))
}

pub(super) fn event_kind(table: &'static str, s: &str) -> Result<EventKind> {
    EventKind::parse(s).ok_or_else(|| corrupt(table, format!("unknown kind {s:?}")))
}

pub(super) fn scopes_from(table: &'static str, scopes: Option<Vec<String>>) -> Result<Option<ScopeSet>> {
    scopes
        .map(|list| {
            list.iter()
                .map(|s| Scope::parse(s).ok_or_else(|| corrupt(table, format!("unknown scope {s:?}"))))
                .collect::<Result<ScopeSet>>()
        })
        .transpose()
}

pub(super) fn scopes_to(scopes: Option<ScopeSet>) -> Option<Vec<String>> {
    scopes.map(|s| s.iter().map(|scope| scope.as_str().to_owned()).collect())
}

pub(super) fn app(row: &PgRow) -> Result<App> {
    Ok(App {
        id: id(row, "id")?,
        slug: AppSlug::parse(row.try_get::<String, _>("slug")?)
            .map_err(|e| corrupt("apps", e.to_string()))?,
        created_at: row.try_get("created_at")?,
    })
}

pub(super) fn principal(row: &PgRow) -> Result<Principal> {
    Ok(Principal {
        id: id(row, "id")?,
        name: row.try_get("name")?,
        platform_admin: row.try_get("platform_admin")?,
        created_at: row.try_get("created_at")?,
    })
}

pub(super) fn role(s: Option<String>) -> Result<Option<Role>> {
    s.map(|s| Role::parse(&s).ok_or_else(|| corrupt("app_members", format!("unknown role {s:?}"))))
        .transpose()
}

pub(super) fn api_token(row: &PgRow) -> Result<ApiToken> {
    Ok(ApiToken {
        id: row.try_get("id")?,
        principal_id: id(row, "principal_id")?,
        app_id: opt_id(row, "app_id")?,
        scopes: scopes_from("api_tokens", row.try_get("scopes")?)?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
        created_at: row.try_get("created_at")?,
    })
}

/// The columns [`trigger`] reads of every trigger, from `triggers t`.
macro_rules! trigger_common_columns {
    () => {
        "t.id, t.app_id, t.name, t.kind, t.handler_function, t.webhook_url, t.webhook_secret,
         t.retry_max_attempts, t.retry_backoff_base_ms, t.retry_backoff_max_ms, t.enabled,
         t.registered_by_principal, t.created_at, t.updated_at, t.flow, t.batch"
    };
}

/// The columns [`trigger`] reads of one kind's details table, by the table's alias in
/// [`trigger_from!`].
macro_rules! kind_columns {
    (kv) => {
        "kv.collection_stem, kv.collection_is_prefix, kv.ops"
    };
    (ps) => {
        "ps.topic_stem, ps.topic_is_prefix"
    };
    (q) => {
        "q.queue"
    };
    (c) => {
        "c.schedule, c.timezone"
    };
    (dl) => {
        "dl.source_trigger, dl.source_kinds"
    };
}

/// The columns [`trigger`] reads, from [`trigger_from!`].
macro_rules! trigger_columns {
    () => {
        concat!(
            $crate::pg::rows::trigger_common_columns!(),
            ", ",
            $crate::pg::rows::kind_columns!(kv),
            ", ",
            $crate::pg::rows::kind_columns!(ps),
            ", ",
            $crate::pg::rows::kind_columns!(q),
            ", ",
            $crate::pg::rows::kind_columns!(c),
            ", ",
            $crate::pg::rows::kind_columns!(dl)
        )
    };
}

/// A trigger with every detail table, left-joined.
macro_rules! trigger_from {
    () => {
        "triggers t
         LEFT JOIN kv_trigger_details kv ON kv.trigger_id = t.id
         LEFT JOIN pubsub_trigger_details ps ON ps.trigger_id = t.id
         LEFT JOIN queue_trigger_details q ON q.trigger_id = t.id
         LEFT JOIN cron_trigger_details c ON c.trigger_id = t.id
         LEFT JOIN dead_letter_trigger_details dl ON dl.trigger_id = t.id"
    };
}
pub(super) use {kind_columns, trigger_columns, trigger_common_columns, trigger_from};

/// `SELECT` of a trigger with its details; append a `WHERE`.
pub(super) const TRIGGER_SELECT: &str = concat!("SELECT ", trigger_columns!(), " FROM ", trigger_from!());

/// `SELECT` of triggers of one kind, joined with that kind's details table only (`$table`, as
/// `$alias` in [`trigger_from!`]); append a `WHERE`. Matching an event's triggers runs one on
/// every write. For a KV match (`pgbench`), the join of every kind's details ran 5,200 a second
/// with planning (simple protocol) against 19,000 for this (3.7×), and 53,000 prepared against
/// 81,000 (1.5×).
macro_rules! trigger_select_of {
    ($alias:ident, $table:literal) => {
        concat!(
            "SELECT ",
            trigger_common_columns!(),
            ", ",
            kind_columns!($alias),
            " FROM triggers t JOIN ",
            $table,
            " ",
            stringify!($alias),
            " ON ",
            stringify!($alias),
            ".trigger_id = t.id"
        )
    };
}

/// [`trigger_select_of!`] for `kv` triggers.
pub(super) const KV_TRIGGER_SELECT: &str = trigger_select_of!(kv, "kv_trigger_details");

/// [`trigger_select_of!`] for `pubsub` triggers.
pub(super) const PUBSUB_TRIGGER_SELECT: &str = trigger_select_of!(ps, "pubsub_trigger_details");

/// [`trigger_select_of!`] for `queue` triggers.
pub(super) const QUEUE_TRIGGER_SELECT: &str = trigger_select_of!(q, "queue_trigger_details");

/// [`trigger_select_of!`] for `dead_letter` triggers.
pub(super) const DEAD_LETTER_TRIGGER_SELECT: &str = trigger_select_of!(dl, "dead_letter_trigger_details");

pub(super) fn trigger(row: &PgRow) -> Result<Trigger> {
    let bad = |detail: String| corrupt("triggers", detail);
    let kind: String = row.try_get("kind")?;
    let missing = |what: &str| bad(format!("{kind} trigger without {what}"));
    let spec = match kind.as_str() {
        "kv" => {
            let stem: Option<String> = row.try_get("collection_stem")?;
            let is_prefix: Option<bool> = row.try_get("collection_is_prefix")?;
            let ops: Option<Vec<String>> = row.try_get("ops")?;
            let ops = ops
                .ok_or_else(|| missing("ops"))?
                .iter()
                .map(|op| KvOp::parse(op).ok_or_else(|| bad(format!("unknown op {op:?}"))))
                .collect::<Result<Vec<_>>>()?;
            TriggerSpec::Kv {
                collection: CollectionPattern::from_parts(
                    stem.ok_or_else(|| missing("collection"))?,
                    is_prefix.ok_or_else(|| missing("collection"))?,
                ),
                ops,
            }
        }
        "pubsub" => {
            let stem: Option<String> = row.try_get("topic_stem")?;
            let is_prefix: Option<bool> = row.try_get("topic_is_prefix")?;
            TriggerSpec::Pubsub {
                topic: CollectionPattern::from_parts(
                    stem.ok_or_else(|| missing("topic"))?,
                    is_prefix.ok_or_else(|| missing("topic"))?,
                ),
            }
        }
        "queue" => {
            let queue: Option<String> = row.try_get("queue")?;
            TriggerSpec::Queue {
                queue: QueueName::parse(queue.ok_or_else(|| missing("queue"))?)
                    .map_err(|e| bad(e.to_string()))?,
            }
        }
        "cron" => {
            let schedule: Option<String> = row.try_get("schedule")?;
            let timezone: Option<String> = row.try_get("timezone")?;
            TriggerSpec::Cron {
                schedule: CronSchedule::stored(
                    &schedule.ok_or_else(|| missing("schedule"))?,
                    &timezone.ok_or_else(|| missing("timezone"))?,
                ),
            }
        }
        "dead_letter" => {
            let source_trigger: Option<String> = row.try_get("source_trigger")?;
            let source_kinds: Option<Vec<String>> = row.try_get("source_kinds")?;
            TriggerSpec::DeadLetter {
                source_trigger: source_trigger
                    .map(|n| TriggerName::parse(n).map_err(|e| bad(e.to_string())))
                    .transpose()?,
                source_kinds: source_kinds
                    .map(|kinds| kinds.iter().map(|k| event_kind("triggers", k)).collect::<Result<Vec<_>>>())
                    .transpose()?,
            }
        }
        "http" => TriggerSpec::Http,
        other => return Err(bad(format!("unknown kind {other:?}"))),
    };
    let function: Option<String> = row.try_get("handler_function")?;
    let url: Option<String> = row.try_get("webhook_url")?;
    let secret: Option<String> = row.try_get("webhook_secret")?;
    let handler = match (function, url, secret) {
        (Some(f), None, _) => Handler::Function(HandlerName::parse(f).map_err(|e| bad(e.to_string()))?),
        (None, Some(url), Some(secret)) => Handler::Webhook { url, secret },
        _ => return Err(bad("a trigger needs exactly one handler".into())),
    };
    let max_attempts: Option<i32> = row.try_get("retry_max_attempts")?;
    let base: Option<i64> = row.try_get("retry_backoff_base_ms")?;
    let max: Option<i64> = row.try_get("retry_backoff_max_ms")?;
    let flow = flow(row)?;
    let batch = batch(row)?;
    Ok(Trigger {
        id: id(row, "id")?,
        app_id: id(row, "app_id")?,
        name: TriggerName::parse(row.try_get::<String, _>("name")?).map_err(|e| bad(e.to_string()))?,
        spec,
        handler,
        retry: RetryOverrides {
            max_attempts: max_attempts.map(|v| v as u32),
            backoff_base_ms: base.map(|v| v as u64),
            backoff_max_ms: max.map(|v| v as u64),
        },
        flow,
        batch,
        enabled: row.try_get("enabled")?,
        registered_by: id(row, "registered_by_principal")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// The columns [`dead_letter`] reads.
pub(super) const DEAD_LETTER_COLUMNS: &str = "id, app_id, trigger_id, trigger_name, kind, delivery_id, \
     payload::text AS payload, headers, attempts, reason, last_error, created_at, resolution, resolved_at, \
     held_lane";

pub(super) fn dead_letter(row: &PgRow) -> Result<DeadLetter> {
    let table = "dead_letters";
    let headers: sqlx::types::Json<EventHeaders> = row.try_get("headers")?;
    let reason: String = row.try_get("reason")?;
    let resolution: Option<String> = row.try_get("resolution")?;
    Ok(DeadLetter {
        id: row.try_get("id")?,
        app_id: id(row, "app_id")?,
        trigger_id: opt_id(row, "trigger_id")?,
        trigger_name: row.try_get("trigger_name")?,
        kind: event_kind(table, row.try_get::<&str, _>("kind")?)?,
        delivery_id: row.try_get("delivery_id")?,
        payload: raw_json(table, row.try_get("payload")?)?,
        headers: headers.0,
        attempts: row.try_get::<i32, _>("attempts")? as u32,
        reason: DeadLetterReason::parse(&reason)
            .ok_or_else(|| corrupt(table, format!("reason {reason:?}")))?,
        last_error: row.try_get("last_error")?,
        created_at: row.try_get("created_at")?,
        resolution: resolution
            .map(|r| Resolution::parse(&r).ok_or_else(|| corrupt(table, format!("resolution {r:?}"))))
            .transpose()?,
        resolved_at: row.try_get("resolved_at")?,
        held_lane: row.try_get("held_lane")?,
    })
}

/// The columns [`delivery`] reads, of `outbox o LEFT JOIN triggers t ON t.id = o.trigger_id`.
pub(super) const DELIVERY_COLUMNS: &str = "o.id, o.app_id, o.trigger_id, t.name AS trigger_name, o.kind, \
     o.attempts, o.max_attempts, o.due_at, o.leased_until, o.waiting, o.gated, \
     o.reply_to IS NOT NULL AS sync, o.ordering_key, o.last_error, o.created_at, o.progress";

pub(super) fn delivery(row: &PgRow) -> Result<Delivery> {
    Ok(Delivery {
        id: row.try_get("id")?,
        app_id: id(row, "app_id")?,
        trigger_id: opt_id(row, "trigger_id")?,
        trigger_name: row.try_get("trigger_name")?,
        kind: event_kind("outbox", row.try_get::<&str, _>("kind")?)?,
        attempts: row.try_get::<i32, _>("attempts")? as u32,
        max_attempts: row.try_get::<i32, _>("max_attempts")? as u32,
        due_at: row.try_get("due_at")?,
        leased_until: row.try_get("leased_until")?,
        waiting: row.try_get("waiting")?,
        gated: row.try_get("gated")?,
        sync: row.try_get("sync")?,
        ordering_key: row.try_get("ordering_key")?,
        last_error: row.try_get("last_error")?,
        created_at: row.try_get("created_at")?,
        progress: row.try_get::<Option<i16>, _>("progress")?.map(|p| p.clamp(0, 100) as u8),
    })
}

/// The SQL condition on `outbox o` that a row is in `state` at `now` (a parameter or `now()`):
/// the rule of [`Delivery::state`].
pub(super) fn in_state(state: DeliveryState, now: &str) -> String {
    let leased = format!("(o.leased_until IS NOT NULL AND o.leased_until > {now})");
    match state {
        DeliveryState::Waiting => format!("(o.waiting OR (o.gated AND NOT {leased} AND o.due_at <= {now}))"),
        DeliveryState::InFlight => format!("NOT o.waiting AND {leased}"),
        DeliveryState::Scheduled => format!("NOT o.waiting AND NOT {leased} AND o.due_at > {now}"),
        DeliveryState::Pending => {
            format!("NOT o.waiting AND NOT o.gated AND NOT {leased} AND o.due_at <= {now}")
        }
    }
}

/// A trigger's `flow` column.
pub(super) fn flow(row: &PgRow) -> Result<Option<Flow>> {
    let flow: Option<serde_json::Value> = row.try_get("flow")?;
    match flow {
        Some(flow) => Flow::from_json(&flow).map_err(|e| corrupt("triggers", format!("flow: {e}"))),
        None => Ok(None),
    }
}

/// A trigger's `batch` column.
pub(super) fn batch(row: &PgRow) -> Result<Option<Batch>> {
    let batch: Option<serde_json::Value> = row.try_get("batch")?;
    match batch {
        Some(batch) => Batch::from_json(&batch).map_err(|e| corrupt("triggers", format!("batch: {e}"))),
        None => Ok(None),
    }
}

pub(super) fn abandoned(row: &PgRow) -> Result<AbandonedExecution> {
    let table = "abandoned_executions";
    let reason: String = row.try_get("reason")?;
    let status: String = row.try_get("handler_status")?;
    Ok(AbandonedExecution {
        id: row.try_get("id")?,
        app_id: id(row, "app_id")?,
        trigger_id: opt_id(row, "trigger_id")?,
        trigger_name: row.try_get("trigger_name")?,
        outbox_id: row.try_get("outbox_id")?,
        reply_to: row.try_get("reply_to")?,
        reason: AbandonReason::parse(&reason).ok_or_else(|| corrupt(table, format!("reason {reason:?}")))?,
        handler_status: HandlerStatus::parse(&status)
            .ok_or_else(|| corrupt(table, format!("status {status:?}")))?,
        result: row.try_get::<Option<String>, _>("result")?.map(|r| raw_json(table, r)).transpose()?,
        error: row.try_get("error")?,
        created_at: row.try_get("created_at")?,
    })
}

pub(super) fn kv_entry(row: &PgRow) -> Result<KvEntry> {
    let table = "kv_entries";
    let value: sqlx::types::Json<serde_json::Value> = row.try_get("value")?;
    Ok(KvEntry {
        collection: CollectionName::parse(row.try_get::<String, _>("collection")?)
            .map_err(|e| corrupt(table, e.to_string()))?,
        key: KvKey::parse(row.try_get::<String, _>("key")?).map_err(|e| corrupt(table, e.to_string()))?,
        value: value.0,
        version: row.try_get("version")?,
        updated_at: row.try_get("updated_at")?,
    })
}

pub(super) fn kv_key(row: &PgRow) -> Result<KvKeyInfo> {
    Ok(KvKeyInfo {
        key: KvKey::parse(row.try_get::<String, _>("key")?)
            .map_err(|e| corrupt("kv_entries", e.to_string()))?,
        version: row.try_get("version")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// The query that reads one page of payload-carrying rows (`{select}` names the table, columns
/// and filter, with `{bytes}`, the size of a row's payload, among the columns; ordered by id
/// descending, `$limit` rows at most) and cuts it where the payloads reach the byte cap
/// (`$cap`): the rows past the cut are read by Postgres, never sent. Every row also carries
/// `fetched`, the count before the cut ([`Page::after_cut`]).
pub(super) fn byte_capped(select: &str, limit: &str, cap: &str) -> String {
    format!(
        "WITH fetched AS ({select} ORDER BY id DESC LIMIT {limit}),
              sized AS (SELECT *, sum(bytes) OVER (ORDER BY id DESC) - bytes AS before,
                               count(*) OVER () AS fetched
                          FROM fetched)
         SELECT * FROM sized WHERE before < {cap} ORDER BY id DESC"
    )
}

/// The page of [`byte_capped`]'s rows.
pub(super) fn capped_page<T>(
    rows: &[PgRow],
    limit: u32,
    item: impl Fn(&PgRow) -> Result<T>,
) -> Result<Page<T>> {
    let fetched = match rows.first() {
        Some(row) => row.try_get::<i64, _>("fetched")? as usize,
        None => 0,
    };
    Ok(Page::after_cut(rows.iter().map(item).collect::<Result<_>>()?, fetched, limit))
}
