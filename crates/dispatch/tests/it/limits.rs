//! Flow limits across several relays (DESIGN §13): generated runs of messages to a trigger with a
//! `concurrency` and one with a `rate`, answered ok, retry, fail or too late, while one relay
//! loses its database for good (what it holds comes back when its leases run out). The limits are
//! checked on the record of every attempt: the workers' own (`picloud_worker::Record`) for the
//! concurrency, the send times the rated handler reads off its deliveries for the rate.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use picloud_core::CollectionPattern;
use picloud_core::flow::{Flow, Rate};
use picloud_store::*;
use picloud_worker::{Delivery, HandlerResult, Record, Reply, Worker};

use crate::support::*;

const CONCURRENCY: u32 = 3;
const RATE: Rate = Rate { per_second: 40, burst: 4 };

/// One attempt of the rated handler: when the relay sent it (unix milliseconds), and its message.
#[derive(Debug, Clone, Copy)]
struct Sent {
    at_ms: i64,
    n: u64,
}

/// The concurrency handler: works 5–40 ms, then mostly answers ok, sometimes retry or fail, and
/// on some first attempts answers after the deadline.
async fn limited(seed: u64, timeout: Duration, d: Delivery) -> HandlerResult {
    let n = d.data::<serde_json::Value>().unwrap()["n"].as_u64().unwrap();
    let roll = mix(seed ^ (n << 8) ^ u64::from(d.attempt));
    tokio::time::sleep(Duration::from_millis(5 + roll % 36)).await;
    let late = d.attempt == 1 && roll % 100 >= 95;
    if late {
        tokio::time::sleep(timeout + Duration::from_millis(200)).await;
    }
    Ok(match (roll >> 8) % 100 {
        _ if late => Reply::ok(serde_json::json!({})),
        0..=14 => Reply::retry("generated retry"),
        15..=19 => Reply::fail("generated failure"),
        _ => Reply::ok(serde_json::json!({})),
    })
}

/// The rate handler: records when the relay sent the attempt (its deadline less the handler
/// timeout: the relay sets it right after the claim, where a token was spent) and answers ok.
async fn rated(log: Arc<Mutex<Vec<Sent>>>, timeout: Duration, d: Delivery) -> HandlerResult {
    let at_ms = d.deadline_ms - timeout.as_millis() as i64;
    let n = d.data::<serde_json::Value>().unwrap()["n"].as_u64().unwrap();
    log.lock().unwrap().push(Sent { at_ms, n });
    Ok(Reply::ok(serde_json::json!({})))
}

/// The most a relay sends an attempt after the claim that took it spent its token: a window of
/// sends holds the claims of a window this much longer.
const CLAIM_TO_SEND: f64 = 0.1;

/// Over every window, no more attempts started than the burst plus the rate over the window
/// (lengthened by [`CLAIM_TO_SEND`]).
fn check_rate(log: &[Sent]) {
    let mut starts: Vec<i64> = log.iter().map(|a| a.at_ms).collect();
    starts.sort_unstable();
    for i in 0..starts.len() {
        for j in i..starts.len() {
            let started = (j - i + 1) as f64;
            let window_s = (starts[j] - starts[i]) as f64 / 1000.0;
            let allowed = f64::from(RATE.burst) + f64::from(RATE.per_second) * (window_s + CLAIM_TO_SEND);
            assert!(started <= allowed, "{started} attempts started in {window_s} s: {starts:?}");
        }
    }
}

async fn one_run(seed: u64) {
    let w = World::new().await;
    let topic = || TriggerSpec::Pubsub { topic: CollectionPattern::parse("t").unwrap() };
    for (name, flow) in [
        ("limited", Flow { concurrency: Some(CONCURRENCY), ..Flow::default() }),
        ("rated", Flow { rate: Some(RATE), ..Flow::default() }),
    ] {
        w.trigger(name, topic(), name).await;
        let patch = TriggerPatch { flow: Some(Some(flow)), ..TriggerPatch::default() };
        w.store.update_trigger(w.app.id, name, &patch).await.unwrap();
    }
    let timeout = run_config("r").node.handler_timeout;
    let (record, rated_log) = (Record::new(), Arc::new(Mutex::new(Vec::new())));
    let (mut workers, mut rated_workers) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        let client = async_nats::connect(w.nats_url()).await.unwrap();
        let worker =
            Worker::new(client, "shop").record(&record).handle("limited", move |d| limited(seed, timeout, d));
        workers.push(worker.start().await.unwrap());
        let log = rated_log.clone();
        rated_workers.push(
            start_worker(&w.nats_url(), "shop", "rated", move |d| rated(log.clone(), timeout, d)).await.0,
        );
    }
    let (proxy, doomed, relays) = three_relays_one_doomed(&w).await;

    let messages = 40u64;
    for n in 0..messages {
        if n == messages / 4 {
            proxy.cut().await;
        }
        w.publish("t", serde_json::json!({"n": n}), None).await;
    }
    w.drained_within_a_minute().await;
    for relay in relays {
        relay.stop().await;
    }
    doomed.signal_stop();
    for worker in workers {
        worker.shutdown().await;
    }
    for worker in rated_workers {
        worker.stop().await;
    }
    let most = record.peak_in_flight("limited");
    assert!(
        most <= CONCURRENCY as usize,
        "seed {seed}: {most} attempts were in flight at once: {:?}",
        record.handed()
    );
    assert!(most > 1, "seed {seed}: the limit let deliveries run side by side");
    let rated_log = rated_log.lock().unwrap().clone();
    let reached: std::collections::BTreeSet<u64> = rated_log.iter().map(|a| a.n).collect();
    assert_eq!(reached, (0..messages).collect(), "every message reached the rated handler");
    check_rate(&rated_log);
}

#[tokio::test]
async fn concurrency_and_rate_hold_across_relays_through_retries_failures_timeouts_and_a_dead_relay() {
    for seed in [1, 2] {
        tokio::time::timeout(Duration::from_secs(120), one_run(seed))
            .await
            .unwrap_or_else(|_| panic!("the run of seed {seed} did not end within two minutes"));
    }
}

/// The rows a relay claimed ahead of its one slot go back when it stops, their attempt not
/// spent: the next relay delivers each as its first attempt (and the delivery the stopping relay
/// had in flight, which timed out, as its second).
#[tokio::test]
async fn a_relay_that_stops_gives_back_its_rows_ahead_of_a_slot_with_their_attempts() {
    tokio::time::timeout(Duration::from_secs(60), rows_ahead_of_a_stopped_relay_come_back())
        .await
        .expect("the rows ahead came back within a minute");
}

async fn rows_ahead_of_a_stopped_relay_come_back() {
    let w = World::new().await;
    w.trigger("limited", TriggerSpec::Pubsub { topic: CollectionPattern::parse("t").unwrap() }, "limited")
        .await;
    let flow = Flow { concurrency: Some(1), ..Flow::default() };
    let patch = TriggerPatch { flow: Some(Some(flow)), ..TriggerPatch::default() };
    w.store.update_trigger(w.app.id, "limited", &patch).await.unwrap();
    for n in 0..3 {
        w.publish("t", serde_json::json!({"n": n}), None).await;
    }
    let release = Arc::new(tokio::sync::Notify::new());
    let held = release.clone();
    let (worker, mut handed) = start_worker(&w.nats_url(), "shop", "limited", move |_| {
        let held = held.clone();
        async move {
            held.notified().await;
            Ok(Reply::ok(serde_json::json!({})))
        }
    })
    .await;
    // A timeout long enough that the stop below begins well before the first delivery ends.
    let mut config = relay_config("r");
    config.node.handler_timeout = Duration::from_secs(3);
    let relay = start_relay(w.store.clone(), &w.nats_url(), config).await;
    let first = next(&mut handed, "the first delivery").await;
    // The one claim took all three rows: one in the slot, two ahead of it.
    let leased: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE leased_until IS NOT NULL")
        .fetch_one(w.store.pool())
        .await
        .unwrap();
    assert_eq!(leased, 3);
    // The handler holds its delivery until the stopping relay timed it out: no slot frees
    // while the relay stops, so nothing ahead starts.
    relay.stop().await;
    release.notify_one();
    worker.stop().await;

    let (worker, mut handed) = start_worker(&w.nats_url(), "shop", "limited", ok).await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("r2")).await;
    for _ in 0..3 {
        let d = next(&mut handed, "a row given back").await;
        if d.id == first.id {
            assert_eq!(d.attempt, 2, "the delivery in flight timed out");
        } else {
            assert_eq!(d.attempt, 1, "giving a row back spends no attempt");
        }
    }
    w.drained().await;
    relay.stop().await;
    worker.stop().await;
}
