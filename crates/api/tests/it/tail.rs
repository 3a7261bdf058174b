//! The live tail over HTTP (DESIGN §15): a real relay's outcomes as Server-Sent Events, filtered;
//! a bounded number per app; a reader that falls behind is disconnected; tails end with the node.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt as _;
use picloud_core::protocol::{EventKind, TailOutcome};
use picloud_worker::{Delivery, Reply as WorkerReply, Shutdown, Worker};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tower::ServiceExt as _;

use crate::support::*;

/// Opens a tail as `token`: the response, whose body streams the events.
async fn open(api: &Api, query: &str, token: &str) -> axum::response::Response {
    let request = Request::get(format!("/v1/apps/shop/tail{query}"))
        .header("Authorization", format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    api.router.clone().oneshot(request).await.unwrap()
}

/// The next `outcome` event of a tail's body.
async fn next_outcome(body: &mut Body, buffer: &mut String) -> Value {
    loop {
        if let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) {
                assert!(event.contains("event: outcome"), "{event}");
                return serde_json::from_str(data).unwrap();
            }
            continue;
        }
        let frame =
            tokio::time::timeout(Duration::from_secs(10), body.frame()).await.expect("an event in time");
        let data = frame.expect("the tail goes on").unwrap().into_data().unwrap_or_default();
        buffer.push_str(std::str::from_utf8(&data).unwrap());
    }
}

async fn enqueue(api: &Api, queue: &str, n: u64) -> String {
    let path = format!("/v1/apps/shop/queues/{queue}/jobs");
    let reply = api.call(Method::POST, &path, Some(&api.developer), Some(json!({"payload": {"n": n}}))).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
    reply.body["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_tail_shows_each_outcome_of_its_trigger_as_the_relay_completes_it() {
    let api = Api::start().await;
    for (name, queue) in [("jobs", "jobs"), ("other", "other")] {
        api.trigger(json!({"name": name, "kind": "queue", "queue": queue, "handler": {"function": "work"},
                           "retry": {"max_attempts": 1}}))
            .await;
    }
    let client = async_nats::connect(api.nats.url()).await.unwrap();
    let worker = Worker::new(client, "shop")
        .handle("work", |d: Delivery| async move {
            let n = d.data::<Value>()?["n"].as_u64().unwrap();
            Ok(if n == 2 { WorkerReply::fail("two fails") } else { WorkerReply::ok(json!({})) })
        })
        .start()
        .await
        .unwrap();
    let relay = api.relay().await;
    let response = open(&api, "?trigger=jobs&kind=queue", &api.viewer).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();

    // The other trigger's outcome is reported before the jobs': a tail that let it through
    // would show it first.
    enqueue(&api, "other", 1).await;
    eventually("the other trigger's delivery to complete", || async {
        (api.outbox_len().await == 0).then_some(())
    })
    .await;
    let first = enqueue(&api, "jobs", 1).await;
    let second = enqueue(&api, "jobs", 2).await;
    let mut buffer = String::new();
    let mut seen = [next_outcome(&mut body, &mut buffer).await, next_outcome(&mut body, &mut buffer).await];
    seen.sort_by_key(|o| o["delivery_id"] != json!(first));
    for (outcome, id, expected, error) in
        [(&seen[0], &first, "ok", Value::Null), (&seen[1], &second, "fail", json!("two fails"))]
    {
        assert_eq!(
            (
                &outcome["delivery_id"],
                &outcome["trigger"],
                &outcome["kind"],
                &outcome["attempt"],
                &outcome["outcome"],
                &outcome["error"],
                &outcome["node"]
            ),
            (
                &json!(id),
                &json!("jobs"),
                &json!("queue"),
                &json!(1),
                &json!(expected),
                &error,
                &json!("relay")
            ),
            "{outcome}"
        );
        assert!(outcome["latency_ms"].as_f64().unwrap() > 0.0, "{outcome}");
    }
    relay.stop().await;
    worker.shutdown().await;
}

#[tokio::test]
async fn a_tail_is_refused_for_a_bad_filter_another_app_and_beyond_the_apps_bound() {
    let api = Api::start_with(|c| c.tail_max_per_app = 1).await;
    api.trigger(json!({"name": "jobs", "kind": "queue", "queue": "jobs", "handler": {"function": "work"}}))
        .await;
    for (query, token, status, code) in [
        ("?kind=sms", &api.viewer, StatusCode::UNPROCESSABLE_ENTITY, "invalid_field"),
        ("?trigger=nope", &api.viewer, StatusCode::NOT_FOUND, "trigger_not_found"),
        ("", &api.other_admin, StatusCode::NOT_FOUND, "app_not_found"),
    ] {
        let reply = api.call(Method::GET, &format!("/v1/apps/shop/tail{query}"), Some(token), None).await;
        assert_eq!((reply.status, reply.code()), (status, code), "{query}");
    }
    let open_one = open(&api, "", &api.viewer).await;
    assert_eq!(open_one.status(), StatusCode::OK);
    let refused = api.call(Method::GET, "/v1/apps/shop/tail", Some(&api.admin), None).await;
    assert_eq!((refused.status, refused.code()), (StatusCode::TOO_MANY_REQUESTS, "too_many_tails"));
    drop(open_one);
    let again = picloud_testkit::eventually("the closed tail's slot to come back", || async {
        let response = open(&api, "", &api.viewer).await;
        (response.status() == StatusCode::OK).then_some(response)
    })
    .await;
    drop(again);
}

#[tokio::test]
async fn a_reader_that_falls_behind_is_disconnected_and_its_slot_given_back() {
    let api = Api::start_with(|c| c.tail_max_per_app = 1).await;
    let response = open(&api, "", &api.viewer).await;
    let mut body = response.into_body();
    let nats = async_nats::connect(api.nats.url()).await.unwrap();
    let outcome = TailOutcome {
        delivery_id: uuid::Uuid::now_v7(),
        trigger: Some("jobs".into()),
        kind: EventKind::Queue,
        attempt: 1,
        outcome: "ok".into(),
        latency_ms: Some(1.0),
        error: None,
        node: "relay".into(),
        ended_at: time::OffsetDateTime::now_utc(),
    };
    let batch = Bytes::from(serde_json::to_vec(&[outcome]).unwrap());
    for _ in 0..1000 {
        nats.publish("picloud.internal.tail.shop", batch.clone()).await.unwrap();
    }
    nats.flush().await.unwrap();

    let mut events = 0;
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("the tail to end in time");
        match frame {
            Some(frame) => {
                events += frame
                    .unwrap()
                    .into_data()
                    .map(|d| d.windows(7).filter(|w| w == b"outcome").count())
                    .unwrap_or(0);
            }
            None => break,
        }
    }
    assert!(events < 1000, "the reader got {events} of 1000 outcomes before it was disconnected");
    let reopened = open(&api, "", &api.viewer).await;
    assert_eq!(reopened.status(), StatusCode::OK, "the slot came back");
}

#[tokio::test]
async fn open_tails_end_when_the_node_stops() {
    let api = Api::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, shutdown) = Shutdown::new();
    let served = tokio::spawn(picloud_api::serve(listener, api.router.clone(), api.state.clone(), shutdown));
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /v1/apps/shop/tail HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\r\n",
        api.viewer
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = vec![0; 1024];
    let n = stream.read(&mut head).await.unwrap();
    assert!(
        String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head[..n])
    );

    stop.send();
    tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .expect("the node stops with a tail open")
        .unwrap()
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .expect("the tail ends")
        .unwrap();
}

#[tokio::test]
async fn a_tail_ends_once_its_token_is_revoked_and_a_delivery_token_cannot_open_one() {
    let api = Api::start_with(|c| c.tail_recheck = Duration::from_millis(100)).await;
    let refused = api.call(Method::GET, "/v1/apps/shop/tail", Some(&api.delivery_token(0)), None).await;
    assert_eq!((refused.status, refused.code()), (StatusCode::FORBIDDEN, "forbidden"));

    let minted = api.call(Method::POST, "/v1/tokens", Some(&api.admin), Some(json!({"app": "shop"}))).await;
    assert_eq!(minted.status, StatusCode::CREATED, "{:?}", minted.body);
    let (token, id) = (minted.body["token"].as_str().unwrap(), minted.body["id"].as_str().unwrap());
    let mut body = open(&api, "", token).await.into_body();
    let revoked = api.call(Method::DELETE, &format!("/v1/tokens/{id}"), Some(&api.admin), None).await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT, "{:?}", revoked.body);
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("the tail to end in time");
        if frame.is_none() {
            break;
        }
    }
}
