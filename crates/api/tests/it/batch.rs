//! A trigger's `batch`, over HTTP (DESIGN §14).

use axum::http::{Method, StatusCode};
use picloud_core::batch::{MAX_BATCH_SIZE, MAX_BATCH_WAIT_MS, MIN_BATCH_SIZE};
use serde_json::{Value, json};

use crate::support::*;

const WEBHOOK: &str = "https://example.com/hook";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const HTTP_REFUSAL: &str = "batch: http triggers are called synchronously; their calls cannot batch";
const WEBHOOK_REFUSAL: &str =
    "batch: webhook handlers take one delivery per request; batch needs a function handler";

fn queue(name: &str, handler: &Value, batch: &Value) -> Value {
    json!({"name": name, "kind": "queue", "queue": name, "handler": handler, "batch": batch})
}

fn function() -> Value {
    json!({"function": "h"})
}

fn webhook() -> Value {
    json!({"webhook": {"url": WEBHOOK, "secret": SECRET}})
}

async fn register(api: &Api, body: Value) -> Reply {
    api.call(Method::POST, "/v1/apps/shop/triggers", Some(&api.admin), Some(body)).await
}

async fn patch(api: &Api, name: &str, body: Value) -> Reply {
    api.call(Method::PATCH, &format!("/v1/apps/shop/triggers/{name}"), Some(&api.admin), Some(body)).await
}

async fn read(api: &Api, name: &str) -> Value {
    let reply =
        api.call(Method::GET, &format!("/v1/apps/shop/triggers/{name}"), Some(&api.admin), None).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    reply.body
}

/// The trigger's batch, as a reader sees it.
async fn read_batch(api: &Api, name: &str) -> Option<Value> {
    read(api, name).await.get("batch").cloned()
}

/// Asserts a 422 `invalid_field` whose message names `field`.
fn assert_refused(reply: &Reply, field: &str, what: &Value) {
    assert_eq!((reply.status, reply.code()), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_field"), "{what}");
    assert!(reply.message().starts_with(&format!("{field}: ")), "{what}: {}", reply.message());
}

#[tokio::test]
async fn a_batch_is_registered_read_changed_kept_and_removed() {
    let api = Api::start().await;
    let batch = json!({"max_size": 100, "max_wait_ms": 1000});
    let created = api.trigger(queue("batched", &function(), &batch)).await;
    assert_eq!(created["batch"], batch);
    let read = api.call(Method::GET, "/v1/apps/shop/triggers/batched", Some(&api.viewer), None).await;
    assert_eq!(read.body["batch"], batch);
    let listed = api.call(Method::GET, "/v1/apps/shop/triggers", Some(&api.viewer), None).await;
    assert_eq!(listed.body["items"][0]["batch"], batch);
    let plain = api.trigger(queue("plain", &function(), &Value::Null)).await;
    assert_eq!(plain.get("batch"), None, "no batch, no field");

    let changed = patch(&api, "batched", json!({"batch": {"max_size": 2, "max_wait_ms": 0}})).await;
    assert_eq!(changed.body["batch"], json!({"max_size": 2, "max_wait_ms": 0}));
    let kept = patch(&api, "batched", json!({"enabled": false})).await;
    assert_eq!(kept.body["batch"], changed.body["batch"], "a patch without batch keeps it");
    let removed = patch(&api, "batched", json!({"batch": null})).await;
    assert_eq!((removed.status, removed.body.get("batch")), (StatusCode::OK, None));
    assert_eq!(read_batch(&api, "batched").await, None);
}

#[tokio::test]
async fn a_batch_that_cannot_hold_is_refused_at_registration_naming_its_field_and_nothing_is_written() {
    let api = Api::start().await;
    let refused = [
        (json!({"max_size": MIN_BATCH_SIZE - 1, "max_wait_ms": 10}), "batch.max_size"),
        (json!({"max_size": MAX_BATCH_SIZE + 1, "max_wait_ms": 10}), "batch.max_size"),
        (json!({"max_wait_ms": 10}), "batch.max_size"),
        (json!({"max_size": 10}), "batch.max_wait_ms"),
        (json!({"max_size": 10, "max_wait_ms": MAX_BATCH_WAIT_MS + 1}), "batch.max_wait_ms"),
        (json!({"max_size": 10, "max_wait_ms": 5, "size": 3}), "batch.size"),
        (json!(100), "batch"),
    ];
    for (batch, field) in refused {
        assert_refused(&register(&api, queue("batched", &function(), &batch)).await, field, &batch);
    }
    let batch = json!({"max_size": 10, "max_wait_ms": 5});
    let http = json!({"name": "call", "kind": "http", "handler": function(), "batch": batch});
    let reply = register(&api, http).await;
    assert_eq!((reply.status, reply.message()), (StatusCode::UNPROCESSABLE_ENTITY, HTTP_REFUSAL));
    let reply = register(&api, queue("hooked", &webhook(), &batch)).await;
    assert_eq!((reply.status, reply.message()), (StatusCode::UNPROCESSABLE_ENTITY, WEBHOOK_REFUSAL));
    let listed = api.call(Method::GET, "/v1/apps/shop/triggers", Some(&api.viewer), None).await;
    assert_eq!(listed.body["items"], json!([]), "no refused registration wrote a trigger");
}

#[tokio::test]
async fn a_patch_that_would_leave_a_batch_that_cannot_hold_is_refused_and_changes_nothing() {
    let api = Api::start().await;
    let batch = json!({"max_size": 10, "max_wait_ms": 5});
    api.trigger(queue("batched", &function(), &batch)).await;
    api.trigger(queue("hooked", &webhook(), &Value::Null)).await;
    api.trigger(json!({"name": "call", "kind": "http", "handler": function()})).await;
    let before = [read(&api, "batched").await, read(&api, "hooked").await, read(&api, "call").await];

    let bad = json!({"max_size": 10, "max_wait_ms": -1});
    assert_refused(&patch(&api, "batched", json!({"batch": bad})).await, "batch.max_wait_ms", &bad);
    let refusals = [
        ("batched", json!({"handler": webhook()}), WEBHOOK_REFUSAL),
        (
            "batched",
            json!({"handler": webhook(), "batch": {"max_size": 3, "max_wait_ms": 0}}),
            WEBHOOK_REFUSAL,
        ),
        ("hooked", json!({"batch": batch}), WEBHOOK_REFUSAL),
        ("hooked", json!({"enabled": false, "batch": batch}), WEBHOOK_REFUSAL),
        ("call", json!({"batch": batch}), HTTP_REFUSAL),
    ];
    for (name, body, message) in refusals {
        let reply = patch(&api, name, body.clone()).await;
        assert_eq!(
            (reply.status, reply.code(), reply.message()),
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message),
            "{name}: {body}"
        );
    }
    let after = [read(&api, "batched").await, read(&api, "hooked").await, read(&api, "call").await];
    assert_eq!(after, before, "no refused patch changed a trigger");

    // What is judged is the trigger the patch leaves: a webhook without its batch, a batch with
    // a function handler.
    let switched = patch(&api, "batched", json!({"handler": webhook(), "batch": null})).await;
    assert_eq!((switched.status, switched.body.get("batch")), (StatusCode::OK, None), "{:?}", switched.body);
    let switched = patch(&api, "hooked", json!({"handler": function(), "batch": batch})).await;
    assert_eq!((switched.status, &switched.body["batch"]), (StatusCode::OK, &batch), "{:?}", switched.body);
    let unbatched = patch(&api, "call", json!({"batch": null})).await;
    assert_eq!((unbatched.status, unbatched.body.get("batch")), (StatusCode::OK, None));
}

#[tokio::test]
async fn the_document_shows_batch_with_the_bounds_the_api_enforces() {
    let api = Api::start().await;
    let document = api.call(Method::GET, "/v1/openapi.json", Some(&api.viewer), None).await.body;
    for shape in ["RegisterTrigger", "PatchTrigger", "TriggerView"] {
        let batch = &document["components"]["schemas"][shape]["properties"]["batch"];
        let bounds = |field: &str| {
            (batch["properties"][field]["minimum"].as_u64(), batch["properties"][field]["maximum"].as_u64())
        };
        assert_eq!(
            bounds("max_size"),
            (Some(MIN_BATCH_SIZE.into()), Some(MAX_BATCH_SIZE.into())),
            "{shape}: {batch}"
        );
        assert_eq!(bounds("max_wait_ms"), (Some(0), Some(MAX_BATCH_WAIT_MS.into())), "{shape}: {batch}");
        assert!(batch["description"].as_str().is_some_and(|d| d.contains("DESIGN §14")), "{shape}: {batch}");
    }
}
