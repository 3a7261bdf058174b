//! The fairness scenario: app B writes a steady stream of events to a fast handler, once with
//! nothing else to deliver and once while app A's backlog drains to a handler that answers
//! after 50 ms; B's p99 write → handler latency in each, and their ratio; and the CPU a
//! delivery costs while B writes, over the deliveries of both apps.

use std::time::Duration;

use crate::cpu::{self, Cpu, PerDelivery};
use crate::drain::{Target, backlog_to};
use crate::env::Servers;
use crate::latency::{Plan, Writes, produce_in_process};
use crate::roles::{Handled, Serving, spawn_relay, start_handler};
use crate::stats::summary;

/// How long the relay runs before B writes: its start (connections, the first claims of A's
/// backlog, the handlers' first answers) is not what B's figure is about.
const WARM_UP: Duration = Duration::from_secs(2);

/// The scenario's shape.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// App A's backlog.
    pub backlog: usize,
    /// How long A's handler takes to answer.
    pub answer_after: Duration,
    /// B's events per second.
    pub rate: u64,
    /// Seconds of B's events.
    pub seconds: u64,
}

/// What one run of B's events measured.
struct Run {
    /// What B's handler measured.
    handled: Handled,
    /// The deliveries of both apps that left the outbox while B wrote.
    deliveries: usize,
    /// The CPU per delivery meanwhile, over [`Run::deliveries`].
    cpu: PerDelivery,
}

/// The scenario: `reps` repetitions, each B alone and B beside A's backlog; B's p99s, their
/// ratio, and the CPU per delivery of each run (in the `RESULT` line: beside A's backlog, and the
/// total alone).
#[allow(clippy::print_stdout)]
pub async fn run(servers: &Servers, shape: Shape, reps: usize) -> anyhow::Result<()> {
    let (mut alone, mut beside) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    let (mut alone_cpu, mut beside_cpu) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    for rep in 1..=reps {
        for with_backlog in [false, true] {
            let Run { handled, deliveries, cpu } = one(servers, shape, with_backlog, rep).await?;
            let what = if with_backlog { "beside A's backlog" } else { "alone" };
            println!(
                "fairness rep {rep}: B {what}: {} events: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                handled.handled, handled.p50_ms, handled.p99_ms, handled.max_ms
            );
            println!(
                "fairness rep {rep}: B {what}: CPU per delivery {} over {deliveries} deliveries of both apps",
                cpu::shown(&cpu.0, cpu.1)
            );
            let (p99s, cpus) =
                if with_backlog { (&mut beside, &mut beside_cpu) } else { (&mut alone, &mut alone_cpu) };
            p99s.push(handled.p99_ms);
            cpus.push(cpu);
        }
    }
    let (b, b_min, b_max) = summary(&beside);
    let (b_alone, alone_min, alone_max) = summary(&alone);
    let ratios: Vec<f64> = beside.iter().zip(&alone).map(|(b, a)| b / a).collect();
    let (ratio, ratio_min, ratio_max) = summary(&ratios);
    println!(
        "fairness: B's p99 {b:.2} ms [{b_min:.2}..{b_max:.2}] beside A's backlog of {}, \
         {b_alone:.2} ms [{alone_min:.2}..{alone_max:.2}] alone; ratio {ratio:.2} [{ratio_min:.2}..{ratio_max:.2}]",
        shape.backlog
    );
    let alone_cpu_total = summary(&alone_cpu.iter().map(|(_, total)| *total).collect::<Vec<_>>()).0;
    println!(
        "RESULT picloud-fairness b_p99_ms={b:.2} b_alone_p99_ms={b_alone:.2} ratio={ratio:.2} {} \
         alone_cpu_us_per_delivery={alone_cpu_total:.1}",
        cpu::result_fields(&beside_cpu)
    );
    Ok(())
}

/// One run of B's events, with A's backlog beside them or not: what B's handler measured, and
/// the CPU every process used from the start of B's writes until B's handler was handed the last
/// of them, per delivery of either app in that window (the rows that left the outbox, counted
/// just outside the CPU samples).
async fn one(servers: &Servers, shape: Shape, with_backlog: bool, rep: usize) -> anyhow::Result<Run> {
    let bench = servers.fresh().await?;
    let (busy, busy_trigger) = bench.other_app("busy").await?;
    if with_backlog {
        let target = Target { app: &busy, trigger: &busy_trigger, collection: "bench" };
        backlog_to(&bench.store, &[target], shape.backlog, None).await?;
    }
    bench.settle().await?;
    let total = usize::try_from(shape.rate * shape.seconds)?;
    let nats = servers.nats_url.as_str();
    let mut quick = Serving::bench(bench.app.slug.as_str()).spawn(nats, total, &["--latency"]).await?;
    let answer_after = shape.answer_after.as_millis().to_string();
    let mut slow =
        Serving::bench(busy.slug.as_str()).spawn(nats, shape.backlog, &["--delay-ms", &answer_after]).await?;
    for handler in [&mut quick, &mut slow] {
        start_handler(handler).await?;
    }
    let mut relay = spawn_relay(&bench.url, nats).await?;
    relay.send("start").await?;
    tokio::time::sleep(WARM_UP).await;
    let what = if with_backlog { "beside A's backlog" } else { "alone" };
    eprintln!("fairness rep {rep}: B producing {what}");
    let plan = Plan {
        rate: shape.rate,
        seconds: shape.seconds,
        writes: Writes::Store { url: bench.url.clone(), app_id: bench.app.id },
    };
    let roles = [("relay", relay.pid()), ("handler", quick.pid()), ("handler", slow.pid())];
    let waiting = bench.outbox_len().await?;
    let before = Cpu::sample(&roles);
    let produced = produce_in_process(&plan).await?;
    let handled = Handled::by(&mut quick).await?;
    let used = Cpu::sample(&roles).since(&before);
    let left = bench.outbox_len().await?;
    let deliveries = usize::try_from(waiting + i64::try_from(produced.written)? - left)?;
    relay.stop().await?;
    quick.stop().await?;
    slow.stop().await?;
    Ok(Run { handled, deliveries, cpu: used.per_delivery_us(deliveries) })
}
