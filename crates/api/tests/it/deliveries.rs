//! The deliveries API over HTTP (DESIGN §15): the outbox by state, and one delivery with the
//! progress its working handler reports and the attempts before it, through a real relay.

use std::sync::Arc;

use axum::http::{Method, StatusCode};
use picloud_testkit::eventually;
use picloud_worker::{Delivery, Reply as WorkerReply, Worker};
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::support::*;

async fn get(api: &Api, path: &str) -> Reply {
    api.call(Method::GET, path, Some(&api.viewer), None).await
}

#[tokio::test]
async fn a_delivery_shows_its_earlier_attempts_and_the_progress_of_the_one_that_works() {
    let api = Api::start().await;
    api.trigger(json!({"name": "jobs", "kind": "queue", "queue": "jobs", "handler": {"function": "work"},
                       "retry": {"max_attempts": 5}}))
        .await;
    let release = Arc::new(Notify::new());
    let client = async_nats::connect(api.nats.url()).await.unwrap();
    let worker = Worker::new(client, "shop")
        .handle("work", {
            let release = release.clone();
            move |d: Delivery| {
                let release = release.clone();
                async move {
                    if d.attempt < 3 {
                        return Ok(WorkerReply::retry(format!("not yet at attempt {}", d.attempt)));
                    }
                    d.working(Some(60)).await?;
                    release.notified().await;
                    Ok(WorkerReply::ok(json!({})))
                }
            }
        })
        .start()
        .await
        .unwrap();
    let relay = api.relay().await;
    let path = "/v1/apps/shop/queues/jobs/jobs";
    let id = api
        .call(Method::POST, path, Some(&api.developer), Some(json!({"payload": {"n": 1}})))
        .await
        .body["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let one = format!("/v1/apps/shop/deliveries/{id}");
    let seen = eventually("the third attempt to report its progress", || async {
        let read = get(&api, &one).await;
        (read.body["progress"] == json!(60)).then_some(read.body)
    })
    .await;
    assert_eq!(
        (&seen["state"], &seen["attempts"], &seen["trigger"]),
        (&json!("in_flight"), &json!(3), &json!("jobs"))
    );
    assert_eq!(seen["event"]["data"], json!({"n": 1}));
    let history = seen["attempt_history"].as_array().unwrap();
    let summary: Vec<(Value, Value, Value, Value)> = history
        .iter()
        .map(|a| (a["attempt"].clone(), a["outcome"].clone(), a["error"].clone(), a["node"].clone()))
        .collect();
    assert_eq!(
        summary,
        [
            (json!(1), json!("retry"), json!("not yet at attempt 1"), json!("relay")),
            (json!(2), json!("retry"), json!("not yet at attempt 2"), json!("relay")),
        ]
    );
    assert!(history.iter().all(|a| a["started_at"].as_str().unwrap() <= a["ended_at"].as_str().unwrap()));

    let in_flight = get(&api, "/v1/apps/shop/deliveries?state=in_flight&trigger=jobs").await;
    assert_eq!(in_flight.body["items"].as_array().unwrap().len(), 1);
    assert_eq!(in_flight.body["items"][0]["id"], json!(id));
    assert!(in_flight.body["items"][0].get("event").is_none(), "a list carries no events");
    let pending = get(&api, "/v1/apps/shop/deliveries?state=pending").await;
    assert_eq!(pending.body["items"], json!([]));

    release.notify_one();
    eventually("the delivery to finish", || async {
        (get(&api, &one).await.status == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
    relay.stop().await;
    worker.shutdown().await;
}

#[tokio::test]
async fn a_bad_state_trigger_or_cursor_is_refused_by_name() {
    let api = Api::start().await;
    let refused = [
        ("/v1/apps/shop/deliveries?state=done", StatusCode::UNPROCESSABLE_ENTITY, "invalid_field"),
        (
            "/v1/apps/shop/deliveries?trigger=Not%20A%20Name",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        ("/v1/apps/shop/deliveries?trigger=absent", StatusCode::NOT_FOUND, "trigger_not_found"),
        ("/v1/apps/shop/deliveries?after=zzz", StatusCode::BAD_REQUEST, "invalid_cursor"),
        ("/v1/apps/shop/deliveries/not-a-uuid", StatusCode::NOT_FOUND, "delivery_not_found"),
    ];
    for (path, status, code) in refused {
        let reply = get(&api, path).await;
        assert_eq!((reply.status, reply.code()), (status, code), "{path}: {:?}", reply.body);
    }
}
