//! KV entries in Postgres, with a version per key.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use picloud_core::AppId;
use sqlx::Row;
use sqlx::types::Json;
use time::{Duration, OffsetDateTime};

use super::PgStore;
use super::pattern::pattern_matches;
use super::rows;
use crate::model::*;
use crate::{Error, KvRepo, Result};

const COLUMNS: &str = "collection, key, value, version, updated_at";

/// The one statement of a KV put that fires its triggers ([`KvRepo::kv_put_firing`]): built once,
/// since the trigger match is the shared predicate of `pattern`.
static KV_PUT_FIRING: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH epoch_now AS MATERIALIZED (SELECT epoch FROM config_epoch),
             matched AS MATERIALIZED (
                 SELECT t.id, t.retry_max_attempts, t.flow
                   FROM kv_trigger_details d JOIN triggers t ON t.id = d.trigger_id
                  WHERE d.app_id = $1 AND t.enabled AND 'put' = ANY (d.ops)
                    AND {matches}
             ), free AS (
                 -- Deliveries of a trigger with a flow go in lanes or are gated, which takes
                 -- statements of their own (`NewDelivery::flowing`): then this statement writes
                 -- nothing. Neither does it on an authorization read at an epoch since moved.
                 SELECT NOT EXISTS (SELECT 1 FROM matched WHERE flow IS NOT NULL)
                        AND ($11::bigint IS NULL OR (SELECT epoch FROM epoch_now) = $11) AS yes
             ), prev AS (
                 -- Locked only when this statement writes: a lock is a write, and would make the
                 -- statement that writes nothing wait for a WAL flush of its own at its commit.
                 SELECT value, version FROM kv_entries
                  WHERE app_id = $1 AND collection = $2 AND key = $3 AND (SELECT yes FROM free)
                    FOR UPDATE
             ), up AS (
                 -- Reading `prev` here makes it run (and lock) before the upsert: read after it,
                 -- FOR UPDATE would skip the row this very statement had just updated.
                 INSERT INTO kv_entries AS k (app_id, collection, key, value, version, created_at, updated_at)
                 SELECT $1, $2, $3, $4, 1, coalesce($8, now()), coalesce($8, now())
                   FROM (SELECT count(*) FROM prev) AS locked, free
                  WHERE free.yes
                 ON CONFLICT (app_id, collection, key) DO UPDATE
                    SET value = excluded.value, version = k.version + 1, updated_at = excluded.updated_at
                 RETURNING k.version
             ), fired AS (
                 INSERT INTO outbox (id, app_id, trigger_id, kind, event_type, source, subject, payload, depth,
                                     max_attempts, due_at, created_at, ordering_key)
                 SELECT picloud_uuid_v7(), $1, t.id, 'kv', 'picloud.kv.put', $5, $3,
                        CASE WHEN octet_length(e.data::text) <= $9 THEN e.data
                             ELSE picloud_too_large(octet_length(e.data::text), $9) END,
                        $6, coalesce(t.retry_max_attempts, $7), coalesce($8, now()), coalesce($8, now()), $10
                   FROM matched t, free,
                        LATERAL (SELECT jsonb_build_object('collection', $2::text, 'key', $3::text, 'op', 'put',
                                                           'value', $4::jsonb, 'previous', (SELECT value FROM prev),
                                                           'version', (SELECT version FROM up))::json AS data) e
                  WHERE free.yes
                 RETURNING id
             )
             SELECT epoch_now.epoch AS config_epoch, up.version, prev.value AS previous,
                    (SELECT array_agg(id) FROM fired) AS fired,
                    CASE WHEN up.version IS NULL OR up.version = coalesce(prev.version, 0) + 1 THEN true
                         ELSE picloud_raced('kv entry') END AS consistent
               FROM epoch_now LEFT JOIN up ON true LEFT JOIN prev ON true",
        matches = pattern_matches("d.collection_stem", "d.collection_is_prefix", "$2")
    )
});

/// The collections, by app, whose puts [`KV_PUT_FIRING`] refused lately because a trigger they
/// fire has a flow: for a moment after a refusal, their puts go the way of several statements at
/// once instead of trying the one statement first (a round trip, and the largest statement to
/// start, for nothing). Only a put's speed depends on it: the other way writes what any put must,
/// and the statement refuses by itself whatever is remembered here, so a flow added is never
/// missed, and a flow removed makes puts one statement again within [`REFUSAL_REMEMBERED`] (by
/// the store's clock: a manual clock that is not moved keeps a refusal).
#[derive(Debug, Clone, Default)]
pub(super) struct Refused(Arc<Mutex<Refusals>>);

/// What [`Refused`] remembers: when each collection was refused, and how many are remembered.
#[derive(Debug, Default)]
struct Refusals {
    by_app: HashMap<AppId, HashMap<String, OffsetDateTime>>,
    count: usize,
}

/// How long a refusal is remembered, by the store's clock.
const REFUSAL_REMEMBERED: Duration = Duration::SECOND;

/// The most refusals remembered: beyond it, those past [`REFUSAL_REMEMBERED`] are forgotten, and
/// all of them if that is not enough.
const REFUSALS_AT_MOST: usize = 4096;

/// Whether a refusal at `at` is still remembered at `now` (one from a later time, the clock having
/// gone back, is not).
fn remembered(at: OffsetDateTime, now: OffsetDateTime) -> bool {
    (Duration::ZERO..REFUSAL_REMEMBERED).contains(&(now - at))
}

impl Refused {
    /// Whether puts to `collection` of `app` were refused within [`REFUSAL_REMEMBERED`] of `now`.
    fn lately(&self, app: AppId, collection: &str, now: OffsetDateTime) -> bool {
        let refused = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        refused
            .by_app
            .get(&app)
            .and_then(|collections| collections.get(collection))
            .is_some_and(|at| remembered(*at, now))
    }

    /// Remembers that a put to `collection` of `app` was refused at `now`.
    fn note(&self, app: AppId, collection: &str, now: OffsetDateTime) {
        let mut refused = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = refused.by_app.get_mut(&app).and_then(|collections| collections.get_mut(collection))
        {
            *at = now;
            return;
        }
        if refused.count >= REFUSALS_AT_MOST {
            refused
                .by_app
                .values_mut()
                .for_each(|collections| collections.retain(|_, at| remembered(*at, now)));
            refused.by_app.retain(|_, collections| !collections.is_empty());
            refused.count = refused.by_app.values().map(HashMap::len).sum();
            if refused.count >= REFUSALS_AT_MOST {
                *refused = Refusals::default();
            }
        }
        refused.by_app.entry(app).or_default().insert(collection.to_owned(), now);
        refused.count += 1;
    }
}

impl KvRepo for PgStore {
    async fn kv_get(&self, app_id: AppId, collection: &str, key: &str) -> Result<Option<KvEntry>> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM kv_entries WHERE app_id = $1 AND collection = $2 AND key = $3"
        ))
        .bind(app_id.as_uuid())
        .bind(collection)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(rows::kv_entry).transpose()
    }

    async fn kv_put(
        &self,
        tx: &mut Self::Tx,
        app_id: AppId,
        collection: &str,
        key: &str,
        value: &serde_json::Value,
        expected: Option<i64>,
    ) -> Result<KvPutResult> {
        loop {
            // Lock the current row (waiting for a concurrent writer) to learn the previous value.
            let current = sqlx::query(
                "SELECT value, version FROM kv_entries
                  WHERE app_id = $1 AND collection = $2 AND key = $3 FOR UPDATE",
            )
            .bind(app_id.as_uuid())
            .bind(collection)
            .bind(key)
            .fetch_optional(&mut **tx)
            .await?;
            if let Some(row) = current {
                let version: i64 = row.try_get("version")?;
                if expected.is_some_and(|e| e != version) {
                    return Err(Error::VersionMismatch {
                        expected: expected.unwrap_or_default(),
                        current: Some(version),
                    });
                }
                let previous: Json<serde_json::Value> = row.try_get("value")?;
                sqlx::query(
                    "UPDATE kv_entries SET value = $4, version = version + 1, updated_at = coalesce($5, now())
                      WHERE app_id = $1 AND collection = $2 AND key = $3",
                )
                .bind(app_id.as_uuid())
                .bind(collection)
                .bind(key)
                .bind(Json(value))
                .bind(self.now())
                .execute(&mut **tx)
                .await?;
                return Ok(KvPutResult { version: version + 1, previous: Some(previous.0) });
            }
            if let Some(expected) = expected {
                return Err(Error::VersionMismatch { expected, current: None });
            }
            let inserted = sqlx::query(
                "INSERT INTO kv_entries (app_id, collection, key, value, version, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, 1, coalesce($5, now()), coalesce($5, now()))
                 ON CONFLICT (app_id, collection, key) DO NOTHING",
            )
            .bind(app_id.as_uuid())
            .bind(collection)
            .bind(key)
            .bind(Json(value))
            .bind(self.now())
            .execute(&mut **tx)
            .await?;
            if inserted.rows_affected() == 1 {
                return Ok(KvPutResult { version: 1, previous: None });
            }
            // A concurrent writer created the key after our read: read it again, locked.
        }
    }

    async fn kv_put_firing(
        &self,
        tx: Option<&mut Self::Tx>,
        put: &FiringPut<'_>,
    ) -> Result<Option<(KvPutResult, Vec<uuid::Uuid>)>> {
        if self.refused.lately(put.app_id, put.collection, self.clock.now()) {
            return Ok(None);
        }
        let query = sqlx::query(&KV_PUT_FIRING)
            .bind(put.app_id.as_uuid())
            .bind(put.collection)
            .bind(put.key)
            .bind(Json(put.value))
            .bind(put.source)
            .bind(put.depth as i32)
            .bind(put.default_max_attempts as i32)
            .bind(self.now())
            .bind(i64::try_from(put.max_data_bytes).unwrap_or(i64::MAX))
            .bind(put.ordering_key)
            .bind(put.authorized_at);
        let row = match tx {
            Some(tx) => query.fetch_one(&mut **tx).await,
            None => query.fetch_one(&self.pool).await,
        }
        .map_err(|e| match super::violated(&e) {
            Some((code, _)) if code == "40001" => Error::Conflict(format!("{}/{}", put.collection, put.key)),
            Some((code, _)) if code == "54000" => Error::TooLarge { max: put.max_data_bytes },
            _ => e.into(),
        })?;
        if put.authorized_at.is_some_and(|epoch| row.try_get::<i64, _>("config_epoch").ok() != Some(epoch)) {
            return Err(Error::Stale);
        }
        let Some(version) = row.try_get("version")? else {
            self.refused.note(put.app_id, put.collection, self.clock.now());
            return Ok(None);
        };
        let previous: Option<Json<serde_json::Value>> = row.try_get("previous")?;
        let fired: Option<Vec<uuid::Uuid>> = row.try_get("fired")?;
        Ok(Some((KvPutResult { version, previous: previous.map(|p| p.0) }, fired.unwrap_or_default())))
    }

    async fn kv_delete(
        &self,
        tx: &mut Self::Tx,
        app_id: AppId,
        collection: &str,
        key: &str,
        expected: Option<i64>,
    ) -> Result<Option<KvEntry>> {
        let deleted = sqlx::query(&format!(
            "DELETE FROM kv_entries
              WHERE app_id = $1 AND collection = $2 AND key = $3 AND ($4::int8 IS NULL OR version = $4)
             RETURNING {COLUMNS}"
        ))
        .bind(app_id.as_uuid())
        .bind(collection)
        .bind(key)
        .bind(expected)
        .fetch_optional(&mut **tx)
        .await?;
        if let Some(row) = deleted {
            return Ok(Some(rows::kv_entry(&row)?));
        }
        let Some(expected) = expected else { return Ok(None) };
        let current: Option<i64> = sqlx::query_scalar(
            "SELECT version FROM kv_entries WHERE app_id = $1 AND collection = $2 AND key = $3",
        )
        .bind(app_id.as_uuid())
        .bind(collection)
        .bind(key)
        .fetch_optional(&mut **tx)
        .await?;
        match current {
            Some(current) => Err(Error::VersionMismatch { expected, current: Some(current) }),
            None => Ok(None),
        }
    }

    async fn kv_list(
        &self,
        app_id: AppId,
        collection: &str,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Page<KvKeyInfo>> {
        let fetched = sqlx::query(
            "SELECT key, version, updated_at FROM kv_entries
              WHERE app_id = $1 AND collection = $2 AND key >= $3 AND starts_with(key, $3)
                AND ($4::text IS NULL OR key > $4)
              ORDER BY key LIMIT $5",
        )
        .bind(app_id.as_uuid())
        .bind(collection)
        .bind(prefix)
        .bind(after)
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        Ok(Page::of(fetched.iter().map(rows::kv_key).collect::<Result<_>>()?, limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_remembered_for_a_moment_by_app_and_collection_and_a_full_memory_forgets_the_old() {
        let refused = Refused::default();
        let (app, other) = (AppId::new(), AppId::new());
        let at = OffsetDateTime::UNIX_EPOCH;
        refused.note(app, "orders", at);
        assert!(refused.lately(app, "orders", at + Duration::milliseconds(999)));
        assert!(!refused.lately(app, "orders", at + REFUSAL_REMEMBERED), "forgotten after the moment");
        assert!(!refused.lately(app, "orders", at - Duration::SECOND), "the clock went back");
        assert!(!refused.lately(app, "users", at), "another collection");
        assert!(!refused.lately(other, "orders", at), "another app");

        for n in 1..REFUSALS_AT_MOST {
            refused.note(other, &format!("c{n}"), at + REFUSAL_REMEMBERED);
        }
        refused.note(other, "full", at + REFUSAL_REMEMBERED);
        assert!(refused.lately(other, "c1", at + REFUSAL_REMEMBERED), "a refusal of the moment stays");
        assert!(!refused.lately(app, "orders", at), "a full memory forgot the old refusal");
        refused.note(other, "c1", at + REFUSAL_REMEMBERED);
        assert!(refused.lately(other, "c2", at + REFUSAL_REMEMBERED), "noted again, nothing is forgotten");

        refused.note(app, "one more", at + REFUSAL_REMEMBERED);
        assert!(refused.lately(app, "one more", at + REFUSAL_REMEMBERED));
        assert!(!refused.lately(other, "c1", at + REFUSAL_REMEMBERED), "all of the moment: all forgotten");
    }
}
