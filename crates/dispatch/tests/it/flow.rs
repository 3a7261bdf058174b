//! Ordered deliveries across several relays (DESIGN §13): generated runs of writes to a few keys,
//! answered ok, retry, fail or too late, while one relay loses its database for good (it dies for
//! the store: what it holds comes back when the leases run out). The invariants are checked on
//! the workers' record of every attempt (`picloud_worker::Record`: per key, in the order handed,
//! with when each started and ended), joined with what the handler did with it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use picloud_core::flow::{Flow, Ordering};
use picloud_core::{Batch, CollectionPattern};
use picloud_store::*;
use picloud_worker::{BatchReply, BatchResult, Delivery, HandlerResult, Record, Reply, Worker};
use uuid::Uuid;

use crate::support::*;

/// What the handler does with one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    Ok,
    Retry,
    Fail,
    /// Answers after the deadline: the relay has timed the attempt out by then.
    Late,
}

/// What the handler did with one attempt.
#[derive(Debug, Clone, Copy)]
struct Acted {
    id: Uuid,
    attempt: u32,
    write: u32,
    act: Act,
    /// The deliveries in its request: 1, or its batch's.
    in_request: usize,
}

/// One attempt as the workers recorded it, in unix milliseconds, with what the handler did.
#[derive(Debug, Clone)]
struct Attempt {
    key: String,
    write: u32,
    attempt: u32,
    start_ms: i64,
    /// When the attempt ended for the relay: its answer, or its deadline if that came first.
    end_ms: i64,
    act: Act,
}

/// The handler's act for attempt `attempt` of write `write` of `key` in run `seed`: mostly ok,
/// sometimes a retry, a failure, or an answer after the deadline (first attempts only, so that
/// runs end quickly).
fn act(seed: u64, key: &str, write: u32, attempt: u32) -> Act {
    let h = key.bytes().fold(mix(seed), |h, b| mix(h ^ u64::from(b)));
    match mix(h ^ (u64::from(write) << 8) ^ u64::from(attempt)) % 100 {
        0..=64 => Act::Ok,
        65..=79 => Act::Retry,
        80..=87 => Act::Fail,
        _ if attempt == 1 => Act::Late,
        _ => Act::Ok,
    }
}

/// The write delivery `d` carries and what the handler does with it in run `seed`.
fn acting(seed: u64, d: &Delivery) -> (u32, Act) {
    let key = d.ordering_key().expect("every message has a key");
    let write = d.data::<serde_json::Value>().unwrap()["write"].as_u64().unwrap() as u32;
    (write, act(seed, key, write, d.attempt))
}

fn reply(act: Act) -> Reply {
    match act {
        Act::Ok | Act::Late => Reply::ok(serde_json::json!({})),
        Act::Retry => Reply::retry("generated retry"),
        Act::Fail => Reply::fail("generated failure"),
    }
}

async fn handle(
    seed: u64,
    log: Arc<Mutex<Vec<Acted>>>,
    handler_timeout: Duration,
    d: Delivery,
) -> HandlerResult {
    let (write, act) = acting(seed, &d);
    tokio::time::sleep(Duration::from_millis(5)).await;
    if act == Act::Late {
        tokio::time::sleep(handler_timeout + Duration::from_millis(200)).await;
    }
    log.lock().unwrap().push(Acted { id: d.id, attempt: d.attempt, write, act, in_request: 1 });
    Ok(reply(act))
}

/// [`handle`] for a batch: each delivery is answered by its act in the batch's results, but a
/// late answer is the whole batch's. It comes late only when every delivery in it is on its
/// first attempt, so that every write still ends on an act of its own within its attempts.
async fn handle_batch(
    seed: u64,
    log: Arc<Mutex<Vec<Acted>>>,
    handler_timeout: Duration,
    batch: Vec<Delivery>,
) -> BatchResult {
    let acts: Vec<(u32, Act)> = batch.iter().map(|d| acting(seed, d)).collect();
    let late = acts.iter().any(|&(_, act)| act == Act::Late) && batch.iter().all(|d| d.attempt == 1);
    tokio::time::sleep(Duration::from_millis(5)).await;
    if late {
        tokio::time::sleep(handler_timeout + Duration::from_millis(200)).await;
    }
    let mut answer = BatchReply::ok();
    let mut log = log.lock().unwrap();
    for (d, (write, act)) in batch.iter().zip(acts) {
        let act = match act {
            _ if late => Act::Late,
            Act::Late => Act::Ok,
            act => act,
        };
        log.push(Acted { id: d.id, attempt: d.attempt, write, act, in_request: batch.len() });
        answer.set(d.id, reply(act).status());
    }
    Ok(answer)
}

/// The workers' record of every attempt, each with what the handler did with it.
fn attempts(record: &Record, acted: &[Acted]) -> Vec<Attempt> {
    let acted: HashMap<(Uuid, u32), Acted> = acted.iter().map(|a| ((a.id, a.attempt), *a)).collect();
    record
        .by_key("h")
        .into_iter()
        .flat_map(|(key, handed)| handed.into_iter().map(move |h| (key.clone(), h)))
        .map(|(key, h)| {
            let did = acted[&(h.id, h.attempt)];
            let end_ms = h.ended_ms.expect("every attempt was answered");
            Attempt {
                key,
                write: did.write,
                attempt: h.attempt,
                start_ms: h.started_ms,
                end_ms,
                act: did.act,
            }
        })
        .collect()
}

/// Checks the invariants of an ordered trigger on the record: per key, no attempt of a write
/// starts before every attempt of the write before it ended (so at most one delivery of a key is
/// in flight, and writes go in write order, a retry keeping its place); every write ends, once,
/// in an ok or a dead letter.
fn check(log: &[Attempt], writes: u32, dead_letters: usize) {
    let mut by_key: BTreeMap<&str, BTreeMap<u32, Vec<&Attempt>>> = BTreeMap::new();
    for a in log {
        by_key.entry(&a.key).or_default().entry(a.write).or_default().push(a);
    }
    let mut failed = 0;
    for (key, by_write) in &by_key {
        assert_eq!(by_write.len() as u32, writes, "{key}: every write was delivered");
        let mut previous_end = i64::MIN;
        for (write, attempts) in by_write {
            let first_start = attempts.iter().map(|a| a.start_ms).min().unwrap();
            assert!(
                first_start >= previous_end,
                "{key}: write {write} started at {first_start}, before write {} ended at {previous_end}: {attempts:?}",
                write - 1
            );
            let mut sorted = attempts.clone();
            sorted.sort_by_key(|a| a.attempt);
            for pair in sorted.windows(2) {
                assert!(
                    pair[1].start_ms >= pair[0].end_ms,
                    "{key}: attempts of write {write} overlap: {pair:?}"
                );
            }
            let last = sorted.last().unwrap();
            assert!(
                matches!(last.act, Act::Ok | Act::Fail) || (last.act == Act::Retry && last.attempt == 3),
                "{key}: write {write} ended on {last:?}"
            );
            failed += usize::from(last.act != Act::Ok);
            previous_end = attempts.iter().map(|a| a.end_ms).max().unwrap();
        }
    }
    assert_eq!(dead_letters, failed, "a dead letter for each write that ended without an ok");
}

/// One generated run of seed `seed`, its trigger batching as `batch` if given.
async fn one_run(seed: u64, batch: Option<Batch>) {
    let w = World::new().await;
    let mut trigger = w
        .trigger("ordered", TriggerSpec::Pubsub { topic: CollectionPattern::parse("t").unwrap() }, "h")
        .await;
    let patch = TriggerPatch {
        flow: Some(Some(Flow { ordering: Ordering::Key, ..Flow::default() })),
        batch: Some(batch),
        ..TriggerPatch::default()
    };
    trigger = w.store.update_trigger(w.app.id, trigger.name.as_str(), &patch).await.unwrap();
    assert!(trigger.flow.is_some());
    assert_eq!(trigger.batch, batch);

    let handler_timeout = run_config("r").node.handler_timeout;
    let (log, record) = (Arc::new(Mutex::new(Vec::new())), Record::new());
    let mut workers = Vec::new();
    for _ in 0..2 {
        let log = log.clone();
        let client = async_nats::connect(w.nats_url()).await.unwrap();
        let worker = Worker::new(client, "shop").record(&record);
        let worker = match batch {
            None => worker.handle("h", move |d| handle(seed, log.clone(), handler_timeout, d)),
            Some(_) => worker.handle_batch("h", move |b| handle_batch(seed, log.clone(), handler_timeout, b)),
        };
        workers.push(worker.start().await.unwrap());
    }
    let (proxy, doomed, relays) = three_relays_one_doomed(&w).await;

    let (keys, writes) = (6u32, 8u32);
    for write in 0..writes {
        if write == writes / 3 {
            proxy.cut().await;
        }
        for key in 0..keys {
            w.publish("t", serde_json::json!({"write": write}), Some(&format!("k{key}"))).await;
        }
    }
    w.drained_within_a_minute().await;
    let dead: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dead_letters").fetch_one(w.store.pool()).await.unwrap();
    for relay in relays {
        relay.stop().await;
    }
    doomed.signal_stop();
    for worker in workers {
        worker.shutdown().await;
    }
    let acted = log.lock().unwrap().clone();
    if batch.is_some() {
        assert!(acted.iter().any(|a| a.in_request > 1), "seed {seed} sent several keys in one batch");
    }
    let log = attempts(&record, &acted);
    check(&log, writes, dead as usize);
    assert!(log.iter().any(|a| a.act == Act::Late), "seed {seed} timed an attempt out");
}

#[tokio::test]
async fn ordered_keys_go_one_at_a_time_in_write_order_across_relays_through_retries_failures_timeouts_and_a_dead_relay()
 {
    for seed in [1, 2] {
        tokio::time::timeout(Duration::from_secs(120), one_run(seed, None))
            .await
            .unwrap_or_else(|_| panic!("the run of seed {seed} did not end within two minutes"));
    }
}

#[tokio::test]
async fn ordered_keys_in_batches_keep_their_order_across_relays_through_retries_failures_timeouts_and_a_dead_relay()
 {
    // Batches of up to four of the six keys' heads, sent once the first has waited 20 ms.
    let batch = Batch { max_size: 4, max_wait_ms: 20 };
    for seed in [3, 4] {
        tokio::time::timeout(Duration::from_secs(120), one_run(seed, Some(batch)))
            .await
            .unwrap_or_else(|_| panic!("the batched run of seed {seed} did not end within two minutes"));
    }
}
