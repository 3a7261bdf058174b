//! KV entries in memory, and the KV put that fires its triggers.

use super::*;

fn kv_entry(collection: &str, key: &str, row: &KvRow) -> Result<KvEntry> {
    let corrupt = |e: picloud_core::NameError| Error::Corrupt { table: "kv_entries", detail: e.to_string() };
    Ok(KvEntry {
        collection: picloud_core::CollectionName::parse(collection).map_err(corrupt)?,
        key: picloud_core::KvKey::parse(key).map_err(corrupt)?,
        value: row.value.clone(),
        version: row.version,
        updated_at: row.updated_at,
    })
}

impl MemStore {
    /// [`KvRepo::kv_put_firing`] inside a transaction.
    async fn put_firing(
        &self,
        tx: &mut MemTx,
        put: &FiringPut<'_>,
    ) -> Result<Option<(KvPutResult, Vec<Uuid>)>> {
        if put.authorized_at.is_some_and(|epoch| epoch != tx.state.config_epoch) {
            return Err(Error::Stale);
        }
        let triggers = self.list_matching_kv(tx, put.app_id, put.collection, KvOp::Put).await?;
        if triggers.iter().any(|t| t.flow.is_some()) {
            return Ok(None);
        }
        let result = self.kv_put(tx, put.app_id, put.collection, put.key, put.value, None).await?;
        let data = kv_event_data(
            put.collection,
            put.key,
            KvOp::Put,
            Some(put.value),
            result.previous.as_ref(),
            result.version,
        );
        if !triggers.is_empty() && data.get().len() > put.max_data_bytes {
            return Err(Error::TooLarge { max: put.max_data_bytes });
        }
        let event = Event {
            kind: EventKind::Kv,
            event_type: picloud_core::protocol::event_type::KV_PUT,
            source: put.source.to_owned(),
            subject: Some(put.key),
            payload: &data,
            depth: put.depth,
            ordering_key: Some(put.ordering_key),
        };
        let rows: Vec<NewDelivery> = triggers
            .iter()
            .map(|t| {
                event.delivery(
                    put.app_id,
                    Some(t.id),
                    t.retry.max_attempts.unwrap_or(put.default_max_attempts),
                )
            })
            .collect();
        let written = self.insert_deliveries(tx, &rows).await?;
        Ok(Some((result, written)))
    }
}

impl KvRepo for MemStore {
    async fn kv_get(&self, app_id: AppId, collection: &str, key: &str) -> Result<Option<KvEntry>> {
        let s = self.lock().await;
        s.kv.get(&(app_id, collection.to_owned(), key.to_owned()))
            .map(|r| kv_entry(collection, key, r))
            .transpose()
    }

    async fn kv_put(
        &self,
        tx: &mut MemTx,
        app_id: AppId,
        collection: &str,
        key: &str,
        value: &serde_json::Value,
        expected: Option<i64>,
    ) -> Result<KvPutResult> {
        let now = self.now();
        let slot = (app_id, collection.to_owned(), key.to_owned());
        let current = tx.state.kv.get(&slot);
        if let Some(expected) = expected
            && current.map(|r| r.version) != Some(expected)
        {
            return Err(Error::VersionMismatch { expected, current: current.map(|r| r.version) });
        }
        let previous = current.map(|r| r.value.clone());
        let version = current.map_or(1, |r| r.version + 1);
        tx.state.kv.insert(slot, KvRow { value: value.clone(), version, updated_at: now });
        Ok(KvPutResult { version, previous })
    }

    async fn kv_put_firing(
        &self,
        tx: Option<&mut MemTx>,
        put: &FiringPut<'_>,
    ) -> Result<Option<(KvPutResult, Vec<Uuid>)>> {
        match tx {
            Some(tx) => self.put_firing(tx, put).await,
            None => {
                let mut tx = self.begin().await?;
                let done = self.put_firing(&mut tx, put).await?;
                self.commit(tx).await?;
                Ok(done)
            }
        }
    }

    async fn kv_delete(
        &self,
        tx: &mut MemTx,
        app_id: AppId,
        collection: &str,
        key: &str,
        expected: Option<i64>,
    ) -> Result<Option<KvEntry>> {
        let slot = (app_id, collection.to_owned(), key.to_owned());
        let Some(current) = tx.state.kv.get(&slot) else { return Ok(None) };
        if let Some(expected) = expected
            && current.version != expected
        {
            return Err(Error::VersionMismatch { expected, current: Some(current.version) });
        }
        let removed = tx.state.kv.remove(&slot).expect("row just read");
        kv_entry(collection, key, &removed).map(Some)
    }

    async fn kv_list(
        &self,
        app_id: AppId,
        collection: &str,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Page<KvKeyInfo>> {
        let s = self.lock().await;
        let found =
            s.kv.iter()
                .filter(|((app, c, k), _)| {
                    *app == app_id
                        && c == collection
                        && k.starts_with(prefix)
                        && after.is_none_or(|a| k.as_str() > a)
                })
                .take(limit as usize + 1)
                .map(|((_, c, k), r)| {
                    kv_entry(c, k, r).map(|e| KvKeyInfo {
                        key: e.key,
                        version: e.version,
                        updated_at: e.updated_at,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
        Ok(Page::of(found, limit))
    }
}
