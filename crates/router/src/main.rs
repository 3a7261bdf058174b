//! The `picloud-router` binary: configuration, telemetry and wiring only; the work lives in the
//! library crates.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use picloud_api::{ApiConfig, ApiState, Ingest};
use picloud_dispatch::{NatsConfig, Relay};
use picloud_store::PgStore;

/// picloud-router: a NATS-centric event router with a Postgres outbox.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply the database migrations (PICLOUD_DATABASE_URL or DATABASE_URL); safe to run again.
    Migrate,
    /// Run a node — HTTP API, NATS ingest and relay — configured from the PICLOUD_* environment.
    /// Stops cleanly on SIGTERM or Ctrl-C, finishing the requests and deliveries it holds.
    Serve {
        /// Apply pending migrations first.
        #[arg(long)]
        migrate: bool,
    },
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The database URL from `PICLOUD_DATABASE_URL`, else `DATABASE_URL`.
fn database_url() -> anyhow::Result<String> {
    env("PICLOUD_DATABASE_URL")
        .or_else(|| env("DATABASE_URL"))
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
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested");
}

async fn migrate(store: &PgStore) -> anyhow::Result<()> {
    picloud_store::pg::migrate(store.pool()).await.context("applying migrations")?;
    tracing::info!("database schema is up to date");
    Ok(())
}

async fn serve(run_migrations: bool) -> anyhow::Result<()> {
    let config = ApiConfig::from_env(env, &default_node_id())?;
    let nats_config = NatsConfig::from_env(env)?;
    let url = database_url()?;
    let store = PgStore::connect(&url, 20).await.context("connecting to Postgres")?;
    if run_migrations {
        migrate(&store).await?;
    }
    let relay_store = PgStore::connect_relay(&url, 10).await.context("connecting to Postgres")?;
    let node_id = config.node.node_id.clone();
    let nats = nats_config
        .connect(&format!("picloud-router {node_id}"))
        .await
        .with_context(|| format!("connecting to NATS at {}", nats_config.url))?;
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("listening on {} (PICLOUD_HTTP_ADDR)", config.http_addr))?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let on_stop = || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }
    };
    let state = ApiState { store, nats: nats.clone(), config: std::sync::Arc::new(config.clone()) };
    let ingest = Ingest::start(state.clone()).await?;
    let relay = tokio::spawn(Relay::new(relay_store, nats.clone(), config.node.clone()).run(on_stop()));
    let http = tokio::spawn(picloud_api::serve(listener, state, on_stop()));
    tracing::info!(node = %node_id, addr = %config.http_addr, "serving");
    shutdown_signal().await;
    let _ = stop.send(true);
    http.await?.context("serving HTTP")?;
    ingest.shutdown().await;
    relay.await??;
    nats.flush().await.ok();
    tracing::info!("stopped");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Migrate => {
            let store = PgStore::connect(&database_url()?, 2).await.context("connecting to Postgres")?;
            migrate(&store).await
        }
        Command::Serve { migrate } => serve(migrate).await,
    }
}
