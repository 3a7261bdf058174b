//! `picloud-bench`: the workloads of WORKLOAD.md, end to end. Each scenario runs three times,
//! each from a fresh database, and ends with one `RESULT` line of medians: `drain`, `latency` and
//! `sync` (§1–3), `backlog` (§4), the flow-control runs `drain --ordering key`,
//! `drain --concurrency`, `fairness` and `debounce` (§5), and `drain --batch`, `tenants` and
//! `fanout` (§6).
//!
//! With no `--database-url` / `--nats-url` it starts its own throwaway PostgreSQL (every setting
//! at its default: fsync and synchronous commit on) and nats-server.

use std::time::Duration;

use clap::{Parser, Subcommand};

mod backlog;
mod cpu;
mod debounce;
mod drain;
mod env;
mod fairness;
mod fanout;
mod latency;
mod proc;
mod roles;
mod stats;
mod sync;
mod tenants;

/// End-to-end benchmarks of picloud-router.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// A Postgres server URL whose role may create databases (default: a throwaway server).
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// A nats-server URL (default: a throwaway server).
    #[arg(long, global = true)]
    nats_url: Option<String>,
    /// Repetitions, each from a fresh database.
    #[arg(long, global = true, default_value_t = 3)]
    reps: usize,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Throughput from a backlog of N deliveries.
    Drain {
        /// Deliveries in the backlog.
        #[arg(long, default_value_t = 100_000)]
        n: usize,
        /// `key`: each repetition drains the backlog twice, plain and then through a trigger
        /// with `flow.ordering: key`, its rows spread over `--keys` ordering keys.
        #[arg(long, value_parser = ["key"], conflicts_with = "concurrency")]
        ordering: Option<String>,
        /// Ordering keys of the ordered backlog.
        #[arg(long, default_value_t = 10_000)]
        keys: usize,
        /// Each repetition drains the backlog twice, plain and then through a trigger with
        /// this `flow.concurrency`.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000), conflicts_with = "batch")]
        concurrency: Option<u32>,
        /// Each repetition drains the backlog twice, plain and then through a trigger with
        /// `batch` of this `max_size`, to a handler that takes batches.
        #[arg(long, value_parser = clap::value_parser!(u32).range(2..=1_000), conflicts_with = "ordering")]
        batch: Option<u32>,
    },
    /// Latency at a steady rate, from a separate producer process.
    Latency {
        /// Events per second.
        #[arg(long, default_value_t = 500)]
        rate: u64,
        /// Seconds of load.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Write through the store's single-event write instead of the HTTP KV API.
        #[arg(long)]
        via_store: bool,
    },
    /// Bursts of writes to a few keys through a trigger with `flow.debounce_ms`: how often the
    /// handler runs, and whether each key's last run has its last value.
    Debounce {
        /// Keys written.
        #[arg(long, default_value_t = 100)]
        keys: usize,
        /// Writes to each key.
        #[arg(long, default_value_t = 100)]
        writes: usize,
        /// Over how many milliseconds each key's writes are spread.
        #[arg(long, default_value_t = 1000)]
        spread_ms: u64,
        /// The trigger's `flow.debounce_ms`.
        #[arg(long, default_value_t = 200)]
        debounce_ms: u32,
    },
    /// One app's steady stream of events, alone and beside another app's backlog to a slow
    /// handler: the stream's p99 latency in each.
    Fairness {
        /// The other app's backlog.
        #[arg(long, default_value_t = 200_000)]
        backlog: usize,
        /// Milliseconds the other app's handler takes to answer.
        #[arg(long, default_value_t = 50)]
        answer_after_ms: u64,
        /// Events per second of the stream.
        #[arg(long, default_value_t = 100)]
        rate: u64,
        /// Seconds of the stream.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// The first deliveries of a deep backlog, against the plain drain in the same repetition:
    /// the ratio of their rates.
    Backlog {
        /// Deliveries in the backlog.
        #[arg(long, default_value_t = 1_000_000)]
        n: usize,
        /// How many of them to drain, and the size of the plain drain.
        #[arg(long, default_value_t = 100_000)]
        drain: usize,
    },
    /// Many apps of many triggers: the drain's backlog and the latency scenario's events spread
    /// over them, each against the same with one app in the same repetition.
    Tenants {
        /// Apps.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
        apps: u32,
        /// Triggers of each app, each to a handler of its own.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
        triggers: u32,
        /// Deliveries of the drains.
        #[arg(long, default_value_t = 100_000)]
        n: usize,
        /// Events per second of the latency runs.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
        rate: u64,
        /// Seconds of the latency runs.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// Publishes to a topic matched by many pubsub triggers, and by one in the same repetition:
    /// the publish round trip, its ratio to the one trigger's, and the latency of every delivery.
    Fanout {
        /// Triggers on the topic, each to a handler of its own.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        triggers: u32,
        /// Publishes per second.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
        rate: u64,
        /// Seconds of publishes.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// Sync invoke round trips, and bare NATS request-replies in the same run.
    Sync {
        /// Sequential calls of each kind.
        #[arg(long, default_value_t = 2000)]
        calls: usize,
    },
    /// (internal) The producer process of the latency, tenants and fan-out scenarios.
    #[command(hide = true)]
    Produce,
    /// (internal) The handler process.
    #[command(hide = true)]
    Handler(roles::HandlerArgs),
    /// (internal) The relay process.
    #[command(hide = true)]
    Relay(roles::RelayArgs),
    /// (internal) The HTTP API process.
    #[command(hide = true)]
    Api(roles::ApiArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // A handler is one thread, as a small handler process would be; the others use the default
    // multi-threaded runtime.
    let runtime = match cli.scenario {
        Scenario::Handler(_) => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        _ => tokio::runtime::Builder::new_multi_thread().enable_all().build()?,
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.scenario {
        Scenario::Produce => latency::produce().await,
        Scenario::Handler(args) => roles::handler(args).await,
        Scenario::Relay(args) => roles::relay(args).await,
        Scenario::Api(args) => roles::api(args).await,
        Scenario::Drain { n, ordering, keys, concurrency, batch } => {
            let servers = env::Servers::start(cli.database_url, cli.nats_url).await?;
            let flowed = match (ordering, concurrency, batch) {
                (Some(_), _, _) => Some(drain::Flowed::Ordered { keys: keys.max(1) }),
                (None, Some(concurrency), _) => Some(drain::Flowed::Limited { concurrency }),
                (None, None, Some(size)) => Some(drain::Flowed::Batched { size }),
                (None, None, None) => None,
            };
            drain::run(&servers, n, flowed, cli.reps).await
        }
        Scenario::Latency { rate, seconds, via_store } => {
            let servers = env::Servers::start(cli.database_url, cli.nats_url).await?;
            latency::run(&servers, rate, seconds, cli.reps, via_store).await
        }
        Scenario::Debounce { keys, writes, spread_ms, debounce_ms } => {
            let servers = env::Servers::start(cli.database_url, cli.nats_url).await?;
            let shape =
                debounce::Shape { keys, writes, debounce_ms, spread: Duration::from_millis(spread_ms) };
            debounce::run(&servers, shape, cli.reps).await
        }
        Scenario::Fairness { backlog, answer_after_ms, rate, seconds } => {
            let servers = env::Servers::start(cli.database_url, cli.nats_url).await?;
            let shape = fairness::Shape {
                backlog,
                answer_after: Duration::from_millis(answer_after_ms),
                rate,
                seconds,
            };
            fairness::run(&servers, shape, cli.reps).await
        }
        Scenario::Backlog { n, drain } => {
            let servers = env::Servers::start(cli.database_url, cli.nats_url).await?;
            backlog::run(&servers, n, drain, cli.reps).await
        }
        Scenario::Tenants { apps, triggers, n, rate, seconds } => {
            let servers = env::Servers::start(cli.database_url, cli.nats_url).await?;
            let shape = tenants::Shape { apps: apps as usize, triggers: triggers as usize, n, rate, seconds };
            tenants::run(&servers, shape, cli.reps).await
        }
        Scenario::Fanout { triggers, rate, seconds } => {
            let servers = env::Servers::start(cli.database_url, cli.nats_url).await?;
            fanout::run(&servers, fanout::Shape { triggers: triggers as usize, rate, seconds }, cli.reps)
                .await
        }
        Scenario::Sync { calls } => {
            let servers = env::Servers::start(cli.database_url, cli.nats_url).await?;
            sync::run(&servers, calls, cli.reps).await
        }
    }
}
