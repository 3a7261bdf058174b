//! The outbox in Postgres: batch inserts into the caller's transaction, the claim, completions.

use std::time::Duration;

use futures::StreamExt as _;
use sqlx::postgres::PgListener;
use sqlx::{PgExecutor, Row};
use time::OffsetDateTime;
use uuid::Uuid;

use picloud_core::TriggerId;
use picloud_core::protocol::{EventKind, TriggerKind, event_type};

use super::rows::{self, event_kind, raw_json, trigger_from};
use super::triggers::{delivery_target, target_columns};
use super::{PgStore, violated};
use crate::model::*;
use crate::{Claim, Error, OutboxRepo, Result, SyncCallWrite, Wakeups};

const INSERT: &str = "
    INSERT INTO outbox (id, app_id, trigger_id, kind, event_type, source, subject, payload, depth,
                        max_attempts, due_at, reply_to, idempotency_key, dead_letter_id, created_at)
    SELECT u.id, u.app_id, u.trigger_id, u.kind, u.event_type, u.source, u.subject, u.payload::json,
           u.depth, u.max_attempts, coalesce($16, now()) + u.delay_ms * interval '1 millisecond',
           u.reply_to, u.idempotency_key, u.dead_letter_id, coalesce(u.event_time, $16, now())
      FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::text[],
                  $8::text[], $9::int4[], $10::int4[], $11::int8[], $12::text[], $13::text[], $14::uuid[],
                  $15::timestamptz[])
        AS u(id, app_id, trigger_id, kind, event_type, source, subject, payload, depth, max_attempts,
             delay_ms, reply_to, idempotency_key, dead_letter_id, event_time)";

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Inserts deliveries through any executor — a pool, a connection, or the caller's own
/// transaction, so the rows commit with the data that caused them. `now` is the time to count
/// delays from (`None`: the database's `now()`).
pub async fn insert_deliveries<'e, E: PgExecutor<'e>>(
    executor: E,
    rows: &[NewDelivery],
    now: Option<OffsetDateTime>,
) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    insert_query(rows, now, INSERT).execute(executor).await.map_err(|e| map_insert_error(e, rows))?;
    Ok(())
}

fn insert_query<'q>(
    rows: &'q [NewDelivery],
    now: Option<OffsetDateTime>,
    sql: &'q str,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let n = rows.len();
    let mut ids = Vec::with_capacity(n);
    let mut app_ids = Vec::with_capacity(n);
    let mut trigger_ids = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut event_types = Vec::with_capacity(n);
    let mut sources = Vec::with_capacity(n);
    let mut subjects = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    let mut depths = Vec::with_capacity(n);
    let mut max_attempts = Vec::with_capacity(n);
    let mut delays = Vec::with_capacity(n);
    let mut reply_tos = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut dead_letter_ids = Vec::with_capacity(n);
    let mut event_times = Vec::with_capacity(n);
    for r in rows {
        ids.push(r.id);
        app_ids.push(r.app_id.as_uuid());
        trigger_ids.push(r.trigger_id.map(TriggerId::as_uuid));
        kinds.push(r.kind.as_str());
        event_types.push(r.event_type.as_str());
        sources.push(r.source.as_str());
        subjects.push(r.subject.as_deref());
        payloads.push(r.payload.get());
        depths.push(r.depth as i32);
        max_attempts.push(r.max_attempts as i32);
        delays.push(millis(r.delay));
        reply_tos.push(r.reply_to.as_deref());
        keys.push(r.idempotency_key.as_deref());
        dead_letter_ids.push(r.dead_letter_id);
        event_times.push(r.event_time);
    }
    sqlx::query(sql)
        .bind(ids)
        .bind(app_ids)
        .bind(trigger_ids)
        .bind(kinds)
        .bind(event_types)
        .bind(sources)
        .bind(subjects)
        .bind(payloads)
        .bind(depths)
        .bind(max_attempts)
        .bind(delays)
        .bind(reply_tos)
        .bind(keys)
        .bind(dead_letter_ids)
        .bind(event_times)
        .bind(now)
}

fn map_insert_error(e: sqlx::Error, rows: &[NewDelivery]) -> Error {
    match violated(&e) {
        Some((code, constraint)) if code == "23505" && constraint == "outbox_idempotency" => {
            let key = rows.iter().find_map(|r| r.idempotency_key.clone()).unwrap_or_default();
            Error::DuplicateIdempotencyKey(key)
        }
        _ => e.into(),
    }
}

/// The columns [`claimed_row`] reads.
const CLAIMED: &str = "o.id, o.app_id, o.trigger_id, o.kind, o.event_type, o.source, o.subject, \
    o.payload::text AS payload, o.depth, o.attempts, o.max_attempts, o.reply_to, o.dead_letter_id, \
    o.last_error, o.created_at";

fn claimed_row(row: &sqlx::postgres::PgRow) -> Result<ClaimedDelivery> {
    Ok(ClaimedDelivery {
        id: row.try_get("id")?,
        app_id: rows::id(row, "app_id")?,
        trigger_id: rows::opt_id(row, "trigger_id")?,
        kind: event_kind("outbox", row.try_get::<&str, _>("kind")?)?,
        event_type: row.try_get("event_type")?,
        source: row.try_get("source")?,
        subject: row.try_get("subject")?,
        payload: raw_json("outbox", row.try_get("payload")?)?,
        depth: row.try_get::<i32, _>("depth")? as u32,
        attempt: row.try_get::<i32, _>("attempts")? as u32,
        max_attempts: row.try_get::<i32, _>("max_attempts")? as u32,
        reply_to: row.try_get("reply_to")?,
        dead_letter_id: row.try_get("dead_letter_id")?,
        last_error: row.try_get("last_error")?,
        created_at: row.try_get("created_at")?,
    })
}

/// The channel relays listen on.
pub(super) const CHANNEL: &str = "picloud_outbox";

impl OutboxRepo for PgStore {
    async fn listen(&self) -> Result<Wakeups> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(CHANNEL).await?;
        Ok(listener.into_stream().map(|n| n.map(|_| ()).map_err(Error::from)).boxed())
    }

    async fn wake_relays(&self) -> Result<()> {
        self.waker.wake(&self.pool);
        Ok(())
    }

    async fn next_due_in(&self) -> Result<Option<Duration>> {
        let millis: Option<i64> = sqlx::query_scalar(
            "SELECT ceil(extract(epoch FROM min(due_at) - coalesce($1, now())) * 1000)::int8
               FROM outbox WHERE due_at > coalesce($1, now())",
        )
        .bind(self.now())
        .fetch_one(&self.pool)
        .await?;
        Ok(millis.map(|m| Duration::from_millis(m.max(0) as u64)))
    }

    async fn insert_deliveries(&self, tx: &mut Self::Tx, rows: &[NewDelivery]) -> Result<()> {
        insert_deliveries(&mut **tx, rows, self.now()).await
    }

    async fn insert_idempotent(&self, tx: &mut Self::Tx, row: &NewDelivery) -> Result<(Uuid, bool)> {
        let key = row.idempotency_key.as_deref().expect("insert_idempotent needs an idempotency key");
        let sql = format!(
            "{INSERT} ON CONFLICT (trigger_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
             RETURNING id"
        );
        let inserted: Option<Uuid> = insert_query(std::slice::from_ref(row), self.now(), &sql)
            .fetch_optional(&mut **tx)
            .await?
            .map(|r| r.try_get("id"))
            .transpose()?;
        if let Some(id) = inserted {
            return Ok((id, true));
        }
        let existing: Uuid =
            sqlx::query_scalar("SELECT id FROM outbox WHERE trigger_id = $1 AND idempotency_key = $2")
                .bind(row.trigger_id.map(TriggerId::as_uuid))
                .bind(key)
                .fetch_one(&mut **tx)
                .await?;
        Ok((existing, false))
    }

    async fn claim_due(&self, batch: u32, lease: Duration, node: &str) -> Result<Claim> {
        let claimed = sqlx::query(&format!(
            "UPDATE outbox o
                SET attempts = o.attempts + 1,
                    leased_until = coalesce($3, now()) + $2 * interval '1 millisecond',
                    leased_by = $4
              WHERE o.ctid = ANY (ARRAY(
                    SELECT ctid FROM outbox
                     WHERE due_at <= coalesce($3, now())
                       AND (leased_until IS NULL OR leased_until <= coalesce($3, now()))
                     ORDER BY due_at
                     LIMIT $1
                       FOR UPDATE SKIP LOCKED))
          RETURNING {CLAIMED}, (SELECT epoch FROM config_epoch) AS config_epoch"
        ))
        .bind(i64::from(batch))
        .bind(millis(lease))
        .bind(self.now())
        .bind(node)
        .fetch_all(&self.pool)
        .await?;
        let config_epoch = claimed.first().map(|row| row.try_get("config_epoch")).transpose()?;
        let rows = claimed.iter().map(claimed_row).collect::<Result<Vec<_>>>()?;
        Ok(Claim { rows, config_epoch })
    }

    async fn insert_sync_call(
        &self,
        call: &NewSyncCall,
        lease: Duration,
        node: &str,
    ) -> Result<SyncCallWrite> {
        // set_config(…, true) lasts for the statement's own transaction, so only this commit
        // skips the wait for the WAL flush. The epoch, the trigger and its standing are read in
        // the statement's one snapshot, and the row is written for exactly that trigger.
        let found = sqlx::query(concat!(
            "WITH relaxed AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)),
                  epoch_now AS MATERIALIZED (SELECT epoch FROM config_epoch),
                  target AS MATERIALIZED (SELECT ",
            target_columns!(),
            "  FROM ",
            trigger_from!(),
            "  JOIN apps a ON a.id = t.app_id
                  WHERE t.app_id = $2 AND t.name = $3),
                  written AS (
                    INSERT INTO outbox AS o (id, app_id, trigger_id, kind, event_type, source, payload,
                                             depth, attempts, max_attempts, due_at, leased_until,
                                             leased_by, reply_to, created_at)
                    SELECT $1, $2, target.id, $4, $5, $6, $7::json, $8, 1, 1, coalesce($9, now()),
                           coalesce($9, now()) + $10 * interval '1 millisecond', $11, $12,
                           coalesce($9, now())
                      FROM relaxed, epoch_now, target
                     WHERE target.enabled AND target.kind = $13
                       AND ($14::bigint IS NULL OR epoch_now.epoch = $14)
                    RETURNING o.created_at)
             SELECT epoch_now.epoch AS config_epoch, target.*,
                    (SELECT created_at FROM written) AS written_at
               FROM epoch_now LEFT JOIN target ON true"
        ))
        .bind(call.id)
        .bind(call.app_id.as_uuid())
        .bind(&call.trigger_name)
        .bind(EventKind::Http.as_str())
        .bind(event_type::HTTP_INVOKE)
        .bind(&call.source)
        .bind(call.payload.get())
        .bind(call.depth as i32)
        .bind(self.now())
        .bind(millis(lease))
        .bind(node)
        .bind(&call.reply_to)
        .bind(TriggerKind::Http.as_str())
        .bind(call.authorized_at)
        .fetch_one(&self.pool)
        .await?;
        if call.authorized_at.is_some_and(|epoch| found.try_get::<i64, _>("config_epoch").ok() != Some(epoch))
        {
            return Ok(SyncCallWrite::Stale);
        }
        if found.try_get::<Option<Uuid>, _>("id")?.is_none() {
            return Ok(SyncCallWrite::NoTrigger);
        }
        let target = delivery_target(&found)?;
        let Some(created_at) = found.try_get::<Option<OffsetDateTime>, _>("written_at")? else {
            return Ok(SyncCallWrite::Refused(target.trigger));
        };
        let row = call.delivery(target.trigger.id);
        let row = ClaimedDelivery {
            id: row.id,
            app_id: row.app_id,
            trigger_id: row.trigger_id,
            kind: row.kind,
            event_type: row.event_type,
            source: row.source,
            subject: row.subject,
            payload: row.payload,
            depth: row.depth,
            attempt: 1,
            max_attempts: row.max_attempts,
            reply_to: row.reply_to,
            dead_letter_id: row.dead_letter_id,
            last_error: None,
            created_at,
        };
        Ok(SyncCallWrite::Written { row, target: Box::new(target) })
    }

    async fn delete_deliveries(&self, tx: &mut Self::Tx, ids: &[Uuid]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let done = sqlx::query("DELETE FROM outbox WHERE id = ANY ($1)").bind(ids).execute(&mut **tx).await?;
        Ok(done.rows_affected())
    }

    async fn delete_delivered(&self, ids: &[Uuid]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let done =
            sqlx::query("DELETE FROM outbox WHERE id = ANY ($1)").bind(ids).execute(&self.pool).await?;
        Ok(done.rows_affected())
    }

    async fn reschedule(&self, tx: &mut Self::Tx, rows: &[Reschedule]) -> Result<u64> {
        if rows.is_empty() {
            return Ok(0);
        }
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        let attempts: Vec<i32> = rows.iter().map(|r| r.attempt as i32).collect();
        let delays: Vec<i64> = rows.iter().map(|r| millis(r.delay)).collect();
        let errors: Vec<&str> = rows.iter().map(|r| r.error.as_str()).collect();
        let refunds: Vec<bool> = rows.iter().map(|r| r.refund_attempt).collect();
        let done = sqlx::query(
            "UPDATE outbox o
                SET due_at = coalesce($6, now()) + u.delay_ms * interval '1 millisecond',
                    leased_until = NULL, leased_by = NULL, last_error = u.error,
                    attempts = o.attempts - u.refund::int
               FROM UNNEST($1::uuid[], $2::int4[], $3::int8[], $4::text[], $5::bool[])
                    AS u(id, attempt, delay_ms, error, refund)
              WHERE o.id = u.id AND o.attempts = u.attempt",
        )
        .bind(ids)
        .bind(attempts)
        .bind(delays)
        .bind(errors)
        .bind(refunds)
        .bind(self.now())
        .execute(&mut **tx)
        .await?;
        Ok(done.rows_affected())
    }

    async fn pending_for_dead_letter(
        &self,
        tx: &mut Self::Tx,
        dead_letter_id: Uuid,
        except: Uuid,
    ) -> Result<u64> {
        let count: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE dead_letter_id = $1 AND id <> $2")
                .bind(dead_letter_id)
                .bind(except)
                .fetch_one(&mut **tx)
                .await?;
        Ok(count as u64)
    }
}
