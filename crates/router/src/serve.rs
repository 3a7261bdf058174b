//! `serve`: every part of a node — HTTP API, NATS ingest, relay, cron scheduler, built-in
//! executors, janitor and metrics — from one configuration, until SIGTERM or Ctrl-C; and what a
//! node refuses to start with (development secrets, a NATS server whose `max_payload` cannot
//! carry its largest envelope).

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use picloud_api::{ApiConfig, ApiState, Ingest};
use picloud_core::config::parse_var;
use picloud_core::protocol::largest_envelope_bytes;
use picloud_dispatch::{
    ExecutorConfig, Janitor, JanitorConfig, Metrics, NatsConfig, NodeConfig, Relay, RelayConfig, Scheduler,
    SchedulerConfig,
};
use picloud_store::PgStore;
use picloud_worker::Shutdown;

/// The `PICLOUD_TOKEN_SECRET` that `compose.yaml` once gave every deployment by default: public,
/// so never a node's key.
const DEVELOPMENT_TOKEN_SECRETS: [&str; 1] = ["dev-only-token-secret-change-me-0123456789"];

/// How often a node that cannot reach NATS at start-up says that it waits.
const NATS_WAIT_LOG_INTERVAL: Duration = Duration::from_secs(10);

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

/// The node's NATS connection, once the server answered and carries envelopes of bodies up to
/// `max_payload_bytes`.
async fn connect_nats(
    nats_config: &NatsConfig,
    node_id: &str,
    max_payload_bytes: usize,
) -> anyhow::Result<async_nats::Client> {
    let nats = nats_config
        .connect(&format!("picloud-router {node_id}"))
        .await
        .with_context(|| format!("connecting to NATS at {}", nats_config.url))?;
    let server = reach_nats(&nats, &nats_config.url).await?;
    check_max_payload(max_payload_bytes, &server)?;
    Ok(nats)
}

/// The store of the API and the background parts, its schema migrated first when
/// `run_migrations`: refused when the database lacks a migration of this version.
async fn connect_migrated(url: &str, run_migrations: bool) -> anyhow::Result<PgStore> {
    let store = PgStore::connect(url, 20).await.context("connecting to Postgres")?;
    if run_migrations {
        migrate(&store).await?;
    }
    let pending =
        picloud_store::pg::pending_migrations(store.pool()).await.context("reading the schema's version")?;
    anyhow::ensure!(
        pending.is_empty(),
        "the database lacks migrations {pending:?} of this version: run `picloud-router migrate` (or `serve --migrate`) first"
    );
    Ok(store)
}

/// Applies the migrations.
pub async fn migrate(store: &PgStore) -> anyhow::Result<()> {
    picloud_store::pg::migrate(store.pool()).await.context("applying migrations")?;
    tracing::info!("database schema is up to date");
    Ok(())
}

/// Which secrets a node accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    /// Only the operator's own: the development values published with picloud-router
    /// (`nats/dev.env`, the former default `PICLOUD_TOKEN_SECRET` of `compose.yaml`) are refused.
    Own,
    /// The development values too: only `dev` passes this, for the servers it starts itself.
    Development,
}

/// Refuses a `PICLOUD_TOKEN_SECRET` or `PICLOUD_NATS_PASSWORD` that anyone can read in this
/// repository, saying what to set instead.
fn refuse_development_secrets(lookup: Lookup<'_>) -> anyhow::Result<()> {
    if lookup("PICLOUD_TOKEN_SECRET")
        .is_some_and(|secret| DEVELOPMENT_TOKEN_SECRETS.contains(&secret.as_str()))
    {
        anyhow::bail!(
            "PICLOUD_TOKEN_SECRET is a development value published with picloud-router: set a secret of \
             your own, the same on every node (e.g. `openssl rand -base64 32`)"
        );
    }
    let password = lookup("PICLOUD_NATS_PASSWORD");
    if password.is_some_and(|password| picloud_local::nats_dev_env().values().any(|dev| *dev == password)) {
        anyhow::bail!(
            "PICLOUD_NATS_PASSWORD is a development password of nats/dev.env: give the router's NATS user \
             a password of your own (e.g. `openssl rand -hex 32`), as PICLOUD_NATS_PASSWORD here and as \
             PICLOUD_NATS_ROUTER_PASSWORD in the nats-servers' environment"
        );
    }
    Ok(())
}

/// The parsed configuration of a node: every variable is checked before anything starts.
pub struct Node {
    api: ApiConfig,
    relay: RelayConfig,
    nats: NatsConfig,
    executors: ExecutorConfig,
    database_url: String,
    /// `PICLOUD_METRICS_INTERVAL_MS`: how often the node reads the database gauges of `/metrics`.
    metrics_interval: Duration,
    /// `PICLOUD_SHUTDOWN_TIMEOUT_MS`: how long everything after the stop signal may take.
    shutdown_timeout: Duration,
    /// `PICLOUD_CONSOLE`: whether the node serves the console at `/console` (DESIGN §15).
    console: bool,
}

impl Node {
    /// Reads and checks every variable of DESIGN §10, and refuses development secrets unless
    /// `secrets` allows them.
    pub fn from_lookup(lookup: Lookup<'_>, secrets: Secrets) -> anyhow::Result<Node> {
        if secrets == Secrets::Own {
            refuse_development_secrets(lookup)?;
        }
        let ms = |variable, default: u64, min: u64, max: u64| {
            parse_var(lookup, variable, default, &format!("milliseconds from {min} to {max}"), |v| {
                (min..=max).contains(v)
            })
            .map(Duration::from_millis)
        };
        // Parsed once: every part of the node takes what it needs of it.
        let node = NodeConfig::from_env(lookup, &default_node_id())?;
        let executors = ExecutorConfig::from_env(lookup, &node)?;
        Ok(Node {
            api: ApiConfig::from_env(lookup, node.clone(), &executors)?,
            relay: RelayConfig::from_env(lookup, node)?,
            nats: NatsConfig::from_env(lookup)?,
            executors,
            database_url: database_url(lookup)?,
            metrics_interval: ms("PICLOUD_METRICS_INTERVAL_MS", 15_000, 1_000, 3_600_000)?,
            shutdown_timeout: ms("PICLOUD_SHUTDOWN_TIMEOUT_MS", 110_000, 1_000, 3_600_000)?,
            console: parse_var(lookup, "PICLOUD_CONSOLE", "on".to_owned(), "on or off", |v| {
                v == "on" || v == "off"
            })? == "on",
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
        let Node {
            api: mut config,
            relay: relay_config,
            nats: nats_config,
            executors,
            database_url: url,
            metrics_interval,
            shutdown_timeout,
            console,
        } = self;
        let metrics =
            Metrics::install().map_err(|e| anyhow::anyhow!("installing the metrics recorder: {e}"))?;
        config.metrics = Some(metrics.clone());
        let store = connect_migrated(&url, run_migrations).await?;
        let relay_store = PgStore::connect_relay(&url, 10).await.context("connecting to Postgres")?;
        let node_id = config.node.node_id.clone();
        let nats = connect_nats(&nats_config, &node_id, config.max_payload_bytes).await?;
        let listener = tokio::net::TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("listening on {} (PICLOUD_HTTP_ADDR)", config.http_addr))?;
        let addr = listener.local_addr()?;
        // One signal for every part, sent when the node stops; the executors get their own, sent
        // once the relay no longer waits on their answers.
        let (stop, node_shutdown) = Shutdown::new();
        let (stop_executors, executors_shutdown) = Shutdown::new();
        let state = ApiState::new(store.clone(), nats.clone(), config.clone());
        let ingest = Ingest::start(state.clone(), node_shutdown.clone()).await?;
        let executors =
            picloud_dispatch::executors::start(store.clone(), nats.clone(), executors, executors_shutdown)
                .await?;
        let mut parts = Parts::default();
        // The rows this node's writes name go to its own relay, without the `NOTIFY` hop.
        let relay = Relay::new(relay_store, nats.clone(), relay_config)
            .taking_written(store.hand_written())
            .run(node_shutdown.clone());
        parts.spawn("relay", async { relay.await.map_err(Into::into) });
        let scheduler =
            Scheduler::new(store.clone(), SchedulerConfig::new(node_id.clone(), &config.node.triggers))
                .run(node_shutdown.clone());
        parts.spawn("cron scheduler", async {
            scheduler.await;
            Ok(())
        });
        let janitor = Janitor::new(store.clone(), JanitorConfig::new(node_id.clone(), &config.node.triggers))
            .run(node_shutdown.clone());
        parts.spawn("janitor", async {
            janitor.await;
            Ok(())
        });
        let gauges = metrics.refresh_gauges_every(store.clone(), metrics_interval, node_shutdown.clone());
        parts.spawn("database gauges", async {
            gauges.await;
            Ok(())
        });
        let mut app = picloud_api::router(state.clone());
        if console {
            app = app.merge(picloud_console::router(state.clone()));
        }
        let http = picloud_api::serve(listener, app, state, node_shutdown);
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
        stop.send();
        let steps = Steps::new(&["ingest", "built-in executors", "final NATS flush"]);
        let teardown = async {
            // Stopping the ingest with the HTTP API: a node that is leaving takes no new NATS work.
            let (rest, ()) = tokio::join!(parts.all(), steps.run("ingest", ingest.finished()));
            failed.extend(rest);
            stop_executors.send();
            steps.run("built-in executors", executors.finished()).await;
            steps.run("final NATS flush", nats.flush()).await.ok();
        };
        if tokio::time::timeout(shutdown_timeout, teardown).await.is_err() {
            let unfinished: Vec<&str> = parts.running().chain(steps.left()).collect();
            for step in &unfinished {
                tracing::error!(step, timeout = ?shutdown_timeout, "did not finish before PICLOUD_SHUTDOWN_TIMEOUT_MS");
            }
            failed.insert(
                0,
                anyhow::anyhow!(
                    "stopping took longer than PICLOUD_SHUTDOWN_TIMEOUT_MS ({} ms): {} did not finish",
                    shutdown_timeout.as_millis(),
                    unfinished.join(", ")
                ),
            );
        }
        match failed.into_iter().next() {
            None => {
                tracing::info!("stopped");
                Ok(())
            }
            Some(e) => Err(e),
        }
    }
}

/// Waits until the client has been answered by a server (so it holds the server's `INFO`),
/// saying so while NATS cannot be reached, and returns that `INFO`.
async fn reach_nats(nats: &async_nats::Client, url: &str) -> anyhow::Result<async_nats::ServerInfo> {
    let answered = nats.flush();
    tokio::pin!(answered);
    loop {
        match tokio::time::timeout(NATS_WAIT_LOG_INTERVAL, &mut answered).await {
            Ok(answered) => break answered.with_context(|| format!("reaching NATS at {url}"))?,
            Err(_) => tracing::warn!(%url, "waiting for NATS (PICLOUD_NATS_URL)"),
        }
    }
    nats.try_server_info().with_context(|| format!("NATS at {url} answered without its INFO"))
}

/// Refuses a NATS server that could not carry the largest envelope a node publishes when bodies
/// are capped at `max_payload_bytes`: such events would be accepted and then never delivered.
fn check_max_payload(max_payload_bytes: usize, server: &async_nats::ServerInfo) -> anyhow::Result<()> {
    let largest = largest_envelope_bytes(max_payload_bytes);
    anyhow::ensure!(
        largest <= server.max_payload,
        "PICLOUD_MAX_PAYLOAD_BYTES={max_payload_bytes} lets an event envelope reach {largest} bytes, but \
         the NATS server {} accepts messages of at most {} bytes (its max_payload): raise max_payload in \
         the nats-server config (the shipped configs set 3MB) or lower PICLOUD_MAX_PAYLOAD_BYTES",
        server.server_name,
        server.max_payload,
    );
    Ok(())
}

/// The steps of a teardown that are not parts, by name: each leaves the list when it finishes,
/// so what is left when the deadline passes is what did not finish.
struct Steps {
    left: Mutex<Vec<&'static str>>,
}

impl Steps {
    fn new(names: &[&'static str]) -> Steps {
        Steps { left: Mutex::new(names.to_vec()) }
    }

    async fn run<T>(&self, name: &'static str, step: impl Future<Output = T>) -> T {
        let done = step.await;
        self.left.lock().unwrap_or_else(PoisonError::into_inner).retain(|left| *left != name);
        done
    }

    fn left(&self) -> impl Iterator<Item = &'static str> {
        self.left.lock().unwrap_or_else(PoisonError::into_inner).clone().into_iter()
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
            Some(Ok((id, Ok(())))) => anyhow::anyhow!("the {} stopped by itself", self.ended(id)),
            Some(ended) => self.failure(ended).expect("a part that did not end well failed"),
        }
    }

    /// Waits for every part, and returns the errors of those that failed.
    async fn all(&mut self) -> Vec<anyhow::Error> {
        let mut failed = Vec::new();
        while let Some(ended) = self.running.join_next_with_id().await {
            if let Some(error) = self.failure(ended) {
                tracing::error!(error = %format!("{error:#}"), "stopping the node");
                failed.push(error);
            }
        }
        failed
    }

    /// The parts that have not ended.
    fn running(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.names.values().copied()
    }

    fn failure(
        &mut self,
        ended: Result<(tokio::task::Id, anyhow::Result<()>), tokio::task::JoinError>,
    ) -> Option<anyhow::Error> {
        match ended {
            Ok((id, Ok(()))) => {
                self.ended(id);
                None
            }
            Ok((id, Err(e))) => Some(e.context(format!("the {} failed", self.ended(id)))),
            Err(e) => Some(anyhow::anyhow!("the {} panicked: {e}", self.ended(e.id()))),
        }
    }

    /// The name of a part that ended, which is no longer running.
    fn ended(&mut self, id: tokio::task::Id) -> &'static str {
        self.names.remove(&id).unwrap_or("node part")
    }
}
