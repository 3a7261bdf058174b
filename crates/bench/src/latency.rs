//! Scenario 2, latency: a separate producer process writes events at a steady rate, each its own
//! transaction; the handler measures how long each took to reach it.

use std::time::Duration;

use anyhow::Context as _;
use picloud_core::names::{CollectionName, KvKey};
use picloud_core::{AppId, TriggerConfig};
use picloud_store::events::{self, EventContext};
use picloud_store::{AuthRepo, PgStore};

use crate::cpu::Cpu;
use crate::env::{Bench, Servers, monotonic_us, payload};
use crate::proc::Role;
use crate::roles::Handled;
use crate::stats::{percentile, summary};

/// The producer process's arguments.
#[derive(Debug, clap::Args)]
pub struct ProduceArgs {
    #[arg(long)]
    url: String,
    /// Write through this HTTP API (`http://127.0.0.1:<port>`) instead of the store.
    #[arg(long)]
    api: Option<String>,
    /// The API token.
    #[arg(long)]
    token: Option<String>,
    #[arg(long)]
    app_id: AppId,
    #[arg(long)]
    rate: u64,
    #[arg(long)]
    seconds: u64,
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
    let total = (rate * seconds).to_string();
    let (mut p50s, mut p99s) = (Vec::new(), Vec::new());
    let mut cpu = Vec::new();
    for rep in 1..=reps {
        let bench = servers.fresh().await?;
        bench.settle().await?;
        let app = bench.app.slug.as_str();
        let mut handler = Role::spawn(
            "handler",
            &["handler", "--nats-url", &servers.nats_url, "--app", app, "--expect", &total, "--latency"],
        )
        .await?;
        let mut relay =
            Role::spawn("relay", &["relay", "--url", &bench.url, "--nats-url", &servers.nats_url]).await?;
        let (api, port) =
            Role::spawn_reporting("api", &["api", "--url", &bench.url, "--nats-url", &servers.nats_url])
                .await?;
        handler.send("start").await?;
        let started = handler.line().await?;
        anyhow::ensure!(started == "started", "the handler said {started:?}");
        relay.send("start").await?;
        // Warm-up, not synchronisation: the relay opens its pool and LISTENs before the first
        // event, so the figures measure steady state.
        tokio::time::sleep(Duration::from_secs(2)).await;
        eprintln!("latency rep {rep}: producing");

        let through = (!via_store).then(|| (format!("http://127.0.0.1:{port}"), bench.token.clone()));
        let roles = [("relay", relay.pid()), ("handler", handler.pid()), ("api", api.pid())];
        let before = Cpu::sample(&roles);
        let produced = produce_in_process(&bench, rate, seconds, through).await?;
        let handled = Handled::by(&mut handler).await?;
        let (parts, total) = Cpu::sample(&roles).since(&before).per_delivery_us(handled.handled);
        relay.stop().await?;
        handler.stop().await?;
        api.stop().await?;
        println!(
            "latency rep {rep}: {} events: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
             producer write p50 {:.2} ms, p99 {:.2} ms",
            handled.handled,
            handled.p50_ms,
            handled.p90_ms,
            handled.p99_ms,
            handled.max_ms,
            produced.write_p50_ms,
            produced.write_p99_ms,
        );
        println!("latency rep {rep}: CPU per event {}", crate::cpu::shown(&parts, total));
        p50s.push(handled.p50_ms);
        p99s.push(handled.p99_ms);
        cpu.push((parts, total));
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

/// Runs the producer process against `bench`'s app, through the store, or through the HTTP API
/// at `api` (its URL and token): what it reports.
pub async fn produce_in_process(
    bench: &Bench,
    rate: u64,
    seconds: u64,
    api: Option<(String, String)>,
) -> anyhow::Result<Produced> {
    let mut producer = tokio::process::Command::new(std::env::current_exe()?);
    producer.args(["produce", "--url", &bench.url, "--app-id", &bench.app.id.to_string()]).args([
        "--rate",
        &rate.to_string(),
        "--seconds",
        &seconds.to_string(),
    ]);
    if let Some((api, token)) = &api {
        producer.args(["--api", api, "--token", token]);
    }
    let out = producer.output().await.context("running the producer")?;
    anyhow::ensure!(out.status.success(), "producer failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_str(
        String::from_utf8(out.stdout)?.lines().last().context("the producer printed nothing")?,
    )?)
}

/// The producer: `rate` events per second for `seconds`, open loop (event i at start + i/rate
/// whether or not earlier writes returned), through 10 connections, each event its own
/// transaction through the store's single-event KV write.
pub async fn produce(args: ProduceArgs) -> anyhow::Result<()> {
    let store = PgStore::connect(&args.url, 10).await?;
    let app = store.app_by_id(args.app_id).await?.context("no such app")?;
    let config = TriggerConfig::default();
    let collection = CollectionName::parse("bench")?;
    let total = args.rate * args.seconds;
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let http = match (&args.api, &args.token) {
        (Some(api), Some(token)) => {
            Some((reqwest::Client::builder().pool_max_idle_per_host(10).build()?, api.clone(), token.clone()))
        }
        _ => None,
    };
    let connections = std::sync::Arc::new(tokio::sync::Semaphore::new(10));
    let mut writes = tokio::task::JoinSet::new();
    for i in 0..total {
        tokio::time::sleep_until(start + interval * i as u32).await;
        let (store, app, collection, http, connections) =
            (store.clone(), app.clone(), collection.clone(), http.clone(), connections.clone());
        writes.spawn(async move {
            let t_us = monotonic_us();
            match http {
                Some((client, api, token)) => {
                    let _connection = connections.acquire().await?;
                    let status = client
                        .put(format!("{api}/v1/apps/{}/kv/bench/k{i}", app.slug))
                        .bearer_auth(token)
                        .json(&payload(i, t_us))
                        .send()
                        .await?
                        .status();
                    anyhow::ensure!(status.is_success(), "PUT answered {status}");
                }
                None => {
                    let cx = EventContext { app_id: app.id, app_slug: &app.slug, depth: 0, config: &config };
                    let key = KvKey::parse(format!("k{i}"))?;
                    events::kv_put_now(&store, &cx, &collection, &key, &payload(i, t_us), None).await?;
                }
            }
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
