//! The debounce scenario: bursts of writes to a few keys through a trigger with
//! `flow.debounce_ms`; how many times the handler ran, and whether each key's last run carried
//! its last value; and the CPU a handler run costs, and a write.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use picloud_core::flow::{Flow, Ordering};
use picloud_core::names::{CollectionName, KvKey};
use picloud_store::PgStore;
use picloud_store::events::{self, EventContext};
use picloud_worker::{Delivery, Reply, Worker};

use crate::cpu::{self, Cpu};
use crate::env::{FLOWED_COLLECTION, HANDLER, Servers};
use crate::roles::spawn_relay;
use crate::stats::summary;

/// The scenario's shape.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub keys: usize,
    pub writes: usize,
    pub debounce_ms: u32,
    /// Over how long the writes of each key are spread.
    pub spread: Duration,
}

/// The scenario: `reps` repetitions; the handler runs, the keys whose last run had their last
/// value, and the CPU every process used from the first write until the outbox was empty. The
/// CPU figure is per handler run, each run being one delivery (`cpu_us_per_delivery` and the
/// parts' fields of the `RESULT` line); the total per write, of which the debounce runs the
/// handler for few, is `cpu_us_per_write`. The handler runs in the benchmark's process, so its
/// CPU is counted under `bench`, with the writers'.
#[allow(clippy::print_stdout)]
pub async fn run(servers: &Servers, shape: Shape, reps: usize) -> anyhow::Result<()> {
    let mut runs = Vec::with_capacity(reps);
    let mut last_values = Vec::with_capacity(reps);
    let (mut per_run, mut per_write) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    for rep in 1..=reps {
        let (ran, last_ok, took, used) = one(servers, shape, rep).await?;
        println!(
            "debounce rep {rep}: {} writes to {} keys in {:.2} s; the handler ran {ran} times, \
             {last_ok} of {} keys last with their last value",
            shape.keys * shape.writes,
            shape.keys,
            took.as_secs_f64(),
            shape.keys
        );
        let (parts, total) = used.per_delivery_us(ran);
        let write = used.per_delivery_us(shape.keys * shape.writes).1;
        println!(
            "debounce rep {rep}: CPU per handler run {}; per write {write:.1} µs",
            cpu::shown(&parts, total)
        );
        per_run.push((parts, total));
        per_write.push(write);
        runs.push(ran as f64);
        last_values.push(last_ok as f64);
    }
    let (median, min, max) = summary(&runs);
    println!(
        "debounce ({} ms) median {median:.0} handler runs [{min:.0}..{max:.0}] for {} writes to {} keys",
        shape.debounce_ms,
        shape.keys * shape.writes,
        shape.keys
    );
    let (last_ok, _, _) = summary(&last_values);
    println!(
        "RESULT picloud-debounce runs={median:.0} last_value_ok={last_ok:.0} {} cpu_us_per_write={:.1}",
        cpu::result_fields(&per_run),
        summary(&per_write).0
    );
    Ok(())
}

/// One repetition: the handler runs, whether each key's last run had its last value, how long
/// the writes took, and the CPU used from the first write until the outbox was empty.
async fn one(servers: &Servers, shape: Shape, rep: usize) -> anyhow::Result<(usize, usize, Duration, Cpu)> {
    let mut bench = servers.fresh().await?;
    bench
        .set_flow(Flow { ordering: Ordering::Key, debounce_ms: Some(shape.debounce_ms), ..Flow::default() })
        .await?;
    let seen: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let nats = async_nats::connect(&servers.nats_url).await?;
    let log = seen.clone();
    let worker = Worker::new(nats, bench.app.slug.as_str())
        .handle(HANDLER, move |d: Delivery| {
            let log = log.clone();
            async move {
                let data: serde_json::Value = d.data()?;
                let n = data["value"]["n"].as_u64().unwrap_or(u64::MAX);
                let key = data["key"].as_str().unwrap_or_default().to_owned();
                log.lock().expect("log lock").push((key, n));
                Ok(Reply::ok(serde_json::json!({})))
            }
        })
        .start()
        .await?;
    let mut relay = spawn_relay(&bench.url, &servers.nats_url).await?;
    relay.send("start").await?;
    eprintln!("debounce rep {rep}: writing");
    let collection = CollectionName::parse(FLOWED_COLLECTION)?;
    // Each key is written by a writer of its own, a task on a connection of its own, a write
    // every `spread / writes`: no key waits for another's write.
    let store = PgStore::connect(&bench.url, u32::try_from(shape.keys.max(1))?).await?;
    let pause = shape.spread / u32::try_from(shape.writes.max(1))?;
    let roles = [("relay", relay.pid())];
    let before = Cpu::sample(&roles);
    let started = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for k in 0..shape.keys {
        let key = KvKey::parse(format!("k{k}"))?;
        let (store, collection, app) = (store.clone(), collection.clone(), bench.app.clone());
        writers.spawn(async move {
            let config = picloud_core::TriggerConfig::default();
            let cx = EventContext { app_id: app.id, app_slug: &app.slug, depth: 0, config: &config };
            // The longest time between the ends of two writes of this key.
            let (mut longest, mut last_end) = (Duration::ZERO, None::<Instant>);
            for n in 0..shape.writes {
                let write = Instant::now();
                events::kv_put_now(&store, &cx, &collection, &key, &serde_json::json!({"n": n}), None, None)
                    .await?;
                let end = Instant::now();
                longest = longest.max(last_end.map_or(Duration::ZERO, |last| end - last));
                last_end = Some(end);
                tokio::time::sleep(pause.saturating_sub(write.elapsed())).await;
            }
            anyhow::Ok(longest)
        });
    }
    let mut gaps = Vec::with_capacity(shape.keys);
    while let Some(written) = writers.join_next().await {
        gaps.push(written??.as_secs_f64() * 1e3);
    }
    let took = started.elapsed();
    let (gap, gap_min, gap_max) = summary(&gaps);
    let over = gaps.iter().filter(|g| **g > f64::from(shape.debounce_ms)).count();
    eprintln!(
        "debounce rep {rep}: the longest time between two writes of a key: median {gap:.0} ms \
         [{gap_min:.0}..{gap_max:.0}] over the keys; {over} keys had one longer than the debounce"
    );
    while bench.outbox_len().await? > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let used = Cpu::sample(&roles).since(&before);
    relay.stop().await?;
    worker.shutdown().await;
    let seen = seen.lock().expect("log lock").clone();
    let mut last: HashMap<String, u64> = HashMap::new();
    for (key, n) in &seen {
        last.insert(key.clone(), *n);
    }
    let last_ok = last.values().filter(|n| **n == shape.writes as u64 - 1).count();
    Ok((seen.len(), last_ok, took, used))
}
