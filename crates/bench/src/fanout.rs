//! The fan-out scenario: one topic matched by 100 pubsub triggers of one app, each to a handler
//! function of its own, and a separate producer process publishing to it through the HTTP API,
//! 200 messages/s for 20 s; in the same repetition the same with one trigger. The figures: the
//! producer's publish round trip (a publish writes a delivery per trigger in its transaction)
//! and its ratio to the one-trigger publish's, and the latency of every delivery from the start
//! of its publish to its handler.

use serde_json::json;

use crate::env::{Servers, handler};
use crate::latency::{self, Load, Requests, Steady, Writer};
use crate::roles::Serving;
use crate::stats::summary;

/// The scenario's shape.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Triggers on the topic.
    pub triggers: usize,
    /// Publishes per second.
    pub rate: u64,
    /// Seconds of publishes.
    pub seconds: u64,
}

/// The topic published to.
const TOPIC: &str = "fan";

/// The scenario: `reps` repetitions, each the publishes with one trigger and with
/// `shape.triggers`; the write and delivery latencies of each and the ratio of the write p50s.
#[allow(clippy::print_stdout)]
pub async fn run(servers: &Servers, shape: Shape, reps: usize) -> anyhow::Result<()> {
    let (mut single, mut fanned, mut ratios) =
        (Vec::with_capacity(reps), Vec::with_capacity(reps), Vec::new());
    for rep in 1..=reps {
        let one = with_triggers(servers, shape, 1, rep).await?;
        let many = with_triggers(servers, shape, shape.triggers, rep).await?;
        let ratio = many.produced.write_p50_ms / one.produced.write_p50_ms;
        println!("fanout rep {rep}: publish p50 {ratio:.2} of the one trigger's");
        ratios.push(ratio);
        single.push(one);
        fanned.push(many);
    }
    let median = |runs: &[Steady], f: fn(&Steady) -> f64| summary(&runs.iter().map(f).collect::<Vec<_>>());
    let (ratio, ratio_min, ratio_max) = summary(&ratios);
    let (write_p50, write_p50_min, write_p50_max) = median(&fanned, |s| s.produced.write_p50_ms);
    let write_p99 = median(&fanned, |s| s.produced.write_p99_ms).0;
    let (one_write_p50, one_write_p50_min, one_write_p50_max) = median(&single, |s| s.produced.write_p50_ms);
    let one_write_p99 = median(&single, |s| s.produced.write_p99_ms).0;
    let (p50, p50_min, p50_max) = median(&fanned, |s| s.handled.p50_ms);
    let (p99, p99_min, p99_max) = median(&fanned, |s| s.handled.p99_ms);
    let (one_p50, one_p99) =
        (median(&single, |s| s.handled.p50_ms).0, median(&single, |s| s.handled.p99_ms).0);
    let triggers = shape.triggers;
    println!(
        "fanout: publish p50 with {triggers} triggers {write_p50:.2} ms [{write_p50_min:.2}..{write_p50_max:.2}], \
         with one {one_write_p50:.2} ms [{one_write_p50_min:.2}..{one_write_p50_max:.2}]; \
         ratio {ratio:.2} [{ratio_min:.2}..{ratio_max:.2}]"
    );
    println!(
        "fanout: delivery latency with {triggers} triggers p50 {p50:.2} ms [{p50_min:.2}..{p50_max:.2}], \
         p99 {p99:.2} ms [{p99_min:.2}..{p99_max:.2}]"
    );
    let cpu: Vec<_> = fanned.iter().map(|s| s.cpu.clone()).collect();
    println!(
        "RESULT picloud-fanout write_p50_ratio={ratio:.2} latency_p50_ms={p50:.2} latency_p99_ms={p99:.2} \
         write_p50_ms={write_p50:.2} write_p99_ms={write_p99:.2} \
         one_trigger_write_p50_ms={one_write_p50:.2} one_trigger_write_p99_ms={one_write_p99:.2} \
         one_trigger_latency_p50_ms={one_p50:.2} one_trigger_latency_p99_ms={one_p99:.2} {}",
        crate::cpu::result_fields(&cpu)
    );
    Ok(())
}

/// One run with `triggers` triggers on the topic, from a fresh database: app `fanout` with
/// pubsub triggers `f<j>` on the topic, to handlers `h<j>`; what it measured, printed.
#[allow(clippy::print_stdout)]
async fn with_triggers(
    servers: &Servers,
    shape: Shape,
    triggers: usize,
    rep: usize,
) -> anyhow::Result<Steady> {
    let bench = servers.fresh().await?;
    let bodies: Vec<serde_json::Value> = (0..triggers).map(trigger).collect();
    let fanout = bench.app_with("fanout", &bodies).await?;
    bench.settle().await?;
    let slug = fanout.app.slug.to_string();
    let serving = Serving { apps: vec![slug.clone()], handlers: (0..triggers).map(handler).collect() };
    let requests =
        Requests::Publish { app: Writer { app: slug, token: fanout.token }, topic: TOPIC.to_owned() };
    let load = Load { rate: shape.rate, seconds: shape.seconds, fan: triggers };
    let what = format!("fanout rep {rep}, {triggers} trigger{}", if triggers == 1 { "" } else { "s" });
    let run = latency::steady(servers, &bench, &serving, load, Some(requests), &what).await?;
    let (handled, produced) = (&run.handled, &run.produced);
    println!(
        "{what}: {} publishes: publish p50 {:.2} ms, p99 {:.2} ms; {} deliveries: latency p50 {:.2} ms, \
         p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        produced.written,
        produced.write_p50_ms,
        produced.write_p99_ms,
        handled.handled,
        handled.p50_ms,
        handled.p90_ms,
        handled.p99_ms,
        handled.max_ms
    );
    println!("{what}: CPU per delivery {}", crate::cpu::shown(&run.cpu.0, run.cpu.1));
    Ok(run)
}

/// The registration of trigger `j`: messages to [`TOPIC`], to handler `h<j>`.
fn trigger(j: usize) -> serde_json::Value {
    json!({"name": format!("f{j}"), "kind": "pubsub", "topic": TOPIC, "handler": {"function": handler(j)}})
}
