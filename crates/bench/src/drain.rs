//! Scenario 1, drain: throughput from a backlog of N deliveries.

use std::time::{Duration, Instant};

use picloud_core::Batch;
use picloud_core::flow::{Flow, Ordering, kv_ordering_key};
use picloud_core::protocol::{EventKind, event_type, source};
use picloud_store::events::Event;
use picloud_store::{App, NewDelivery, OutboxRepo, PgStore, Transactional, Trigger};
use serde_json::value::to_raw_value;

use crate::cpu::{Cpu, PerDelivery};
use crate::env::{Bench, FLOWED_COLLECTION, Servers, payload};
use crate::roles::{Serving, spawn_relay, start_handler};
use crate::stats::summary;

/// The flow of the second drain of each repetition.
#[derive(Debug, Clone, Copy)]
pub enum Flowed {
    /// `flow.ordering: key`, the rows spread over this many keys.
    Ordered { keys: usize },
    /// `flow.concurrency`.
    Limited { concurrency: u32 },
    /// `batch` of this `max_size` (DESIGN §14), to a handler that takes batches.
    Batched { size: u32 },
}

/// The `max_wait_ms` of the batched drain: only its last, unfilled batch waits.
const BATCH_WAIT_MS: u32 = 20;

impl Flowed {
    /// Gives the flowed trigger this flow, or batch.
    async fn apply(self, bench: &mut Bench) -> anyhow::Result<()> {
        match self {
            Flowed::Ordered { .. } => {
                bench.set_flow(Flow { ordering: Ordering::Key, ..Flow::default() }).await
            }
            Flowed::Limited { concurrency } => {
                bench.set_flow(Flow { concurrency: Some(concurrency), ..Flow::default() }).await
            }
            Flowed::Batched { size } => {
                bench.set_batch(Batch { max_size: size, max_wait_ms: BATCH_WAIT_MS }).await
            }
        }
    }

    /// The key of the i-th row.
    fn key(self, i: usize) -> usize {
        match self {
            Flowed::Ordered { keys } => i % keys,
            Flowed::Limited { .. } | Flowed::Batched { .. } => i,
        }
    }

    /// What the drain is called in the output, and its `RESULT` name.
    fn names(self) -> (String, &'static str) {
        match self {
            Flowed::Ordered { keys } => (format!("drain ordered by {keys} keys"), "ordering"),
            Flowed::Limited { concurrency } => (format!("drain at concurrency {concurrency}"), "concurrency"),
            Flowed::Batched { size } => (format!("drain in batches of {size}"), "batch"),
        }
    }
}

/// The drain, and with `flowed` a second drain after it in each repetition: the same backlog
/// through a trigger with that flow.
#[allow(clippy::print_stdout)]
pub async fn run(servers: &Servers, n: usize, flowed: Option<Flowed>, reps: usize) -> anyhow::Result<()> {
    let mut plain = Vec::with_capacity(reps);
    let mut flowed_runs = Vec::with_capacity(reps);
    for rep in 1..=reps {
        plain.push(one(servers, n, None, Until::Empty, rep).await?);
        if let Some(flowed) = flowed {
            flowed_runs.push(one(servers, n, Some(flowed), Until::Empty, rep).await?);
        }
    }
    let rates: Vec<f64> = plain.iter().map(|r| r.rate).collect();
    let (median, min, max) = summary(&rates);
    println!("drain median {median:.0}/s [{min:.0}..{max:.0}] over {reps} runs");
    let Some(flowed) = flowed else {
        println!("RESULT picloud drain_per_s={median:.0} {}", cpu_fields(&plain));
        return Ok(());
    };
    let (what, name) = flowed.names();
    let flowed_rates: Vec<f64> = flowed_runs.iter().map(|r| r.rate).collect();
    let (rate, rate_min, rate_max) = summary(&flowed_rates);
    let ratios: Vec<f64> = flowed_rates.iter().zip(&rates).map(|(f, u)| f / u).collect();
    let (ratio, ratio_min, ratio_max) = summary(&ratios);
    println!(
        "{what} median {rate:.0}/s [{rate_min:.0}..{rate_max:.0}], \
         {ratio:.2} [{ratio_min:.2}..{ratio_max:.2}] of the plain drain of the same repetition"
    );
    println!("RESULT picloud drain_per_s={median:.0} {}", cpu_fields(&plain));
    println!(
        "RESULT picloud-drain-{name} drain_per_s={rate:.0} ratio={ratio:.2} {}",
        cpu_fields(&flowed_runs)
    );
    Ok(())
}

/// One repetition: a fresh database, the backlog, the drain until `until`; its rate and CPU.
pub async fn one(
    servers: &Servers,
    n: usize,
    flowed: Option<Flowed>,
    until: Until,
    rep: usize,
) -> anyhow::Result<Run> {
    let mut bench = servers.fresh().await?;
    if let Some(flowed) = flowed {
        flowed.apply(&mut bench).await?;
    }
    backlog(&bench, n, flowed).await?;
    bench.settle().await?;
    let what = flowed.map_or_else(|| "drain".to_owned(), |f| f.names().0);
    eprintln!("{what} rep {rep}: backlog of {n} written; draining");
    let batched = matches!(flowed, Some(Flowed::Batched { .. }));
    let serving = Serving::bench(bench.app.slug.as_str());
    let (elapsed, used) = drain(servers, &bench, &serving, n, batched, until).await?;
    Ok(Run::printed(&format!("{what} rep {rep}"), n, elapsed, &used))
}

/// What one drain measured.
pub struct Run {
    /// Deliveries per second.
    pub rate: f64,
    pub cpu: PerDelivery,
}

impl Run {
    /// The figures of `n` deliveries drained in `elapsed` with `used` CPU, printed as `what`'s.
    #[allow(clippy::print_stdout)]
    pub fn printed(what: &str, n: usize, elapsed: Duration, used: &Cpu) -> Run {
        let rate = n as f64 / elapsed.as_secs_f64();
        println!("{what}: {n} deliveries in {:.3} s = {rate:.0}/s", elapsed.as_secs_f64());
        let (parts, total) = used.per_delivery_us(n);
        println!("{what}: CPU per delivery {}", crate::cpu::shown(&parts, total));
        Run { rate, cpu: (parts, total) }
    }
}

/// The `RESULT` fields of the CPU per delivery: medians over `runs`, in µs.
pub fn cpu_fields(runs: &[Run]) -> String {
    crate::cpu::result_fields(&runs.iter().map(|r| r.cpu.clone()).collect::<Vec<_>>())
}

/// N deliveries through the store's batch insert, 1,000 per transaction: to the `bench` trigger,
/// each of its own key, or with `flowed` to the `flowed` trigger, keyed as the flow has it.
pub async fn backlog(bench: &Bench, n: usize, flowed: Option<Flowed>) -> anyhow::Result<()> {
    let (collection, trigger) = match flowed {
        None => ("bench", &bench.trigger),
        Some(_) => (FLOWED_COLLECTION, &bench.flowed),
    };
    let target = Target { app: &bench.app, trigger, collection };
    backlog_to(&bench.store, &[target], n, flowed).await
}

/// Where the rows of a backlog go: KV puts to `collection`, delivered to `app`'s kv `trigger`.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub app: &'a App,
    pub trigger: &'a Trigger,
    pub collection: &'a str,
}

/// [`backlog`] to any apps' kv triggers: row i to `targets[i % targets.len()]`, so the rows of
/// every transaction are spread evenly over the targets.
pub async fn backlog_to(
    store: &PgStore,
    targets: &[Target<'_>],
    n: usize,
    flowed: Option<Flowed>,
) -> anyhow::Result<()> {
    anyhow::ensure!(!targets.is_empty(), "a backlog needs a target");
    let sources: Vec<String> =
        targets.iter().map(|t| source::kv(t.app.slug.as_str(), t.collection)).collect();
    let config = picloud_core::TriggerConfig::default();
    for start in (0..n).step_by(1000) {
        let rows: Vec<NewDelivery> = (start..n.min(start + 1000))
            .map(|i| {
                let (target, source) = (&targets[i % targets.len()], &sources[i % targets.len()]);
                let key = flowed.map_or(i, |f| f.key(i));
                let (subject, data) = (format!("k{key}"), to_raw_value(&payload(i as u64, 0)).expect("json"));
                let ordering_key = kv_ordering_key(target.collection, &subject);
                let event = Event {
                    kind: EventKind::Kv,
                    event_type: event_type::KV_PUT,
                    source: source.clone(),
                    subject: Some(&subject),
                    payload: &data,
                    depth: 0,
                    ordering_key: Some(&ordering_key),
                };
                NewDelivery { max_attempts: 8, ..event.delivery_to(target.app.id, target.trigger, &config) }
            })
            .collect();
        let mut tx = store.begin().await?;
        store.insert_deliveries(&mut tx, &rows).await?;
        store.commit(tx).await?;
    }
    Ok(())
}

/// When a drain ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// The handler was handed the N deliveries and the outbox holds none of the rows.
    Empty,
    /// The handler was handed N deliveries; the outbox may hold more.
    Handed,
}

/// From "start" (connecting and LISTEN included) until a handler serving `serving` was handed N
/// deliveries (`batched`: a batch at a time), and with [`Until::Empty`] the outbox holds none of
/// the rows; and the CPU every process used meanwhile. The relay is told to start once the
/// handler has its subscriptions: a delivery published before would find no responders and wait
/// out a retry's backoff (a handler of many apps takes a while to subscribe to all of them).
pub async fn drain(
    servers: &Servers,
    bench: &Bench,
    serving: &Serving,
    n: usize,
    batched: bool,
    until: Until,
) -> anyhow::Result<(Duration, Cpu)> {
    let flags: &[&str] = if batched { &["--batch"] } else { &[] };
    let mut handler = serving.spawn(&servers.nats_url, n, flags).await?;
    let mut relay = spawn_relay(&bench.url, &servers.nats_url).await?;
    let (relay_pid, handler_pid) = (relay.pid(), handler.pid());
    let cpu = || Cpu::sample(&[("relay", relay_pid), ("handler", handler_pid)]);
    let before = cpu();
    let t0 = Instant::now();
    start_handler(&mut handler).await?;
    relay.send("start").await?;
    let done = tokio::time::timeout(Duration::from_secs(600), handler.line()).await??;
    anyhow::ensure!(done.starts_with("done "), "the handler said {done:?}");
    while until == Until::Empty && bench.outbox_len().await? > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = t0.elapsed();
    let used = cpu().since(&before);
    relay.stop().await?;
    handler.stop().await?;
    Ok((elapsed, used))
}
