//! What a delivery looks like and how each answer ends it.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt as _;
use picloud_core::protocol::EventKind;
use picloud_core::token::TokenKey;
use picloud_core::{Scope, TriggerConfig};
use picloud_store::events::EventContext;
use picloud_store::*;
use picloud_worker::{Delivery, Reply};
use serde_json::{Value, json};

use crate::support::*;

#[tokio::test]
async fn a_kv_event_reaches_its_handler_once_with_every_attribute_of_the_envelope() {
    let w = World::new().await;
    let trigger = w.kv_trigger("on-order", "orders:*", "process-order").await;
    let client = async_nats::connect(w.nats_url()).await.unwrap();
    let mut handler = client
        .queue_subscribe("picloud.v1.handle.shop.process-order", "picloud.shop.process-order".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("node-a")).await;
    let before_ms = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;

    w.put("orders:eu", "o-1", json!({"total": 12}), 0).await;
    let msg = tokio::time::timeout(Duration::from_secs(10), handler.next()).await.unwrap().unwrap();

    let headers = msg.headers.clone().expect("a delivery has headers");
    assert_eq!(headers.get("Content-Type").map(|v| v.as_str()), Some("application/cloudevents+json"));
    assert_eq!(headers.iter().count(), 1, "Content-Type is the only header");
    let e: Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(e["specversion"], "1.0");
    assert!(e["id"].as_str().unwrap().parse::<uuid::Uuid>().is_ok());
    assert_eq!(e["type"], "picloud.kv.put");
    assert_eq!(e["source"], "/apps/shop/kv/orders:eu");
    assert_eq!(e["subject"], "o-1");
    assert!(
        time::OffsetDateTime::parse(
            e["time"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339
        )
        .is_ok()
    );
    assert_eq!(e["datacontenttype"], "application/json");
    assert_eq!(
        e["data"],
        json!({"collection": "orders:eu", "key": "o-1", "op": "put", "value": {"total": 12}, "previous": null, "version": 1})
    );
    assert_eq!(e["picloudattempt"], 1);
    assert_eq!(e["picloudapp"], "shop");
    assert_eq!(e["picloudkind"], "kv");
    assert_eq!(e["picloudtrigger"], "on-order");
    assert_eq!(e["picloudtriggerid"], trigger.id.to_string());
    assert_eq!(e["piclouddepth"], 0);
    assert_eq!(e["picloudprincipal"], w.admin.id.to_string());
    let deadline = e["piclouddeadline"].as_i64().unwrap();
    assert!(deadline >= before_ms + 1500 && deadline <= before_ms + 1500 + 10_000, "deadline {deadline}");
    let token = TokenKey::new(SECRET).verify(e["picloudtoken"].as_str().unwrap(), deadline).unwrap();
    assert_eq!((token.principal, token.app, token.depth), (w.admin.id, w.app.id, 1));
    assert!(token.scopes.contains(Scope::AppWrite), "the handler may write its app's data");
    assert!(!token.scopes.contains(Scope::AppAdmin), "but never manage the app (DESIGN §9)");

    let mut ok = async_nats::HeaderMap::new();
    ok.insert("Picloud-Status", "ok");
    client.publish_with_headers(msg.reply.unwrap(), ok, "{}".into()).await.unwrap();
    w.drained().await;
    assert!(handler.next().now_or_never_is_none().await, "delivered once");
    assert!(w.dead_letters().await.is_empty());
    relay.stop().await;
}

/// `now_or_never` for a subscriber: whether no message is already waiting.
trait NothingWaiting {
    async fn now_or_never_is_none(&mut self) -> bool;
}

impl NothingWaiting for futures::stream::Next<'_, async_nats::Subscriber> {
    async fn now_or_never_is_none(&mut self) -> bool {
        futures::FutureExt::now_or_never(self).is_none()
    }
}

#[tokio::test]
async fn retry_twice_then_ok_gives_three_attempts_with_one_delivery_id_and_no_dead_letter() {
    let w = World::new().await;
    w.kv_trigger("on-order", "orders", "flaky").await;
    let (worker, mut rx) = start_worker(&w.nats_url(), "shop", "flaky", |d: Delivery| async move {
        Ok(if d.attempt < 3 {
            Reply::retry_after(Duration::from_millis(5), "not yet")
        } else {
            Reply::ok(json!({}))
        })
    })
    .await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;
    w.put("orders", "o-1", json!(1), 0).await;

    let attempts: Vec<_> = [
        next(&mut rx, "attempt 1").await,
        next(&mut rx, "attempt 2").await,
        next(&mut rx, "attempt 3").await,
    ]
    .iter()
    .map(|d| (d.id, d.attempt))
    .collect();
    assert_eq!(attempts.iter().map(|a| a.1).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(attempts.iter().all(|a| a.0 == attempts[0].0), "one delivery id across attempts: {attempts:?}");
    w.drained().await;
    assert!(w.dead_letters().await.is_empty());
    assert!(rx.try_recv().is_err(), "no fourth attempt");
    relay.stop().await;
    worker.stop().await;
}

#[tokio::test]
async fn a_delivery_whose_attempts_run_out_becomes_an_exhausted_dead_letter() {
    let w = World::new().await;
    let trigger = w.kv_trigger("on-order", "orders", "busy").await;
    let (worker, mut rx) =
        start_worker(&w.nats_url(), "shop", "busy", |_| async { Ok(Reply::retry("still busy")) }).await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;
    w.put("orders", "o-1", json!(1), 0).await;

    let first = next(&mut rx, "attempt 1").await;
    let dead = eventually("the dead letter", || async { w.dead_letters().await.pop() }).await;
    assert_eq!((dead.reason, dead.attempts, dead.kind), (DeadLetterReason::Exhausted, 3, EventKind::Kv));
    assert_eq!((dead.delivery_id, dead.trigger_id), (first.id, Some(trigger.id)));
    assert_eq!(dead.last_error.as_deref(), Some("still busy"));
    assert_eq!(w.outbox_len().await, 0);
    relay.stop().await;
    worker.stop().await;
}

#[tokio::test]
async fn a_delivery_its_handler_fails_becomes_a_rejected_dead_letter_at_once() {
    let w = World::new().await;
    w.kv_trigger("on-order", "orders", "strict").await;
    let (worker, mut rx) =
        start_worker(&w.nats_url(), "shop", "strict", |_| async { Ok(Reply::fail("bad order")) }).await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;
    w.put("orders", "o-1", json!(1), 0).await;

    next(&mut rx, "the only attempt").await;
    let dead = eventually("the dead letter", || async { w.dead_letters().await.pop() }).await;
    assert_eq!((dead.reason, dead.attempts), (DeadLetterReason::Rejected, 1));
    assert_eq!(dead.last_error.as_deref(), Some("bad order"));
    assert_eq!(dead.headers.event_type, "picloud.kv.put");
    assert_eq!(serde_json::from_str::<Value>(dead.payload.get()).unwrap()["key"], "o-1");
    assert!(rx.try_recv().is_err(), "no second attempt after fail");
    relay.stop().await;
    worker.stop().await;
}

#[tokio::test]
async fn with_no_handler_subscribed_a_delivery_retries_and_then_becomes_a_dead_letter() {
    let w = World::new().await;
    w.kv_trigger("on-order", "orders", "nobody").await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;
    w.put("orders", "o-1", json!(1), 0).await;

    let dead = eventually("the dead letter", || async { w.dead_letters().await.pop() }).await;
    assert_eq!((dead.reason, dead.attempts), (DeadLetterReason::Exhausted, 3));
    assert!(dead.last_error.as_deref().unwrap().contains("no responders"), "{:?}", dead.last_error);
    relay.stop().await;
}

async fn dead_letter_trigger(w: &World, name: &str, handler: &str) {
    let spec = TriggerSpec::DeadLetter { source_trigger: None, source_kinds: None };
    w.trigger(name, spec, handler).await;
}

#[tokio::test]
async fn a_dead_letter_trigger_that_succeeds_resolves_the_dead_letter_as_handled_by_script() {
    let w = World::new().await;
    w.kv_trigger("on-order", "orders", "strict").await;
    dead_letter_trigger(&w, "report", "on-dead").await;
    let (strict, _) =
        start_worker(&w.nats_url(), "shop", "strict", |_| async { Ok(Reply::fail("no")) }).await;
    let (reporter, mut reports) = start_worker(&w.nats_url(), "shop", "on-dead", ok).await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;
    w.put("orders", "o-1", json!(1), 0).await;

    let report = next(&mut reports, "the dead-letter delivery").await;
    assert_eq!(report.event.event_type, "picloud.dead_letter.created");
    assert_eq!(report.event.source, "/apps/shop/dead-letters");
    assert_eq!(report.event.picloudkind, "dead_letter");
    let data: Value = report.data().unwrap();
    assert_eq!((data["reason"].as_str(), data["trigger"].as_str()), (Some("rejected"), Some("on-order")));
    assert_eq!(data["event"]["data"]["key"], "o-1");
    let dead = eventually("handled_by_script", || async {
        w.dead_letters().await.pop().filter(|d| d.resolution == Some(Resolution::HandledByScript))
    })
    .await;
    assert_eq!(data["id"], dead.id.to_string());
    w.drained().await;
    relay.stop().await;
    strict.stop().await;
    reporter.stop().await;
}

#[tokio::test]
async fn dead_letter_triggers_that_all_fail_resolve_it_as_handler_failed_and_never_loop() {
    let w = World::new().await;
    w.kv_trigger("on-order", "orders", "strict").await;
    dead_letter_trigger(&w, "report-fails", "fails").await;
    dead_letter_trigger(&w, "report-busy", "busy").await;
    let (strict, _) =
        start_worker(&w.nats_url(), "shop", "strict", |_| async { Ok(Reply::fail("no")) }).await;
    let (fails, _) =
        start_worker(&w.nats_url(), "shop", "fails", |_| async { Ok(Reply::fail("cannot")) }).await;
    let (busy, mut busy_rx) =
        start_worker(&w.nats_url(), "shop", "busy", |_| async { Ok(Reply::retry("later")) }).await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;
    w.put("orders", "o-1", json!(1), 0).await;

    let dead = eventually("handler_failed", || async {
        w.dead_letters().await.pop().filter(|d| d.resolution == Some(Resolution::HandlerFailed))
    })
    .await;
    assert_eq!(dead.reason, DeadLetterReason::Rejected);
    let busy_attempts: HashSet<u32> =
        std::iter::from_fn(|| busy_rx.try_recv().ok()).map(|d| d.attempt).collect();
    assert_eq!(busy_attempts, HashSet::from([1, 2, 3]), "the retrying script was tried until exhausted");
    w.drained().await;
    assert_eq!(w.dead_letters().await.len(), 1, "dead-letter deliveries never become dead letters");
    relay.stop().await;
    for worker in [strict, fails, busy] {
        worker.stop().await;
    }
}

#[tokio::test]
async fn a_self_triggering_handler_stops_at_the_depth_limit() {
    let mut w = World::new().await;
    w.config = TriggerConfig { max_depth: 3, ..w.config };
    let mut config = relay_config("n");
    config.node.triggers.max_depth = 3;
    w.kv_trigger("echo", "loop", "echo").await;
    let (store, app, handler_config) = (w.store.clone(), w.app.clone(), w.config);
    let (worker, mut rx) = start_worker(&w.nats_url(), "shop", "echo", move |d: Delivery| {
        let (store, app) = (store.clone(), app.clone());
        async move {
            let token = TokenKey::new(SECRET).verify(d.token.as_deref().unwrap(), d.deadline_ms)?;
            let cx = EventContext {
                app_id: token.app,
                app_slug: &app.slug,
                depth: token.depth,
                config: &handler_config,
            };
            let mut tx = store.begin().await?;
            let collection = picloud_core::CollectionName::parse("loop")?;
            let key = picloud_core::KvKey::parse(format!("k{}", token.depth))?;
            picloud_store::events::kv_put(&store, &mut tx, &cx, &collection, &key, &json!(token.depth), None)
                .await?;
            store.commit(tx).await?;
            Ok(Reply::ok(json!({})))
        }
    })
    .await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), config).await;
    w.put("loop", "start", json!(0), 0).await;

    let depths: Vec<u32> = vec![
        next(&mut rx, "depth 0").await.depth,
        next(&mut rx, "depth 1").await.depth,
        next(&mut rx, "depth 2").await.depth,
    ];
    assert_eq!(depths, [0, 1, 2]);
    let dead = eventually("the max_depth dead letter", || async { w.dead_letters().await.pop() }).await;
    assert_eq!((dead.reason, dead.headers.depth, dead.attempts), (DeadLetterReason::MaxDepth, 3, 0));
    w.drained().await;
    assert!(rx.try_recv().is_err(), "nothing is delivered at the depth limit");
    relay.stop().await;
    worker.stop().await;
}

#[tokio::test]
async fn a_principal_removed_from_the_app_gets_an_unauthorized_dead_letter_and_the_handler_sees_nothing() {
    let w = World::new().await;
    w.kv_trigger("on-order", "orders", "process").await;
    let (worker, mut rx) = start_worker(&w.nats_url(), "shop", "process", ok).await;
    w.store.remove_member(w.app.id, w.admin.id).await.unwrap();
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;
    w.put("orders", "o-1", json!(1), 0).await;

    let dead = eventually("the dead letter", || async { w.dead_letters().await.pop() }).await;
    assert_eq!((dead.reason, dead.attempts), (DeadLetterReason::Unauthorized, 1));
    assert!(dead.last_error.as_deref().unwrap().contains("no longer holds"), "{:?}", dead.last_error);
    w.drained().await;
    relay.stop().await;
    worker.stop().await;
    assert!(rx.try_recv().is_err(), "the handler never saw the delivery");
}

#[tokio::test]
async fn a_stopping_relay_finishes_the_deliveries_it_holds_and_claims_nothing_new() {
    let w = World::new().await;
    w.kv_trigger("on-order", "orders", "slow").await;
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let (worker, mut rx) = start_worker(&w.nats_url(), "shop", "slow", {
        let release = release.clone();
        move |_| {
            let release = release.clone();
            async move {
                release.notified().await;
                Ok(Reply::ok(json!({})))
            }
        }
    })
    .await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;
    w.put("orders", "o-1", json!(1), 0).await;
    next(&mut rx, "the delivery").await;

    relay.signal_stop();
    release.notify_one();
    relay.stop().await;
    assert_eq!(w.outbox_len().await, 0, "the delivery in flight was completed before the relay stopped");

    w.put("orders", "o-2", json!(2), 0).await;
    assert_eq!(w.outbox_len().await, 1, "a stopped relay claims nothing");
    let leased: Option<time::OffsetDateTime> =
        sqlx::query_scalar("SELECT leased_until FROM outbox").fetch_one(w.store.pool()).await.unwrap();
    assert_eq!(leased, None);
    worker.stop().await;
}

#[tokio::test]
async fn an_envelope_larger_than_nats_carries_is_dead_lettered_at_once_not_retried() {
    let w = World::new().await;
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("small.conf");
    std::fs::write(&conf, "max_payload: 4096\n").unwrap();
    let nats = picloud_testkit::NatsServer::start_with_config(&conf).await.unwrap();
    w.kv_trigger("big", "orders", "big").await;
    w.put("orders", "o-1", json!({"pad": "x".repeat(8192)}), 0).await;

    let relay = start_relay(w.store.clone(), &nats.url(), relay_config("n")).await;
    let dead = eventually("the dead letter", || async { w.dead_letters().await.pop() }).await;
    assert_eq!((dead.reason, dead.attempts), (DeadLetterReason::Rejected, 1));
    let error = dead.last_error.unwrap_or_default();
    assert!(error.contains("max_payload (4096 bytes)"), "{error}");
    w.drained().await;
    relay.stop().await;
}
