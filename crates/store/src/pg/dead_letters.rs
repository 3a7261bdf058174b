//! Dead letters in Postgres: burying outbox rows in one statement, listing, resolving, GC.

use std::time::Duration;

use picloud_core::protocol::EventKind;
use picloud_core::{AppId, TriggerId};
use sqlx::postgres::{PgArguments, Postgres};
use sqlx::query::Query;
use uuid::Uuid;

use sqlx::Row;

use super::PgStore;
use super::outbox::release;
use super::rows::{self, DEAD_LETTER_COLUMNS};
use crate::model::*;
use crate::{DeadLetterRepo, Result};

impl DeadLetterRepo for PgStore {
    async fn insert_dead_letters(
        &self,
        tx: &mut Self::Tx,
        rows: &[NewDeadLetter],
    ) -> Result<Vec<DeadLetter>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let headers = rows
            .iter()
            .map(|r| serde_json::to_value(&r.headers).map(sqlx::types::Json))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| rows::corrupt("dead_letters", e.to_string()))?;
        let inserted = sqlx::query(&format!(
            "INSERT INTO dead_letters (id, app_id, trigger_id, trigger_name, kind, delivery_id, payload, headers,
                                       attempts, reason, last_error, created_at)
             SELECT u.id, u.app_id, u.trigger_id, u.trigger_name, u.kind, u.delivery_id, u.payload::json,
                    u.headers, u.attempts, u.reason, u.last_error, coalesce($12, now())
               FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::uuid[], $7::text[],
                           $8::jsonb[], $9::int4[], $10::text[], $11::text[])
                 AS u(id, app_id, trigger_id, trigger_name, kind, delivery_id, payload, headers, attempts,
                      reason, last_error)
             RETURNING {DEAD_LETTER_COLUMNS}"
        ))
        .bind(rows.iter().map(|r| r.id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.app_id.as_uuid()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.trigger_id.map(TriggerId::as_uuid)).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.trigger_name.as_deref()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.kind.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.delivery_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.payload.get()).collect::<Vec<_>>())
        .bind(headers)
        .bind(rows.iter().map(|r| r.attempts as i32).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.reason.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.last_error.as_deref()).collect::<Vec<_>>())
        .bind(self.now())
        .fetch_all(&mut **tx)
        .await?;
        inserted.iter().map(rows::dead_letter).collect()
    }

    async fn bury(&self, tx: &mut Self::Tx, buried: &[Bury]) -> Result<Vec<DeadLetter>> {
        if buried.is_empty() {
            return Ok(Vec::new());
        }
        let new_ids: Vec<Uuid> = buried.iter().map(|_| Uuid::now_v7()).collect();
        // A buried row that headed a lane either keeps it (its trigger holds keys on dead
        // letters: the dead letter holds the lane) or releases it to the next row.
        let moved = sqlx::query(&format!(
            "WITH gone AS (
                 DELETE FROM outbox o
                  USING UNNEST($1::uuid[], $2::int4[], $3::text[], $4::text[], $5::uuid[])
                        AS u(id, attempt, reason, error, dead_letter_id)
                  WHERE o.id = u.id AND o.attempts = u.attempt
              RETURNING o.*, u.reason, u.error, u.dead_letter_id AS new_id
             ), buried AS (
             INSERT INTO dead_letters (id, app_id, trigger_id, trigger_name, kind, delivery_id, payload, headers,
                                       attempts, reason, last_error, created_at, held_lane)
             SELECT g.new_id, g.app_id, t.id, t.name, g.kind, g.id, g.payload,
                    jsonb_strip_nulls(jsonb_build_object('type', g.event_type, 'source', g.source,
                                                         'subject', g.subject, 'time', g.created_at,
                                                         'depth', g.depth, 'ordering_key', g.ordering_key)),
                    g.attempts, g.reason, coalesce(g.error, g.last_error), coalesce($6, now()),
                    CASE WHEN coalesce((t.flow->>'hold_on_dead_letter')::boolean, false) THEN g.lane END
               FROM gone g LEFT JOIN triggers t ON t.id = g.trigger_id
             RETURNING {DEAD_LETTER_COLUMNS}
             )
             SELECT buried.*, g.trigger_id AS lane_trigger, g.lane
               FROM buried JOIN gone g ON g.id = buried.delivery_id"
        ))
        .bind(buried.iter().map(|b| b.id).collect::<Vec<_>>())
        .bind(buried.iter().map(|b| b.attempt as i32).collect::<Vec<_>>())
        .bind(buried.iter().map(|b| b.reason.as_str()).collect::<Vec<_>>())
        .bind(buried.iter().map(|b| b.error.as_deref()).collect::<Vec<_>>())
        .bind(new_ids)
        .bind(self.now())
        .fetch_all(&mut **tx)
        .await?;
        let mut released = Vec::new();
        for row in &moved {
            let lane: Option<String> = row.try_get("lane")?;
            let trigger: Option<Uuid> = row.try_get("lane_trigger")?;
            let held: Option<String> = row.try_get("held_lane")?;
            if let (Some(lane), Some(trigger), None) = (lane, trigger, held) {
                released.push((trigger, lane));
            }
        }
        release(tx, &released).await?;
        moved.iter().map(rows::dead_letter).collect()
    }

    async fn dead_letter(&self, app_id: AppId, id: Uuid) -> Result<Option<DeadLetter>> {
        let row = sqlx::query(&format!(
            "SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE app_id = $1 AND id = $2"
        ))
        .bind(app_id.as_uuid())
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(rows::dead_letter).transpose()
    }

    async fn lock_dead_letter(
        &self,
        tx: &mut Self::Tx,
        app_id: AppId,
        id: Uuid,
    ) -> Result<Option<DeadLetter>> {
        let row = sqlx::query(&format!(
            "SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE app_id = $1 AND id = $2 FOR UPDATE"
        ))
        .bind(app_id.as_uuid())
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
        row.as_ref().map(rows::dead_letter).transpose()
    }

    async fn list_dead_letters(
        &self,
        app_id: AppId,
        filter: &DeadLetterFilter,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Page<DeadLetter>> {
        let select = format!(
            "SELECT {DEAD_LETTER_COLUMNS}, octet_length(payload::text) AS bytes FROM dead_letters
              WHERE {} AND ($7::uuid IS NULL OR id < $7)",
            filter_sql(filter)
        );
        let sql = rows::byte_capped(&select, "$8", "$9");
        let fetched = bind_filter(sqlx::query(&sql), app_id, filter)
            .bind(after)
            .bind(i64::from(limit) + 1)
            .bind(PAGE_PAYLOAD_BYTES as i64)
            .fetch_all(&self.pool)
            .await?;
        rows::capped_page(&fetched, limit, rows::dead_letter)
    }

    async fn unresolved_count(&self, app_id: AppId) -> Result<u64> {
        self.count_dead_letters(app_id, &DeadLetterFilter { resolution: Some(None), ..Default::default() })
            .await
    }

    async fn count_dead_letters(&self, app_id: AppId, filter: &DeadLetterFilter) -> Result<u64> {
        let sql = format!("SELECT count(*) FROM dead_letters WHERE {}", filter_sql(filter));
        let count: i64 =
            bind_filter(sqlx::query(&sql), app_id, filter).fetch_one(&self.pool).await?.try_get(0)?;
        Ok(count as u64)
    }

    async fn lock_dead_letters(
        &self,
        tx: &mut Self::Tx,
        app_id: AppId,
        filter: &DeadLetterFilter,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<Uuid>> {
        // `FOR UPDATE` without `SKIP LOCKED`: a row another transaction holds is waited for, and
        // Postgres evaluates the conditions again on the row as that transaction left it. The
        // cursor starts at the nil id, below every other, so that it bounds the index scan.
        let sql = format!(
            "SELECT id FROM dead_letters WHERE {} AND id > $7 ORDER BY id LIMIT $8 FOR UPDATE",
            filter_sql(filter)
        );
        let locked = bind_filter(sqlx::query(&sql), app_id, filter)
            .bind(after.unwrap_or_default())
            .bind(i64::from(limit))
            .fetch_all(&mut **tx)
            .await?;
        Ok(locked.iter().map(|row| row.try_get("id")).collect::<Result<_, sqlx::Error>>()?)
    }

    async fn resolve(
        &self,
        tx: &mut Self::Tx,
        app_id: AppId,
        id: Uuid,
        resolution: Resolution,
        only_unresolved: bool,
    ) -> Result<Option<DeadLetter>> {
        // A dead letter that held its lane releases it when resolved.
        let row = sqlx::query(&format!(
            "WITH before AS (
                 SELECT id AS resolved_id, trigger_id AS released_trigger, held_lane AS released_lane
                   FROM dead_letters
                  WHERE app_id = $1 AND id = $2 AND (NOT $4 OR resolution IS NULL)
                    FOR UPDATE)
             UPDATE dead_letters SET resolution = $3, resolved_at = coalesce($5, now()), held_lane = NULL
               FROM before
              WHERE id = before.resolved_id
             RETURNING {DEAD_LETTER_COLUMNS}, before.released_trigger, before.released_lane"
        ))
        .bind(app_id.as_uuid())
        .bind(id)
        .bind(resolution.as_str())
        .bind(only_unresolved)
        .bind(self.now())
        .fetch_optional(&mut **tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let trigger: Option<Uuid> = row.try_get("released_trigger")?;
        let lane: Option<String> = row.try_get("released_lane")?;
        if let (Some(trigger), Some(lane)) = (trigger, lane) {
            release(tx, &[(trigger, lane)]).await?;
        }
        rows::dead_letter(&row).map(Some)
    }

    async fn gc_dead_letters(&self, older_than: Duration, batch: u32) -> Result<u64> {
        self.delete_past(
            "DELETE FROM dead_letters WHERE id IN (
                 SELECT id FROM dead_letters
                  WHERE resolution IS NOT NULL
                    AND resolved_at < coalesce($2, now()) - $1 * interval '1 millisecond'
                  LIMIT $3)",
            older_than,
            batch,
        )
        .await
    }
}

/// The conditions of `filter` on `dead_letters`, whose values [`bind_filter`] binds as `$1` (the
/// app) to `$6` (the same in every statement, unused ones included).
fn filter_sql(filter: &DeadLetterFilter) -> String {
    // A literal `resolution IS NULL` lets the planner use the partial index of unresolved rows.
    let resolution = match filter.resolution {
        None => "",
        Some(None) => "AND resolution IS NULL",
        Some(Some(_)) => "AND resolution = $3",
    };
    // `DeadLetter::replayable`: an email, or a dead letter whose trigger still exists.
    let replayable = if filter.replayable {
        format!("AND (kind = '{}' OR trigger_id IS NOT NULL)", EventKind::Email.as_str())
    } else {
        String::new()
    };
    format!(
        "app_id = $1 AND ($2::text IS NULL OR trigger_name = $2) {resolution}
         AND ($4::text IS NULL OR reason = $4)
         AND ($5::timestamptz IS NULL OR created_at > $5) AND ($6::timestamptz IS NULL OR created_at < $6)
         {replayable}"
    )
}

/// Binds the values of [`filter_sql`]'s conditions.
fn bind_filter<'q>(
    query: Query<'q, Postgres, PgArguments>,
    app_id: AppId,
    filter: &'q DeadLetterFilter,
) -> Query<'q, Postgres, PgArguments> {
    query
        .bind(app_id.as_uuid())
        .bind(filter.trigger_name.as_deref())
        .bind(filter.resolution.flatten().map(Resolution::as_str))
        .bind(filter.reason.map(DeadLetterReason::as_str))
        .bind(filter.created_after)
        .bind(filter.created_before)
}
