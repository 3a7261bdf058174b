//! Scenario 1, drain: throughput from a backlog of N deliveries.

use picloud_core::flow::kv_ordering_key;
use std::time::{Duration, Instant};

use picloud_core::protocol::{EventKind, event_type, source};
use picloud_store::events::Event;
use picloud_store::{NewDelivery, OutboxRepo, Transactional};
use serde_json::value::to_raw_value;

use crate::env::{Bench, Servers, payload};
use crate::proc::Role;
use crate::stats::summary;

#[allow(clippy::print_stdout)]
pub async fn run(servers: &Servers, n: usize, reps: usize) -> anyhow::Result<()> {
    let mut rates = Vec::with_capacity(reps);
    for rep in 1..=reps {
        let bench = servers.fresh().await?;
        backlog(&bench, n).await?;
        bench.settle().await?;
        eprintln!("drain rep {rep}: backlog of {n} written; draining");
        let elapsed = drain(servers, &bench, n).await?;
        let rate = n as f64 / elapsed.as_secs_f64();
        println!("drain rep {rep}: {n} deliveries in {:.3} s = {rate:.0}/s", elapsed.as_secs_f64());
        rates.push(rate);
    }
    let (median, min, max) = summary(&rates);
    println!("drain median {median:.0}/s [{min:.0}..{max:.0}] over {reps} runs");
    println!("RESULT picloud drain_per_s={median:.0}");
    Ok(())
}

/// N deliveries through the store's batch insert, 1,000 per transaction.
async fn backlog(bench: &Bench, n: usize) -> anyhow::Result<()> {
    let source = source::kv(bench.app.slug.as_str(), "bench");
    for start in (0..n).step_by(1000) {
        let rows: Vec<NewDelivery> = (start..n.min(start + 1000))
            .map(|i| {
                let (subject, data) = (format!("k{i}"), to_raw_value(&payload(i as u64, 0)).expect("json"));
                let ordering_key = kv_ordering_key("bench", &subject);
                let event = Event {
                    kind: EventKind::Kv,
                    event_type: event_type::KV_PUT,
                    source: source.clone(),
                    subject: Some(&subject),
                    payload: &data,
                    depth: 0,
                    ordering_key: Some(&ordering_key),
                };
                event.delivery(bench.app.id, Some(bench.trigger.id), 8)
            })
            .collect();
        let mut tx = bench.store.begin().await?;
        bench.store.insert_deliveries(&mut tx, &rows).await?;
        bench.store.commit(tx).await?;
    }
    Ok(())
}

/// From "start" (connecting and LISTEN included) until the handler ran N times and the outbox
/// holds none of the rows.
async fn drain(servers: &Servers, bench: &Bench, n: usize) -> anyhow::Result<Duration> {
    let expect = n.to_string();
    let mut handler = Role::spawn(
        "handler",
        &["handler", "--nats-url", &servers.nats_url, "--app", bench.app.slug.as_str(), "--expect", &expect],
    )
    .await?;
    let mut relay =
        Role::spawn("relay", &["relay", "--url", &bench.url, "--nats-url", &servers.nats_url]).await?;
    let t0 = Instant::now();
    handler.send("start").await?;
    relay.send("start").await?;
    let started = handler.line().await?;
    anyhow::ensure!(started == "started", "the handler said {started:?}");
    let done = tokio::time::timeout(Duration::from_secs(600), handler.line()).await??;
    anyhow::ensure!(done.starts_with("done "), "the handler said {done:?}");
    while bench.outbox_len().await? > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = t0.elapsed();
    relay.stop().await?;
    handler.stop().await?;
    Ok(elapsed)
}
