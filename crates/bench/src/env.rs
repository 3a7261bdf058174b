//! The servers a run uses, and one fresh database with the benchmark's app and trigger.

use std::time::Duration;

use anyhow::Context as _;
use picloud_api::views::{CreateToken, RegisterTrigger};
use picloud_api::{Caller, Ops};
use picloud_core::net::AllowNets;
use picloud_core::{PrincipalId, TriggerConfig};
use picloud_dispatch::{NodeConfig, RelayConfig};
use picloud_store::{App, AuthRepo as _, PgStore, Trigger, TriggerRepo as _, pg};
use picloud_testkit::{NatsServer, PgOptions, PgServer};
use serde_json::json;

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
        let ops = Ops::new(store, TriggerConfig::default(), AllowNets::default());
        let (app, admin, token) = tenant(&ops, "bench").await?;
        let handler = json!({"function": HANDLER});
        let call = json!({"name": "call", "kind": "http", "handler": handler});
        let flowed = json!({"name": "flowed", "kind": "kv", "collection": FLOWED_COLLECTION, "ops": ["put"],
                            "handler": handler});
        for trigger in [call, bench_trigger(), flowed] {
            ops.register_trigger(&admin, serde_json::from_value::<RegisterTrigger>(trigger)?).await?;
        }
        let trigger = ops.store().trigger(app.id, "bench").await?.context("the bench trigger is gone")?;
        let flowed = ops.store().trigger(app.id, "flowed").await?.context("the flowed trigger is gone")?;
        let store = ops.store().clone();
        Ok(Bench { url, store, app, trigger, flowed, token })
    }
}

/// App `slug` with its admin `<slug>-admin`: the app, the admin as the caller that registers
/// triggers (they run as the admin, as if registered over HTTP), and an admin token.
async fn tenant(ops: &Ops, slug: &str) -> anyhow::Result<(App, Caller, String)> {
    ops.create_app(&Caller::operator(None), slug.to_owned()).await?;
    let app = ops.store().app_by_slug(slug).await?.context("the app is gone")?;
    let operator = Caller::operator(Some(app.clone()));
    let admin = ops.create_principal(&operator, &format!("{slug}-admin"), false).await?;
    ops.set_member(&operator, &admin.id.to_string(), "admin").await?;
    let mint = CreateToken { principal_id: Some(admin.id), app: None, scopes: None, expires_in_s: None };
    let token = ops.mint_token(&operator, &mint).await?.token;
    let admin =
        ops.store().principal(PrincipalId::from_uuid(admin.id)).await?.context("the admin is gone")?;
    Ok((app.clone(), Caller::operator_as(admin, Some(app)), token))
}

/// The `bench` trigger: KV puts to the `bench*` collections, to the benchmark's handler.
fn bench_trigger() -> serde_json::Value {
    json!({"name": "bench", "kind": "kv", "collection": "bench*", "ops": ["put"], "handler": {"function": HANDLER}})
}

/// The collection of the flowed trigger: no other scenario writes to it.
pub const FLOWED_COLLECTION: &str = "flowed";

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
    /// The trigger on [`FLOWED_COLLECTION`], with the flow a scenario gives it
    /// ([`Bench::set_flow`]).
    pub flowed: Trigger,
    /// An admin token of the app, for the HTTP API.
    pub token: String,
}

impl Bench {
    /// Gives the flowed trigger `flow`.
    pub async fn set_flow(&mut self, flow: picloud_core::Flow) -> anyhow::Result<()> {
        let patch = picloud_store::TriggerPatch { flow: Some(Some(flow)), ..Default::default() };
        self.flowed = self.store.update_trigger(self.app.id, "flowed", &patch).await?;
        Ok(())
    }

    /// Gives the flowed trigger `batch`.
    pub async fn set_batch(&mut self, batch: picloud_core::Batch) -> anyhow::Result<()> {
        let patch = picloud_store::TriggerPatch { batch: Some(Some(batch)), ..Default::default() };
        self.flowed = self.store.update_trigger(self.app.id, "flowed", &patch).await?;
        Ok(())
    }

    /// Another app, `slug`, with an admin and the `bench` trigger, registered as the `bench`
    /// app's is.
    pub async fn other_app(&self, slug: &str) -> anyhow::Result<(App, Trigger)> {
        let Tenant { app, mut triggers, .. } = self.app_with(slug, &[bench_trigger()]).await?;
        Ok((app, triggers.remove(0)))
    }

    /// Another app, `slug`, with an admin and an admin token, and `triggers` (registration
    /// bodies) registered by the admin, as over HTTP.
    pub async fn app_with(&self, slug: &str, triggers: &[serde_json::Value]) -> anyhow::Result<Tenant> {
        let ops = Ops::new(self.store.clone(), TriggerConfig::default(), AllowNets::default());
        let (app, admin, token) = tenant(&ops, slug).await?;
        let mut registered = Vec::with_capacity(triggers.len());
        for trigger in triggers {
            let body = serde_json::from_value::<RegisterTrigger>(trigger.clone())?;
            let name = ops.register_trigger(&admin, body).await?.name;
            registered.push(self.store.trigger(app.id, &name).await?.context("a trigger is gone")?);
        }
        Ok(Tenant { app, token, triggers: registered })
    }

    /// `VACUUM ANALYZE; CHECKPOINT;`
    pub async fn settle(&self) -> anyhow::Result<()> {
        Ok(self.store.settle().await?)
    }

    pub async fn outbox_len(&self) -> anyhow::Result<i64> {
        Ok(self.store.outbox_len().await?)
    }
}

/// An app beside the `bench` app ([`Bench::app_with`]).
pub struct Tenant {
    pub app: App,
    /// An admin token of the app, for the HTTP API.
    pub token: String,
    /// Its triggers, in the order they were registered.
    pub triggers: Vec<Trigger>,
}

/// The name of handler function `j` of a scenario whose triggers each deliver to a handler of
/// their own.
pub fn handler(j: usize) -> String {
    format!("h{j}")
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
