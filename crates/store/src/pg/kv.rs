//! KV entries in Postgres, with a version per key.

use sqlx::Row;
use sqlx::types::Json;
use uuid::Uuid;

use super::PgStore;
use super::rows::{self, page};
use crate::model::*;
use crate::{Error, KvRepo, Result};

const COLUMNS: &str = "collection, key, value, version, updated_at";

impl KvRepo for PgStore {
    async fn kv_get(&self, app_id: Uuid, collection: &str, key: &str) -> Result<Option<KvEntry>> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM kv_entries WHERE app_id = $1 AND collection = $2 AND key = $3"
        ))
        .bind(app_id)
        .bind(collection)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(rows::kv_entry).transpose()
    }

    async fn kv_put(
        &self,
        tx: &mut Self::Tx,
        app_id: Uuid,
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
            .bind(app_id)
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
                .bind(app_id)
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
            .bind(app_id)
            .bind(collection)
            .bind(key)
            .bind(Json(value))
            .bind(self.now())
            .execute(&mut **tx)
            .await
            .map_err(|e| match super::violated(&e) {
                Some((code, _)) if code == "23503" => Error::AppNotFound(app_id.to_string()),
                _ => e.into(),
            })?;
            if inserted.rows_affected() == 1 {
                return Ok(KvPutResult { version: 1, previous: None });
            }
            // A concurrent writer created the key after our read: read it again, locked.
        }
    }

    async fn kv_delete(
        &self,
        tx: &mut Self::Tx,
        app_id: Uuid,
        collection: &str,
        key: &str,
        expected: Option<i64>,
    ) -> Result<Option<KvEntry>> {
        let deleted = sqlx::query(&format!(
            "DELETE FROM kv_entries
              WHERE app_id = $1 AND collection = $2 AND key = $3 AND ($4::int8 IS NULL OR version = $4)
             RETURNING {COLUMNS}"
        ))
        .bind(app_id)
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
        .bind(app_id)
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
        app_id: Uuid,
        collection: &str,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Page<KvEntry>> {
        let fetched = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM kv_entries
              WHERE app_id = $1 AND collection = $2 AND key >= $3 AND starts_with(key, $3)
                AND ($4::text IS NULL OR key > $4)
              ORDER BY key LIMIT $5"
        ))
        .bind(app_id)
        .bind(collection)
        .bind(prefix)
        .bind(after)
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        Ok(page(fetched.iter().map(rows::kv_entry).collect::<Result<_>>()?, limit))
    }
}
