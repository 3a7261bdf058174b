//! What operating a node reads of the database besides its repositories: the metrics gauges,
//! the email probe of `/readyz`, the janitor's cluster-wide lock, the databases `dev` and the
//! benchmarks create, and how the benchmarks settle a database between phases.

use sqlx::{ConnectOptions as _, Connection as _, PgConnection};

use super::PgStore;
use crate::Result;

/// The database gauges of `/metrics` at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gauges {
    /// Outbox rows due and not leased.
    pub due: i64,
    /// How long the oldest of them has been due, in seconds (0 when none is).
    pub oldest_due_age_s: f64,
    /// Dead letters not resolved.
    pub unresolved_dead_letters: i64,
    /// Abandoned executions kept.
    pub abandoned_executions: i64,
}

/// A session-level advisory lock on a connection of its own: held until [`AdvisoryLock::release`],
/// or until the connection dies (dropped, or the node gone), when Postgres releases it.
#[derive(Debug)]
pub struct AdvisoryLock {
    key: i64,
    conn: PgConnection,
}

impl AdvisoryLock {
    /// Releases the lock and closes its connection.
    pub async fn release(mut self) -> Result<()> {
        let unlocked =
            sqlx::query("SELECT pg_advisory_unlock($1)").bind(self.key).execute(&mut self.conn).await;
        let closed = self.conn.close().await;
        unlocked?;
        Ok(closed?)
    }
}

impl PgStore {
    /// The gauges, in one round trip: the due rows come off the claims' indexes (`outbox_app_due`,
    /// read whole: it is ordered by app first; `outbox_gated`; rows waiting in a lane are not due),
    /// the unresolved dead letters off their partial index; abandoned executions are bounded by
    /// their retention.
    pub async fn gauges(&self) -> Result<Gauges> {
        let (due, oldest_due_age_s, unresolved_dead_letters, abandoned_executions) = sqlx::query_as(
            "WITH due AS (
                 SELECT due_at FROM outbox
                  WHERE due_at <= coalesce($1, now()) AND NOT waiting AND NOT gated
                    AND (leased_until IS NULL OR leased_until <= coalesce($1, now()))
                 UNION ALL
                 SELECT due_at FROM outbox
                  WHERE due_at <= coalesce($1, now()) AND gated AND NOT waiting
                    AND (leased_until IS NULL OR leased_until <= coalesce($1, now())))
             SELECT (SELECT count(*) FROM due),
                    coalesce((SELECT extract(epoch FROM coalesce($1, now()) - min(due_at))::float8 FROM due), 0),
                    (SELECT count(*) FROM dead_letters WHERE resolution IS NULL),
                    (SELECT count(*) FROM abandoned_executions)",
        )
        .bind(self.now())
        .fetch_one(self.pool())
        .await?;
        Ok(Gauges { due, oldest_due_age_s, unresolved_dead_letters, abandoned_executions })
    }

    /// Lets free up to `batch` rows that nothing would ever claim: rows in the lanes of a trigger
    /// that is gone (a writer put them there while the trigger or its app was being deleted,
    /// and nothing makes them heads), and gated rows of a trigger without limits (gone, or its
    /// limits removed while a writer that read them was writing). Claimable, they are dropped
    /// by the relay that claims them, or delivered. How many it let free.
    pub async fn free_unclaimable(&self, batch: u32) -> Result<u64> {
        let in_lanes = sqlx::query(
            "UPDATE outbox SET lane = NULL, lane_seq = NULL, waiting = false
              WHERE id IN (SELECT o.id FROM outbox o
                            WHERE o.lane IS NOT NULL
                              AND NOT EXISTS (SELECT 1 FROM triggers t WHERE t.id = o.trigger_id)
                            LIMIT $1)",
        )
        .bind(i64::from(batch))
        .execute(self.pool())
        .await?;
        // The triggers with gated rows, one index probe each (a skip scan of `outbox_gated`),
        // rather than every gated row of a limited trigger's backlog.
        let ungated = sqlx::query(
            "WITH RECURSIVE gated(trigger_id) AS (
                 (SELECT trigger_id FROM outbox WHERE gated AND NOT waiting ORDER BY trigger_id LIMIT 1)
                 UNION ALL
                 SELECT (SELECT o.trigger_id FROM outbox o
                          WHERE o.gated AND NOT o.waiting AND o.trigger_id > g.trigger_id
                          ORDER BY o.trigger_id LIMIT 1)
                   FROM gated g WHERE g.trigger_id IS NOT NULL)
             UPDATE outbox SET gated = false
              WHERE id IN (SELECT o.id FROM gated g JOIN outbox o ON o.trigger_id = g.trigger_id
                            WHERE o.gated AND NOT o.waiting
                              AND NOT EXISTS (SELECT 1 FROM flow_state f WHERE f.trigger_id = g.trigger_id)
                            LIMIT $1)",
        )
        .bind(i64::from(batch))
        .execute(self.pool())
        .await?;
        Ok(in_lanes.rows_affected() + ungated.rows_affected())
    }

    /// Whether any email row is in the outbox: one probe of the partial index `outbox_email`,
    /// however large the outbox.
    pub async fn email_rows_waiting(&self) -> Result<bool> {
        Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM outbox WHERE kind = 'email')")
            .fetch_one(self.pool())
            .await?)
    }

    /// Takes the session-level advisory lock `key` on a new connection, unless another session
    /// holds it (`None`).
    pub async fn try_advisory_lock(&self, key: i64) -> Result<Option<AdvisoryLock>> {
        let mut conn = self.pool().connect_options().connect().await?;
        let locked: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(key).fetch_one(&mut conn).await?;
        if locked {
            Ok(Some(AdvisoryLock { key, conn }))
        } else {
            conn.close().await?;
            Ok(None)
        }
    }

    /// Creates the database `name` on this store's server unless it exists.
    pub async fn create_database_if_missing(&self, name: &str) -> Result<()> {
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(self.pool())
            .await?;
        if !exists {
            sqlx::query(&format!("CREATE DATABASE {}", quoted(name))).execute(self.pool()).await?;
        }
        Ok(())
    }

    /// Drops the database `name` on this store's server if it exists, ending its sessions.
    pub async fn drop_database_if_exists(&self, name: &str) -> Result<()> {
        sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quoted(name)))
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Brings the database to a steady state before a measurement: dead rows vacuumed, planner
    /// statistics fresh, and dirty pages written (`VACUUM ANALYZE; CHECKPOINT`).
    pub async fn settle(&self) -> Result<()> {
        sqlx::query("VACUUM ANALYZE").execute(self.pool()).await?;
        sqlx::query("CHECKPOINT").execute(self.pool()).await?;
        Ok(())
    }

    /// How many outbox rows there are, due or not, claimed or not.
    pub async fn outbox_len(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(self.pool()).await?)
    }
}

/// `name` as a quoted SQL identifier.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
