//! Flow limits in Postgres (DESIGN §13): the claim of gated rows within each trigger's
//! `concurrency` and `rate`, and the state that claim keeps per trigger.

use std::sync::LazyLock;
use std::time::Duration;

use sqlx::{PgConnection, Row};
use time::OffsetDateTime;
use uuid::Uuid;

use picloud_core::{Flow, TriggerId};

use super::PgStore;
use super::outbox::{claimed_row, lease_picked, millis};
use crate::{AHEAD_PER_SLOT, Claim, Holder, LimitedClaim, Result};

/// A gated row of the trigger `x` that may be claimed now (`$3`: the store's clock, if any).
const CLAIMABLE: &str = "o.trigger_id = x.trigger_id AND o.gated AND NOT o.waiting
                         AND o.due_at <= coalesce($3, now())
                         AND (o.leased_until IS NULL OR o.leased_until <= coalesce($3, now()))";

/// The claim of gated rows, one statement. It locks the state rows of the limited triggers that
/// have claimable rows, skipping those another relay holds (one relay counts and spends a
/// trigger's slots and tokens at a time); `FOR UPDATE` reads the newest version of each, so the
/// slots and tokens are those the last claim committed, whatever the statement's snapshot. It
/// claims at most [`crate::Slots::claimable`] and `⌊tokens⌋` rows per trigger, spends the tokens, and
/// writes the holder's slots ([`crate::Slots::held`], until now + lease), dropping the slots whose
/// lease ran out.
/// No app takes more than its room in the holder's share (rows of one app's triggers count
/// together, taken in turns).
/// `$1` want, `$2` lease (ms), `$3` now, `$4` holder, `$5`/`$6`/`$11` the holder's busy triggers,
/// their rows claimed and of those in flight, `$7` node, `$8` the share, `$9`/`$10` the holder's
/// apps and their held slots.
static CLAIM: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH clock AS MATERIALIZED (
             SELECT coalesce($3, now()) AS now, extract(epoch FROM coalesce($3, now()))::float8 AS now_s),
         state AS MATERIALIZED (
             SELECT x.trigger_id, t.app_id, x.tokens, x.refilled_at, x.slots, t.flow
               FROM flow_state x JOIN triggers t ON t.id = x.trigger_id
              WHERE EXISTS (SELECT 1 FROM outbox o WHERE {CLAIMABLE})
              ORDER BY x.trigger_id
                FOR UPDATE OF x SKIP LOCKED),
         limits AS MATERIALIZED (
             SELECT s.trigger_id, s.app_id, s.slots,
                    greatest(0, $8::int8 - coalesce((SELECT h.held FROM UNNEST($9::uuid[], $10::int8[]) AS h(app_id, held)
                                                     WHERE h.app_id = s.app_id), 0)) AS room,
                    (s.flow->>'concurrency')::int AS concurrency,
                    (s.flow->'rate'->>'per_second')::float8 AS per_second,
                    least((s.flow->'rate'->>'burst')::float8,
                          s.tokens + (s.flow->'rate'->>'per_second')::float8
                                     * extract(epoch FROM clock.now - s.refilled_at)) AS tokens,
                    coalesce((SELECT b.n FROM UNNEST($5::uuid[], $6::int4[]) AS b(trigger_id, n)
                               WHERE b.trigger_id = s.trigger_id), 0) AS busy,
                    coalesce((SELECT r.n FROM UNNEST($5::uuid[], $11::int4[]) AS r(trigger_id, n)
                               WHERE r.trigger_id = s.trigger_id), 0) AS running,
                    (SELECT coalesce(sum((e.value->>0)::int), 0) FROM jsonb_each(s.slots) e
                      WHERE e.key <> $4::text AND (e.value->>1)::float8 > clock.now_s)::int AS others
               FROM state s, clock),
         open AS MATERIALIZED (
             SELECT l.*, CASE WHEN l.concurrency IS NOT NULL THEN greatest(0, l.concurrency - l.others) END AS open
               FROM limits l),
         allowed AS MATERIALIZED (
             SELECT o.*, greatest(0, least($1, o.room,
                                           coalesce(o.open * CASE WHEN o.per_second IS NULL THEN 1 + {AHEAD_PER_SLOT}
                                                                  ELSE 1 END
                                                    - o.busy, $1),
                                           coalesce(floor(o.tokens)::int, $1))) AS n
               FROM open o),
         picked AS (
             SELECT r.ctid FROM (
                 SELECT p.ctid, p.turn, x.trigger_id, x.room,
                        row_number() OVER (PARTITION BY x.app_id ORDER BY p.turn, x.trigger_id) AS nth
                   FROM allowed x CROSS JOIN LATERAL (
                     SELECT q.ctid, row_number() OVER () AS turn FROM (
                         SELECT o.ctid FROM outbox o WHERE {CLAIMABLE}
                          ORDER BY o.due_at LIMIT x.n
                            FOR UPDATE SKIP LOCKED) q) p) r
              WHERE r.nth <= r.room
              ORDER BY r.turn, r.trigger_id
              LIMIT $1),
         claimed AS ({lease}),
         counted AS (
             SELECT a.*, x.claimed, CASE WHEN a.open IS NOT NULL THEN greatest(a.running, least(a.open, a.busy + x.claimed)) END AS held
               FROM allowed a CROSS JOIN LATERAL (
                 SELECT count(*)::int AS claimed FROM claimed c WHERE c.trigger_id = a.trigger_id) x),
         spent AS (
             UPDATE flow_state f
                SET tokens = CASE WHEN c.tokens IS NULL THEN f.tokens ELSE c.tokens - c.claimed END,
                    refilled_at = CASE WHEN c.tokens IS NULL THEN f.refilled_at ELSE clock.now END,
                    slots = CASE WHEN c.concurrency IS NULL THEN '{{}}'::jsonb ELSE
                        (SELECT coalesce(jsonb_object_agg(e.key, e.value), '{{}}'::jsonb)
                           FROM jsonb_each(c.slots) e
                          WHERE e.key <> $4::text AND (e.value->>1)::float8 > clock.now_s)
                        || CASE WHEN c.held > 0
                                THEN jsonb_build_object($4::text, jsonb_build_array(
                                         c.held, clock.now_s + $2 / 1000.0))
                                ELSE '{{}}'::jsonb END
                    END
               FROM counted c, clock
              WHERE f.trigger_id = c.trigger_id
                -- Nothing claimed and the holder's slots as recorded: the row stays as it is.
                AND (c.claimed > 0 OR coalesce((c.slots -> $4::text ->> 0)::int, 0) <> coalesce(c.held, 0))),
         waits AS (
             SELECT min((1 - (c.tokens - c.claimed)) / c.per_second) FILTER (WHERE c.tokens - c.claimed < 1)
                        AS next_token_s,
                    array_agg(c.trigger_id ORDER BY c.trigger_id) FILTER (WHERE c.held IS NOT NULL) AS slot_triggers,
                    array_agg(c.held ORDER BY c.trigger_id) FILTER (WHERE c.held IS NOT NULL) AS slot_counts
               FROM counted c)
         SELECT w.next_token_s, w.slot_triggers, w.slot_counts,
                (SELECT epoch FROM config_epoch) AS config_epoch, c.*
           FROM waits w LEFT JOIN claimed c ON true",
        lease = lease_picked("$7", "SELECT ctid FROM picked", ""),
    )
});

pub(super) async fn claim_limited(
    store: &PgStore,
    want: u32,
    lease: Duration,
    holder: Holder<'_>,
) -> Result<LimitedClaim> {
    if want == 0 {
        return Ok(LimitedClaim {
            claim: Claim { rows: Vec::new(), config_epoch: None },
            next_token_in: None,
            slots: Vec::new(),
        });
    }
    let busy_triggers: Vec<Uuid> = holder.busy.iter().map(|(trigger, _)| trigger.as_uuid()).collect();
    let claimed: Vec<i32> = holder.busy.iter().map(|(_, busy)| busy.claimed as i32).collect();
    let running: Vec<i32> = holder.busy.iter().map(|(_, busy)| busy.running as i32).collect();
    let (held_apps, held): (Vec<Uuid>, Vec<i64>) =
        holder.share.held.iter().map(|(app, n)| (app.as_uuid(), i64::from(*n))).unzip();
    let found = sqlx::query(&CLAIM)
        .bind(i32::try_from(want).unwrap_or(i32::MAX))
        .bind(millis(lease))
        .bind(store.now())
        .bind(holder.id)
        .bind(busy_triggers)
        .bind(claimed)
        .bind(holder.node)
        .bind(i64::from(holder.share.per_app))
        .bind(held_apps)
        .bind(held)
        .bind(running)
        .fetch_all(&store.pool)
        .await?;
    let next_token_in = found
        .first()
        .map(|row| row.try_get::<Option<f64>, _>("next_token_s"))
        .transpose()?
        .flatten()
        .map(|s| Duration::from_secs_f64(s.max(0.0)));
    let slots = match found.first() {
        Some(row) => {
            let triggers: Option<Vec<Uuid>> = row.try_get("slot_triggers")?;
            let counts: Option<Vec<i32>> = row.try_get("slot_counts")?;
            triggers
                .unwrap_or_default()
                .into_iter()
                .zip(counts.unwrap_or_default())
                .map(|(trigger, n)| (TriggerId::from_uuid(trigger), n.max(0) as u32))
                .collect()
        }
        None => Vec::new(),
    };
    let mut rows = Vec::with_capacity(found.len());
    for row in &found {
        if row.try_get::<Option<Uuid>, _>("id")?.is_some() {
            rows.push(claimed_row(row)?);
        }
    }
    let config_epoch = if rows.is_empty() { None } else { found[0].try_get("config_epoch")? };
    Ok(LimitedClaim { claim: Claim { rows, config_epoch }, next_token_in, slots })
}

pub(super) async fn limits_exist(store: &PgStore) -> Result<bool> {
    Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM flow_state)").fetch_one(&store.pool).await?)
}

pub(super) async fn release_slots(
    store: &PgStore,
    holder: Uuid,
    triggers: Option<&[TriggerId]>,
) -> Result<()> {
    let triggers: Option<Vec<Uuid>> = triggers.map(|t| t.iter().map(|t| t.as_uuid()).collect());
    sqlx::query(
        "UPDATE flow_state SET slots = slots - $1::text
          WHERE slots ? $1::text AND ($2::uuid[] IS NULL OR trigger_id = ANY ($2))",
    )
    .bind(holder.to_string())
    .bind(triggers)
    .execute(&store.pool)
    .await?;
    Ok(())
}

/// [`crate::OutboxRepo::extend_slots`]: the holder's entry of each trigger's `slots` (`[held, until
/// in epoch seconds]`), if it has not ended, ends no sooner than now + `lease`. Rows are updated in
/// trigger order, as the claim locks them.
pub(super) async fn extend_slots(
    store: &PgStore,
    holder: Uuid,
    triggers: &[TriggerId],
    lease: Duration,
) -> Result<Vec<TriggerId>> {
    if triggers.is_empty() {
        return Ok(Vec::new());
    }
    let mut triggers: Vec<Uuid> = triggers.iter().map(|t| t.as_uuid()).collect();
    triggers.sort_unstable();
    triggers.dedup();
    let kept: Vec<Uuid> = sqlx::query_scalar(
        "WITH clock AS (SELECT extract(epoch FROM coalesce($3, now()))::float8 AS now_s),
              locked AS (
                  SELECT f.trigger_id FROM flow_state f, clock
                   WHERE f.trigger_id = ANY ($2) AND f.slots ? $1::text
                     AND (f.slots -> $1::text ->> 1)::float8 > clock.now_s
                   ORDER BY f.trigger_id
                     FOR UPDATE OF f)
         UPDATE flow_state f
            SET slots = jsonb_set(f.slots, ARRAY[$1::text], jsonb_build_array(
                    f.slots -> $1::text -> 0,
                    greatest((f.slots -> $1::text ->> 1)::float8, clock.now_s + $4 / 1000.0)))
           FROM locked, clock
          WHERE f.trigger_id = locked.trigger_id
      RETURNING f.trigger_id",
    )
    .bind(holder.to_string())
    .bind(triggers)
    .bind(store.now())
    .bind(millis(lease))
    .fetch_all(&store.pool)
    .await?;
    Ok(kept.into_iter().map(TriggerId::from_uuid).collect())
}

/// Keeps a trigger's limits in step with its new `flow`, in the transaction that writes it: a
/// limited trigger has a state row (its bucket full: a new flow starts a new bucket), and its
/// rows are gated; an unlimited one has neither. `changed`: the trigger existed before (its rows
/// are gated or let free again).
pub(super) async fn set_limits(
    conn: &mut PgConnection,
    trigger: TriggerId,
    flow: Option<&Flow>,
    now: Option<OffsetDateTime>,
    changed: bool,
) -> Result<()> {
    let limited = flow.is_some_and(Flow::is_limited);
    if limited {
        let burst = flow.and_then(|f| f.rate).map(|rate| f64::from(rate.burst));
        sqlx::query(
            "INSERT INTO flow_state (trigger_id, tokens, refilled_at) VALUES ($1, $2, coalesce($3, now()))
             ON CONFLICT (trigger_id) DO UPDATE SET tokens = excluded.tokens, refilled_at = excluded.refilled_at",
        )
        .bind(trigger.as_uuid())
        .bind(burst)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    } else if changed {
        sqlx::query("DELETE FROM flow_state WHERE trigger_id = $1")
            .bind(trigger.as_uuid())
            .execute(&mut *conn)
            .await?;
    }
    if changed {
        sqlx::query("UPDATE outbox SET gated = $2 WHERE trigger_id = $1 AND gated <> $2")
            .bind(trigger.as_uuid())
            .bind(limited)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}
