//! Triggers and their detail tables in Postgres, and the matching that writes use.

use picloud_core::protocol::EventKind;
use picloud_core::{AppId, TriggerId};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::flow::set_limits;
use super::pattern::pattern_matches;
use super::rows::{
    self, DEAD_LETTER_TRIGGER_SELECT, KV_TRIGGER_SELECT, PUBSUB_TRIGGER_SELECT, QUEUE_TRIGGER_SELECT,
    TRIGGER_SELECT,
};
use super::{PgStore, violated};
use crate::model::*;
use crate::{DeliveryTarget, Error, Result, Standing, Targets, TriggerRepo};

fn handler_columns(handler: &Handler) -> (Option<&str>, Option<&str>, Option<&str>) {
    match handler {
        Handler::Function(name) => (Some(name.as_str()), None, None),
        Handler::Webhook { url, secret } => (None, Some(url.as_str()), Some(secret.as_str())),
    }
}

fn map_trigger_error(e: sqlx::Error, new: &NewTrigger) -> Error {
    match violated(&e) {
        Some((code, constraint)) if code == "23505" && constraint.starts_with("queue_trigger_details") => {
            match &new.spec {
                TriggerSpec::Queue { queue } => Error::QueueTaken(queue.to_string()),
                _ => e.into(),
            }
        }
        Some((code, _)) if code == "23505" => Error::DuplicateTrigger(new.name.to_string()),
        Some((code, constraint)) if code == "23503" && constraint.contains("principal") => {
            Error::UnknownPrincipal(new.registered_by)
        }
        Some((code, _)) if code == "23503" => Error::AppNotFound(new.app_id.to_string()),
        _ => e.into(),
    }
}

async fn insert_details(conn: &mut PgConnection, new: &NewTrigger) -> sqlx::Result<()> {
    match &new.spec {
        TriggerSpec::Kv { collection, ops } => {
            let ops: Vec<&str> = ops.iter().map(|op| op.as_str()).collect();
            sqlx::query(
                "INSERT INTO kv_trigger_details (trigger_id, app_id, collection_stem, collection_is_prefix, ops)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(new.id.as_uuid())
            .bind(new.app_id.as_uuid())
            .bind(collection.stem())
            .bind(collection.is_prefix())
            .bind(ops)
            .execute(conn)
            .await?;
        }
        TriggerSpec::Pubsub { topic } => {
            sqlx::query(
                "INSERT INTO pubsub_trigger_details (trigger_id, app_id, topic_stem, topic_is_prefix)
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(new.id.as_uuid())
            .bind(new.app_id.as_uuid())
            .bind(topic.stem())
            .bind(topic.is_prefix())
            .execute(conn)
            .await?;
        }
        TriggerSpec::Queue { queue } => {
            sqlx::query("INSERT INTO queue_trigger_details (trigger_id, app_id, queue) VALUES ($1, $2, $3)")
                .bind(new.id.as_uuid())
                .bind(new.app_id.as_uuid())
                .bind(queue.as_str())
                .execute(conn)
                .await?;
        }
        TriggerSpec::Cron { schedule } => {
            sqlx::query(
                "INSERT INTO cron_trigger_details (trigger_id, app_id, schedule, timezone) VALUES ($1, $2, $3, $4)",
            )
            .bind(new.id.as_uuid())
            .bind(new.app_id.as_uuid())
            .bind(schedule.expression())
            .bind(schedule.timezone())
            .execute(conn)
            .await?;
        }
        TriggerSpec::DeadLetter { source_trigger, source_kinds } => {
            let kinds: Option<Vec<&str>> =
                source_kinds.as_ref().map(|ks| ks.iter().map(|k| k.as_str()).collect());
            sqlx::query(
                "INSERT INTO dead_letter_trigger_details (trigger_id, app_id, source_trigger, source_kinds)
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(new.id.as_uuid())
            .bind(new.app_id.as_uuid())
            .bind(source_trigger.as_ref().map(|n| n.as_str()))
            .bind(kinds)
            .execute(conn)
            .await?;
        }
        TriggerSpec::Http => {}
    }
    Ok(())
}

async fn fetch_one(conn: &mut PgConnection, id: TriggerId) -> Result<Trigger> {
    let row =
        sqlx::query(&format!("{TRIGGER_SELECT} WHERE t.id = $1")).bind(id.as_uuid()).fetch_one(conn).await?;
    rows::trigger(&row)
}

impl TriggerRepo for PgStore {
    async fn create_trigger(&self, new: &NewTrigger) -> Result<Trigger> {
        let mut tx = self.pool.begin().await?;
        let (function, url, secret) = handler_columns(&new.handler);
        sqlx::query(
            "INSERT INTO triggers (id, app_id, name, kind, handler_function, webhook_url, webhook_secret,
                                   retry_max_attempts, retry_backoff_base_ms, retry_backoff_max_ms, enabled,
                                   registered_by_principal, created_at, updated_at, flow, batch)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, coalesce($13, now()), coalesce($13, now()),
                     $14, $15)",
        )
        .bind(new.id.as_uuid())
        .bind(new.app_id.as_uuid())
        .bind(new.name.as_str())
        .bind(new.spec.kind().as_str())
        .bind(function)
        .bind(url)
        .bind(secret)
        .bind(new.retry.max_attempts.map(|v| v as i32))
        .bind(new.retry.backoff_base_ms.map(|v| v as i64))
        .bind(new.retry.backoff_max_ms.map(|v| v as i64))
        .bind(new.enabled)
        .bind(new.registered_by.as_uuid())
        .bind(self.now())
        .bind(new.flow.map(sqlx::types::Json))
        .bind(new.batch.map(sqlx::types::Json))
        .execute(&mut *tx)
        .await
        .map_err(|e| map_trigger_error(e, new))?;
        insert_details(&mut tx, new).await.map_err(|e| map_trigger_error(e, new))?;
        set_limits(&mut tx, new.id, new.flow.as_ref(), self.now(), false).await?;
        let trigger = fetch_one(&mut tx, new.id).await?;
        tx.commit().await?;
        Ok(trigger)
    }

    async fn trigger(&self, app_id: AppId, name: &str) -> Result<Option<Trigger>> {
        let row = sqlx::query(&format!("{TRIGGER_SELECT} WHERE t.app_id = $1 AND t.name = $2"))
            .bind(app_id.as_uuid())
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(rows::trigger).transpose()
    }

    async fn trigger_by_id(
        &self,
        tx: &mut Self::Tx,
        app_id: AppId,
        id: TriggerId,
    ) -> Result<Option<Trigger>> {
        let row = sqlx::query(&format!("{TRIGGER_SELECT} WHERE t.app_id = $1 AND t.id = $2"))
            .bind(app_id.as_uuid())
            .bind(id.as_uuid())
            .fetch_optional(&mut **tx)
            .await?;
        row.as_ref().map(rows::trigger).transpose()
    }

    async fn list_triggers(&self, app_id: AppId, after: Option<&str>, limit: u32) -> Result<Page<Trigger>> {
        let fetched = sqlx::query(&format!(
            "{TRIGGER_SELECT} WHERE t.app_id = $1 AND ($2::text IS NULL OR t.name > $2) ORDER BY t.name LIMIT $3"
        ))
        .bind(app_id.as_uuid())
        .bind(after)
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        Ok(Page::of(fetched.iter().map(rows::trigger).collect::<Result<_>>()?, limit))
    }

    async fn update_trigger(&self, app_id: AppId, name: &str, patch: &TriggerPatch) -> Result<Trigger> {
        let mut tx = self.pool.begin().await?;
        let (function, url, secret) = patch.handler.as_ref().map(handler_columns).unwrap_or_default();
        let retry = patch.retry.unwrap_or_default();
        let id: Option<Uuid> = sqlx::query_scalar(
            "UPDATE triggers SET
                 enabled = coalesce($3, enabled),
                 handler_function = CASE WHEN $4 THEN $5 ELSE handler_function END,
                 webhook_url = CASE WHEN $4 THEN $6 ELSE webhook_url END,
                 webhook_secret = CASE WHEN $4 THEN $7 ELSE webhook_secret END,
                 retry_max_attempts = CASE WHEN $8 THEN $9 ELSE retry_max_attempts END,
                 retry_backoff_base_ms = CASE WHEN $8 THEN $10 ELSE retry_backoff_base_ms END,
                 retry_backoff_max_ms = CASE WHEN $8 THEN $11 ELSE retry_backoff_max_ms END,
                 flow = CASE WHEN $13 THEN $14 ELSE flow END,
                 batch = CASE WHEN $15 THEN $16 ELSE batch END,
                 updated_at = coalesce($12, now())
             WHERE app_id = $1 AND name = $2
             RETURNING id",
        )
        .bind(app_id.as_uuid())
        .bind(name)
        .bind(patch.enabled)
        .bind(patch.handler.is_some())
        .bind(function)
        .bind(url)
        .bind(secret)
        .bind(patch.retry.is_some())
        .bind(retry.max_attempts.map(|v| v as i32))
        .bind(retry.backoff_base_ms.map(|v| v as i64))
        .bind(retry.backoff_max_ms.map(|v| v as i64))
        .bind(self.now())
        .bind(patch.flow.is_some())
        .bind(patch.flow.flatten().map(sqlx::types::Json))
        .bind(patch.batch.is_some())
        .bind(patch.batch.flatten().map(sqlx::types::Json))
        .fetch_optional(&mut *tx)
        .await?;
        let id = TriggerId::from_uuid(id.ok_or_else(|| Error::TriggerNotFound(name.to_owned()))?);
        if patch.enabled == Some(false) {
            // A disabled cron trigger forgets its next tick: enabled again, it is scheduled from
            // then on, and the ticks it missed while disabled never fire.
            sqlx::query("UPDATE cron_trigger_details SET next_tick_at = NULL WHERE trigger_id = $1")
                .bind(id.as_uuid())
                .execute(&mut *tx)
                .await?;
        }
        if let Some(flow) = patch.flow {
            set_limits(&mut tx, id, flow.as_ref(), self.now(), true).await?;
        }
        let trigger = fetch_one(&mut tx, id).await?;
        tx.commit().await?;
        Ok(trigger)
    }

    async fn delete_trigger(&self, app_id: AppId, name: &str) -> Result<bool> {
        // Its rows are dropped by the relay that claims them; those waiting in its lanes or gated
        // by its limits are let free first, or nothing would ever claim them (its dead letters
        // stop holding).
        let done = sqlx::query(
            "WITH gone AS (DELETE FROM triggers WHERE app_id = $1 AND name = $2 RETURNING id),
                  freed AS (UPDATE outbox SET lane = NULL, lane_seq = NULL, waiting = false, gated = false
                             WHERE trigger_id = (SELECT id FROM gone) AND (lane IS NOT NULL OR (gated AND NOT waiting)))
             SELECT count(*) FROM gone",
        )
        .bind(app_id.as_uuid())
        .bind(name)
        .fetch_one(&self.pool)
        .await?;
        let deleted: i64 = done.try_get(0)?;
        Ok(deleted == 1)
    }

    async fn list_matching_kv(
        &self,
        tx: &mut Self::Tx,
        app_id: AppId,
        collection: &str,
        op: KvOp,
    ) -> Result<Vec<Trigger>> {
        let fetched = sqlx::query(&format!(
            "{KV_TRIGGER_SELECT}
              WHERE kv.app_id = $1 AND t.enabled AND $3 = ANY (kv.ops) AND {}
              ORDER BY t.name",
            pattern_matches("kv.collection_stem", "kv.collection_is_prefix", "$2")
        ))
        .bind(app_id.as_uuid())
        .bind(collection)
        .bind(op.as_str())
        .fetch_all(&mut **tx)
        .await?;
        fetched.iter().map(rows::trigger).collect()
    }

    async fn list_matching_pubsub(
        &self,
        tx: &mut Self::Tx,
        app_id: AppId,
        topic: &str,
    ) -> Result<Vec<Trigger>> {
        let fetched = sqlx::query(&format!(
            "{PUBSUB_TRIGGER_SELECT}
              WHERE ps.app_id = $1 AND t.enabled AND {}
              ORDER BY t.name",
            pattern_matches("ps.topic_stem", "ps.topic_is_prefix", "$2")
        ))
        .bind(app_id.as_uuid())
        .bind(topic)
        .fetch_all(&mut **tx)
        .await?;
        fetched.iter().map(rows::trigger).collect()
    }

    async fn queue_trigger(&self, tx: &mut Self::Tx, app_id: AppId, queue: &str) -> Result<Option<Trigger>> {
        let row = sqlx::query(&format!("{QUEUE_TRIGGER_SELECT} WHERE q.app_id = $1 AND q.queue = $2"))
            .bind(app_id.as_uuid())
            .bind(queue)
            .fetch_optional(&mut **tx)
            .await?;
        row.as_ref().map(rows::trigger).transpose()
    }

    async fn list_matching_dead_letter(
        &self,
        tx: &mut Self::Tx,
        app_id: AppId,
        source_trigger: Option<&str>,
        kind: EventKind,
    ) -> Result<Vec<Trigger>> {
        let fetched = sqlx::query(&format!(
            "{DEAD_LETTER_TRIGGER_SELECT}
              WHERE dl.app_id = $1 AND t.enabled
                AND (dl.source_trigger IS NULL OR dl.source_trigger = $2)
                AND (dl.source_kinds IS NULL OR $3 = ANY (dl.source_kinds))
              ORDER BY t.name"
        ))
        .bind(app_id.as_uuid())
        .bind(source_trigger)
        .bind(kind.as_str())
        .fetch_all(&mut **tx)
        .await?;
        fetched.iter().map(rows::trigger).collect()
    }

    async fn delivery_targets(&self, ids: &[TriggerId]) -> Result<Targets> {
        let fetched = sqlx::query(concat!(
            "SELECT ",
            target_columns!(),
            ", (SELECT epoch FROM config_epoch) AS config_epoch FROM ",
            rows::trigger_from!(),
            "  JOIN apps a ON a.id = t.app_id
              WHERE t.id = ANY ($1)",
        ))
        .bind(ids.iter().map(|id| id.as_uuid()).collect::<Vec<_>>())
        .fetch_all(&self.pool)
        .await?;
        let config_epoch = fetched.first().map(|row| row.try_get("config_epoch")).transpose()?;
        let targets = fetched.iter().map(delivery_target).collect::<Result<Vec<_>>>()?;
        Ok(Targets { targets, config_epoch })
    }
}

/// The columns [`delivery_target`] reads: a trigger (`t`, joined as in `trigger_from!`), its
/// app's slug (`a`) and the registering principal's standing. The standing comes from scalar
/// subqueries rather than two more joins: planning a nine-table join took milliseconds on every
/// new connection.
macro_rules! target_columns {
    () => {
        concat!(
            $crate::pg::rows::trigger_columns!(),
            ", a.slug,
               (SELECT p.platform_admin FROM principals p WHERE p.id = t.registered_by_principal) AS platform_admin,
               (SELECT m.role FROM app_members m
                 WHERE m.app_id = t.app_id AND m.principal_id = t.registered_by_principal) AS role"
        )
    };
}
pub(super) use target_columns;

/// Reads a row of [`target_columns`].
pub(super) fn delivery_target(row: &sqlx::postgres::PgRow) -> Result<DeliveryTarget> {
    let platform_admin: Option<bool> = row.try_get("platform_admin")?;
    Ok(DeliveryTarget {
        trigger: rows::trigger(row)?,
        app_slug: picloud_core::AppSlug::parse(row.try_get::<String, _>("slug")?)
            .map_err(|e| rows::corrupt("apps", e.to_string()))?,
        standing: platform_admin
            .map(|platform_admin| {
                Ok::<_, Error>(Standing { platform_admin, role: rows::role(row.try_get("role")?)? })
            })
            .transpose()?,
    })
}
