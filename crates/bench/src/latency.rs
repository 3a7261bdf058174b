//! Scenario 2, latency: a separate producer process writes events at a steady rate, each its own
//! transaction; the handler measures how long each took to reach it. The steady run and the
//! producer serve the tenants and fan-out scenarios too.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use picloud_core::names::{CollectionName, KvKey};
use picloud_core::{AppId, TriggerConfig};
use picloud_store::events::{self, EventContext};
use picloud_store::{AuthRepo, PgStore};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::Semaphore;

use crate::cpu::{Cpu, PerDelivery};
use crate::env::{Bench, Servers, monotonic_us, payload};
use crate::proc::Role;
use crate::roles::{Handled, Serving, spawn_relay, start_handler};
use crate::stats::{percentile, summary};

/// What the producer process writes: its one line of stdin, as JSON.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    /// Events per second.
    pub rate: u64,
    /// Seconds of events.
    pub seconds: u64,
    pub writes: Writes,
}

/// How the producer writes each event.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Writes {
    /// The store's single-event KV write at database `url`, to collection `bench` of the app.
    Store { url: String, app_id: AppId },
    /// Requests to the HTTP API at `api` (`http://127.0.0.1:<port>`).
    Http { api: String, requests: Requests },
}

/// The producer's requests to the HTTP API.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Requests {
    /// KV puts: event i to a pseudo-random one of `apps`, in a pseudo-random one of
    /// `collections`.
    Kv { apps: Vec<Writer>, collections: Vec<String> },
    /// Publishes to `topic` of the app.
    Publish { app: Writer, topic: String },
}

/// An app the producer writes to over HTTP, and a token of it that may.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Writer {
    pub app: String,
    pub token: String,
}

impl Writer {
    /// `bench`'s app, with its admin token.
    pub fn bench(bench: &Bench) -> Writer {
        Writer { app: bench.app.slug.to_string(), token: bench.token.clone() }
    }
}

/// What the producer reports on its last line of stdout.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Produced {
    pub written: usize,
    pub write_p50_ms: f64,
    pub write_p99_ms: f64,
}

#[allow(clippy::print_stdout)]
pub async fn run(
    servers: &Servers,
    rate: u64,
    seconds: u64,
    reps: usize,
    via_store: bool,
) -> anyhow::Result<()> {
    let (mut p50s, mut p99s) = (Vec::new(), Vec::new());
    let mut cpu = Vec::new();
    for rep in 1..=reps {
        let steady = one(servers, rate, seconds, via_store, rep).await?;
        p50s.push(steady.handled.p50_ms);
        p99s.push(steady.handled.p99_ms);
        cpu.push(steady.cpu);
    }
    let (p50, p50_min, p50_max) = summary(&p50s);
    let (p99, p99_min, p99_max) = summary(&p99s);
    println!(
        "latency p50 {p50:.2} ms [{p50_min:.2}..{p50_max:.2}], p99 {p99:.2} ms [{p99_min:.2}..{p99_max:.2}]"
    );
    let through = if via_store { "the store's single-event write" } else { "the HTTP KV API" };
    println!("(writes through {through})");
    let cpu_fields = crate::cpu::result_fields(&cpu);
    println!("RESULT picloud latency_p50_ms={p50:.2} latency_p99_ms={p99:.2} {cpu_fields}");
    Ok(())
}

/// One repetition of the latency scenario, from a fresh database: what it measured, printed.
pub async fn one(
    servers: &Servers,
    rate: u64,
    seconds: u64,
    via_store: bool,
    rep: usize,
) -> anyhow::Result<Steady> {
    let bench = servers.fresh().await?;
    bench.settle().await?;
    let requests = (!via_store)
        .then(|| Requests::Kv { apps: vec![Writer::bench(&bench)], collections: vec!["bench".to_owned()] });
    let serving = Serving::bench(bench.app.slug.as_str());
    let what = format!("latency rep {rep}");
    let load = Load { rate, seconds, fan: 1 };
    let steady = steady(servers, &bench, &serving, load, requests, &what).await?;
    steady.print(&what);
    Ok(steady)
}

/// What one steady run measured.
pub struct Steady {
    /// What the handler was handed, and the latencies.
    pub handled: Handled,
    /// The producer's write round trips.
    pub produced: Produced,
    pub cpu: PerDelivery,
}

impl Steady {
    /// Prints the run's figures as `what`'s: a line of latencies and one of CPU per event.
    #[allow(clippy::print_stdout)]
    pub fn print(&self, what: &str) {
        let (handled, produced) = (&self.handled, &self.produced);
        println!(
            "{what}: {} events: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
             producer write p50 {:.2} ms, p99 {:.2} ms",
            handled.handled,
            handled.p50_ms,
            handled.p90_ms,
            handled.p99_ms,
            handled.max_ms,
            produced.write_p50_ms,
            produced.write_p99_ms,
        );
        println!("{what}: CPU per event {}", crate::cpu::shown(&self.cpu.0, self.cpu.1));
    }
}

/// A steady load: `rate` events per second for `seconds`, each making `fan` deliveries.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub rate: u64,
    pub seconds: u64,
    pub fan: usize,
}

/// A steady run on `bench`'s database: a handler process serving `serving`, and a router node
/// (the HTTP API and the relay in one process), or for the store's writes the relay and the
/// HTTP API apart, idle for 2 s; then the producer's `requests` to the API (`None`: the store's
/// single-event write to `bench`'s app instead) at the `load`, until the handler was handed
/// every delivery they make. `what` names the run in the log.
pub async fn steady(
    servers: &Servers,
    bench: &Bench,
    serving: &Serving,
    load: Load,
    requests: Option<Requests>,
    what: &str,
) -> anyhow::Result<Steady> {
    let expect = usize::try_from(load.rate * load.seconds)? * load.fan;
    let mut handler = serving.spawn(&servers.nats_url, expect, &["--latency"]).await?;
    // Writes through the HTTP API go to a router node (the API and the relay in one process, as
    // `serve` runs them); the store's writes come from outside any node, so the relay is a
    // process of its own.
    let mut relay = match requests {
        Some(_) => None,
        None => Some(spawn_relay(&bench.url, &servers.nats_url).await?),
    };
    let api_args = ["api", "--url", &bench.url, "--nats-url", &servers.nats_url];
    let (api, port) = match relay {
        Some(_) => Role::spawn_reporting("api", &api_args).await?,
        None => Role::spawn_reporting("node", &[&api_args[..], &["--relay"]].concat()).await?,
    };
    start_handler(&mut handler).await?;
    if let Some(relay) = &mut relay {
        relay.send("start").await?;
    }
    // Warm-up, not synchronisation: the relay opens its pool and LISTENs before the first
    // event, so the figures measure steady state.
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("{what}: producing");
    let mut roles = vec![("handler", handler.pid())];
    match &relay {
        Some(relay) => roles.extend([("relay", relay.pid()), ("api", api.pid())]),
        None => roles.push(("node", api.pid())),
    }
    let before = Cpu::sample(&roles);
    let writes = match requests {
        Some(requests) => Writes::Http { api: format!("http://127.0.0.1:{port}"), requests },
        None => Writes::Store { url: bench.url.clone(), app_id: bench.app.id },
    };
    let plan = Plan { rate: load.rate, seconds: load.seconds, writes };
    let produced = produce_in_process(&plan).await?;
    let handled = Handled::by(&mut handler).await?;
    let cpu = Cpu::sample(&roles).since(&before).per_delivery_us(handled.handled);
    if let Some(relay) = relay {
        relay.stop().await?;
    }
    handler.stop().await?;
    api.stop().await?;
    Ok(Steady { handled, produced, cpu })
}

/// Runs the producer process on `plan`: what it reports.
pub async fn produce_in_process(plan: &Plan) -> anyhow::Result<Produced> {
    let mut producer = tokio::process::Command::new(std::env::current_exe()?)
        .arg("produce")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the producer")?;
    let mut stdin = producer.stdin.take().context("the producer's stdin")?;
    stdin.write_all(format!("{}\n", serde_json::to_string(plan)?).as_bytes()).await?;
    drop(stdin);
    let out = producer.wait_with_output().await.context("running the producer")?;
    anyhow::ensure!(out.status.success(), "producer failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_str(
        String::from_utf8(out.stdout)?.lines().last().context("the producer printed nothing")?,
    )?)
}

/// The producer: reads its [`Plan`] from stdin and writes `rate` events per second for
/// `seconds`, open loop (event i at start + i/rate whether or not earlier writes returned),
/// through 10 connections, each event its own transaction.
pub async fn produce() -> anyhow::Result<()> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).context("reading the plan")?;
    let plan: Plan = serde_json::from_str(&line).context("the plan")?;
    let write = Arc::new(Write::prepare(&plan).await?);
    let total = plan.rate * plan.seconds;
    let interval = Duration::from_secs_f64(1.0 / plan.rate as f64);
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let mut writes = tokio::task::JoinSet::new();
    for i in 0..total {
        tokio::time::sleep_until(start + interval * i as u32).await;
        let write = write.clone();
        writes.spawn(async move {
            let t_us = monotonic_us();
            write.one(i, t_us).await?;
            Ok::<f64, anyhow::Error>((monotonic_us() - t_us) as f64 / 1000.0)
        });
    }
    let mut round_trips = Vec::with_capacity(total as usize);
    while let Some(done) = writes.join_next().await {
        round_trips.push(done??);
    }
    round_trips.sort_by(f64::total_cmp);
    let produced = Produced {
        written: round_trips.len(),
        write_p50_ms: percentile(&round_trips, 50.0),
        write_p99_ms: percentile(&round_trips, 99.0),
    };
    #[allow(clippy::print_stdout)]
    {
        println!("{}", serde_json::to_string(&produced)?);
    }
    Ok(())
}

/// The producer's writes, ready to go: a store of 10 connections, or an HTTP client that keeps
/// 10 connections, 10 requests in flight at most.
enum Write {
    Store { store: PgStore, app: picloud_store::App, collection: CollectionName, config: TriggerConfig },
    Http { client: reqwest::Client, connections: Arc<Semaphore>, api: String, requests: Requests },
}

impl Write {
    async fn prepare(plan: &Plan) -> anyhow::Result<Write> {
        Ok(match &plan.writes {
            Writes::Store { url, app_id } => {
                let store = PgStore::connect(url, 10).await?;
                let app = store.app_by_id(*app_id).await?.context("no such app")?;
                let collection = CollectionName::parse("bench")?;
                Write::Store { store, app, collection, config: TriggerConfig::default() }
            }
            Writes::Http { api, requests } => Write::Http {
                client: reqwest::Client::builder().pool_max_idle_per_host(10).build()?,
                connections: Arc::new(Semaphore::new(10)),
                api: api.clone(),
                requests: requests.clone(),
            },
        })
    }

    /// Writes event `i`, its payload stamped `t_us`.
    async fn one(&self, i: u64, t_us: i64) -> anyhow::Result<()> {
        match self {
            Write::Store { store, app, collection, config } => {
                let cx = EventContext { app_id: app.id, app_slug: &app.slug, depth: 0, config };
                let key = KvKey::parse(format!("k{i}"))?;
                events::kv_put_now(store, &cx, collection, &key, &payload(i, t_us), None, None).await?;
            }
            Write::Http { client, connections, api, requests } => {
                let _connection = connections.acquire().await?;
                let request = match requests {
                    Requests::Kv { apps, collections } => {
                        let pick = mix(i);
                        let to = &apps[(pick % apps.len() as u64) as usize];
                        let collection =
                            &collections[(pick / apps.len() as u64 % collections.len() as u64) as usize];
                        client
                            .put(format!("{api}/v1/apps/{}/kv/{collection}/k{i}", to.app))
                            .bearer_auth(&to.token)
                    }
                    Requests::Publish { app, topic } => client
                        .post(format!("{api}/v1/apps/{}/topics/{topic}/messages", app.app))
                        .bearer_auth(&app.token),
                };
                let status = request.json(&payload(i, t_us)).send().await?.status();
                anyhow::ensure!(status.is_success(), "the write answered {status}");
            }
        }
        Ok(())
    }
}

/// A well-mixed 64-bit function of `i` (splitmix64's finaliser): the same pseudo-random pick of
/// app and collection for event i in every run.
fn mix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
