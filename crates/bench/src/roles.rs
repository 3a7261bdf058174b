//! The benchmark's relay, handler and HTTP API, each its own process, as they run in production.
//! A role prints `ready`, waits for `start` on stdin (connecting counts as part of the run),
//! works, and stops cleanly on `stop` or end of input. The handler serves one or more handler
//! functions of one or more apps over one NATS connection, as the worker SDK subscribes them (a
//! queue group per app and handler); it prints `started` once it has its subscriptions, and
//! `done <json>` once it has been handed the number of deliveries it expects.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use picloud_core::protocol::EventKind;
use picloud_dispatch::Relay;
use picloud_store::PgStore;
use picloud_worker::{BatchReply, Delivery, Reply, Running, Shutdown, Worker};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{Mutex, Notify};

use crate::env::{HANDLER, monotonic_us, relay_config};
use crate::proc::Role;
use crate::stats::percentile;

/// The handler process's arguments.
#[derive(Debug, clap::Args)]
pub struct HandlerArgs {
    #[arg(long)]
    nats_url: String,
    /// The apps served, comma-separated: each with every handler of `--handler`.
    #[arg(long, value_delimiter = ',', required = true)]
    app: Vec<String>,
    /// The handler functions served, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = HANDLER)]
    handler: Vec<String>,
    /// Deliveries to wait for before printing `done`.
    #[arg(long)]
    expect: usize,
    /// Measure each delivery's latency from the `t_us` of its KV value or pubsub message.
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

/// What a handler process serves: each of these handler functions of each of these apps.
#[derive(Debug, Clone)]
pub struct Serving {
    pub apps: Vec<String>,
    pub handlers: Vec<String>,
}

impl Serving {
    /// The benchmark's handler ([`HANDLER`]) of `app`.
    pub fn bench(app: &str) -> Serving {
        Serving { apps: vec![app.to_owned()], handlers: vec![HANDLER.to_owned()] }
    }

    /// Starts a handler process serving these, which says `done` once it was handed `expect`
    /// deliveries; `flags` are more of its arguments (`--latency`, `--batch`, …).
    pub async fn spawn(&self, nats_url: &str, expect: usize, flags: &[&str]) -> anyhow::Result<Role> {
        let (apps, handlers, expect) = (self.apps.join(","), self.handlers.join(","), expect.to_string());
        let mut args = vec![
            "handler",
            "--nats-url",
            nats_url,
            "--app",
            &apps,
            "--handler",
            &handlers,
            "--expect",
            &expect,
        ];
        args.extend_from_slice(flags);
        Role::spawn("handler", &args).await
    }
}

/// Tells a handler process to start, and waits until it has its subscriptions.
pub async fn start_handler(handler: &mut Role) -> anyhow::Result<()> {
    handler.send("start").await?;
    let started = handler.line().await?;
    anyhow::ensure!(started == "started", "the handler said {started:?}");
    Ok(())
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
    /// Run the relay in the same process, as a router node does (`serve`): the rows the API's
    /// writes name are handed to it in memory.
    #[arg(long)]
    relay: bool,
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
    pub async fn by(handler: &mut Role) -> anyhow::Result<Handled> {
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
    // One connection serves every app: a worker per app, each serving every handler. (Its inbox
    // prefix is no app's, so a `working` reply would get no renewed token: none is sent here.)
    let nats = async_nats::connect(&args.nats_url).await?;
    let workers = args.app.iter().map(|app| {
        let worker = Worker::new(nats.clone(), app).concurrency(1024);
        args.handler.iter().fold(worker, |worker, name| serve(worker, name, &tally, delay, args.batch))
    });
    let running = futures::future::try_join_all(workers.map(Worker::start)).await?;
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
    futures::future::join_all(running.into_iter().map(Running::shutdown)).await;
    if let Some(echoing) = echoing {
        echoing.abort();
    }
    Ok(())
}

/// `worker` serving handler `name`: each delivery noted in `tally` and answered `ok` after
/// `delay`, one at a time, or with `batch` a batch at a time ([`Worker::handle_batch`]).
fn serve(worker: Worker, name: &str, tally: &Arc<Tally>, delay: std::time::Duration, batch: bool) -> Worker {
    let tally = tally.clone();
    if batch {
        worker.handle_batch(name, move |batch: Vec<Delivery>| {
            let (now_us, tally) = (monotonic_us(), tally.clone());
            async move {
                tally.handed(&batch, now_us, delay).await?;
                Ok(BatchReply::ok())
            }
        })
    } else {
        worker.handle(name, move |d: Delivery| {
            let (now_us, tally) = (monotonic_us(), tally.clone());
            async move {
                tally.handed(std::slice::from_ref(&d), now_us, delay).await?;
                Ok(Reply::Ok(Default::default()))
            }
        })
    }
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
                let data = d.data::<serde_json::Value>()?;
                // A KV event carries the value written; a pubsub message is the data itself.
                let written =
                    if d.event.picloudkind == EventKind::Kv.as_str() { &data["value"] } else { &data };
                let t_us = written["t_us"].as_i64().ok_or_else(|| {
                    <serde_json::Error as serde::de::Error>::custom("a delivery's event has no `t_us`")
                })?;
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

/// The relay process on database `url`, waiting to be told `start`.
pub async fn spawn_relay(url: &str, nats_url: &str) -> anyhow::Result<Role> {
    Role::spawn("relay", &["relay", "--url", url, "--nats-url", nats_url]).await
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

/// The HTTP API and its node's sync deliveries, and with `--relay` the node's relay too; prints
/// `ready <port>`, serves until `stop`.
#[allow(clippy::print_stdout)]
pub async fn api(args: ApiArgs) -> anyhow::Result<()> {
    let lines = BufReader::new(tokio::io::stdin()).lines();
    let store = PgStore::connect(&args.url, 10).await?;
    let nats = async_nats::connect(&args.nats_url).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let stop = stop_on_command(lines);
    let relay = if args.relay {
        let relay_store = PgStore::connect_relay(&args.url, 20).await?;
        let relay =
            Relay::new(relay_store, nats.clone(), relay_config()).taking_written(store.hand_written());
        Some(tokio::spawn(relay.run(stop.clone())))
    } else {
        None
    };
    let config = picloud_api::ApiConfig::new(relay_config().node);
    let state = picloud_api::ApiState::new(store, nats, config);
    println!("ready {port}");
    picloud_api::serve(listener, picloud_api::router(state.clone()), state, stop).await?;
    if let Some(relay) = relay {
        relay.await??;
    }
    Ok(())
}
