//! The tenants scenario: 1,000 apps of 10 triggers each. The drain's backlog spread evenly over
//! every trigger of every app, and the latency scenario's events spread over the apps (each
//! event to one trigger of a pseudo-random app, so that it makes one delivery), each against the
//! same run with the one `bench` app in the same repetition: how much many tenants cost, as the
//! ratios of the drain rates and of the latency p50s.
//!
//! App `tenant<i>` has triggers `t<j>` on KV puts to `t<j>-*`, each to a handler function of its
//! own, `h<j>`; one handler process serves every handler of every app.

use std::time::Instant;

use futures::{StreamExt as _, TryStreamExt as _};
use serde_json::json;

use crate::drain::{self, Run, Target, Until};
use crate::env::{Bench, Servers, Tenant, handler};
use crate::latency::{self, Load, Requests, Steady, Writer};
use crate::roles::Serving;
use crate::stats::summary;

/// The scenario's shape.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Apps.
    pub apps: usize,
    /// Triggers of each app.
    pub triggers: usize,
    /// Deliveries of the drain.
    pub n: usize,
    /// Events per second of the latency run.
    pub rate: u64,
    /// Seconds of the latency run.
    pub seconds: u64,
}

/// Apps set up at once, each on a connection of the store's pool of 20. (Every change to apps,
/// principals, memberships and triggers updates the one `config_epoch` row, so those commits go
/// one at a time however many apps are set up at once: what overlaps is the rest.)
const SETUP_CONCURRENCY: usize = 16;

/// What one repetition measured: the drains and the latency runs, with the apps and alone.
struct Rep {
    drain: Run,
    one_app_drain: Run,
    latency: Steady,
    one_app_latency: Steady,
}

/// The scenario: `reps` repetitions, each the one-app drain and the drain over the apps, then the
/// one-app latency run and the latency run over the apps; the figures of each and the ratios.
#[allow(clippy::print_stdout)]
pub async fn run(servers: &Servers, shape: Shape, reps: usize) -> anyhow::Result<()> {
    anyhow::ensure!(shape.apps > 0 && shape.triggers > 0, "the tenants need an app and a trigger");
    let mut runs = Vec::with_capacity(reps);
    for rep in 1..=reps {
        let one_app_drain = drain::one(servers, shape.n, None, Until::Empty, rep).await?;
        let drain = spread_drain(servers, shape, rep).await?;
        let one_app_latency = latency::one(servers, shape.rate, shape.seconds, false, rep).await?;
        let latency = spread_latency(servers, shape, rep).await?;
        let run = Rep { drain, one_app_drain, latency, one_app_latency };
        println!(
            "tenants rep {rep}: drain {:.2} of the one app's rate, latency p50 {:.2} of the one app's",
            run.drain_ratio(),
            run.latency_p50_ratio()
        );
        runs.push(run);
    }
    let median = |f: fn(&Rep) -> f64| summary(&runs.iter().map(f).collect::<Vec<_>>());
    let (drain_ratio, drain_ratio_min, drain_ratio_max) = median(Rep::drain_ratio);
    let (p50_ratio, p50_ratio_min, p50_ratio_max) = median(Rep::latency_p50_ratio);
    let (rate, rate_min, rate_max) = median(|r| r.drain.rate);
    let (one_rate, one_rate_min, one_rate_max) = median(|r| r.one_app_drain.rate);
    let (p50, p50_min, p50_max) = median(|r| r.latency.handled.p50_ms);
    let (one_p50, one_p50_min, one_p50_max) = median(|r| r.one_app_latency.handled.p50_ms);
    let (p99, one_p99) =
        (median(|r| r.latency.handled.p99_ms).0, median(|r| r.one_app_latency.handled.p99_ms).0);
    let cpu = |f: fn(&Rep) -> f64| median(f).0;
    let (drain_cpu, one_drain_cpu) = (cpu(|r| r.drain.cpu.1), cpu(|r| r.one_app_drain.cpu.1));
    let (latency_cpu, one_latency_cpu) = (cpu(|r| r.latency.cpu.1), cpu(|r| r.one_app_latency.cpu.1));
    let (apps, triggers) = (shape.apps, shape.triggers);
    println!(
        "tenants: drain over {apps} apps x {triggers} triggers median {rate:.0}/s [{rate_min:.0}..{rate_max:.0}], \
         one app {one_rate:.0}/s [{one_rate_min:.0}..{one_rate_max:.0}]; \
         ratio {drain_ratio:.2} [{drain_ratio_min:.2}..{drain_ratio_max:.2}]"
    );
    println!(
        "tenants: latency over {apps} apps p50 {p50:.2} ms [{p50_min:.2}..{p50_max:.2}], \
         one app {one_p50:.2} ms [{one_p50_min:.2}..{one_p50_max:.2}]; \
         ratio {p50_ratio:.2} [{p50_ratio_min:.2}..{p50_ratio_max:.2}]"
    );
    println!(
        "RESULT picloud-tenants drain_ratio={drain_ratio:.2} latency_p50_ratio={p50_ratio:.2} \
         drain_per_s={rate:.0} one_app_drain_per_s={one_rate:.0} \
         latency_p50_ms={p50:.2} latency_p99_ms={p99:.2} \
         one_app_latency_p50_ms={one_p50:.2} one_app_latency_p99_ms={one_p99:.2} \
         drain_cpu_us_per_delivery={drain_cpu:.1} one_app_drain_cpu_us_per_delivery={one_drain_cpu:.1} \
         latency_cpu_us_per_delivery={latency_cpu:.1} one_app_latency_cpu_us_per_delivery={one_latency_cpu:.1}"
    );
    Ok(())
}

impl Rep {
    /// The drain rate over the apps, as a part of the one app's.
    fn drain_ratio(&self) -> f64 {
        self.drain.rate / self.one_app_drain.rate
    }

    /// The latency p50 over the apps, as a multiple of the one app's.
    fn latency_p50_ratio(&self) -> f64 {
        self.latency.handled.p50_ms / self.one_app_latency.handled.p50_ms
    }
}

/// One repetition's drain over the apps: a fresh database with the apps, the drain's backlog
/// spread evenly over their triggers (row i to app i mod apps, the apps' triggers in turn), the
/// drain; its rate and CPU.
async fn spread_drain(servers: &Servers, shape: Shape, rep: usize) -> anyhow::Result<Run> {
    let (bench, tenants) = with_tenants(servers, shape, rep).await?;
    let collections: Vec<String> = (0..shape.triggers).map(collection).collect();
    let targets: Vec<Target<'_>> = (0..shape.triggers)
        .flat_map(|j| {
            let collection = collections[j].as_str();
            tenants.iter().map(move |t| Target { app: &t.app, trigger: &t.triggers[j], collection })
        })
        .collect();
    drain::backlog_to(&bench.store, &targets, shape.n, None).await?;
    bench.settle().await?;
    eprintln!("tenants drain rep {rep}: backlog of {} written; draining", shape.n);
    let (elapsed, used) =
        drain::drain(servers, &bench, &serving(&tenants, shape), shape.n, false, Until::Empty).await?;
    let what = format!("tenants drain rep {rep}, {} apps x {} triggers", shape.apps, shape.triggers);
    Ok(Run::printed(&what, shape.n, elapsed, &used))
}

/// One repetition's latency run over the apps: a fresh database with the apps; each event a KV
/// put through the HTTP API to a pseudo-random app, in the collection of a pseudo-random one of
/// its triggers, with that app's token.
async fn spread_latency(servers: &Servers, shape: Shape, rep: usize) -> anyhow::Result<Steady> {
    let (bench, tenants) = with_tenants(servers, shape, rep).await?;
    bench.settle().await?;
    let apps =
        tenants.iter().map(|t| Writer { app: t.app.slug.to_string(), token: t.token.clone() }).collect();
    let requests = Requests::Kv { apps, collections: (0..shape.triggers).map(collection).collect() };
    let load = Load { rate: shape.rate, seconds: shape.seconds, fan: 1 };
    let what = format!("tenants latency rep {rep}, {} apps x {} triggers", shape.apps, shape.triggers);
    let steady =
        latency::steady(servers, &bench, &serving(&tenants, shape), load, Some(requests), &what).await?;
    steady.print(&what);
    Ok(steady)
}

/// A fresh database with the scenario's apps, set up [`SETUP_CONCURRENCY`] at a time.
async fn with_tenants(servers: &Servers, shape: Shape, rep: usize) -> anyhow::Result<(Bench, Vec<Tenant>)> {
    let bench = servers.fresh().await?;
    let started = Instant::now();
    let bodies: Vec<serde_json::Value> = (0..shape.triggers).map(trigger).collect();
    let tenants: Vec<Tenant> = futures::stream::iter(0..shape.apps)
        .map(|i| {
            let (bench, bodies) = (&bench, &bodies);
            async move { bench.app_with(&format!("tenant{i}"), bodies).await }
        })
        .buffered(SETUP_CONCURRENCY)
        .try_collect()
        .await?;
    eprintln!(
        "tenants rep {rep}: {} apps x {} triggers set up in {:.1} s",
        shape.apps,
        shape.triggers,
        started.elapsed().as_secs_f64()
    );
    Ok((bench, tenants))
}

/// The registration of an app's trigger `j`: KV puts to `t<j>-*`, to handler `h<j>`.
fn trigger(j: usize) -> serde_json::Value {
    json!({"name": format!("t{j}"), "kind": "kv", "collection": format!("t{j}-*"), "ops": ["put"],
           "handler": {"function": handler(j)}})
}

/// The collection the events of trigger `j` are written to: only that trigger matches it.
fn collection(j: usize) -> String {
    format!("t{j}-bench")
}

/// Every handler of every app.
fn serving(tenants: &[Tenant], shape: Shape) -> Serving {
    Serving {
        apps: tenants.iter().map(|t| t.app.slug.to_string()).collect(),
        handlers: (0..shape.triggers).map(handler).collect(),
    }
}
