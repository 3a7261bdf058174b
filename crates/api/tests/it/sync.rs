//! Sync invocation: the caller waits while its node delivers the call; results nobody waits for
//! are logged as abandoned executions.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use picloud_core::Role;
use picloud_core::token::{generate_api_token, hash_api_token};
use picloud_store::events::{self, EventContext};
use picloud_store::*;
use picloud_worker::{Delivery, Reply as WorkerReply, Worker};
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::support::*;

async fn abandoned(api: &Api) -> Vec<Value> {
    let reply = api.call(Method::GET, "/v1/apps/shop/abandoned-executions", Some(&api.viewer), None).await;
    reply.body["items"].as_array().unwrap().clone()
}

async fn worker(
    api: &Api,
    handler: &str,
    f: impl Fn(Delivery) -> WorkerReply + Send + Sync + 'static,
) -> picloud_worker::Running {
    let f = Arc::new(f);
    let client = async_nats::connect(api.nats.url()).await.unwrap();
    Worker::new(client, "shop")
        .handle(handler, move |d| {
            let f = f.clone();
            async move { Ok(f(d)) }
        })
        .start()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_sync_call_answers_with_the_handlers_json_or_the_status_of_its_failure() {
    let api = Api::start().await;
    api.trigger(json!({"name": "double", "kind": "http", "handler": {"function": "double"}})).await;
    api.trigger(json!({"name": "refuse", "kind": "http", "handler": {"function": "refuse"}})).await;
    api.trigger(json!({"name": "nobody", "kind": "http", "handler": {"function": "nobody"}})).await;
    let double = worker(&api, "double", |d| {
        let n = d.data::<Value>().unwrap()["n"].as_i64().unwrap();
        WorkerReply::ok(json!({"double": n * 2, "depth": d.depth, "kind": d.event.picloudkind}))
    })
    .await;
    let refuse = worker(&api, "refuse", |_| WorkerReply::fail("cannot do that")).await;

    let ok = api
        .call(Method::POST, "/v1/apps/shop/invoke/double", Some(&api.developer), Some(json!({"n": 21})))
        .await;
    assert_eq!(
        (ok.status, ok.body.clone()),
        (StatusCode::OK, json!({"double": 42, "depth": 0, "kind": "http"}))
    );
    let failed =
        api.call(Method::POST, "/v1/apps/shop/invoke/refuse", Some(&api.developer), Some(json!({}))).await;
    assert_eq!((failed.status, failed.code()), (StatusCode::BAD_GATEWAY, "handler_failed"));
    assert!(failed.message().contains("cannot do that"), "{}", failed.message());
    let unserved =
        api.call(Method::POST, "/v1/apps/shop/invoke/nobody", Some(&api.developer), Some(json!({}))).await;
    assert_eq!((unserved.status, unserved.code()), (StatusCode::SERVICE_UNAVAILABLE, "no_handler"));

    eventually("sync rows to be completed, never retried", || async {
        (api.outbox_len().await == 0).then_some(())
    })
    .await;
    let dead: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dead_letters").fetch_one(api.store().pool()).await.unwrap();
    assert_eq!(dead, 0, "sync rows never become dead letters");
    assert!(abandoned(&api).await.is_empty(), "every result found its caller");
    double.shutdown().await;
    refuse.shutdown().await;
}

#[tokio::test]
async fn a_caller_that_invoked_before_is_refused_once_its_token_is_revoked_expired_or_its_role_lowered() {
    let clock = Clock::manual(time::OffsetDateTime::now_utc());
    let api = Api::start_on(clock.clone(), |_| {}).await;
    api.trigger(json!({"name": "echo", "kind": "http", "handler": {"function": "echo"}})).await;
    let echo = worker(&api, "echo", |_| WorkerReply::ok(json!({"echo": true}))).await;
    let invoke = |token: String| {
        let api = &api;
        async move { api.call(Method::POST, "/v1/apps/shop/invoke/echo", Some(&token), Some(json!({}))).await }
    };
    let expires_at = clock.now() + Duration::from_secs(3);
    let short_lived = generate_api_token();
    api.store()
        .create_token(&NewApiToken {
            id: uuid::Uuid::now_v7(),
            principal_id: api.admin_principal.id,
            token_hash: hash_api_token(&short_lived),
            app_id: None,
            scopes: None,
            expires_at: Some(expires_at),
        })
        .await
        .unwrap();
    for _ in 0..2 {
        for token in [&api.developer, &api.admin, &short_lived] {
            assert_eq!(invoke(token.clone()).await.status, StatusCode::OK);
        }
    }

    let (token, _) = api.store().token_by_hash(&hash_api_token(&api.developer)).await.unwrap().unwrap();
    assert!(api.store().revoke_token(token.id).await.unwrap());
    let revoked = invoke(api.developer.clone()).await;
    assert_eq!((revoked.status, revoked.code()), (StatusCode::UNAUTHORIZED, "token_revoked"));

    // Kept again at the epoch the revocation moved to, then refused once the role is lowered.
    assert_eq!(invoke(api.admin.clone()).await.status, StatusCode::OK);
    api.store().set_role(api.app.id, api.admin_principal.id, Role::Viewer).await.unwrap();
    let lowered = invoke(api.admin.clone()).await;
    assert_eq!(lowered.status, StatusCode::FORBIDDEN, "{:?}", lowered.body);
    api.store().set_role(api.app.id, api.admin_principal.id, Role::Admin).await.unwrap();

    // Nothing moves the epoch when a token expires: the kept token's own expiry is checked.
    assert_eq!(invoke(short_lived.clone()).await.status, StatusCode::OK);
    clock.advance(Duration::from_secs(3));
    let expired = invoke(short_lived.clone()).await;
    assert_eq!((expired.status, expired.code()), (StatusCode::UNAUTHORIZED, "token_expired"));
    echo.shutdown().await;
}

#[tokio::test]
async fn a_caller_whose_timeout_runs_out_gets_504_and_the_late_result_is_abandoned() {
    let api = Api::start().await;
    api.trigger(json!({"name": "slow", "kind": "http", "handler": {"function": "slow"}})).await;
    let release = Arc::new(Notify::new());
    let client = async_nats::connect(api.nats.url()).await.unwrap();
    let slow = Worker::new(client, "shop")
        .handle("slow", {
            let release = release.clone();
            move |_| {
                let release = release.clone();
                async move {
                    release.notified().await;
                    Ok(WorkerReply::ok(json!({"late": true})))
                }
            }
        })
        .start()
        .await
        .unwrap();
    let timed_out = api
        .call_with(
            Method::POST,
            "/v1/apps/shop/invoke/slow",
            Some(&api.developer),
            Some(b"{}".to_vec()),
            &[("Picloud-Timeout-Ms", "100")],
        )
        .await;
    assert_eq!((timed_out.status, timed_out.code()), (StatusCode::GATEWAY_TIMEOUT, "timeout"));
    release.notify_one();
    let logged = eventually("the abandoned execution", || async { abandoned(&api).await.pop() }).await;
    assert_eq!(
        (logged["reason"].clone(), logged["handler_status"].clone()),
        (json!("no_responders"), json!("ok"))
    );
    assert_eq!((logged["trigger"].clone(), logged["result"].clone()), (json!("slow"), json!({"late": true})));
    eventually("the row to be completed", || async { (api.outbox_len().await == 0).then_some(()) }).await;
    slow.shutdown().await;
}

#[tokio::test]
async fn a_caller_that_hangs_up_leaves_its_result_abandoned_as_caller_gone() {
    let api = Api::start().await;
    api.trigger(json!({"name": "slow", "kind": "http", "handler": {"function": "slow"}})).await;
    let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let client = async_nats::connect(api.nats.url()).await.unwrap();
    let slow = Worker::new(client, "shop")
        .handle("slow", {
            let (started, release) = (started.clone(), release.clone());
            move |_| {
                let (started, release) = (started.clone(), release.clone());
                async move {
                    started.notify_one();
                    release.notified().await;
                    Ok(WorkerReply::fail("too late anyway"))
                }
            }
        })
        .start()
        .await
        .unwrap();
    let call = api.invoke_in_background("slow", &[]);
    started.notified().await;
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled(), "the caller hung up");
    release.notify_one();
    let logged = eventually("the abandoned execution", || async { abandoned(&api).await.pop() }).await;
    assert_eq!(
        (logged["reason"].clone(), logged["handler_status"].clone()),
        (json!("caller_gone"), json!("fail"))
    );
    assert_eq!(logged["error"], "too late anyway");
    slow.shutdown().await;
}

#[tokio::test]
async fn a_call_in_flight_when_nats_restarts_answers_503_at_once_instead_of_waiting_for_its_timeout() {
    let mut api = Api::start().await;
    api.trigger(json!({"name": "slow", "kind": "http", "handler": {"function": "slow"}})).await;
    let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let client = async_nats::connect(api.nats.url()).await.unwrap();
    let slow = Worker::new(client, "shop")
        .handle("slow", {
            let (started, release) = (started.clone(), release.clone());
            move |_| {
                let (started, release) = (started.clone(), release.clone());
                async move {
                    started.notify_one();
                    release.notified().await;
                    Ok(WorkerReply::ok(json!({})))
                }
            }
        })
        .start()
        .await
        .unwrap();
    // Without watching the connection, the call would wait out the handler's deadline: 504.
    let call = api.invoke_in_background("slow", &[("Picloud-Timeout-Ms", "60000")]);
    started.notified().await;

    api.nats.restart().await.unwrap();

    let response =
        tokio::time::timeout(Duration::from_secs(10), call).await.expect("an answer at once").unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value =
        serde_json::from_slice(&axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "nats_unavailable");
    eventually("the row to be completed", || async { (api.outbox_len().await == 0).then_some(()) }).await;
    release.notify_one();
    slow.shutdown().await;
}

#[tokio::test]
async fn when_the_waiting_node_dies_a_relay_records_the_call_abandoned_and_never_runs_it_again() {
    let api = Api::start().await;
    let trigger_view =
        api.trigger(json!({"name": "echo", "kind": "http", "handler": {"function": "echo"}})).await;
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let echo = worker(&api, "echo", move |d| {
        let _ = seen_tx.send(d.id);
        WorkerReply::ok(json!({"echo": true}))
    })
    .await;
    // The node wrote the row claimed by itself, then died: no one waits on the inbox, no one
    // delivers.
    let config = picloud_core::TriggerConfig::default();
    let cx = EventContext { app_id: api.app.id, app_slug: &api.app.slug, depth: 0, config: &config };
    let body = serde_json::value::RawValue::from_string("{}".into()).unwrap();
    let lease = Duration::from_millis(800);
    let waiter =
        events::SyncWaiter { reply_to: "_INBOX.dead-node.1", authorized_at: None, node: "dead-node", lease };
    let write = events::invoke(api.store(), &cx, "echo", &body, waiter);
    let SyncCallWrite::Written { row, target } = write.await.unwrap() else { panic!("the call is written") };
    assert_eq!(target.trigger.id.to_string(), trigger_view["id"].as_str().unwrap());
    let id = row.id;

    let relay = api.relay().await;
    let logged = eventually("the abandoned execution", || async { abandoned(&api).await.pop() }).await;
    assert_eq!(
        (logged["reason"].clone(), logged["handler_status"].clone()),
        (json!("lease_expired"), json!("unknown"))
    );
    assert_eq!(
        (logged["outbox_id"].clone(), logged["reply_to"].clone(), logged["trigger"].clone()),
        (json!(id), json!("_INBOX.dead-node.1"), json!("echo"))
    );
    eventually("the row to be completed", || async { (api.outbox_len().await == 0).then_some(()) }).await;
    relay.stop().await;
    echo.shutdown().await;
    assert!(seen.try_recv().is_err(), "the handler was not called again");
}

#[tokio::test]
async fn a_sync_calls_answer_is_taken_only_from_its_own_app() {
    let api = Api::start().await;
    api.trigger(json!({"name": "call", "kind": "http", "handler": {"function": "call"}})).await;
    let handler = async_nats::connect(api.nats.url()).await.unwrap();
    let mut calls = handler.subscribe("picloud.v1.handle.shop.call").await.unwrap();
    picloud_worker::round_trip(&handler).await.unwrap();
    let call = api.invoke_in_background("call", &[]);
    let delivery = tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut calls))
        .await
        .unwrap()
        .unwrap();
    let reply = delivery.reply.unwrap().to_string();
    assert!(reply.contains(".shop."), "{reply}");
    let ok = |body: &'static [u8]| {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Picloud-Status", "ok");
        (headers, bytes::Bytes::from_static(body))
    };
    // Another app answers first, under its own name where the app stands; then the real one, on
    // the same connection, so in that order.
    let (headers, body) = ok(br#"{"forged": true}"#);
    handler.publish_with_headers(reply.replace(".shop.", ".other."), headers, body).await.unwrap();
    let (headers, body) = ok(br#"{"real": true}"#);
    handler.publish_with_headers(reply, headers, body).await.unwrap();
    let answer = call.await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let body: Value =
        serde_json::from_slice(&axum::body::to_bytes(answer.into_body(), 1 << 20).await.unwrap()).unwrap();
    assert_eq!(body, json!({"real": true}), "the other app's answer was taken");
}
