//! Abandoned executions in Postgres.

use std::time::Duration;

use picloud_core::{AppId, TriggerId};
use uuid::Uuid;

use super::PgStore;
use super::rows;
use crate::model::*;
use crate::{AbandonedRepo, Result};

const COLUMNS: &str = "id, app_id, trigger_id, trigger_name, outbox_id, reply_to, reason, handler_status, \
                       result::text AS result, error, created_at";

impl AbandonedRepo for PgStore {
    async fn insert_abandoned(&self, row: &AbandonedExecution) -> Result<AbandonedExecution> {
        let inserted = sqlx::query(&format!(
            "INSERT INTO abandoned_executions (id, app_id, trigger_id, trigger_name, outbox_id, reply_to, reason,
                                               handler_status, result, error, created_at)
             VALUES ($1, $2, (SELECT id FROM triggers WHERE id = $3), $4, $5, $6, $7, $8, $9::json, $10,
                     coalesce($11, now()))
             RETURNING {COLUMNS}"
        ))
        .bind(row.id)
        .bind(row.app_id.as_uuid())
        .bind(row.trigger_id.map(TriggerId::as_uuid))
        .bind(&row.trigger_name)
        .bind(row.outbox_id)
        .bind(&row.reply_to)
        .bind(row.reason.as_str())
        .bind(row.handler_status.as_str())
        .bind(row.result.as_ref().map(|r| r.get()))
        .bind(row.error.as_deref())
        .bind(self.now())
        .fetch_one(&self.pool)
        .await?;
        rows::abandoned(&inserted)
    }

    async fn list_abandoned(
        &self,
        app_id: AppId,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Page<AbandonedExecution>> {
        let select = format!(
            "SELECT {COLUMNS}, coalesce(octet_length(result::text), 0) AS bytes FROM abandoned_executions
              WHERE app_id = $1 AND ($2::uuid IS NULL OR id < $2)"
        );
        let fetched = sqlx::query(&rows::byte_capped(&select, "$3", "$4"))
            .bind(app_id.as_uuid())
            .bind(after)
            .bind(i64::from(limit) + 1)
            .bind(PAGE_PAYLOAD_BYTES as i64)
            .fetch_all(&self.pool)
            .await?;
        rows::capped_page(&fetched, limit, rows::abandoned)
    }

    async fn gc_abandoned(&self, older_than: Duration, batch: u32) -> Result<u64> {
        self.delete_past(
            "DELETE FROM abandoned_executions WHERE id IN (
                 SELECT id FROM abandoned_executions
                  WHERE created_at < coalesce($2, now()) - $1 * interval '1 millisecond'
                  LIMIT $3)",
            older_than,
            batch,
        )
        .await
    }
}
