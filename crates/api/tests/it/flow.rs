//! A trigger's `flow` and the ordering keys of events, over HTTP (DESIGN §13).

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::*;

fn pubsub(flow: &Value) -> Value {
    json!({"name": "ordered", "kind": "pubsub", "topic": "orders", "handler": {"function": "h"}, "flow": flow})
}

async fn patch(api: &Api, body: Value) -> Reply {
    api.call(Method::PATCH, "/v1/apps/shop/triggers/ordered", Some(&api.admin), Some(body)).await
}

/// The ordering key and whether it waits, of every outbox row, by key.
async fn rows(api: &Api) -> Vec<(Option<String>, bool)> {
    sqlx::query_as("SELECT ordering_key, waiting FROM outbox ORDER BY ordering_key, waiting")
        .fetch_all(api.store().pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_flow_is_registered_read_changed_and_removed() {
    let api = Api::start().await;
    let created = api.trigger(pubsub(&json!({"ordering": "key", "hold_on_dead_letter": true}))).await;
    assert_eq!(created["flow"], json!({"ordering": "key", "hold_on_dead_letter": true}));
    let read = api.call(Method::GET, "/v1/apps/shop/triggers/ordered", Some(&api.viewer), None).await;
    assert_eq!(read.body["flow"], created["flow"]);

    let changed = patch(&api, json!({"flow": {"ordering": "trigger"}})).await;
    assert_eq!(changed.body["flow"], json!({"ordering": "trigger", "hold_on_dead_letter": false}));
    let kept = patch(&api, json!({"enabled": false})).await;
    assert_eq!(kept.body["flow"], changed.body["flow"], "a patch without flow keeps it");
    let removed = patch(&api, json!({"flow": null})).await;
    assert_eq!((removed.status, removed.body.get("flow")), (StatusCode::OK, None));
}

#[tokio::test]
async fn a_flow_that_cannot_hold_is_refused_naming_its_field_and_nothing_is_written() {
    let api = Api::start().await;
    let refused = [
        (json!({"concurrency": 0}), "flow.concurrency"),
        (json!({"rate": {}}), "flow.rate.per_second"),
        (json!({"rate": {"per_second": 5, "burst": -1}}), "flow.rate.burst"),
        (json!({"debounce_ms": 500}), "flow.debounce_ms"),
        (json!({"ordering": "key", "hold": true}), "flow.hold"),
        (json!({"hold_on_dead_letter": true}), "flow.hold_on_dead_letter"),
        (json!({"ordering": "lanes"}), "flow.ordering"),
        (json!("key"), "flow"),
    ];
    for (flow, field) in refused {
        let reply =
            api.call(Method::POST, "/v1/apps/shop/triggers", Some(&api.admin), Some(pubsub(&flow))).await;
        assert_eq!(
            (reply.status, reply.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_field"),
            "{flow}"
        );
        assert!(reply.message().starts_with(&format!("{field}: ")), "{flow}: {}", reply.message());
    }
    let http = json!({"name": "call", "kind": "http", "handler": {"function": "h"}, "flow": {"ordering": "trigger"}});
    let reply = api.call(Method::POST, "/v1/apps/shop/triggers", Some(&api.admin), Some(http)).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(reply.message().starts_with("flow: "), "{}", reply.message());
    let listed = api.call(Method::GET, "/v1/apps/shop/triggers", Some(&api.viewer), None).await;
    assert_eq!(listed.body["items"], json!([]), "no refused registration wrote a trigger");

    api.trigger(pubsub(&json!({"ordering": "key"}))).await;
    let reply = patch(&api, json!({"flow": {"ordering": "key", "debounce_ms": 0}})).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(reply.message().starts_with("flow.debounce_ms: "), "{}", reply.message());
    let read = api.call(Method::GET, "/v1/apps/shop/triggers/ordered", Some(&api.viewer), None).await;
    assert_eq!(read.body["flow"], json!({"ordering": "key", "hold_on_dead_letter": false}), "unchanged");
}

#[tokio::test]
async fn limits_and_a_debounce_are_registered_read_back_and_patched_away() {
    let api = Api::start().await;
    let flow = json!({"ordering": "key", "concurrency": 8, "rate": {"per_second": 50}, "debounce_ms": 200});
    api.trigger(pubsub(&flow)).await;
    let read = api.call(Method::GET, "/v1/apps/shop/triggers/ordered", Some(&api.viewer), None).await;
    assert_eq!(
        read.body["flow"],
        json!({"ordering": "key", "concurrency": 8, "rate": {"per_second": 50, "burst": 50},
               "debounce_ms": 200, "hold_on_dead_letter": false})
    );
    let reply = patch(&api, json!({"flow": {"rate": {"per_second": 5, "burst": 20}}})).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.body["flow"],
        json!({"ordering": "none", "rate": {"per_second": 5, "burst": 20}, "hold_on_dead_letter": false})
    );
}

#[tokio::test]
async fn ordering_keys_come_from_a_jobs_field_and_a_messages_header_and_bad_ones_are_refused() {
    let api = Api::start().await;
    api.trigger(json!({"name": "jobs", "kind": "queue", "queue": "q", "handler": {"function": "h"},
                       "flow": {"ordering": "key"}}))
        .await;
    api.trigger(pubsub(&json!({"ordering": "key"}))).await;
    for _ in 0..2 {
        let job = json!({"payload": 1, "ordering_key": "user-1"});
        let reply =
            api.call(Method::POST, "/v1/apps/shop/queues/q/jobs", Some(&api.developer), Some(job)).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED);
    }
    let body = Some(b"{}".to_vec());
    let header = [("Picloud-Ordering-Key", "order-9")];
    let path = "/v1/apps/shop/topics/orders/messages";
    let reply = api.call_with(Method::POST, path, Some(&api.developer), body.clone(), &header).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let reply = api.call_with(Method::POST, path, Some(&api.developer), body.clone(), &[]).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(
        rows(&api).await,
        [
            (Some("order-9".into()), false),
            (Some("user-1".into()), false),
            (Some("user-1".into()), true),
            (None, false),
        ],
        "the second job of user-1 waits for the first; a message without a key waits for nothing"
    );

    let long = "k".repeat(201);
    let bad_job = json!({"payload": 1, "ordering_key": long});
    let reply =
        api.call(Method::POST, "/v1/apps/shop/queues/q/jobs", Some(&api.developer), Some(bad_job)).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(reply.message().starts_with("ordering_key: "), "{}", reply.message());
    let reply = api
        .call_with(Method::POST, path, Some(&api.developer), body, &[("Picloud-Ordering-Key", &long)])
        .await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(reply.message().starts_with("Picloud-Ordering-Key: "), "{}", reply.message());
    assert_eq!(rows(&api).await.len(), 4, "refused writes wrote nothing");
}

#[tokio::test]
async fn a_message_over_nats_ingest_takes_its_ordering_key_from_the_header() {
    let api = Api::start().await;
    let (stop, shutdown) = picloud_worker::Shutdown::new();
    let ingest = picloud_api::Ingest::start(api.state.clone(), shutdown).await.unwrap();
    api.trigger(pubsub(&json!({"ordering": "key"}))).await;
    let client = async_nats::ConnectOptions::new()
        .custom_inbox_prefix("_INBOX_shop")
        .connect(api.nats.url())
        .await
        .unwrap();
    let publish = |key: String| {
        let client = client.clone();
        let token = api.developer.clone();
        async move {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Authorization", format!("Bearer {token}"));
            headers.insert("Picloud-Ordering-Key", key);
            let reply = client
                .request_with_headers("picloud.v1.ingest.shop.pubsub.orders", headers, "{}".into())
                .await
                .unwrap();
            let body: Value = serde_json::from_slice(&reply.payload).unwrap();
            (reply.headers.unwrap().get("Picloud-Status").unwrap().as_str().to_owned(), body)
        }
    };
    for _ in 0..2 {
        assert_eq!(publish("order-1".into()).await.0, "ok");
    }
    let (status, body) = publish("k".repeat(201)).await;
    assert_eq!(status, "error");
    assert!(body["error"]["message"].as_str().unwrap().starts_with("Picloud-Ordering-Key: "), "{body}");
    assert_eq!(rows(&api).await, [(Some("order-1".into()), false), (Some("order-1".into()), true)]);
    stop.send();
    ingest.finished().await;
}
