//! Batches (DESIGN §14): a trigger with `batch` gets its deliveries many to a request, each
//! answered by the batch's results or its status, each with its own attempts.

use std::time::{Duration, Instant};

use picloud_core::Batch;
use picloud_store::*;
use picloud_worker::{BatchReply, Delivery, Reply, ReplyStatus};
use serde_json::json;

use crate::support::*;

/// A KV trigger on `orders` to `handler` that batches as `batch`.
async fn batched_trigger(w: &World, handler: &str, batch: Batch) -> Trigger {
    let trigger = w.kv_trigger("batched", "orders", handler).await;
    let patch = TriggerPatch { batch: Some(Some(batch)), ..TriggerPatch::default() };
    let trigger = w.store.update_trigger(w.app.id, trigger.name.as_str(), &patch).await.unwrap();
    assert_eq!(trigger.batch, Some(batch));
    trigger
}

/// The value each delivery of a batch carries.
fn values(batch: &[Delivery]) -> Vec<String> {
    batch
        .iter()
        .map(|d| d.data::<serde_json::Value>().unwrap()["value"]["value"].as_str().unwrap().to_owned())
        .collect()
}

/// The KV key of each dead letter's event.
fn keys(dead: &[DeadLetter]) -> Vec<String> {
    let key = |d: &DeadLetter| {
        serde_json::from_str::<serde_json::Value>(d.payload.get()).unwrap()["key"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    dead.iter().map(key).collect()
}

#[tokio::test]
async fn a_full_batch_goes_in_one_request_and_its_results_answer_each_delivery() {
    let w = World::new().await;
    // A long wait: only a full batch goes at once (and the rows' leases move to cover the wait).
    let wait = Duration::from_secs(10);
    batched_trigger(&w, "many", Batch { max_size: 10, max_wait_ms: wait.as_millis() as u32 }).await;
    let (worker, mut batches) =
        start_batch_worker(&w.nats_url(), "shop", "many", |batch: Vec<Delivery>| async move {
            let mut reply = BatchReply::ok();
            for d in &batch {
                match d.data::<serde_json::Value>().unwrap()["value"]["value"].as_str().unwrap() {
                    "bad" => reply.set(d.id, ReplyStatus::Fail),
                    "again" if d.attempt == 1 => reply.set(d.id, ReplyStatus::Retry),
                    _ => &mut reply,
                };
            }
            Ok(reply)
        })
        .await;
    let mut written = Vec::new();
    for i in 0..10 {
        let value = match i {
            3 => "bad".to_owned(),
            6 => "again".to_owned(),
            _ => format!("v{i}"),
        };
        w.put("orders", &format!("o-{i}"), json!({"value": value}), 0).await;
        written.push(value);
    }
    // Written before the relay starts: one claim takes them all.
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;
    let started = Instant::now();

    let first = next(&mut batches, "the full batch").await;
    assert!(started.elapsed() < wait, "a full batch goes without waiting out max_wait_ms");
    let mut sent = values(&first);
    sent.sort_unstable();
    written.sort_unstable();
    assert_eq!(sent, written, "all ten in one request");
    assert!(first.iter().all(|d| d.attempt == 1));
    let again = next(&mut batches, "the retried delivery").await;
    let retried = first.iter().find(|d| values(std::slice::from_ref(d)) == ["again"]).unwrap().id;
    assert_eq!((values(&again), again[0].attempt, again[0].id), (vec!["again".to_owned()], 2, retried));
    w.drained().await;
    let dead = w.dead_letters().await;
    assert_eq!(keys(&dead), ["o-3"], "the failed one only");
    assert_eq!(dead[0].attempts, 1);
    assert!(batches.try_recv().is_err(), "the others were answered ok once");
    relay.stop().await;
    worker.stop().await;
}

#[tokio::test]
async fn an_unfilled_batch_goes_once_its_first_delivery_has_waited_max_wait() {
    let w = World::new().await;
    let wait = Duration::from_millis(400);
    batched_trigger(&w, "many", Batch { max_size: 100, max_wait_ms: wait.as_millis() as u32 }).await;
    let (worker, mut batches) =
        start_batch_worker(&w.nats_url(), "shop", "many", |_| async { Ok(BatchReply::ok()) }).await;
    for i in 0..3 {
        w.put("orders", &format!("o-{i}"), json!({"value": format!("v{i}")}), 0).await;
    }
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;
    // The relay's tasks have not run yet: the wait starts after this.
    let started = Instant::now();
    let batch = next(&mut batches, "the batch").await;
    let mut sent = values(&batch);
    sent.sort_unstable();
    assert_eq!(sent, ["v0", "v1", "v2"], "the three wait for each other");
    assert!(started.elapsed() >= wait, "it went after {:?}, before its wait of {wait:?}", started.elapsed());
    w.drained().await;
    relay.stop().await;
    worker.stop().await;
}

#[tokio::test]
async fn a_batch_whose_answer_comes_too_late_is_tried_again_whole_and_its_status_answers_all() {
    let w = World::new().await;
    batched_trigger(&w, "many", Batch { max_size: 3, max_wait_ms: 5000 }).await;
    let timeout = relay_config("n").node.handler_timeout;
    let (worker, mut batches) =
        start_batch_worker(&w.nats_url(), "shop", "many", move |batch: Vec<Delivery>| async move {
            match batch[0].attempt {
                1 => {
                    tokio::time::sleep(timeout * 2).await;
                    Ok(BatchReply::ok())
                }
                _ => Ok(BatchReply::all(Reply::fail("no more"))),
            }
        })
        .await;
    for i in 0..3 {
        w.put("orders", &format!("o-{i}"), json!({"value": format!("v{i}")}), 0).await;
    }
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;
    let first = next(&mut batches, "the first attempt").await;
    let second = next(&mut batches, "the second attempt").await;
    assert_eq!(first.len(), 3);
    let attempts = |batch: &[Delivery], attempt: Option<u32>| {
        let mut ids: Vec<_> = batch.iter().map(|d| (d.id, attempt.unwrap_or(d.attempt))).collect();
        ids.sort_unstable();
        ids
    };
    assert_eq!(
        attempts(&second, None),
        attempts(&first, Some(2)),
        "the same three, each on its second attempt"
    );
    w.drained().await;
    let dead = w.dead_letters().await;
    assert_eq!(dead.len(), 3, "the header's fail answers every delivery");
    assert!(dead.iter().all(|d| d.attempts == 2 && d.last_error.as_deref() == Some("no more")), "{dead:?}");
    relay.stop().await;
    worker.stop().await;
}

#[tokio::test]
async fn a_batch_that_works_three_times_its_timeout_while_saying_so_runs_once() {
    let w = World::new().await;
    // A short wait (their claim's lease covers it): only `working` keeps the rows' leases.
    batched_trigger(&w, "many", Batch { max_size: 4, max_wait_ms: 100 }).await;
    let config = relay_config("n");
    let work = config.node.handler_timeout * 3;
    let (worker, mut batches) =
        start_batch_worker(&w.nats_url(), "shop", "many", move |batch: Vec<Delivery>| async move {
            batch[0].long_running(tokio::time::sleep(work)).await;
            Ok(BatchReply::ok())
        })
        .await;
    for i in 0..4 {
        w.put("orders", &format!("o-{i}"), json!({"value": format!("v{i}")}), 0).await;
    }
    let relay = start_relay(w.store.clone(), &w.nats_url(), config).await;
    let batch = next(&mut batches, "the batch").await;
    assert_eq!(batch.len(), 4);
    picloud_testkit::eventually_within("the batch completes", work * 3, || async {
        (w.outbox_len().await == 0).then_some(())
    })
    .await;
    assert!(batches.try_recv().is_err(), "one attempt for all four, though it took three handler timeouts");
    assert!(w.dead_letters().await.is_empty());
    relay.stop().await;
    worker.stop().await;
}

#[tokio::test]
async fn a_handler_of_one_delivery_at_a_time_answers_each_of_a_batch_by_its_own_reply() {
    let w = World::new().await;
    batched_trigger(&w, "one", Batch { max_size: 3, max_wait_ms: 5000 }).await;
    let (worker, mut handed) = start_worker(&w.nats_url(), "shop", "one", |d: Delivery| async move {
        Ok(match d.data::<serde_json::Value>().unwrap()["value"]["value"].as_str().unwrap() {
            "bad" => Reply::fail("bad value"),
            _ => Reply::ok(json!({})),
        })
    })
    .await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;
    for value in ["a", "bad", "c"] {
        w.put("orders", value, json!({"value": value}), 0).await;
    }
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.extend(values(&[next(&mut handed, "a delivery of the batch").await]));
    }
    seen.sort_unstable();
    assert_eq!(seen, ["a", "bad", "c"], "each by itself");
    w.drained().await;
    assert_eq!(keys(&w.dead_letters().await), ["bad"], "each answered by its own reply");
    relay.stop().await;
    worker.stop().await;
}

#[tokio::test]
async fn a_relay_that_stops_sends_its_unfilled_batches_at_once_and_completes_them() {
    let w = World::new().await;
    // A minute's wait: the batch goes only because the relay stops.
    batched_trigger(&w, "many", Batch { max_size: 100, max_wait_ms: 60_000 }).await;
    let (worker, mut batches) =
        start_batch_worker(&w.nats_url(), "shop", "many", |_| async { Ok(BatchReply::ok()) }).await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;
    for i in 0..2 {
        w.put("orders", &format!("o-{i}"), json!({"value": format!("v{i}")}), 0).await;
    }
    // Their leases moved to cover the minute's wait: they wait in the batch.
    claimed(&w, 2, Duration::from_secs(30)).await;
    assert!(batches.try_recv().is_err(), "the batch waits for more");
    let stopped = Instant::now();
    relay.stop().await;
    assert!(stopped.elapsed() < Duration::from_secs(10), "the stop did not wait out the batch");
    let mut sent = values(&next(&mut batches, "the batch").await);
    sent.sort_unstable();
    assert_eq!(sent, ["v0", "v1"]);
    assert_eq!(w.outbox_len().await, 0, "the stopping relay completed the batch it sent");
    worker.stop().await;
}

#[tokio::test]
async fn a_row_that_waits_for_its_batch_longer_than_its_lease_has_its_lease_moved_first() {
    let w = World::new().await;
    let config = relay_config("n");
    // Longer than a claim's lease (the handler timeout and the lease margin).
    let wait = config.node.handler_timeout + config.node.lease_margin * 2;
    batched_trigger(&w, "many", Batch { max_size: 100, max_wait_ms: wait.as_millis() as u32 }).await;
    let (worker, mut batches) =
        start_batch_worker(&w.nats_url(), "shop", "many", |_| async { Ok(BatchReply::ok()) }).await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), config.clone()).await;
    w.put("orders", "o-1", json!({"value": "v"}), 0).await;
    let covered = config.node.handler_timeout + wait;
    eventually("the row's lease covers its wait and the handler timeout after it", || async {
        let leased: Option<bool> =
            sqlx::query_scalar("SELECT leased_until >= due_at + make_interval(secs => $1) FROM outbox")
                .bind(covered.as_secs_f64())
                .fetch_optional(w.store.pool())
                .await
                .unwrap()
                .flatten();
        leased.unwrap_or(false).then_some(())
    })
    .await;
    let batch = next(&mut batches, "the batch").await;
    assert_eq!((values(&batch), batch[0].attempt), (vec!["v".to_owned()], 1));
    w.drained().await;
    relay.stop().await;
    worker.stop().await;
}

#[tokio::test]
async fn a_batch_larger_than_nats_carries_goes_as_several_requests_each_within_max_payload() {
    let w = World::new().await;
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("small.conf");
    std::fs::write(&conf, "max_payload: 8192\n").unwrap();
    let nats = picloud_testkit::NatsServer::start_with_config(&conf).await.unwrap();
    batched_trigger(&w, "many", Batch { max_size: 10, max_wait_ms: 5000 }).await;
    let (worker, mut batches) =
        start_batch_worker(&nats.url(), "shop", "many", |_| async { Ok(BatchReply::ok()) }).await;
    let relay = start_relay(w.store.clone(), &nats.url(), relay_config("n")).await;
    for i in 0..10 {
        w.put("orders", &format!("o-{i}"), json!({"value": format!("v{i}"), "pad": "x".repeat(1000)}), 0)
            .await;
    }
    let mut sizes = Vec::new();
    while sizes.iter().sum::<usize>() < 10 {
        sizes.push(next(&mut batches, "a part of the batch").await.len());
    }
    assert!(sizes.len() > 1 && sizes.iter().all(|&n| n > 1), "one batch of ten, split: {sizes:?}");
    w.drained().await;
    assert!(w.dead_letters().await.is_empty(), "none was too large to carry");
    relay.stop().await;
    worker.stop().await;
}

/// Waits until `n` rows are claimed with leases beyond `beyond` from now.
async fn claimed(w: &World, n: i64, beyond: Duration) {
    eventually("the rows are claimed", || async {
        let claimed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox WHERE leased_until > now() + make_interval(secs => $1)",
        )
        .bind(beyond.as_secs_f64())
        .fetch_one(w.store.pool())
        .await
        .unwrap();
        (claimed == n).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_shorter_max_wait_applies_to_the_batch_already_filling() {
    let w = World::new().await;
    let trigger = batched_trigger(&w, "many", Batch { max_size: 100, max_wait_ms: 60_000 }).await;
    let (worker, mut batches) =
        start_batch_worker(&w.nats_url(), "shop", "many", |_| async { Ok(BatchReply::ok()) }).await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;
    w.put("orders", "o-1", json!({"value": "v1"}), 0).await;
    claimed(&w, 1, Duration::ZERO).await;
    let patch = TriggerPatch {
        batch: Some(Some(Batch { max_size: 100, max_wait_ms: 100 })),
        ..TriggerPatch::default()
    };
    w.store.update_trigger(w.app.id, trigger.name.as_str(), &patch).await.unwrap();
    w.put("orders", "o-2", json!({"value": "v2"}), 0).await;
    let batch = next(&mut batches, "the batch, well before the first wait of a minute").await;
    assert!(batch.iter().all(|d| d.attempt == 1), "sent within the first claim's lease");
    let mut sent = values(&batch);
    sent.sort_unstable();
    assert_eq!(sent, ["v1", "v2"]);
    w.drained().await;
    relay.stop().await;
    worker.stop().await;
}

#[tokio::test]
async fn a_batch_that_no_claim_can_add_to_goes_at_once() {
    let w = World::new().await;
    batched_trigger(&w, "many", Batch { max_size: 100, max_wait_ms: 60_000 }).await;
    let (worker, mut batches) =
        start_batch_worker(&w.nats_url(), "shop", "many", |_| async { Ok(BatchReply::ok()) }).await;
    // A relay of four slots: four rows claimed, and no claim can follow until they are answered.
    let mut config = relay_config("n");
    config.max_in_flight = 4;
    let relay = start_relay(w.store.clone(), &w.nats_url(), config).await;
    for i in 0..4 {
        w.put("orders", &format!("o-{i}"), json!({"value": format!("v{i}")}), 0).await;
    }
    let mut sent = Vec::new();
    while sent.len() < 4 {
        sent.extend(values(&next(&mut batches, "the batch, well before its wait of a minute").await));
    }
    sent.sort_unstable();
    assert_eq!(sent, ["v0", "v1", "v2", "v3"]);
    w.drained().await;
    relay.stop().await;
    worker.stop().await;
}

#[tokio::test]
async fn a_batch_of_a_trigger_ordered_as_a_whole_goes_at_once() {
    let w = World::new().await;
    let trigger = batched_trigger(&w, "many", Batch { max_size: 100, max_wait_ms: 60_000 }).await;
    let (worker, mut batches) =
        start_batch_worker(&w.nats_url(), "shop", "many", |_| async { Ok(BatchReply::ok()) }).await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;
    // No other delivery can join its batch while one is in flight.
    let flow = picloud_core::Flow { ordering: picloud_core::flow::Ordering::Trigger, ..Default::default() };
    let patch = TriggerPatch { flow: Some(Some(flow)), ..TriggerPatch::default() };
    w.store.update_trigger(w.app.id, trigger.name.as_str(), &patch).await.unwrap();
    w.put("orders", "o-9", json!({"value": "v9"}), 0).await;
    assert_eq!(values(&next(&mut batches, "the ordered delivery, without a wait").await), ["v9"]);
    w.drained().await;
    relay.stop().await;
    worker.stop().await;
}
