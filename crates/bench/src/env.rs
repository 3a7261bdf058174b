//! The servers a run uses, and one fresh database with the benchmark's app and trigger.

use std::time::Duration;

use anyhow::Context as _;
use picloud_core::token::{generate_api_token, hash_api_token};
use picloud_core::{AppSlug, CollectionPattern, HandlerName, RetryOverrides, Role, TriggerName};
use picloud_dispatch::{NodeConfig, RelayConfig};
use picloud_store::{
    App, AuthRepo, Handler, KvOp, NewApiToken, NewTrigger, PgStore, Trigger, TriggerRepo, TriggerSpec, pg,
};
use picloud_testkit::{NatsServer, PgOptions, PgServer};
use uuid::Uuid;

/// The app's handler.
pub const HANDLER: &str = "bench";
/// The secret delivery tokens are signed with.
pub const SECRET: &[u8] = b"picloud-bench-token-secret";

/// Postgres and NATS: given, or throwaway ones owned here.
pub struct Servers {
    server_url: String,
    pub nats_url: String,
    _pg: Option<PgServer>,
    _nats: Option<NatsServer>,
    next_db: std::sync::atomic::AtomicUsize,
}

impl Servers {
    pub async fn start(database_url: Option<String>, nats_url: Option<String>) -> anyhow::Result<Servers> {
        let (server_url, pg) = match database_url {
            Some(url) => (url, None),
            None => {
                let pg = PgServer::start(PgOptions { durable: true, ..PgOptions::default() })
                    .await
                    .context("starting a throwaway PostgreSQL")?;
                (pg.url("postgres"), Some(pg))
            }
        };
        let (nats_url, nats) = match nats_url {
            Some(url) => (url, None),
            None => {
                let nats = NatsServer::start().await.context("starting a throwaway nats-server")?;
                (nats.url(), Some(nats))
            }
        };
        Ok(Servers { server_url, nats_url, _pg: pg, _nats: nats, next_db: Default::default() })
    }

    /// A fresh database, migrated, with app `bench`, its admin and a `kv` trigger on `bench*`;
    /// the previous repetition's database is dropped first.
    pub async fn fresh(&self) -> anyhow::Result<Bench> {
        let n = self.next_db.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = |n: usize| format!("picloud_bench_{}_{n}", std::process::id());
        let admin = PgStore::connect(&self.server_url, 1).await?;
        if n > 0 {
            admin.drop_database_if_exists(&name(n - 1)).await?;
        }
        let name = name(n);
        admin.create_database_if_missing(&name).await?;
        let url = replace_database(&self.server_url, &name);
        let store = PgStore::connect(&url, 20).await?;
        pg::migrate(store.pool()).await?;
        let app = store.create_app(&AppSlug::parse("bench")?).await?;
        let principal = store.create_principal("bench-admin", false).await?;
        store.set_role(app.id, principal.id, Role::Admin).await?;
        let call = NewTrigger {
            id: Uuid::now_v7(),
            app_id: app.id,
            name: TriggerName::parse("call")?,
            spec: TriggerSpec::Http,
            handler: Handler::Function(HandlerName::parse(HANDLER)?),
            retry: RetryOverrides::default(),
            enabled: true,
            registered_by: principal.id,
        };
        store.create_trigger(&call).await?;
        let token = generate_api_token();
        store
            .create_token(&NewApiToken {
                id: Uuid::now_v7(),
                principal_id: principal.id,
                token_hash: hash_api_token(&token),
                app_id: None,
                scopes: None,
                expires_at: None,
            })
            .await?;
        let trigger = store
            .create_trigger(&NewTrigger {
                id: Uuid::now_v7(),
                app_id: app.id,
                name: TriggerName::parse("bench")?,
                spec: TriggerSpec::Kv {
                    collection: CollectionPattern::parse("bench*")?,
                    ops: vec![KvOp::Put],
                },
                handler: Handler::Function(HandlerName::parse(HANDLER)?),
                retry: RetryOverrides::default(),
                enabled: true,
                registered_by: principal.id,
            })
            .await?;
        Ok(Bench { url, store, app, trigger, token })
    }
}

/// `url` with its database name replaced.
fn replace_database(url: &str, database: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let base = match base.rfind('/') {
        Some(i) if base[..i].contains("://") && base[..i].ends_with(|c: char| c != '/') => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{base}/{database}?{q}"),
        None => format!("{base}/{database}"),
    }
}

/// One fresh database of one repetition.
pub struct Bench {
    pub url: String,
    pub store: PgStore,
    pub app: App,
    pub trigger: Trigger,
    /// An admin token of the app, for the HTTP API.
    pub token: String,
}

impl Bench {
    /// `VACUUM ANALYZE; CHECKPOINT;`
    pub async fn settle(&self) -> anyhow::Result<()> {
        sqlx::query("VACUUM ANALYZE").execute(self.store.pool()).await?;
        sqlx::query("CHECKPOINT").execute(self.store.pool()).await?;
        Ok(())
    }

    pub async fn outbox_len(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(self.store.pool()).await?)
    }
}

/// The relay as the benchmark runs it: the defaults.
pub fn relay_config() -> RelayConfig {
    let mut config = RelayConfig::new(NodeConfig::new("bench-relay", SECRET));
    config.poll_interval = Duration::from_millis(250);
    config
}

/// `CLOCK_MONOTONIC` in microseconds: the same clock in every process on the host.
pub fn monotonic_us() -> i64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec * 1_000_000 + t.tv_nsec / 1_000
}

/// The ~100-byte payload of WORKLOAD.md.
pub fn payload(id: u64, t_us: i64) -> serde_json::Value {
    serde_json::json!({"id": id, "kind": "noop", "t_us": t_us, "pad": "x".repeat(38)})
}

#[cfg(test)]
mod tests {
    use super::replace_database;

    #[test]
    fn the_database_name_of_a_url_is_replaced() {
        assert_eq!(replace_database("postgres://u@h:5/postgres", "b"), "postgres://u@h:5/b");
        assert_eq!(
            replace_database("postgres://u@h:5/postgres?sslmode=disable", "b"),
            "postgres://u@h:5/b?sslmode=disable"
        );
        assert_eq!(replace_database("postgres://u@h:5", "b"), "postgres://u@h:5/b");
    }
}
