//! `serve`: every part of a node — HTTP API, NATS ingest, relay, cron scheduler, built-in
//! executors, janitor and metrics — from one configuration, until SIGTERM or Ctrl-C.

use anyhow::Context as _;
use picloud_api::{ApiConfig, ApiState, Ingest};
use picloud_dispatch::{
    ExecutorConfig, Janitor, JanitorConfig, Metrics, NatsConfig, Relay, Scheduler, SchedulerConfig,
};
use picloud_store::PgStore;

/// A configuration lookup: the process environment, or `dev`'s values over it.
pub type Lookup<'a> = &'a (dyn Fn(&str) -> Option<String> + Sync);

/// The process environment.
pub fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The database URL from `PICLOUD_DATABASE_URL`, else `DATABASE_URL`.
pub fn database_url(lookup: Lookup<'_>) -> anyhow::Result<String> {
    lookup("PICLOUD_DATABASE_URL")
        .or_else(|| lookup("DATABASE_URL"))
        .context("PICLOUD_DATABASE_URL (or DATABASE_URL) must be set to a postgres:// URL")
}

/// `hostname-pid`, the default `PICLOUD_NODE_ID`.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| env("HOSTNAME"))
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into());
    format!("{host}-{}", std::process::id())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested");
}

/// Applies the migrations.
pub async fn migrate(store: &PgStore) -> anyhow::Result<()> {
    picloud_store::pg::migrate(store.pool()).await.context("applying migrations")?;
    tracing::info!("database schema is up to date");
    Ok(())
}

/// The parsed configuration of a node: every variable is checked before anything starts.
pub struct Node {
    api: ApiConfig,
    nats: NatsConfig,
    executors: ExecutorConfig,
    database_url: String,
}

impl Node {
    /// Reads and checks every variable of DESIGN §10.
    pub fn from_lookup(lookup: Lookup<'_>) -> anyhow::Result<Node> {
        Ok(Node {
            api: ApiConfig::from_env(lookup, &default_node_id())?,
            nats: NatsConfig::from_env(lookup)?,
            executors: ExecutorConfig::from_env(lookup)?,
            database_url: database_url(lookup)?,
        })
    }

    /// Runs the node until `shutdown` resolves, then stops taking work, finishes what it holds
    /// and returns. `ready` is called with the HTTP address once every part serves.
    pub async fn run(
        self,
        run_migrations: bool,
        shutdown: impl Future<Output = ()>,
        ready: impl FnOnce(std::net::SocketAddr),
    ) -> anyhow::Result<()> {
        let Node { api: mut config, nats: nats_config, executors, database_url: url } = self;
        config.metrics =
            Some(Metrics::install().map_err(|e| anyhow::anyhow!("installing the metrics recorder: {e}"))?);
        let store = PgStore::connect(&url, 20).await.context("connecting to Postgres")?;
        if run_migrations {
            migrate(&store).await?;
        }
        let pending = picloud_store::pg::pending_migrations(store.pool())
            .await
            .context("reading the schema's version")?;
        anyhow::ensure!(
            pending.is_empty(),
            "the database lacks migrations {pending:?} of this version: run `picloud-router migrate` (or `serve --migrate`) first"
        );
        let relay_store = PgStore::connect_relay(&url, 10).await.context("connecting to Postgres")?;
        let node_id = config.node.node_id.clone();
        let nats = nats_config
            .connect(&format!("picloud-router {node_id}"))
            .await
            .with_context(|| format!("connecting to NATS at {}", nats_config.url))?;
        let listener = tokio::net::TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("listening on {} (PICLOUD_HTTP_ADDR)", config.http_addr))?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let on_stop = || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            }
        };
        let state = ApiState::new(store.clone(), nats.clone(), config.clone());
        let ingest = Ingest::start(state.clone()).await?;
        let executors = picloud_dispatch::executors::start(store.clone(), nats.clone(), executors).await?;
        let mut parts = Parts::default();
        let relay = Relay::new(relay_store, nats.clone(), config.node.clone()).run(on_stop());
        parts.spawn("relay", async { relay.await.map_err(Into::into) });
        let scheduler =
            Scheduler::new(store.clone(), SchedulerConfig::new(node_id.clone(), &config.node.triggers))
                .run(on_stop());
        parts.spawn("cron scheduler", async {
            scheduler.await;
            Ok(())
        });
        let janitor = Janitor::new(store.clone(), JanitorConfig::new(node_id.clone(), &config.node.triggers))
            .run(on_stop());
        parts.spawn("janitor", async {
            janitor.await;
            Ok(())
        });
        let http = picloud_api::serve(listener, state, on_stop());
        parts.spawn("HTTP API", async { http.await.context("serving HTTP") });
        tracing::info!(node = %node_id, %addr, "serving");
        ready(addr);
        let mut failed = tokio::select! {
            _ = shutdown => Vec::new(),
            ended = parts.first_to_end() => {
                tracing::error!(error = %format!("{ended:#}"), "stopping the node");
                vec![ended]
            }
        };
        let _ = stop.send(true);
        // Stopping the ingest with the HTTP API: a node that is leaving takes no new NATS work.
        let (rest, ()) = tokio::join!(parts.all(), ingest.shutdown());
        failed.extend(rest);
        executors.shutdown().await;
        nats.flush().await.ok();
        match failed.into_iter().next() {
            None => {
                tracing::info!("stopped");
                Ok(())
            }
            Some(e) => Err(e),
        }
    }
}

/// The long-running parts of a node. Each runs until the node stops; one that ends before that
/// has failed, and takes the node down with it.
#[derive(Default)]
struct Parts {
    running: tokio::task::JoinSet<anyhow::Result<()>>,
    names: std::collections::HashMap<tokio::task::Id, &'static str>,
}

impl Parts {
    fn spawn(&mut self, name: &'static str, part: impl Future<Output = anyhow::Result<()>> + Send + 'static) {
        let id = self.running.spawn(part).id();
        self.names.insert(id, name);
    }

    /// Waits for the first part to end: before the node is asked to stop, that is a failure.
    async fn first_to_end(&mut self) -> anyhow::Error {
        match self.running.join_next_with_id().await {
            None => anyhow::anyhow!("the node has no parts"),
            Some(Ok((id, Ok(())))) => anyhow::anyhow!("the {} stopped by itself", self.name(id)),
            Some(ended) => self.failure(ended).expect("a part that did not end well failed"),
        }
    }

    /// Waits for every part, and returns the errors of those that failed.
    async fn all(mut self) -> Vec<anyhow::Error> {
        let mut failed = Vec::new();
        while let Some(ended) = self.running.join_next_with_id().await {
            if let Some(error) = self.failure(ended) {
                tracing::error!(error = %format!("{error:#}"), "stopping the node");
                failed.push(error);
            }
        }
        failed
    }

    fn failure(
        &self,
        ended: Result<(tokio::task::Id, anyhow::Result<()>), tokio::task::JoinError>,
    ) -> Option<anyhow::Error> {
        match ended {
            Ok((_, Ok(()))) => None,
            Ok((id, Err(e))) => Some(e.context(format!("the {} failed", self.name(id)))),
            Err(e) => Some(anyhow::anyhow!("the {} panicked: {e}", self.name(e.id()))),
        }
    }

    fn name(&self, id: tokio::task::Id) -> &'static str {
        self.names.get(&id).copied().unwrap_or("node part")
    }
}
