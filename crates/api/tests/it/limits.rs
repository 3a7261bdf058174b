//! One tenant cannot take all of a node: requests in flight, their time, and sync calls in flight
//! per app are bounded, and what is refused is told to come back later.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use picloud_worker::{Reply as WorkerReply, Shutdown, Worker};
use serde_json::json;
use tokio::sync::{Semaphore, mpsc};

use crate::support::*;

/// A handler `slow` of `shop` that reports each call it starts and answers once released (the
/// semaphore closed: from then on every call is answered at once).
async fn slow_handler(api: &Api) -> (picloud_worker::Running, mpsc::UnboundedReceiver<()>, Arc<Semaphore>) {
    api.trigger(json!({"name": "slow", "kind": "http", "handler": {"function": "slow"}})).await;
    let (started_tx, started) = mpsc::unbounded_channel();
    let release = Arc::new(Semaphore::new(0));
    let client = async_nats::connect(api.nats.url()).await.unwrap();
    let running = Worker::new(client, "shop")
        .handle("slow", {
            let release = release.clone();
            move |_| {
                let (started_tx, release) = (started_tx.clone(), release.clone());
                async move {
                    let _ = started_tx.send(());
                    let _ = release.acquire().await;
                    Ok(WorkerReply::ok(json!({})))
                }
            }
        })
        .start()
        .await
        .unwrap();
    (running, started, release)
}

/// Starts `n` sync calls of `slow` and returns once the handler holds all of them.
async fn calls_in_flight(
    api: &Api,
    n: usize,
    started: &mut mpsc::UnboundedReceiver<()>,
) -> Vec<tokio::task::JoinHandle<StatusCode>> {
    let calls = (0..n)
        .map(|_| {
            let call = api.invoke_in_background("slow", &[]);
            tokio::spawn(async move { call.await.unwrap().status() })
        })
        .collect();
    for _ in 0..n {
        tokio::time::timeout(Duration::from_secs(20), started.recv())
            .await
            .expect("the handler to take a call");
    }
    calls
}

async fn retry_after(api: &Api, path: &str) -> (StatusCode, String, Option<String>) {
    let request = axum::http::Request::get(path)
        .header("Authorization", format!("Bearer {}", api.developer))
        .body(axum::body::Body::empty())
        .unwrap();
    let response = tower::ServiceExt::oneshot(api.router.clone(), request).await.unwrap();
    let status = response.status();
    let after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    let body: serde_json::Value =
        serde_json::from_slice(&axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap()).unwrap();
    (status, body["error"]["code"].as_str().unwrap_or_default().to_owned(), after)
}

#[tokio::test]
async fn a_node_at_its_request_limit_answers_503_overloaded_yet_still_reports_its_health() {
    let api = Api::start_with(|c| c.http_max_in_flight = 2).await;
    let (worker, mut started, release) = slow_handler(&api).await;
    let calls = calls_in_flight(&api, 2, &mut started).await;

    let (status, code, after) = retry_after(&api, "/v1/apps").await;
    assert_eq!(
        (status, code.as_str(), after.as_deref()),
        (StatusCode::SERVICE_UNAVAILABLE, "overloaded", Some("1"))
    );
    assert_eq!(api.call(Method::GET, "/healthz", None, None).await.status, StatusCode::OK);

    release.close();
    for call in calls {
        assert_eq!(call.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(api.call(Method::GET, "/v1/apps", Some(&api.developer), None).await.status, StatusCode::OK);
    worker.shutdown().await;
}

#[tokio::test]
async fn a_request_that_outlasts_the_nodes_timeout_answers_503_request_timeout() {
    let api = Api::start_with(|c| c.http_timeout = Duration::from_millis(300)).await;
    let (worker, _started, release) = slow_handler(&api).await;
    let reply = api
        .call_with(
            Method::POST,
            "/v1/apps/shop/invoke/slow",
            Some(&api.developer),
            Some(b"{}".to_vec()),
            &[("Picloud-Timeout-Ms", "5000")],
        )
        .await;
    assert_eq!((reply.status, reply.code()), (StatusCode::SERVICE_UNAVAILABLE, "request_timeout"));
    release.close();
    worker.shutdown().await;
}

#[tokio::test]
async fn an_app_with_all_its_sync_calls_in_flight_gets_429_and_writes_nothing() {
    let api = Api::start_with(|c| c.sync_max_in_flight_per_app = 2).await;
    let (worker, mut started, release) = slow_handler(&api).await;
    let calls = calls_in_flight(&api, 2, &mut started).await;

    let refused =
        api.call(Method::POST, "/v1/apps/shop/invoke/slow", Some(&api.developer), Some(json!({}))).await;
    assert_eq!((refused.status, refused.code()), (StatusCode::TOO_MANY_REQUESTS, "too_many_sync_calls"));
    assert_eq!(api.outbox_len().await, 2, "the refused call wrote nothing");
    let elsewhere =
        api.call(Method::POST, "/v1/apps/other/invoke/slow", Some(&api.other_admin), Some(json!({}))).await;
    assert_eq!(elsewhere.code(), "trigger_not_found", "another app's calls are not held back");

    release.close();
    for call in calls {
        assert_eq!(call.await.unwrap(), StatusCode::OK);
    }
    eventually("the slots to come back", || async {
        let again = api.call_with(
            Method::POST,
            "/v1/apps/shop/invoke/slow",
            Some(&api.developer),
            Some(b"{}".to_vec()),
            &[("Picloud-Timeout-Ms", "50")],
        );
        (again.await.status != StatusCode::TOO_MANY_REQUESTS).then_some(())
    })
    .await;
    worker.shutdown().await;
}

#[tokio::test]
async fn a_node_whose_database_cannot_be_reached_answers_503_database_unavailable_on_http_and_ingest() {
    let api = Api::start().await;
    let (stop, shutdown) = Shutdown::new();
    let ingest = picloud_api::Ingest::start(api.state.clone(), shutdown).await.unwrap();
    let client = async_nats::ConnectOptions::new()
        .custom_inbox_prefix("_INBOX_shop")
        .connect(api.nats.url())
        .await
        .unwrap();
    api.store().pool().close().await;

    let (status, code, after) = retry_after(&api, "/v1/apps").await;
    assert_eq!(
        (status, code.as_str(), after.as_deref()),
        (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable", Some("1"))
    );
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Authorization", format!("Bearer {}", api.developer));
    let body = json!({"collection": "c", "key": "k", "value": 1}).to_string();
    let reply =
        client.request_with_headers("picloud.v1.ingest.shop.kv.put", headers, body.into()).await.unwrap();
    let status = reply.headers.as_ref().and_then(|h| h.get("Picloud-Status")).map(|v| v.as_str().to_owned());
    let answer: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(
        (status.as_deref(), answer["error"]["code"].as_str()),
        (Some("error"), Some("database_unavailable"))
    );
    stop.send();
    ingest.finished().await;
}
