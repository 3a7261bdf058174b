//! The benchmark's relay and handler, each its own process, as they run in production. A role
//! prints `ready`, waits for `start` on stdin (connecting counts as part of the run), works, and
//! stops cleanly on `stop` or end of input. The handler prints `done <json>` once it has been
//! handed the number of deliveries it expects.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use picloud_dispatch::Relay;
use picloud_store::PgStore;
use picloud_worker::{BatchReply, Delivery, Reply, Shutdown, Worker};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{Mutex, Notify};

use crate::env::{HANDLER, monotonic_us, relay_config};
use crate::stats::percentile;

/// The handler process's arguments.
#[derive(Debug, clap::Args)]
pub struct HandlerArgs {
    #[arg(long)]
    nats_url: String,
    #[arg(long)]
    app: String,
    /// Deliveries to wait for before printing `done`.
    #[arg(long)]
    expect: usize,
    /// Measure each delivery's latency from the `t_us` of its KV value.
    #[arg(long)]
    latency: bool,
    /// Answer each delivery this many milliseconds after it arrives.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Also answer bare NATS requests on `bench.echo` (queue group `bench`), for comparison.
    #[arg(long)]
    echo: bool,
    /// Take the deliveries a batch at a time ([`Worker::handle_batch`]): for a trigger with
    /// `batch`.
    #[arg(long)]
    batch: bool,
}

/// The relay process's arguments.
#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    #[arg(long)]
    url: String,
    #[arg(long)]
    nats_url: String,
}

/// The API process's arguments.
#[derive(Debug, clap::Args)]
pub struct ApiArgs {
    #[arg(long)]
    url: String,
    #[arg(long)]
    nats_url: String,
}

/// What the handler reports.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Handled {
    pub handled: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Handled {
    /// Waits up to two minutes for `handler`'s `done` line: what it was handed.
    pub async fn by(handler: &mut crate::proc::Role) -> anyhow::Result<Handled> {
        use anyhow::Context as _;
        let done = tokio::time::timeout(std::time::Duration::from_secs(120), handler.line())
            .await
            .context("not every event reached the handler")??;
        Ok(serde_json::from_str(done.strip_prefix("done ").context("the handler did not say done")?)?)
    }
}

/// Lines from stdin: the orchestrator's commands.
async fn command(lines: &mut tokio::io::Lines<BufReader<tokio::io::Stdin>>) -> Option<String> {
    lines.next_line().await.ok().flatten()
}

/// The stop signal of a role: sent on `stop` or at the end of input.
fn stop_on_command(mut lines: tokio::io::Lines<BufReader<tokio::io::Stdin>>) -> Shutdown {
    let (stop, shutdown) = Shutdown::new();
    tokio::spawn(async move {
        until_stop(&mut lines).await;
        stop.send();
    });
    shutdown
}

#[allow(clippy::print_stdout)]
pub async fn handler(args: HandlerArgs) -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    println!("ready");
    anyhow::ensure!(command(&mut lines).await.as_deref() == Some("start"), "expected start");
    let tally = Arc::new(Tally {
        count: AtomicUsize::new(0),
        latencies: Mutex::new(Vec::with_capacity(if args.latency { args.expect } else { 0 })),
        all: Notify::new(),
        expect: args.expect,
        latency: args.latency,
    });
    let delay = std::time::Duration::from_millis(args.delay_ms);
    let worker = Worker::new(async_nats::connect(&args.nats_url).await?, &args.app).concurrency(1024);
    let worker = if args.batch {
        worker.handle_batch(HANDLER, {
            let tally = tally.clone();
            move |batch: Vec<Delivery>| {
                let (now_us, tally) = (monotonic_us(), tally.clone());
                async move {
                    tally.handed(&batch, now_us, delay).await?;
                    Ok(BatchReply::ok())
                }
            }
        })
    } else {
        worker.handle(HANDLER, {
            let tally = tally.clone();
            move |d: Delivery| {
                let (now_us, tally) = (monotonic_us(), tally.clone());
                async move {
                    tally.handed(std::slice::from_ref(&d), now_us, delay).await?;
                    Ok(Reply::Ok(Default::default()))
                }
            }
        })
    };
    let running = worker.start().await?;
    let client = async_nats::connect(&args.nats_url).await?;
    let echo =
        if args.echo { Some(client.queue_subscribe("bench.echo", "bench".into()).await?) } else { None };
    let echoing = echo.map(|mut sub| {
        let client = client.clone();
        tokio::spawn(async move {
            use futures::StreamExt as _;
            while let Some(msg) = sub.next().await {
                if let Some(reply) = msg.reply {
                    let _ = client.publish(reply, msg.payload).await;
                }
            }
        })
    });
    picloud_worker::round_trip(&client).await.map_err(anyhow::Error::msg)?;
    println!("started");
    let finished = tokio::select! {
        () = tally.all.notified() => true,
        () = until_stop(&mut lines) => false,
    };
    if finished {
        report(&tally.count, &tally.latencies).await?;
        until_stop(&mut lines).await;
    }
    running.shutdown().await;
    if let Some(echoing) = echoing {
        echoing.abort();
    }
    Ok(())
}

/// What the handler was handed.
struct Tally {
    count: AtomicUsize,
    latencies: Mutex<Vec<f64>>,
    /// Signalled once `expect` deliveries were handed.
    all: Notify,
    expect: usize,
    /// Whether to keep each delivery's latency.
    latency: bool,
}

impl Tally {
    /// Notes `deliveries` handed at `now_us`, and answers them after `delay`.
    async fn handed(
        &self,
        deliveries: &[Delivery],
        now_us: i64,
        delay: std::time::Duration,
    ) -> serde_json::Result<()> {
        if self.latency {
            let mut latencies = self.latencies.lock().await;
            for d in deliveries {
                let t_us = d.data::<serde_json::Value>()?["value"]["t_us"].as_i64().unwrap_or(now_us);
                latencies.push((now_us - t_us) as f64 / 1000.0);
            }
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let before = self.count.fetch_add(deliveries.len(), Ordering::Relaxed);
        if before < self.expect && before + deliveries.len() >= self.expect {
            self.all.notify_one();
        }
        Ok(())
    }
}

/// Returns at `stop` or at the end of input.
async fn until_stop(lines: &mut tokio::io::Lines<BufReader<tokio::io::Stdin>>) {
    while let Some(line) = command(lines).await {
        if line == "stop" {
            break;
        }
    }
}

/// Prints `done <json>`: how many deliveries the handler was handed, and their latencies.
#[allow(clippy::print_stdout)]
async fn report(count: &AtomicUsize, latencies: &Mutex<Vec<f64>>) -> anyhow::Result<()> {
    let mut seen = latencies.lock().await.clone();
    seen.sort_by(f64::total_cmp);
    let handled = Handled {
        handled: count.load(Ordering::Relaxed),
        p50_ms: percentile(&seen, 50.0),
        p90_ms: percentile(&seen, 90.0),
        p99_ms: percentile(&seen, 99.0),
        max_ms: seen.last().copied().unwrap_or(f64::NAN),
    };
    println!("done {}", serde_json::to_string(&handled)?);
    Ok(())
}

#[allow(clippy::print_stdout)]
pub async fn relay(args: RelayArgs) -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    println!("ready");
    anyhow::ensure!(command(&mut lines).await.as_deref() == Some("start"), "expected start");
    let store = PgStore::connect_relay(&args.url, 20).await?;
    let nats = async_nats::connect(&args.nats_url).await?;
    Relay::new(store, nats, relay_config()).run(stop_on_command(lines)).await?;
    Ok(())
}

/// The HTTP API and its node's sync deliveries; prints `ready <port>`, serves until `stop`.
#[allow(clippy::print_stdout)]
pub async fn api(args: ApiArgs) -> anyhow::Result<()> {
    let lines = BufReader::new(tokio::io::stdin()).lines();
    let store = PgStore::connect(&args.url, 10).await?;
    let nats = async_nats::connect(&args.nats_url).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let config = picloud_api::ApiConfig::new(relay_config().node);
    let state = picloud_api::ApiState::new(store, nats, config);
    println!("ready {port}");
    picloud_api::serve(listener, picloud_api::router(state.clone()), state, stop_on_command(lines)).await?;
    Ok(())
}
