//! The `picloud-router` binary: configuration, telemetry and wiring only; the work lives in the
//! library crates.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use picloud_store::PgStore;

mod admin;
mod dev;
mod serve;

/// picloud-router: a NATS-centric event router with a Postgres outbox.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run everything on this machine: a PostgreSQL and a nats-server under ./.picloud/ (their
    /// data kept between runs), an app `demo` with an admin token, and a node serving them.
    Dev(dev::DevArgs),
    /// Apply the database migrations (PICLOUD_DATABASE_URL or DATABASE_URL); safe to run again.
    Migrate,
    /// Run a node — HTTP API, NATS ingest, relay and built-in executors — configured from the
    /// PICLOUD_* environment. Stops cleanly on SIGTERM or Ctrl-C, finishing the requests and
    /// deliveries it holds.
    Serve {
        /// Apply pending migrations first.
        #[arg(long)]
        migrate: bool,
    },
    /// Administer principals, apps, members, tokens, triggers and dead letters directly in the
    /// database (PICLOUD_DATABASE_URL).
    #[command(subcommand)]
    Admin(admin::AdminCommand),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only for a terminal: a log redirected to a file stays plain text to grep.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Dev(args) => dev::run(args).await,
        Command::Migrate => {
            let url = serve::database_url(&serve::env)?;
            let store = PgStore::connect(&url, 2).await.context("connecting to Postgres")?;
            serve::migrate(&store).await
        }
        Command::Serve { migrate } => {
            let node = serve::Node::from_lookup(&serve::env, serve::Secrets::Own)?;
            node.run(migrate, serve::shutdown_signal(), |_| {}).await
        }
        Command::Admin(command) => {
            let url = serve::database_url(&serve::env)?;
            let store = PgStore::connect(&url, 2).await.context("connecting to Postgres")?;
            let triggers = picloud_core::TriggerConfig::from_env(serve::env)?;
            // `admin` registers no webhooks: the default allow list is never consulted.
            let ops = picloud_api::Ops::new(store, triggers, picloud_core::net::AllowNets::default());
            admin::run(&ops, command).await
        }
    }
}
