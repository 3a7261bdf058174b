//! Cancelling deliveries over HTTP (DESIGN §14): in each state, the worker told when one runs,
//! sync calls refused, finished ones not found.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use picloud_worker::{Delivery, Record, Worker};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

use crate::support::*;

async fn enqueue(api: &Api, queue: &str, job: Value) -> String {
    let path = format!("/v1/apps/shop/queues/{queue}/jobs");
    let reply = api.call(Method::POST, &path, Some(&api.developer), Some(job)).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
    reply.body["id"].as_str().unwrap().to_owned()
}

async fn cancel(api: &Api, id: &str) -> Reply {
    let path = format!("/v1/apps/shop/deliveries/{id}/cancel");
    api.call(Method::POST, &path, Some(&api.admin), None).await
}

/// Answers 200 with the dead letter the delivery became: `cancelled`, resolved `ignored`.
fn assert_cancelled(reply: &Reply, id: &str) {
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(
        (&reply.body["delivery_id"], &reply.body["reason"], &reply.body["resolution"]),
        (&json!(id), &json!("cancelled"), &json!("ignored"))
    );
}

/// The next thing the handler told, within 30 s.
async fn next<T>(heard: &mut mpsc::UnboundedReceiver<T>) -> T {
    let within = Duration::from_secs(30);
    tokio::time::timeout(within, heard.recv()).await.expect("the handler to tell within 30 s").unwrap()
}

/// Sends a message when dropped.
struct Dropped(mpsc::UnboundedSender<&'static str>);

impl Drop for Dropped {
    fn drop(&mut self) {
        self.0.send("dropped").ok();
    }
}

#[tokio::test]
async fn a_delivery_in_flight_is_cancelled_its_handler_stopped_and_it_is_never_delivered_again() {
    let api = Api::start().await;
    api.trigger(json!({"name": "long", "kind": "queue", "queue": "long", "handler": {"function": "long"}}))
        .await;
    let (events, mut heard) = mpsc::unbounded_channel();
    let client = async_nats::connect(api.nats.url()).await.unwrap();
    let record = Record::new();
    let worker = Worker::new(client, "shop")
        .record(&record)
        .handle("long", move |d: Delivery| {
            let events = events.clone();
            let cancellation = d.cancellation();
            async move {
                let _dropped = Dropped(events.clone());
                let on_token = events.clone();
                tokio::spawn(async move {
                    cancellation.cancelled().await;
                    on_token.send("token fired").ok();
                });
                events.send("started").ok();
                std::future::pending::<()>().await;
                unreachable!("the handler never answers by itself")
            }
        })
        .start()
        .await
        .unwrap();
    let relay = api.relay().await;

    let id = enqueue(&api, "long", json!({"payload": {"n": 1}})).await;
    assert_eq!(next(&mut heard).await, "started");
    assert_cancelled(&cancel(&api, &id).await, &id);
    let mut told: Vec<&str> = vec![next(&mut heard).await, next(&mut heard).await];
    told.sort_unstable();
    assert_eq!(told, ["dropped", "token fired"], "the handler's future is dropped and its token fires");
    assert_eq!(record.in_flight("long"), 0, "the record ends a cancelled delivery");
    assert_eq!(api.outbox_len().await, 0, "nothing is left to deliver again");
    let again = cancel(&api, &id).await;
    assert_eq!((again.status, again.code()), (StatusCode::NOT_FOUND, "delivery_not_found"));

    // The worker answered `fail` for it: that buries nothing, and the trigger goes on.
    let second = enqueue(&api, "long", json!({"payload": {"n": 2}})).await;
    assert_eq!(next(&mut heard).await, "started");
    assert_cancelled(&cancel(&api, &second).await, &second);
    // Once the relay stopped, it has completed the worker's `fail` answers too.
    relay.stop().await;
    let dead = api.call(Method::GET, "/v1/apps/shop/dead-letters", Some(&api.viewer), None).await;
    let reasons: Vec<&Value> = dead.body["items"].as_array().unwrap().iter().map(|d| &d["reason"]).collect();
    assert_eq!(reasons, [&json!("cancelled"), &json!("cancelled")], "one dead letter per cancel, no other");
    let count = api.call(Method::GET, "/v1/apps/shop/dead-letters/count", Some(&api.viewer), None).await;
    assert_eq!(count.body["count"], 0, "cancelled dead letters are resolved");
    worker.shutdown().await;
}

#[tokio::test]
async fn pending_scheduled_and_waiting_deliveries_are_cancelled_and_the_replay_delivers_the_event() {
    let api = Api::start().await;
    api.trigger(json!({"name": "jobs", "kind": "queue", "queue": "jobs", "handler": {"function": "h"},
                       "flow": {"ordering": "key"}}))
        .await;
    let pending = enqueue(&api, "jobs", json!({"payload": {"n": 1}, "ordering_key": "k"})).await;
    let waiting = enqueue(&api, "jobs", json!({"payload": {"n": 2}, "ordering_key": "k"})).await;
    let scheduled = enqueue(&api, "jobs", json!({"payload": {"n": 3}, "delay_ms": 3_600_000})).await;
    let states: Vec<(bool, bool)> = sqlx::query_as(
        "SELECT waiting, due_at > now() FROM outbox ORDER BY array_position(ARRAY[$1, $2, $3], id::text)",
    )
    .bind(&pending)
    .bind(&waiting)
    .bind(&scheduled)
    .fetch_all(api.store().pool())
    .await
    .unwrap();
    assert_eq!(states, [(false, false), (true, false), (false, true)], "pending, waiting, scheduled");
    for id in [&waiting, &pending, &scheduled] {
        assert_cancelled(&cancel(&api, id).await, id);
    }
    assert_eq!(api.outbox_len().await, 0);

    let dead = api.call(Method::GET, "/v1/apps/shop/dead-letters", Some(&api.viewer), None).await;
    let of_pending =
        dead.body["items"].as_array().unwrap().iter().find(|d| d["delivery_id"] == json!(pending));
    let replay = format!("/v1/apps/shop/dead-letters/{}/replay", of_pending.unwrap()["id"].as_str().unwrap());
    let replayed = api.call(Method::POST, &replay, Some(&api.admin), None).await;
    assert_eq!(replayed.status, StatusCode::OK, "a cancelled delivery can be replayed: {:?}", replayed.body);
    assert_eq!(api.outbox_len().await, 1);
}

#[tokio::test]
async fn a_sync_call_is_not_cancellable_and_bad_or_unknown_ids_are_not_found() {
    let api = Api::start().await;
    api.trigger(json!({"name": "call", "kind": "http", "handler": {"function": "call"}})).await;
    let (started, mut running) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let client = async_nats::connect(api.nats.url()).await.unwrap();
    let worker = Worker::new(client, "shop")
        .handle("call", {
            let release = release.clone();
            move |d: Delivery| {
                started.send(d.id).ok();
                let release = release.clone();
                async move {
                    release.notified().await;
                    Ok(picloud_worker::Reply::ok(json!({"done": true})))
                }
            }
        })
        .start()
        .await
        .unwrap();
    let call = api.invoke_in_background("call", &[]);
    let id = next(&mut running).await.to_string();
    let refused = cancel(&api, &id).await;
    assert_eq!((refused.status, refused.code()), (StatusCode::CONFLICT, "not_cancellable"));
    release.notify_one();
    assert_eq!(call.await.unwrap().status(), StatusCode::OK, "the call goes on to its answer");

    for id in ["not-a-uuid", "0193a7c0-0000-7000-8000-000000000001"] {
        let missing = cancel(&api, id).await;
        assert_eq!((missing.status, missing.code()), (StatusCode::NOT_FOUND, "delivery_not_found"), "{id}");
    }
    worker.shutdown().await;
}
