//! The outbox in Postgres: batch inserts into the caller's transaction, the claim, completions.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use futures::StreamExt as _;
use sqlx::postgres::PgListener;
use sqlx::{PgConnection, Row};
use time::OffsetDateTime;
use uuid::Uuid;

use picloud_core::protocol::{EventKind, TriggerKind, event_type};
use picloud_core::{AppId, TriggerId};

use super::rows::{self, event_kind, raw_json, trigger_from};
use super::triggers::{delivery_target, target_columns};
use super::{PgStore, violated};
use crate::model::*;
use crate::{
    APPS_PER_CLAIM, Claim, Error, Holder, LimitedClaim, OutboxRepo, Result, SharedClaim, SyncCallWrite,
    Wakeups, Walk,
};

/// The columns every insert of deliveries writes.
const INSERT_INTO: &str = "
    INSERT INTO outbox (id, app_id, trigger_id, kind, event_type, source, subject, payload, depth,
                        max_attempts, due_at, reply_to, idempotency_key, dead_letter_id, created_at,
                        ordering_key, lane, lane_seq, waiting, gated)";

/// The rows to insert, in the order given (`n`).
const ROWS: &str = "
    UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::text[],
           $8::text[], $9::int4[], $10::int4[], $11::int8[], $12::text[], $13::text[], $14::uuid[],
           $15::timestamptz[], $17::text[], $18::text[], $19::bool[], $20::bool[]) WITH ORDINALITY";

/// The names of the columns of [`ROWS`].
const ROW_NAMES: &str =
    "(id, app_id, trigger_id, kind, event_type, source, subject, payload, depth, max_attempts,
    delay_ms, reply_to, idempotency_key, dead_letter_id, event_time, ordering_key, lane, front, gated, n)";

/// The event columns of a row `u` of [`ROWS`].
const EVENT: &str =
    "u.id, u.app_id, u.trigger_id, u.kind, u.event_type, u.source, u.subject, u.payload::json,
           u.depth, u.max_attempts, coalesce($16, now()) + u.delay_ms * interval '1 millisecond',
           u.reply_to, u.idempotency_key, u.dead_letter_id, coalesce(u.event_time, $16, now()),
           u.ordering_key";

/// The first row of the lane of `u` (`u.trigger_id`, `u.lane`): its head, or the row that becomes
/// head next. One rule for the writers and the release.
const LANE_FIRST: &str = "SELECT h.id, h.lane_seq AS seq, h.waiting FROM outbox h
                           WHERE h.trigger_id = u.trigger_id AND h.lane = u.lane
                           ORDER BY h.lane_seq LIMIT 1";

/// A dead letter holding the lane of `u`.
const LANE_HELD: &str = "SELECT true AS yes FROM dead_letters d
                          WHERE d.trigger_id = u.trigger_id AND d.held_lane = u.lane LIMIT 1";

/// The insert of deliveries none of which is in a lane.
static INSERT: LazyLock<String> = LazyLock::new(|| {
    format!("{INSERT_INTO} SELECT {EVENT}, NULL, NULL, false, u.gated FROM {ROWS} AS u{ROW_NAMES}")
});

/// The insert of deliveries some of which are in lanes (their lanes locked by the caller, see
/// [`lock_lanes`]). A row goes to the back of its lane, waiting when the lane has rows, when a
/// dead letter holds it, or when an earlier row of this insert is in it; a row for the front (the
/// replay of a held dead letter) goes before the lane's first row and is its head, unless the
/// lane has a head already (then it goes to the back). Places follow the order given.
static INSERT_IN_LANES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{INSERT_INTO}
         SELECT {EVENT}, u.lane,
                CASE WHEN u.lane IS NULL THEN NULL
                     WHEN front.yes AND head.seq IS NOT NULL THEN head.seq - 1
                     ELSE u.seq END,
                CASE WHEN u.lane IS NULL OR front.yes THEN false
                     ELSE u.rn > 1 OR head.seq IS NOT NULL OR held.yes IS NOT NULL END,
                u.gated
           FROM (SELECT v.*, CASE WHEN v.lane IS NOT NULL THEN nextval('outbox_lane_seq') END AS seq,
                        row_number() OVER (PARTITION BY v.trigger_id, v.lane ORDER BY v.n) AS rn
                   FROM {ROWS} AS v{ROW_NAMES}) u
           LEFT JOIN LATERAL ({LANE_FIRST}) head ON true
           LEFT JOIN LATERAL ({LANE_HELD}) held ON true
           CROSS JOIN LATERAL (SELECT u.front AND u.rn = 1 AND (head.seq IS NULL OR head.waiting) AS yes) front"
    )
});

/// The insert for `rows`: in lanes when one of them is.
fn insert_sql(rows: &[NewDelivery]) -> &'static str {
    if rows.iter().any(|r| lane_of(r).is_some()) { &INSERT_IN_LANES } else { &INSERT }
}

pub(super) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Inserts deliveries on the caller's connection, in its transaction, so the rows commit with
/// the data that caused them. `now` is the time to count delays from (`None`: the database's
/// `now()`). Returns the delivery each row is ([`OutboxRepo::insert_deliveries`]).
pub async fn insert_deliveries(
    conn: &mut PgConnection,
    rows: &[NewDelivery],
    now: Option<OffsetDateTime>,
) -> Result<Vec<Uuid>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    lock_lanes(conn, rows.iter().filter_map(lane_of)).await?;
    let mut landed: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    if !rows.iter().any(NewDelivery::replaces_newest) {
        insert_query(rows, now, insert_sql(rows))
            .execute(conn)
            .await
            .map_err(|e| map_insert_error(e, rows))?;
        return Ok(landed);
    }
    // Debounced rows one at a time, each seeing the one before in its lane; the others at once.
    let plain: Vec<NewDelivery> = rows.iter().filter(|r| !r.replaces_newest()).cloned().collect();
    if !plain.is_empty() {
        insert_query(&plain, now, insert_sql(&plain))
            .execute(&mut *conn)
            .await
            .map_err(|e| map_insert_error(e, &plain))?;
    }
    for (row, landed) in rows.iter().zip(&mut landed).filter(|(r, _)| r.replaces_newest()) {
        match debounce(conn, row, now).await? {
            Some(replaced) => *landed = replaced,
            None => {
                let one = std::slice::from_ref(row);
                insert_query(one, now, &INSERT_IN_LANES)
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| map_insert_error(e, one))?;
            }
        }
    }
    Ok(landed)
}

/// Gives the newest delivery of the lane of `row` the event of `row` and moves it to `row`'s due
/// time, counted from this statement rather than from the start of its transaction (which may
/// have waited on locks and a busy server: the debounce would shrink by that wait), if it has
/// not started (no attempt, no lease) and no idempotency key names it; a KV
/// event keeps the `previous` of the oldest event it replaces (`model::debounced_data`). Returns
/// the delivery it replaced the event of, if it did. The caller holds the lane's lock, so the
/// newest row stays the newest; a relay claiming it at the same moment wins or loses the row
/// lock, and the update sees which.
async fn debounce(
    conn: &mut PgConnection,
    row: &NewDelivery,
    now: Option<OffsetDateTime>,
) -> Result<Option<Uuid>> {
    let (trigger, lane) = lane_of(row).expect("a debounced row is in a lane");
    let replaced: Option<Uuid> = sqlx::query_scalar(
        "UPDATE outbox o
            SET payload = CASE WHEN o.kind = $11
                               THEN jsonb_set($1::jsonb, '{previous}', coalesce(o.payload::jsonb -> 'previous', 'null'))::json
                               ELSE $1::json END,
                event_type = $2, subject = $3, source = $4, depth = $8,
                due_at = coalesce($6, statement_timestamp()) + $5 * interval '1 millisecond',
                created_at = coalesce($7, $6, now())
          WHERE o.id = (SELECT h.id FROM outbox h WHERE h.trigger_id = $9 AND h.lane = $10
                         ORDER BY h.lane_seq DESC LIMIT 1)
            AND o.attempts = 0 AND o.leased_until IS NULL AND o.idempotency_key IS NULL
      RETURNING o.id",
    )
    .bind(row.payload.get())
    .bind(&row.event_type)
    .bind(&row.subject)
    .bind(&row.source)
    .bind(millis(row.delay))
    .bind(now)
    .bind(row.event_time)
    .bind(row.depth as i32)
    .bind(trigger)
    .bind(lane)
    .bind(EventKind::Kv.as_str())
    .fetch_optional(conn)
    .await?;
    Ok(replaced)
}

fn lane_of(row: &NewDelivery) -> Option<(Uuid, &str)> {
    Some((row.trigger_id?.as_uuid(), row.lane.as_deref()?))
}

/// The advisory lock of a lane: 64-bit FNV-1a of the trigger id and the lane, the same in every
/// process and version.
fn lane_lock_key(trigger_id: Uuid, lane: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in trigger_id.as_bytes().iter().chain(lane.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

/// Locks lanes until the transaction ends. Whoever reads a lane to change it (writers putting rows
/// in, a release making the next row head) holds its lock first and reads it in a statement
/// after, so no writer puts a row behind a head that is gone unseen. Locks are taken in key
/// order, so two transactions never wait on each other in a cycle.
async fn lock_lanes<'a>(conn: &mut PgConnection, lanes: impl Iterator<Item = (Uuid, &'a str)>) -> Result<()> {
    let mut keys: Vec<i64> = lanes.map(|(trigger, lane)| lane_lock_key(trigger, lane)).collect();
    if keys.is_empty() {
        return Ok(());
    }
    keys.sort_unstable();
    keys.dedup();
    sqlx::query("SELECT pg_advisory_xact_lock(k) FROM UNNEST($1::int8[]) AS k")
        .bind(keys)
        .execute(conn)
        .await?;
    Ok(())
}

/// Takes, in key order, the locks of the lanes that are free now, never waiting for one (a writer
/// holds a lane's lock for the rest of its transaction): the lanes it locked, and those it did
/// not.
async fn try_lock_lanes<'a>(
    conn: &mut PgConnection,
    lanes: &'a [(Uuid, String)],
) -> Result<(Vec<&'a (Uuid, String)>, Vec<&'a (Uuid, String)>)> {
    let mut keyed: Vec<(i64, &(Uuid, String))> =
        lanes.iter().map(|lane| (lane_lock_key(lane.0, &lane.1), lane)).collect();
    keyed.sort_unstable_by_key(|(key, _)| *key);
    keyed.dedup_by(|a, b| a.1 == b.1);
    let keys: Vec<i64> = keyed.iter().map(|(key, _)| *key).collect();
    let locked: Vec<bool> =
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(k) FROM UNNEST($1::int8[]) AS k")
            .bind(&keys)
            .fetch_all(conn)
            .await?;
    let (locked, busy): (Vec<_>, Vec<_>) = keyed.into_iter().zip(locked).partition(|(_, locked)| *locked);
    Ok((
        locked.into_iter().map(|((_, lane), _)| lane).collect(),
        busy.into_iter().map(|((_, lane), _)| lane).collect(),
    ))
}

fn columns<'a>(lanes: &[&'a (Uuid, String)]) -> (Vec<Uuid>, Vec<&'a str>) {
    lanes.iter().map(|(trigger, lane)| (*trigger, lane.as_str())).unzip()
}

/// The statement of [`promote`].
static PROMOTE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE outbox o SET waiting = false
           FROM UNNEST($1::uuid[], $2::text[]) AS u(trigger_id, lane)
           CROSS JOIN LATERAL ({LANE_FIRST}) head
          WHERE o.id = head.id AND head.waiting AND NOT EXISTS ({LANE_HELD})"
    )
});

/// Makes each lane's first row its head, when it waits and no dead letter holds the lane. The
/// caller holds the lanes' locks, taken in an earlier statement.
async fn promote(conn: &mut PgConnection, lanes: &[&(Uuid, String)]) -> Result<()> {
    if lanes.is_empty() {
        return Ok(());
    }
    let (triggers, lanes) = columns(lanes);
    sqlx::query(&PROMOTE).bind(triggers).bind(lanes).execute(conn).await?;
    Ok(())
}

/// Releases, in the caller's transaction, lanes whose head left the outbox or whose dead letter
/// was resolved: those whose lock is free now get their next head at once; the others are noted
/// in `lane_releases` for [`OutboxRepo::release_lanes`]. It never waits for a lock, so a
/// completion never waits for a writer.
pub(super) async fn release(conn: &mut PgConnection, lanes: &[(Uuid, String)]) -> Result<()> {
    if lanes.is_empty() {
        return Ok(());
    }
    let (locked, busy) = try_lock_lanes(conn, lanes).await?;
    promote(conn, &locked).await?;
    if !busy.is_empty() {
        let (triggers, lanes) = columns(&busy);
        // DO UPDATE, not DO NOTHING: a sweep may hold this lane's note, read the lane before this
        // transaction's change and delete the note; updating it waits for that sweep, and the
        // note is written again after it.
        sqlx::query(
            "INSERT INTO lane_releases (trigger_id, lane) SELECT * FROM UNNEST($1::uuid[], $2::text[])
             ON CONFLICT (trigger_id, lane) DO UPDATE SET lane = excluded.lane",
        )
        .bind(triggers)
        .bind(lanes)
        .execute(conn)
        .await?;
    }
    Ok(())
}

/// Deletes rows and notes the lanes whose heads they were.
async fn delete_and_release(conn: &mut PgConnection, ids: &[Uuid]) -> Result<u64> {
    let gone = sqlx::query("DELETE FROM outbox WHERE id = ANY ($1) RETURNING trigger_id, lane")
        .bind(ids)
        .fetch_all(&mut *conn)
        .await?;
    let lanes = gone
        .iter()
        .filter_map(|row| {
            let lane: Option<String> = row.try_get("lane").ok()?;
            let trigger: Option<Uuid> = row.try_get("trigger_id").ok()?;
            Some((trigger?, lane?))
        })
        .collect::<Vec<_>>();
    release(conn, &lanes).await?;
    Ok(gone.len() as u64)
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
    let mut ordering_keys = Vec::with_capacity(n);
    let mut lanes = Vec::with_capacity(n);
    let mut fronts = Vec::with_capacity(n);
    let mut gated = Vec::with_capacity(n);
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
        ordering_keys.push(r.ordering_key.as_deref());
        lanes.push(r.lane.as_deref());
        fronts.push(r.front_of_lane);
        gated.push(r.gated);
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
        .bind(ordering_keys)
        .bind(lanes)
        .bind(fronts)
        .bind(gated)
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
pub(super) const CLAIMED: &str = "o.id, o.app_id, o.trigger_id, o.kind, o.event_type, o.source, o.subject, \
    o.payload::text AS payload, o.depth, o.attempts, o.max_attempts, o.reply_to, o.dead_letter_id, \
    o.last_error, o.created_at, o.ordering_key, o.lane IS NOT NULL AS in_lane, o.gated";

pub(super) fn claimed_row(row: &sqlx::postgres::PgRow) -> Result<ClaimedDelivery> {
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
        ordering_key: row.try_get("ordering_key")?,
        in_lane: row.try_get("in_lane")?,
        gated: row.try_get("gated")?,
    })
}

/// The statement of [`OutboxRepo::claim_shared`] (public for the tests that explain and time
/// it): `$1` want, `$2` the lease in milliseconds, `$3` the store's clock (NULL: `now()`), `$4`
/// the node, `$5` the first app id to visit, `$6` the share, `$7`/`$8` the apps' held slots.
///
/// The walk finds each next app with a probe of `outbox_app_due`, whatever its rows; the app's
/// first row there says whether it has a due one, and where its part is taken from (the index
/// entries before it are of rows the statement cannot see: it does not walk them twice). Then
/// each app's oldest due rows are taken from the same index, as many as its quota.
pub static CLAIM_SHARED: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH RECURSIVE {walk},
         apps AS MATERIALIZED (
             SELECT w.app_id, w.n, w.first_due,
                    greatest(0, $6::int8 - coalesce((SELECT h.held FROM UNNEST($7::uuid[], $8::int8[]) AS h(app_id, held)
                                                     WHERE h.app_id = w.app_id), 0)) AS room,
                    w.first_due <= coalesce($3, now()) AS due
               FROM walk w),
         quotas AS MATERIALIZED (
             SELECT a.app_id, a.n, a.first_due,
                    CASE WHEN a.due THEN least(a.room, ceil($1::float8 / greatest(1,
                        count(*) FILTER (WHERE a.due AND a.room > 0) OVER ()))::int8) ELSE 0 END AS quota
               FROM apps a)
         {lease}",
        walk = app_walk("$5", Some(APPS_PER_CLAIM)),
        lease = lease_picked(
            "$4",
            "SELECT p.ctid FROM quotas x CROSS JOIN LATERAL (
                 SELECT o.ctid FROM outbox o
                  WHERE o.app_id = x.app_id AND o.due_at >= x.first_due AND o.due_at <= coalesce($3, now())
                    AND NOT o.waiting AND NOT o.gated
                    AND (o.leased_until IS NULL OR o.leased_until <= coalesce($3, now()))
                  ORDER BY o.due_at LIMIT x.quota
                    FOR UPDATE SKIP LOCKED) p
              LIMIT $1",
            ", (SELECT max(q.n) FROM quotas q) AS visited,
                   (SELECT q.app_id FROM quotas q WHERE q.n = (SELECT max(n) FROM quotas)) AS last_visited,
                   (SELECT epoch FROM config_epoch) AS config_epoch,
                   (SELECT q.quota FROM quotas q WHERE q.app_id = o.app_id) AS quota",
        ),
    )
});

/// How far the walk of a claim that took nothing went: how many apps from `$1` it visited, and
/// the last (a claim that took rows says it itself).
static WALKED: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH RECURSIVE {walk}
         SELECT max(n) AS visited, (SELECT w.app_id FROM walk w WHERE w.n = (SELECT max(n) FROM walk)) AS last_visited FROM walk",
        walk = app_walk("$1", Some(APPS_PER_CLAIM)),
    )
});

/// The lease of the rows `rows` selects (their `ctid`s, locked by the statement) to the node
/// `node`: the attempt counted, `leased_until` now (`$3`, the store's clock) + the lease (`$2`,
/// ms); it returns the claimed columns and `also`. One top-level statement: a claim that runs
/// it in a CTE and joins its rows costs a fifth more.
pub(super) fn lease_picked(node: &str, rows: &str, also: &str) -> String {
    format!(
        "UPDATE outbox o
            SET attempts = o.attempts + 1,
                leased_until = coalesce($3, now()) + $2 * interval '1 millisecond',
                leased_by = {node},
                progress = NULL
          WHERE o.ctid = ANY (ARRAY({rows}))
      RETURNING {CLAIMED}{also}"
    )
}

/// The recursive CTE `walk (app_id, first_due, n)`: the apps with rows in `outbox_app_due`, from
/// the id `start` on, in order, one index probe each (which also finds the app's earliest due
/// time: the index orders an app's rows by it), `limit` at most.
fn app_walk(start: &str, limit: Option<u32>) -> String {
    let within = limit.map(|limit| format!("AND w.n < {limit}")).unwrap_or_default();
    format!(
        "walk (app_id, first_due, n) AS (
             (SELECT o.app_id, o.due_at, 1 FROM outbox o
               WHERE NOT o.waiting AND NOT o.gated AND o.app_id >= {start}
               ORDER BY o.app_id, o.due_at LIMIT 1)
           UNION ALL
             SELECT f.app_id, f.due_at, w.n + 1
               FROM walk w CROSS JOIN LATERAL (
                   SELECT o.app_id, o.due_at FROM outbox o
                    WHERE NOT o.waiting AND NOT o.gated AND o.app_id > w.app_id
                    ORDER BY o.app_id, o.due_at LIMIT 1) f
              WHERE true {within})"
    )
}

/// The channel relays listen on.
pub(super) const CHANNEL: &str = "picloud_outbox";

impl OutboxRepo for PgStore {
    async fn listen(&self) -> Result<Wakeups> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(CHANNEL).await?;
        Ok(listener.into_stream().map(|n| n.map(|n| super::wakeup(n.payload())).map_err(Error::from)).boxed())
    }

    async fn wake_relays(&self) -> Result<()> {
        self.waker.wake(&self.pool, None);
        Ok(())
    }

    async fn wake_relays_for(&self, written: Vec<Uuid>) -> Result<()> {
        self.waker.wake(&self.pool, Some(written));
        Ok(())
    }

    async fn next_due_in(&self) -> Result<Option<Duration>> {
        // Off the claims' indexes: the free rows' per app, and the gated rows' per limited
        // trigger. One probe per app: asked after a claim found nothing, not per row.
        static NEXT_DUE: LazyLock<String> = LazyLock::new(|| {
            format!(
                "WITH RECURSIVE {walk}
                 SELECT ceil(extract(epoch FROM least(
                            (SELECT min(d.due_at) FROM walk w CROSS JOIN LATERAL (
                                 SELECT o.due_at FROM outbox o
                                  WHERE o.app_id = w.app_id AND NOT o.waiting AND NOT o.gated
                                    AND o.due_at > coalesce($1, now())
                                  ORDER BY o.due_at LIMIT 1) d),
                            (SELECT min(g.due_at) FROM flow_state f CROSS JOIN LATERAL (
                                 SELECT o.due_at FROM outbox o
                                  WHERE o.trigger_id = f.trigger_id AND o.gated AND NOT o.waiting
                                    AND o.due_at > coalesce($1, now())
                                  ORDER BY o.due_at LIMIT 1) g))
                        - coalesce($1, now())) * 1000)::int8",
                walk = app_walk("'00000000-0000-0000-0000-000000000000'::uuid", None),
            )
        });
        let millis: Option<i64> =
            sqlx::query_scalar(&NEXT_DUE).bind(self.now()).fetch_one(&self.pool).await?;
        Ok(millis.map(|m| Duration::from_millis(m.max(0) as u64)))
    }

    async fn insert_deliveries(&self, tx: &mut Self::Tx, rows: &[NewDelivery]) -> Result<Vec<Uuid>> {
        insert_deliveries(tx, rows, self.now()).await
    }

    async fn insert_idempotent(&self, tx: &mut Self::Tx, row: &NewDelivery) -> Result<(Uuid, bool)> {
        let key = row.idempotency_key.as_deref().expect("insert_idempotent needs an idempotency key");
        let sql = format!(
            "{} ON CONFLICT (trigger_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
             RETURNING id",
            insert_sql(std::slice::from_ref(row))
        );
        lock_lanes(tx, lane_of(row).into_iter()).await?;
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

    async fn claim_shared(
        &self,
        want: u32,
        lease: Duration,
        node: &str,
        walk: Walk<'_>,
    ) -> Result<SharedClaim> {
        let (apps, held): (Vec<Uuid>, Vec<i64>) =
            walk.share.held.iter().map(|(app, n)| (app.as_uuid(), i64::from(*n))).unzip();
        let from = walk.from.map_or(Uuid::nil(), AppId::as_uuid);
        let found = sqlx::query(&CLAIM_SHARED)
            .bind(i64::from(want))
            .bind(millis(lease))
            .bind(self.now())
            .bind(node)
            .bind(from)
            .bind(i64::from(walk.share.per_app))
            .bind(apps)
            .bind(held)
            .fetch_all(&self.pool)
            .await?;
        let rows = found.iter().map(claimed_row).collect::<Result<Vec<_>>>()?;
        let asked;
        let walked = match found.first() {
            Some(first) => first,
            None => {
                asked = sqlx::query(&WALKED).bind(from).fetch_one(&self.pool).await?;
                &asked
            }
        };
        let visited = walked.try_get::<Option<i32>, _>("visited")?.unwrap_or(0) as u32;
        let last_visited = walked.try_get::<Option<Uuid>, _>("last_visited")?.map(AppId::from_uuid);
        let config_epoch = if rows.is_empty() { None } else { walked.try_get("config_epoch")? };
        // Per app, what it gave and its part: an app that gave all of it may have more rows.
        let mut parts: HashMap<AppId, (i64, i64)> = HashMap::new();
        for (row, found) in rows.iter().zip(&found) {
            let part = parts.entry(row.app_id).or_insert((0, found.try_get("quota")?));
            part.0 += 1;
        }
        let full = rows.len() >= want as usize;
        let more = full || parts.values().any(|(gave, part)| gave >= part);
        let last_taken = rows.iter().map(|r| r.app_id).max().filter(|_| full);
        let resume_at = SharedClaim::resume_at(visited, last_visited, last_taken);
        Ok(SharedClaim { claim: Claim { rows, config_epoch }, more, resume_at })
    }

    async fn claim_written(&self, ids: &[Uuid], lease: Duration, node: &str) -> Result<Claim> {
        static CLAIM_WRITTEN: LazyLock<String> = LazyLock::new(|| {
            lease_picked(
                "$4",
                "SELECT o.ctid FROM outbox o
                  WHERE o.id = ANY ($1) AND o.due_at <= coalesce($3, now()) AND NOT o.waiting AND NOT o.gated
                    AND (o.leased_until IS NULL OR o.leased_until <= coalesce($3, now()))
                    FOR UPDATE SKIP LOCKED",
                ", (SELECT epoch FROM config_epoch) AS config_epoch",
            )
        });
        let found = sqlx::query(&CLAIM_WRITTEN)
            .bind(ids)
            .bind(millis(lease))
            .bind(self.now())
            .bind(node)
            .fetch_all(&self.pool)
            .await?;
        let rows = found.iter().map(claimed_row).collect::<Result<Vec<_>>>()?;
        let config_epoch = found.first().map(|r| r.try_get("config_epoch")).transpose()?;
        Ok(Claim { rows, config_epoch })
    }

    async fn claim_limited(&self, want: u32, lease: Duration, holder: Holder<'_>) -> Result<LimitedClaim> {
        super::flow::claim_limited(self, want, lease, holder).await
    }

    async fn limits_exist(&self) -> Result<bool> {
        super::flow::limits_exist(self).await
    }

    async fn release_slots(&self, holder: Uuid, triggers: Option<&[TriggerId]>) -> Result<()> {
        super::flow::release_slots(self, holder, triggers).await
    }

    async fn extend_slots(
        &self,
        holder: Uuid,
        triggers: &[TriggerId],
        lease: Duration,
    ) -> Result<Vec<TriggerId>> {
        super::flow::extend_slots(self, holder, triggers, lease).await
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
            ordering_key: None,
            in_lane: false,
            gated: false,
        };
        Ok(SyncCallWrite::Written { row, target: Box::new(target) })
    }

    async fn delete_deliveries(&self, tx: &mut Self::Tx, ids: &[Uuid]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        delete_and_release(tx, ids).await
    }

    async fn delete_delivered(&self, ids: &[Uuid]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        // Rows outside lanes go in one statement; a row in a lane (or already gone) is deleted
        // again in a transaction that releases its lane.
        let outside = sqlx::query("DELETE FROM outbox WHERE id = ANY ($1) AND lane IS NULL")
            .bind(ids)
            .execute(&self.pool)
            .await?;
        if outside.rows_affected() == ids.len() as u64 {
            return Ok(outside.rows_affected());
        }
        let mut tx = self.pool.begin().await?;
        let in_lanes = delete_and_release(&mut tx, ids).await?;
        tx.commit().await?;
        Ok(outside.rows_affected() + in_lanes)
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
        let records: Vec<Option<sqlx::types::Json<&AttemptRecord>>> =
            rows.iter().map(|r| r.record.as_ref().map(sqlx::types::Json)).collect();
        // The history keeps the last ATTEMPTS_KEPT: one is appended at a time, so at most the
        // first goes.
        let done = sqlx::query(&format!(
            "UPDATE outbox o
                SET due_at = coalesce($6, now()) + u.delay_ms * interval '1 millisecond',
                    leased_until = NULL, leased_by = NULL, last_error = u.error,
                    attempts = o.attempts - u.refund::int,
                    attempt_log = CASE WHEN u.record IS NULL THEN o.attempt_log
                                       WHEN jsonb_array_length(coalesce(o.attempt_log, '[]')) >= {ATTEMPTS_KEPT}
                                       THEN (o.attempt_log - 0) || jsonb_build_array(u.record)
                                       ELSE coalesce(o.attempt_log, '[]') || jsonb_build_array(u.record) END
               FROM UNNEST($1::uuid[], $2::int4[], $3::int8[], $4::text[], $5::bool[], $7::jsonb[])
                    AS u(id, attempt, delay_ms, error, refund, record)
              WHERE o.id = u.id AND o.attempts = u.attempt",
        ))
        .bind(ids)
        .bind(attempts)
        .bind(delays)
        .bind(errors)
        .bind(refunds)
        .bind(self.now())
        .bind(records)
        .execute(&mut **tx)
        .await?;
        Ok(done.rows_affected())
    }

    async fn release_lanes(&self, batch: u32) -> Result<u64> {
        let noted: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM lane_releases)").fetch_one(&self.pool).await?;
        if !noted {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await?;
        let noted: Vec<(Uuid, String)> =
            sqlx::query_as("SELECT trigger_id, lane FROM lane_releases LIMIT $1 FOR UPDATE SKIP LOCKED")
                .bind(i64::from(batch))
                .fetch_all(&mut *tx)
                .await?;
        if noted.is_empty() {
            return Ok(0);
        }
        let (locked, _) = try_lock_lanes(&mut tx, &noted).await?;
        let (triggers, lanes) = columns(&locked);
        sqlx::query(
            "DELETE FROM lane_releases r USING UNNEST($1::uuid[], $2::text[]) AS u(trigger_id, lane)
              WHERE r.trigger_id = u.trigger_id AND r.lane = u.lane",
        )
        .bind(triggers)
        .bind(lanes)
        .execute(&mut *tx)
        .await?;
        promote(&mut tx, &locked).await?;
        tx.commit().await?;
        Ok(locked.len() as u64)
    }

    async fn extend_leases(&self, node: &str, rows: &[LeaseExtension]) -> Result<Vec<Uuid>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        let attempts: Vec<i32> = rows.iter().map(|r| r.attempt as i32).collect();
        let leases: Vec<i64> = rows.iter().map(|r| millis(r.lease)).collect();
        let progress: Vec<Option<i16>> = rows.iter().map(|r| r.progress.map(i16::from)).collect();
        let extended = sqlx::query_scalar(
            "UPDATE outbox o
                SET leased_until = greatest(o.leased_until, coalesce($5, now()) + u.lease_ms * interval '1 millisecond'),
                    progress = coalesce(u.progress, o.progress)
               FROM UNNEST($1::uuid[], $2::int4[], $3::int8[], $6::int2[]) AS u(id, attempt, lease_ms, progress)
              WHERE o.id = u.id AND o.attempts = u.attempt AND o.leased_by = $4 AND o.leased_until IS NOT NULL
          RETURNING o.id",
        )
        .bind(ids)
        .bind(attempts)
        .bind(leases)
        .bind(node)
        .bind(self.now())
        .bind(progress)
        .fetch_all(&self.pool)
        .await?;
        Ok(extended)
    }

    async fn list_deliveries(
        &self,
        app_id: AppId,
        filter: &DeliveryFilter,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Page<Delivery>> {
        let state = filter.state.map(|s| format!("AND {}", rows::in_state(s, "coalesce($5, now())")));
        let rows = sqlx::query(&format!(
            "SELECT {} FROM outbox o LEFT JOIN triggers t ON t.id = o.trigger_id
              WHERE o.app_id = $1 AND ($2::uuid IS NULL OR o.id > $2) AND ($3::uuid IS NULL OR o.trigger_id = $3)
                    {}
              ORDER BY o.id LIMIT $4",
            rows::DELIVERY_COLUMNS,
            state.unwrap_or_default(),
        ))
        .bind(app_id.as_uuid())
        .bind(after)
        .bind(filter.trigger_id.map(TriggerId::as_uuid))
        .bind(i64::from(limit) + 1)
        .bind(self.now())
        .fetch_all(&self.pool)
        .await?;
        Ok(Page::of(rows.iter().map(rows::delivery).collect::<Result<_>>()?, limit))
    }

    async fn delivery(&self, app_id: AppId, id: Uuid) -> Result<Option<DeliveryDetail>> {
        let row = sqlx::query(&format!(
            "SELECT {}, o.event_type, o.source, o.subject, o.depth, o.payload::text AS payload, o.attempt_log
               FROM outbox o LEFT JOIN triggers t ON t.id = o.trigger_id
              WHERE o.app_id = $1 AND o.id = $2",
            rows::DELIVERY_COLUMNS
        ))
        .bind(app_id.as_uuid())
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let delivery = rows::delivery(&row)?;
        let log: Option<sqlx::types::Json<Vec<AttemptRecord>>> = row.try_get("attempt_log")?;
        Ok(Some(DeliveryDetail {
            headers: EventHeaders {
                event_type: row.try_get("event_type")?,
                source: row.try_get("source")?,
                subject: row.try_get("subject")?,
                time: delivery.created_at,
                depth: row.try_get::<i32, _>("depth")? as u32,
                ordering_key: delivery.ordering_key.clone(),
            },
            payload: raw_json("outbox", row.try_get("payload")?)?,
            attempts: log.map(|l| l.0).unwrap_or_default(),
            delivery,
        }))
    }

    async fn lock_delivery(&self, tx: &mut Self::Tx, app_id: AppId, id: Uuid) -> Result<Option<Delivery>> {
        // The lane's lock first, as writers take it: a sweep releasing the lane (which would
        // make this row head, and so wait for its lock) then leaves the lane to this transaction.
        let lane: Option<(Option<Uuid>, Option<String>)> =
            sqlx::query_as("SELECT trigger_id, lane FROM outbox WHERE app_id = $1 AND id = $2")
                .bind(app_id.as_uuid())
                .bind(id)
                .fetch_optional(&mut **tx)
                .await?;
        if let Some((Some(trigger), Some(lane))) = &lane {
            lock_lanes(tx, std::iter::once((*trigger, lane.as_str()))).await?;
        }
        let row = sqlx::query(&format!(
            "SELECT {} FROM outbox o LEFT JOIN triggers t ON t.id = o.trigger_id
              WHERE o.app_id = $1 AND o.id = $2 FOR UPDATE OF o",
            rows::DELIVERY_COLUMNS
        ))
        .bind(app_id.as_uuid())
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
        row.as_ref().map(rows::delivery).transpose()
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
