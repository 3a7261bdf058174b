//! Trigger statistics in Postgres: the relays' upserts, the windows the API reads, the backlog.

use std::time::Duration;

use picloud_core::{AppId, Latencies, TriggerId, stats::LATENCY_BUCKETS};
use sqlx::Row;
use time::OffsetDateTime;

use super::PgStore;
use super::rows::{self, in_state};
use crate::model::{AttemptStats, DeliveryState, StatsBucket, TriggerBacklog};
use crate::{Result, StatsRepo};

/// A `bigint[]` literal of a histogram's counts (bound as text: one array per row of an UNNEST).
fn counts_literal(latencies: &Latencies) -> String {
    let counts: Vec<String> = latencies.counts().iter().map(u64::to_string).collect();
    format!("{{{}}}", counts.join(","))
}

fn count(row: &sqlx::postgres::PgRow, column: &str) -> Result<u64> {
    Ok(row.try_get::<i64, _>(column)?.max(0) as u64)
}

impl StatsRepo for PgStore {
    async fn record_attempts(&self, node: &str, stats: &[AttemptStats]) -> Result<()> {
        if stats.is_empty() {
            return Ok(());
        }
        let outcome = |i: usize| stats.iter().map(|s| s.outcomes[i] as i64).collect::<Vec<_>>();
        // In trigger order, so that two batches of one node never wait on each other crosswise.
        sqlx::query(
            "INSERT INTO trigger_stats AS s (trigger_id, bucket, node, ok, retry, fail, timeout, no_handler, latency)
             SELECT u.trigger_id, date_trunc('minute', coalesce($8, now())), $9,
                    u.ok, u.retry, u.fail, u.timeout, u.no_handler, u.latency::bigint[]
               FROM UNNEST($1::uuid[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], $7::text[])
                 AS u(trigger_id, ok, retry, fail, timeout, no_handler, latency)
              ORDER BY u.trigger_id
             ON CONFLICT (trigger_id, bucket, node) DO UPDATE
                SET ok = s.ok + EXCLUDED.ok, retry = s.retry + EXCLUDED.retry, fail = s.fail + EXCLUDED.fail,
                    timeout = s.timeout + EXCLUDED.timeout, no_handler = s.no_handler + EXCLUDED.no_handler,
                    latency = ARRAY(SELECT a + b FROM unnest(s.latency, EXCLUDED.latency) WITH ORDINALITY AS x(a, b, i)
                                     ORDER BY i)",
        )
        .bind(stats.iter().map(|s| s.trigger_id.as_uuid()).collect::<Vec<_>>())
        .bind(outcome(0))
        .bind(outcome(1))
        .bind(outcome(2))
        .bind(outcome(3))
        .bind(outcome(4))
        .bind(stats.iter().map(|s| counts_literal(&s.latencies)).collect::<Vec<_>>())
        .bind(self.now())
        .bind(node)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn attempt_stats(
        &self,
        trigger_id: TriggerId,
        since: OffsetDateTime,
        step: Duration,
    ) -> Result<Vec<StatsBucket>> {
        // One statement, so that the counts and the latencies are of the same rows.
        let rows = sqlx::query(
            "WITH binned AS (
                 SELECT date_bin($2 * interval '1 second', bucket, $3) AS start, ok, retry, fail, timeout,
                        no_handler, latency
                   FROM trigger_stats WHERE trigger_id = $1 AND bucket >= $3
             ), latencies AS (
                 SELECT start, array_agg(i ORDER BY i) AS at, array_agg(n ORDER BY i) AS counts
                   FROM (SELECT b.start, x.i::int4 AS i, sum(x.n)::int8 AS n
                           FROM binned b, unnest(b.latency) WITH ORDINALITY AS x(n, i)
                          WHERE x.n > 0 GROUP BY 1, 2) AS per_bucket
                  GROUP BY start
             )
             SELECT t.start, t.ok, t.retry, t.fail, t.timeout, t.no_handler, l.at, l.counts
               FROM (SELECT start, sum(ok)::int8 AS ok, sum(retry)::int8 AS retry, sum(fail)::int8 AS fail,
                            sum(timeout)::int8 AS timeout, sum(no_handler)::int8 AS no_handler
                       FROM binned GROUP BY start) AS t
               LEFT JOIN latencies l USING (start)
              ORDER BY t.start",
        )
        .bind(trigger_id.as_uuid())
        .bind(step.as_secs_f64())
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let start: OffsetDateTime = row.try_get("start")?;
                let mut attempts = AttemptStats::new(trigger_id);
                for (i, column) in ["ok", "retry", "fail", "timeout", "no_handler"].into_iter().enumerate() {
                    attempts.outcomes[i] = count(row, column)?;
                }
                let at: Option<Vec<i32>> = row.try_get("at")?;
                let counts: Option<Vec<i64>> = row.try_get("counts")?;
                let mut histogram = vec![0; LATENCY_BUCKETS];
                for (i, n) in at.unwrap_or_default().into_iter().zip(counts.unwrap_or_default()) {
                    let slot = usize::try_from(i - 1).ok().and_then(|i| histogram.get_mut(i));
                    let slot =
                        slot.ok_or_else(|| rows::corrupt("trigger_stats", format!("latency bucket {i}")))?;
                    *slot = n.max(0) as u64;
                }
                attempts.latencies = Latencies::from_counts(&histogram).expect("as many counts as buckets");
                Ok(StatsBucket { start, attempts })
            })
            .collect()
    }

    async fn backlogs(&self, app_id: AppId) -> Result<Vec<(Option<TriggerId>, TriggerBacklog)>> {
        let now = "coalesce($2, now())";
        let pending = in_state(DeliveryState::Pending, now);
        let rows = sqlx::query(&format!(
            "SELECT o.trigger_id,
                    count(*) FILTER (WHERE {pending}) AS pending,
                    count(*) FILTER (WHERE {}) AS scheduled,
                    count(*) FILTER (WHERE {}) AS in_flight,
                    count(*) FILTER (WHERE {}) AS waiting,
                    min(o.due_at) FILTER (WHERE {pending}) AS oldest_due
               FROM outbox o WHERE o.app_id = $1
              GROUP BY o.trigger_id",
            in_state(DeliveryState::Scheduled, now),
            in_state(DeliveryState::InFlight, now),
            in_state(DeliveryState::Waiting, now),
        ))
        .bind(app_id.as_uuid())
        .bind(self.now())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let trigger_id =
                    row.try_get::<Option<uuid::Uuid>, _>("trigger_id")?.map(TriggerId::from_uuid);
                let backlog = TriggerBacklog {
                    pending: count(row, "pending")?,
                    scheduled: count(row, "scheduled")?,
                    in_flight: count(row, "in_flight")?,
                    waiting: count(row, "waiting")?,
                    oldest_due: row.try_get("oldest_due")?,
                };
                Ok((trigger_id, backlog))
            })
            .collect()
    }

    async fn gc_stats(&self, older_than: Duration, batch: u32) -> Result<u64> {
        self.delete_past(
            "DELETE FROM trigger_stats WHERE (trigger_id, bucket, node) IN (
                 SELECT trigger_id, bucket, node FROM trigger_stats
                  WHERE bucket < coalesce($2, now()) - $1 * interval '1 millisecond'
                  LIMIT $3)",
            older_than,
            batch,
        )
        .await
    }
}
