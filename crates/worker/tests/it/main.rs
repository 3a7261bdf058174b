//! The worker SDK against a real nats-server, with the relay's side of the protocol played by
//! hand: requests on the handle subject, answers read from the reply.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::{HeaderMap, StatusCode};
use bytes::Bytes;
use futures::StreamExt as _;
use picloud_testkit::NatsServer;
use picloud_worker::{BatchReply, Delivery, Reply, ReplyStatus, Worker};
use tokio::sync::{Notify, mpsc};
use uuid::Uuid;

fn envelope(id: Uuid, attempt: u32) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "specversion": "1.0", "id": id, "type": "picloud.queue.job", "source": "/apps/shop/queues/q",
            "time": "2026-11-28T10:00:00.000Z", "datacontenttype": "application/json",
            "data": {"n": 7}, "picloudattempt": attempt, "picloudapp": "shop", "picloudkind": "queue",
            "picloudtrigger": "jobs", "picloudtriggerid": Uuid::now_v7(), "piclouddepth": 2,
            "picloudprincipal": Uuid::now_v7(), "picloudtoken": "pdt_x", "piclouddeadline": 1_764_324_030_123_i64,
        })
        .to_string(),
    )
}

/// Sends one delivery to `handler` and returns the reply (or the no-responders status).
async fn request(client: &async_nats::Client, handler: &str, body: Bytes) -> async_nats::Message {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("Content-Type", "application/cloudevents+json");
    client
        .publish_with_reply_and_headers(format!("picloud.v1.handle.shop.{handler}"), inbox, headers, body)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), replies.next()).await.unwrap().unwrap()
}

/// Sends `envelopes` as one batch (DESIGN §14) to `handler` and returns the reply.
async fn request_batch(
    client: &async_nats::Client,
    handler: &str,
    envelopes: &[Bytes],
) -> async_nats::Message {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("Content-Type", "application/cloudevents-batch+json");
    let body = format!(
        "[{}]",
        envelopes.iter().map(|e| std::str::from_utf8(e).unwrap()).collect::<Vec<_>>().join(",")
    );
    client
        .publish_with_reply_and_headers(
            format!("picloud.v1.handle.shop.{handler}"),
            inbox,
            headers,
            body.into(),
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), replies.next()).await.unwrap().unwrap()
}

/// A batch answer's `results` (`null` when its body is empty).
fn results(msg: &async_nats::Message) -> serde_json::Value {
    if msg.payload.is_empty() {
        return serde_json::Value::Null;
    }
    serde_json::from_slice::<serde_json::Value>(&msg.payload).unwrap()["results"].clone()
}

fn status(msg: &async_nats::Message) -> Option<String> {
    msg.headers.as_ref().and_then(|h| h.get("Picloud-Status")).map(|v| v.as_str().to_owned())
}

#[tokio::test]
async fn a_handler_gets_typed_fields_and_its_replies_follow_the_protocol() {
    let nats = NatsServer::start().await.unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<Delivery>();
    let worker = Worker::new(async_nats::connect(nats.url()).await.unwrap(), "shop")
        .handle("ok", move |d: Delivery| {
            let _ = seen_tx.send(d.clone());
            async move {
                Ok(Reply::ok(
                    serde_json::json!({"double": d.data::<serde_json::Value>()?["n"].as_i64().unwrap() * 2}),
                ))
            }
        })
        .handle("later", |_| async { Ok(Reply::retry_after(Duration::from_millis(1500), "busy\nnow")) })
        .handle("never", |_| async { Ok(Reply::fail("bad input")) })
        .handle("broken", |_| async { Err("database down".into()) })
        .start()
        .await
        .unwrap();

    let id = Uuid::now_v7();
    let ok = request(&client, "ok", envelope(id, 3)).await;
    assert_eq!(status(&ok).as_deref(), Some("ok"), "{:?} {:?}", ok.status, ok.description);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&ok.payload).unwrap(),
        serde_json::json!({"double": 14})
    );
    let d = seen.recv().await.unwrap();
    assert_eq!((d.id, d.attempt, d.depth, d.token.as_deref()), (id, 3, 2, Some("pdt_x")));
    assert_eq!((d.deadline_ms, d.event.picloudapp.as_str()), (1_764_324_030_123, "shop"));

    let later = request(&client, "later", envelope(id, 1)).await;
    let h = later.headers.clone().unwrap();
    assert_eq!(status(&later).as_deref(), Some("retry"));
    assert_eq!(h.get("Picloud-Retry-After-Ms").map(|v| v.as_str()), Some("1500"));
    assert_eq!(h.get("Picloud-Error").map(|v| v.as_str()), Some("busy now"), "errors are one header line");

    let never = request(&client, "never", envelope(id, 1)).await;
    assert_eq!(
        (
            status(&never).as_deref(),
            never.headers.unwrap().get("Picloud-Error").map(|v| v.as_str().to_owned())
        ),
        (Some("fail"), Some("bad input".into()))
    );

    let broken = request(&client, "broken", envelope(id, 1)).await;
    assert_eq!(status(&broken).as_deref(), Some("retry"), "a handler error asks for a retry");

    let garbage = request(&client, "ok", Bytes::from_static(b"not json")).await;
    assert_eq!(
        status(&garbage).as_deref(),
        Some("fail"),
        "a malformed delivery will not improve by retrying"
    );
    worker.shutdown().await;
}

#[tokio::test]
async fn shutdown_finishes_the_delivery_in_hand_and_takes_nothing_new() {
    let nats = NatsServer::start().await.unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let started = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let first = Arc::new(AtomicBool::new(true));
    let worker = Worker::new(async_nats::connect(nats.url()).await.unwrap(), "shop")
        .handle("slow", {
            let (started, release) = (started.clone(), release.clone());
            move |_| {
                let (started, release) = (started.clone(), release.clone());
                let holds = first.swap(false, Ordering::SeqCst);
                async move {
                    if holds {
                        started.notify_one();
                        release.notified().await;
                    }
                    Ok(Reply::ok(serde_json::json!({"finished": true})))
                }
            }
        })
        .start()
        .await
        .unwrap();

    let in_hand = tokio::spawn({
        let client = client.clone();
        async move { request(&client, "slow", envelope(Uuid::now_v7(), 1)).await }
    });
    started.notified().await;
    let stopping = tokio::spawn(worker.shutdown());
    // Until the server has processed the unsubscribe, deliveries may still arrive and are served;
    // after it, nothing is taken.
    let after = loop {
        let msg = request(&client, "slow", envelope(Uuid::now_v7(), 1)).await;
        if msg.status == Some(StatusCode::NO_RESPONDERS) {
            break msg;
        }
    };
    assert_eq!(after.status, Some(StatusCode::NO_RESPONDERS), "a draining worker takes nothing new");
    release.notify_one();
    let answered = in_hand.await.unwrap();
    assert_eq!(status(&answered).as_deref(), Some("ok"), "the delivery in hand was finished");
    stopping.await.unwrap();
}

/// A delivery with ordering key `key`, due for an answer a minute from now.
fn keyed(id: Uuid, attempt: u32, key: &str) -> Bytes {
    let mut envelope: serde_json::Value = serde_json::from_slice(&envelope(id, attempt)).unwrap();
    let deadline =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() + 60_000;
    envelope["piclouddeadline"] = serde_json::json!(deadline as i64);
    envelope["picloudorderingkey"] = serde_json::json!(key);
    Bytes::from(envelope.to_string())
}

#[tokio::test]
async fn a_record_counts_each_handlers_deliveries_in_flight_and_orders_them_per_key() {
    let nats = NatsServer::start().await.unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let record = picloud_worker::Record::new();
    let worker = Worker::new(async_nats::connect(nats.url()).await.unwrap(), "shop")
        .record(&record)
        .handle("held", {
            let release = release.clone();
            move |_| {
                let release = release.clone();
                async move {
                    release.acquire().await?.forget();
                    Ok(Reply::ok(serde_json::json!({})))
                }
            }
        })
        .handle("quick", |_| async { Ok(Reply::ok(serde_json::json!({}))) })
        .start()
        .await
        .unwrap();

    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    let mut answers = Vec::new();
    for (id, key) in ids.iter().zip(["a", "b", "a"]) {
        let client = client.clone();
        let body = keyed(*id, 1, key);
        answers.push(tokio::spawn(async move { request(&client, "held", body).await }));
        let handed = record.handed().len();
        picloud_testkit::eventually("the delivery to be handed", || async {
            (record.handed().len() > handed).then_some(())
        })
        .await;
    }
    request(&client, "quick", keyed(Uuid::now_v7(), 2, "a")).await;
    assert_eq!(record.in_flight("held"), 3, "three handed, none answered");
    assert_eq!(record.in_flight("quick"), 0);

    release.add_permits(3);
    for answer in answers {
        assert_eq!(status(&answer.await.unwrap()).as_deref(), Some("ok"));
    }
    assert_eq!(record.in_flight("held"), 0);
    assert_eq!(record.peak_in_flight("held"), 3);
    let by_key = record.by_key("held");
    let a: Vec<Uuid> = by_key["a"].iter().map(|h| h.id).collect();
    assert_eq!(a, [ids[0], ids[2]], "key a's deliveries in the order handed");
    assert_eq!(by_key["b"].iter().map(|h| h.id).collect::<Vec<_>>(), [ids[1]]);
    assert_eq!(record.by_key("quick")["a"][0].attempt, 2);
    worker.shutdown().await;
}

#[tokio::test]
async fn a_cancel_notice_stops_its_delivery_in_hand_and_one_that_comes_before_it() {
    let nats = NatsServer::start().await.unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let (started_tx, mut started) = mpsc::unbounded_channel::<Uuid>();
    // One delivery at a time: the second waits for the first's slot, taken after its notice.
    let worker = Worker::new(async_nats::connect(nats.url()).await.unwrap(), "shop")
        .concurrency(1)
        .handle("long", move |d: Delivery| {
            let _ = started_tx.send(d.id);
            async move {
                std::future::pending::<()>().await;
                Ok(Reply::ok(serde_json::json!({})))
            }
        })
        .start()
        .await
        .unwrap();
    let notice = |id: Uuid| Bytes::from(serde_json::json!({ "id": id }).to_string());
    let send = |id: Uuid| {
        let client = client.clone();
        tokio::spawn(async move { request(&client, "long", envelope(id, 1)).await })
    };

    let running = Uuid::now_v7();
    let first = send(running);
    assert_eq!(tokio::time::timeout(Duration::from_secs(10), started.recv()).await.unwrap(), Some(running));
    let early = Uuid::now_v7();
    client.publish("picloud.v1.cancel.shop.long", notice(early)).await.unwrap();
    picloud_worker::round_trip(&client).await.unwrap();
    let second = send(early);
    picloud_worker::round_trip(&client).await.unwrap();

    // In hand: the notice drops the handler's future, and the delivery is answered `fail`.
    client.publish("picloud.v1.cancel.shop.long", notice(running)).await.unwrap();
    let answer = first.await.unwrap();
    assert_eq!(status(&answer).as_deref(), Some("fail"));
    assert_eq!(answer.headers.as_ref().unwrap().get("Picloud-Error").unwrap().as_str(), "cancelled");
    // Before it: the notice was kept, and the delivery is cancelled as it is taken, never run.
    let answer = second.await.unwrap();
    assert_eq!(status(&answer).as_deref(), Some("fail"));
    assert!(started.try_recv().is_err(), "the early-cancelled delivery ran");
    worker.shutdown().await;
}

#[tokio::test]
async fn a_batch_handler_gets_the_batch_in_order_and_its_results_answer_each_delivery() {
    let nats = NatsServer::start().await.unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<Vec<Uuid>>();
    let worker = Worker::new(async_nats::connect(nats.url()).await.unwrap(), "shop")
        .handle_batch("many", move |batch: Vec<Delivery>| {
            let _ = seen_tx.send(batch.iter().map(|d| d.id).collect());
            async move {
                let mut reply = BatchReply::ok();
                if let [_, second, third, ..] = &batch[..] {
                    reply.set(second.id, ReplyStatus::Fail).set(third.id, ReplyStatus::Retry);
                }
                Ok(reply)
            }
        })
        .handle_batch("busy", |_| async { Ok(BatchReply::all(Reply::retry("the database is busy"))) })
        .handle_batch("broken", |_| async { Err("database down".into()) })
        .start()
        .await
        .unwrap();
    let ids: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
    let envelopes: Vec<Bytes> = ids.iter().map(|&id| envelope(id, 1)).collect();

    let answer = request_batch(&client, "many", &envelopes).await;
    assert_eq!(seen.recv().await.unwrap(), ids, "the whole batch, in its order");
    assert_eq!(status(&answer).as_deref(), Some("ok"), "the status of those the results do not name");
    assert_eq!(
        results(&answer),
        serde_json::json!({ids[1].to_string(): "fail", ids[2].to_string(): "retry"})
    );

    let busy = request_batch(&client, "busy", &envelopes).await;
    assert_eq!(status(&busy).as_deref(), Some("retry"));
    assert_eq!(
        busy.headers.as_ref().unwrap().get("Picloud-Error").map(|v| v.as_str()),
        Some("the database is busy")
    );
    assert_eq!(results(&busy), serde_json::Value::Null, "no results: the header speaks for all");
    let broken = request_batch(&client, "broken", &envelopes).await;
    assert_eq!(status(&broken).as_deref(), Some("retry"), "a handler error retries the batch");

    let alone = request(&client, "many", envelope(ids[0], 2)).await;
    assert_eq!(seen.recv().await.unwrap(), [ids[0]], "a delivery alone is a batch of one");
    assert_eq!(status(&alone).as_deref(), Some("ok"));
    let garbage = request_batch(&client, "many", &[Bytes::from_static(b"{}")]).await;
    assert_eq!(status(&garbage).as_deref(), Some("fail"), "a malformed batch will not improve by retrying");
    worker.shutdown().await;
}

#[tokio::test]
async fn a_handler_of_one_delivery_at_a_time_answers_a_batch_with_each_ones_status() {
    let nats = NatsServer::start().await.unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let worker = Worker::new(async_nats::connect(nats.url()).await.unwrap(), "shop")
        .handle("one", |d: Delivery| async move {
            Ok(match d.attempt {
                1 => Reply::ok(serde_json::json!({})),
                2 => Reply::retry("later"),
                _ => Reply::fail("never"),
            })
        })
        .start()
        .await
        .unwrap();
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    let envelopes: Vec<Bytes> = ids.iter().zip(1..).map(|(&id, attempt)| envelope(id, attempt)).collect();
    let answer = request_batch(&client, "one", &envelopes).await;
    assert_eq!(status(&answer).as_deref(), Some("ok"));
    assert_eq!(
        results(&answer),
        serde_json::json!({ids[0].to_string(): "ok", ids[1].to_string(): "retry", ids[2].to_string(): "fail"})
    );
    worker.shutdown().await;
}
