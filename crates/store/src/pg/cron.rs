//! Cron triggers' next ticks in Postgres: the locking read of the due ones and their advance.

use picloud_core::TriggerId;
use sqlx::Row;
use time::OffsetDateTime;
use uuid::Uuid;

use super::PgStore;
use super::rows::{self, corrupt};
use crate::cron::{DueCron, NextTick};
use crate::{CronRepo, Result};

impl CronRepo for PgStore {
    async fn lock_due_cron(
        &self,
        tx: &mut Self::Tx,
        now: OffsetDateTime,
        batch: u32,
    ) -> Result<Vec<DueCron>> {
        let due = sqlx::query(
            "SELECT c.trigger_id, t.app_id, a.slug, t.name, c.schedule, c.timezone, t.retry_max_attempts,
                    c.next_tick_at, t.flow
               FROM cron_trigger_details c
               JOIN triggers t ON t.id = c.trigger_id
               JOIN apps a ON a.id = t.app_id
              WHERE t.enabled AND (c.next_tick_at IS NULL OR c.next_tick_at <= $1)
              ORDER BY c.next_tick_at NULLS FIRST, c.trigger_id
              LIMIT $2
                FOR UPDATE OF c SKIP LOCKED",
        )
        .bind(now)
        .bind(i64::from(batch))
        .fetch_all(&mut **tx)
        .await?;
        due.iter()
            .map(|row| {
                let bad = |e: picloud_core::NameError| corrupt("triggers", e.to_string());
                Ok(DueCron {
                    trigger_id: rows::id(row, "trigger_id")?,
                    app_id: rows::id(row, "app_id")?,
                    app_slug: picloud_core::AppSlug::parse(row.try_get::<String, _>("slug")?).map_err(bad)?,
                    trigger_name: picloud_core::TriggerName::parse(row.try_get::<String, _>("name")?)
                        .map_err(bad)?,
                    schedule: picloud_core::CronSchedule::stored(
                        &row.try_get::<String, _>("schedule")?,
                        &row.try_get::<String, _>("timezone")?,
                    ),
                    max_attempts: row.try_get::<Option<i32>, _>("retry_max_attempts")?.map(|v| v as u32),
                    flow: rows::flow(row)?,
                    next_tick_at: row.try_get("next_tick_at")?,
                })
            })
            .collect()
    }

    async fn set_next_ticks(&self, tx: &mut Self::Tx, ticks: &[(TriggerId, NextTick)]) -> Result<()> {
        if ticks.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = ticks.iter().map(|(id, _)| id.as_uuid()).collect();
        // NULL in the array is `Never`, stored as 'infinity': never due, and not "not computed".
        let at: Vec<Option<OffsetDateTime>> = ticks
            .iter()
            .map(|(_, next)| match next {
                NextTick::At(at) => Some(*at),
                NextTick::Never => None,
            })
            .collect();
        sqlx::query(
            "UPDATE cron_trigger_details c SET next_tick_at = coalesce(u.at, 'infinity')
               FROM UNNEST($1::uuid[], $2::timestamptz[]) AS u(id, at)
              WHERE c.trigger_id = u.id",
        )
        .bind(ids)
        .bind(at)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn next_cron_tick(&self, now: OffsetDateTime) -> Result<Option<OffsetDateTime>> {
        let next = sqlx::query_scalar(
            "SELECT min(coalesce(c.next_tick_at, $1))
               FROM cron_trigger_details c
               JOIN triggers t ON t.id = c.trigger_id
              WHERE t.enabled AND (c.next_tick_at IS NULL OR c.next_tick_at < 'infinity')",
        )
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        Ok(next)
    }
}
