//! The debounce scenario: bursts of writes to a few keys through a trigger with
//! `flow.debounce_ms`; how many times the handler ran, and whether each key's last run carried
//! its last value.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use picloud_core::flow::{Flow, Ordering};
use picloud_core::names::{CollectionName, KvKey};
use picloud_store::events::{self, EventContext};
use picloud_worker::{Delivery, Reply, Worker};

use crate::env::{FLOWED_COLLECTION, HANDLER, Servers};
use crate::proc::Role;
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

#[allow(clippy::print_stdout)]
pub async fn run(servers: &Servers, shape: Shape, reps: usize) -> anyhow::Result<()> {
    let mut runs = Vec::with_capacity(reps);
    let mut all_last = true;
    for rep in 1..=reps {
        let (ran, last_ok, took) = one(servers, shape, rep).await?;
        println!(
            "debounce rep {rep}: {} writes to {} keys in {:.2} s; the handler ran {ran} times, \
             {last_ok} of {} keys last with their last value",
            shape.keys * shape.writes,
            shape.keys,
            took.as_secs_f64(),
            shape.keys
        );
        runs.push(ran as f64);
        all_last &= last_ok == shape.keys;
    }
    let (median, min, max) = summary(&runs);
    println!(
        "debounce ({} ms) median {median:.0} handler runs [{min:.0}..{max:.0}] for {} writes to {} keys",
        shape.debounce_ms,
        shape.keys * shape.writes,
        shape.keys
    );
    println!("RESULT picloud debounce_runs={median:.0} debounce_last_values={all_last}");
    Ok(())
}

/// One repetition: the handler runs, whether each key's last run had its last value, and how
/// long the writes took.
async fn one(servers: &Servers, shape: Shape, rep: usize) -> anyhow::Result<(usize, usize, Duration)> {
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
    let mut relay =
        Role::spawn("relay", &["relay", "--url", &bench.url, "--nats-url", &servers.nats_url]).await?;
    relay.send("start").await?;
    eprintln!("debounce rep {rep}: writing");
    let config = picloud_core::TriggerConfig::default();
    let cx = EventContext { app_id: bench.app.id, app_slug: &bench.app.slug, depth: 0, config: &config };
    let collection = CollectionName::parse(FLOWED_COLLECTION)?;
    let keys: Vec<KvKey> =
        (0..shape.keys).map(|k| KvKey::parse(format!("k{k}"))).collect::<Result<_, _>>()?;
    let started = Instant::now();
    let pause = shape.spread / u32::try_from(shape.writes.max(1))?;
    for n in 0..shape.writes {
        let round = Instant::now();
        let (cx, collection, store) = (&cx, &collection, &bench.store);
        let writes = keys.iter().map(|key| async move {
            events::kv_put_now(store, cx, collection, key, &serde_json::json!({"n": n}), None).await
        });
        for written in futures::future::join_all(writes).await {
            written?;
        }
        tokio::time::sleep(pause.saturating_sub(round.elapsed())).await;
    }
    let took = started.elapsed();
    while bench.outbox_len().await? > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.stop().await?;
    worker.shutdown().await;
    let seen = seen.lock().expect("log lock").clone();
    let mut last: HashMap<String, u64> = HashMap::new();
    for (key, n) in &seen {
        last.insert(key.clone(), *n);
    }
    let last_ok = last.values().filter(|n| **n == shape.writes as u64 - 1).count();
    Ok((seen.len(), last_ok, took))
}
