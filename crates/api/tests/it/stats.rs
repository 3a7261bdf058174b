//! A trigger's statistics over HTTP (DESIGN §15): the attempts a real relay completed, counted by
//! outcome in the window's buckets, with their latency and the trigger's backlog.

use axum::http::{Method, StatusCode};
use picloud_testkit::eventually;
use picloud_worker::{Delivery, Reply as WorkerReply, Worker};
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn the_attempts_a_relay_completed_are_counted_by_outcome_in_the_current_bucket() {
    let api = Api::start().await;
    api.trigger(json!({"name": "jobs", "kind": "queue", "queue": "jobs", "handler": {"function": "work"},
                       "retry": {"max_attempts": 1}}))
        .await;
    let client = async_nats::connect(api.nats.url()).await.unwrap();
    let worker = Worker::new(client, "shop")
        .handle("work", |d: Delivery| async move {
            let n = d.data::<serde_json::Value>()?["n"].as_u64().unwrap();
            Ok(if n % 3 == 0 {
                WorkerReply::fail("multiples of three fail")
            } else {
                WorkerReply::ok(json!({}))
            })
        })
        .start()
        .await
        .unwrap();
    let relay = api.relay().await;
    for n in 1..=9 {
        let job = json!({"payload": {"n": n}});
        let reply =
            api.call(Method::POST, "/v1/apps/shop/queues/jobs/jobs", Some(&api.developer), Some(job)).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
    }

    let path = "/v1/apps/shop/triggers/jobs/stats";
    let stats = eventually("nine attempts to be counted", || async {
        let read = api.call(Method::GET, path, Some(&api.viewer), None).await;
        let total = &read.body["total"];
        (total["ok"].as_u64().unwrap_or(0) + total["fail"].as_u64().unwrap_or(0) == 9).then_some(read.body)
    })
    .await;
    assert_eq!((stats["window"].clone(), stats["bucket_seconds"].clone()), (json!("1h"), json!(60)));
    let buckets = stats["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 60, "every minute of the hour");
    let total = &stats["total"];
    assert_eq!(
        (total["ok"].clone(), total["fail"].clone(), total["timeout"].clone()),
        (json!(6), json!(3), json!(0))
    );
    let (p50, p99) = (total["p50_ms"].as_f64().unwrap(), total["p99_ms"].as_f64().unwrap());
    assert!(0.0 < p50 && p50 <= p99 && p99 < 1500.0, "p50 {p50} ms, p99 {p99} ms");
    let counted: Vec<u64> =
        buckets.iter().map(|b| b["ok"].as_u64().unwrap() + b["fail"].as_u64().unwrap()).collect();
    assert_eq!(counted[58] + counted[59], 9, "in the current minute (or the one before, at a minute's turn)");
    assert!(buckets[..58].iter().all(|b| b["p50_ms"].is_null()), "the earlier minutes are empty");
    assert_eq!(
        stats["backlog"],
        json!({"pending": 0, "scheduled": 0, "in_flight": 0, "waiting": 0, "oldest_due_age_ms": null})
    );

    let week = api.call(Method::GET, &format!("{path}?window=7d"), Some(&api.viewer), None).await;
    assert_eq!(week.body["buckets"].as_array().unwrap().len(), 168);
    assert_eq!(week.body["total"]["ok"], json!(6), "the hour's attempts are in the week's");
    relay.stop().await;
    worker.shutdown().await;
}

#[tokio::test]
async fn statistics_show_the_backlog_and_refuse_an_unknown_window_or_trigger() {
    let api = Api::start().await;
    api.trigger(json!({"name": "jobs", "kind": "queue", "queue": "jobs", "handler": {"function": "work"}}))
        .await;
    let job = json!({"payload": {}, "delay_ms": 60_000});
    api.call(Method::POST, "/v1/apps/shop/queues/jobs/jobs", Some(&api.developer), Some(job)).await;
    api.call(
        Method::POST,
        "/v1/apps/shop/queues/jobs/jobs",
        Some(&api.developer),
        Some(json!({"payload": {}})),
    )
    .await;

    let stats =
        api.call(Method::GET, "/v1/apps/shop/triggers/jobs/stats?window=24h", Some(&api.viewer), None).await;
    assert_eq!(stats.body["buckets"].as_array().unwrap().len(), 144);
    let backlog = &stats.body["backlog"];
    assert_eq!((backlog["pending"].clone(), backlog["scheduled"].clone()), (json!(1), json!(1)));
    assert!(backlog["oldest_due_age_ms"].as_u64().is_some(), "{backlog}");

    let bad =
        api.call(Method::GET, "/v1/apps/shop/triggers/jobs/stats?window=2h", Some(&api.viewer), None).await;
    assert_eq!((bad.status, bad.code()), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_field"));
    assert!(bad.message().contains("window"), "{}", bad.message());
    let missing = api.call(Method::GET, "/v1/apps/shop/triggers/nope/stats", Some(&api.viewer), None).await;
    assert_eq!((missing.status, missing.code()), (StatusCode::NOT_FOUND, "trigger_not_found"));
    let elsewhere =
        api.call(Method::GET, "/v1/apps/shop/triggers/jobs/stats", Some(&api.other_admin), None).await;
    assert_eq!(elsewhere.status, StatusCode::NOT_FOUND, "another app's admin cannot see it");
}

#[tokio::test]
async fn a_sync_call_the_node_delivered_itself_is_counted_too() {
    let api = Api::start().await;
    api.trigger(json!({"name": "call", "kind": "http", "handler": {"function": "answer"}})).await;
    let client = async_nats::connect(api.nats.url()).await.unwrap();
    let worker = Worker::new(client, "shop")
        .handle("answer", |_: Delivery| async move { Ok(WorkerReply::ok(json!({"ok": true}))) })
        .start()
        .await
        .unwrap();
    let called =
        api.call(Method::POST, "/v1/apps/shop/invoke/call", Some(&api.developer), Some(json!({}))).await;
    assert_eq!(called.status, StatusCode::OK, "{:?}", called.body);

    let path = "/v1/apps/shop/triggers/call/stats";
    let total = eventually("the call to be counted", || async {
        let read = api.call(Method::GET, path, Some(&api.viewer), None).await;
        (read.body["total"]["ok"] == json!(1)).then_some(read.body["total"].clone())
    })
    .await;
    assert!(total["p50_ms"].as_f64().unwrap() > 0.0, "{total}");
    worker.shutdown().await;
}
