//! KV entries: put (optionally conditional on a version), get, delete, list by prefix.

use picloud_core::{Capability, CollectionName, KvKey};
use picloud_store::{Store, events};

use super::Ops;
use crate::auth::{Caller, Guarded};
use crate::error::{ApiError, ErrorCode};
use crate::extract::{Page, PageQuery};
use crate::views::{KvKeyView, KvValue, VersionView};

fn names(collection: String, key: String) -> Result<(CollectionName, KvKey), ApiError> {
    Ok((
        CollectionName::parse(collection).map_err(|e| ApiError::invalid("collection", e))?,
        KvKey::parse(key).map_err(|e| ApiError::invalid("key", e))?,
    ))
}

fn key_not_found(collection: &str, key: &str) -> ApiError {
    ApiError::new(ErrorCode::KeyNotFound, format!("no key {key} in {collection}"))
}

impl<S: Store> Ops<S> {
    /// Upserts an entry, only while it has version `expected` when one is given: the new version;
    /// [stale](Guarded::Stale), having written nothing, when the caller was authorized at a
    /// configuration epoch (`authorized_at`) that has moved since.
    pub async fn kv_put(
        &self,
        caller: &Caller,
        collection: &str,
        key: &str,
        value: &serde_json::Value,
        expected: Option<i64>,
        authorized_at: Option<i64>,
    ) -> Result<Guarded<VersionView>, ApiError> {
        let app = caller.require_app(Capability::AppWriteKv)?;
        let (collection, key) = names(collection.to_owned(), key.to_owned())?;
        let cx = self.event_context(app, caller);
        match events::kv_put_now(&self.store, &cx, &collection, &key, value, expected, authorized_at).await {
            Ok((put, _)) => Ok(Guarded::Written(VersionView { version: put.version })),
            Err(picloud_store::Error::Stale) => Ok(Guarded::Stale),
            Err(e) => Err(e.into()),
        }
    }

    /// An entry's value and version.
    pub async fn kv_get(&self, caller: &Caller, collection: &str, key: &str) -> Result<KvValue, ApiError> {
        let app = caller.require_app(Capability::AppReadKv)?;
        let entry = self.store.kv_get(app.id, collection, key).await?;
        let entry = entry.ok_or_else(|| key_not_found(collection, key))?;
        Ok(KvValue { value: entry.value, version: entry.version })
    }

    /// Deletes an entry, only while it has version `expected` when one is given: the deleted
    /// entry's version. A name that breaks the rule is a key that does not exist.
    pub async fn kv_delete(
        &self,
        caller: &Caller,
        collection: String,
        key: String,
        expected: Option<i64>,
    ) -> Result<VersionView, ApiError> {
        let app = caller.require_app(Capability::AppWriteKv)?;
        let Ok((collection, key)) = names(collection.clone(), key.clone()) else {
            return Err(key_not_found(&collection, &key));
        };
        let cx = self.event_context(app, caller);
        let mut tx = self.store.begin().await?;
        match events::kv_delete(&self.store, &mut tx, &cx, &collection, &key, expected).await? {
            Some((deleted, fired)) => {
                events::commit_and_wake_for(&self.store, tx, &fired).await?;
                Ok(VersionView { version: deleted.version })
            }
            None => Err(key_not_found(collection.as_str(), key.as_str())),
        }
    }

    /// A page of a collection's keys starting with `prefix`, by key.
    pub async fn kv_list(
        &self,
        caller: &Caller,
        collection: &str,
        prefix: &str,
        page: &PageQuery,
    ) -> Result<Page<KvKeyView>, ApiError> {
        let app = caller.require_app(Capability::AppReadKv)?;
        let after = page.after()?;
        let found = self.store.kv_list(app.id, collection, prefix, after.as_deref(), page.limit()).await?;
        Ok(Page::from_store(
            found,
            |e| e.key.to_string(),
            |e| KvKeyView {
                key: e.key.into_string(),
                version: e.version,
                updated_at: picloud_core::protocol::rfc3339_millis(e.updated_at),
            },
        ))
    }
}
