//! The `picloud-router` binary: configuration, telemetry and wiring only; the work lives in the
//! library crates.

use anyhow::Context as _;
use clap::{Parser, Subcommand};

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
}

/// The database URL from `PICLOUD_DATABASE_URL`, else `DATABASE_URL`.
fn database_url() -> anyhow::Result<String> {
    std::env::var("PICLOUD_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .context("PICLOUD_DATABASE_URL (or DATABASE_URL) must be set to a postgres:// URL")
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
            let url = database_url()?;
            let store = picloud_store::PgStore::connect(&url, 2).await.context("connecting to Postgres")?;
            picloud_store::pg::migrate(store.pool()).await.context("applying migrations")?;
            tracing::info!("database schema is up to date");
        }
    }
    Ok(())
}
