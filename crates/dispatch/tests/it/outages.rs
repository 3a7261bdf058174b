//! Delivery through failures under the relay: a Postgres connection killed while the relay reads
//! where claimed rows go must leave them to be delivered (and a sync call never run twice), and a
//! NATS connection lost while deliveries are in flight gives them back at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use std::time::Duration;

use picloud_store::events::{self, EventContext, SyncWaiter};
use picloud_store::*;
use picloud_testkit::MailCatcher;
use serde_json::json;
use serde_json::value::RawValue;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::executors::{next_mail, send_email, start_executors};
use crate::support::*;

/// The backends waiting for a lock on table `apps`.
async fn waiting_on_apps(w: &World) -> Vec<i32> {
    sqlx::query_scalar("SELECT pid FROM pg_locks WHERE relation = 'apps'::regclass AND NOT granted")
        .fetch_all(w.store.pool())
        .await
        .unwrap()
}

/// A sync call whose row outlived its lease on the node that wrote it (the node died).
async fn expired_sync_call(w: &World) -> Uuid {
    w.trigger("call", TriggerSpec::Http, "call").await;
    let cx = EventContext { app_id: w.app.id, app_slug: &w.app.slug, depth: 0, config: &w.config };
    let body = RawValue::from_string("{}".into()).unwrap();
    let waiter =
        SyncWaiter { reply_to: "_INBOX.dead.1", authorized_at: None, node: "dead", lease: Duration::ZERO };
    match events::invoke(&w.store, &cx, "call", &body, waiter).await.unwrap() {
        SyncCallWrite::Written { row, .. } => row.id,
        _ => panic!("the call is written"),
    }
}

#[tokio::test]
async fn an_email_whose_app_look_up_loses_its_connection_is_still_sent() {
    let w = World::new().await;
    let mut smtp = MailCatcher::start().await.unwrap();
    let executors = start_executors(&w, Some(&smtp.url())).await;
    let id = send_email(&w, json!({"to": "ann@example.com", "subject": "Hi", "text": "Hello"})).await;
    let call = expired_sync_call(&w).await;

    // Hold the relay's reads of where its rows go on a lock, then kill the connections that wait.
    let mut lock = w.store.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE apps IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;
    let waiting = eventually("the relay to wait on the look-up", || async {
        Some(waiting_on_apps(&w).await).filter(|pids| !pids.is_empty())
    })
    .await;
    for pid in waiting {
        let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(&mut *lock)
            .await
            .unwrap();
        assert!(killed);
    }
    lock.rollback().await.unwrap();

    let mail = next_mail(&mut smtp, "the email, sent after the failed look-up").await;
    assert_eq!(mail.to, ["ann@example.com"]);
    w.drained().await;
    assert!(w.dead_letters().await.is_empty(), "the email {id} was delivered, not dead-lettered");
    let page = w.store.list_abandoned(w.app.id, None, 10).await.unwrap();
    let abandoned: Vec<_> = page.items.iter().map(|a| (a.outbox_id, a.reason, a.handler_status)).collect();
    assert_eq!(
        abandoned,
        [(call, AbandonReason::LeaseExpired, HandlerStatus::Unknown)],
        "the sync call is never run again"
    );
    relay.stop().await;
    executors.shutdown().await;
}

#[tokio::test]
async fn a_delivery_in_flight_when_nats_restarts_is_given_back_at_once_without_spending_an_attempt() {
    let mut w = World::new().await;
    w.kv_trigger("slow", "orders", "slow").await;
    // The first delivery hangs in its handler until the test ends; the one after the restart is
    // answered.
    let calls = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    let worker_client = async_nats::connect(w.nats_url()).await.unwrap();
    let (worker, mut seen) = start_worker_on(worker_client.clone(), "shop", "slow", {
        let release = release.clone();
        move |_| {
            let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
            let release = release.clone();
            async move {
                if first {
                    release.notified().await;
                }
                Ok(picloud_worker::Reply::ok(json!({})))
            }
        }
    })
    .await;
    let mut config = relay_config("n");
    config.node.handler_timeout = std::time::Duration::from_secs(120);
    let relay = start_relay(w.store.clone(), &w.nats_url(), config).await;
    w.put("orders", "o-1", json!({"n": 1}), 0).await;
    let first = next(&mut seen, "the first delivery").await;

    // The row is held until the worker is subscribed on the restarted server again: the relay
    // gives it back (and delivers it again) only then, so the new delivery cannot meet a server
    // where no worker has subscribed yet (no responders, which rightly spends an attempt).
    let mut hold = w.store.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM outbox WHERE id = $1 FOR UPDATE")
        .bind(first.id)
        .execute(&mut *hold)
        .await
        .unwrap();
    w.restart_nats_for(&worker_client).await;
    worker_client.flush().await.unwrap();
    hold.rollback().await.unwrap();

    let again = next(&mut seen, "the delivery again, long before its 120 s deadline").await;
    assert_eq!(again.id, first.id);
    assert_eq!(again.attempt, first.attempt, "the lost attempt is given back");
    w.drained().await;
    assert!(w.dead_letters().await.is_empty());
    relay.stop().await;
    release.notify_one();
    worker.stop().await;
}

#[tokio::test]
async fn a_delivery_whose_handler_works_is_kept_through_a_nats_restart_and_runs_once() {
    let mut w = World::new().await;
    w.kv_trigger("slow", "orders", "slow").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    let worker_client = async_nats::connect(w.nats_url()).await.unwrap();
    let (worker, mut seen) = start_worker_on(worker_client.clone(), "shop", "slow", {
        let (calls, release) = (calls.clone(), release.clone());
        move |d: picloud_worker::Delivery| {
            calls.fetch_add(1, Ordering::SeqCst);
            let release = release.clone();
            async move {
                d.long_running(release.notified()).await;
                Ok(picloud_worker::Reply::ok(json!({})))
            }
        }
    })
    .await;
    // A deadline that outlasts the restart: the delivery is kept, not timed out, through it.
    let mut config = relay_config("n");
    config.node.handler_timeout = std::time::Duration::from_secs(5);
    let relay = start_relay(w.store.clone(), &w.nats_url(), config).await;
    w.put("orders", "o-1", json!({"n": 1}), 0).await;
    let first = next(&mut seen, "the delivery").await;
    w.lease_past(first.id, w.lease_of(first.id).await, "the handler's working to move the lease").await;

    w.nats.restart().await.unwrap();
    // Its workings after the restart move the lease again, twice (the first might have been
    // written from one said before): the relay hears it, so the final answer will reach it.
    for _ in 0..2 {
        w.lease_past(first.id, w.lease_of(first.id).await, "a working heard after the restart").await;
    }
    release.notify_one();
    w.drained().await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the working delivery was not given back and run again");
    assert!(w.dead_letters().await.is_empty());
    relay.stop().await;
    worker.stop().await;
}

#[tokio::test]
async fn a_kept_working_delivery_whose_deadline_passes_after_a_nats_restart_gets_its_attempt_back() {
    let mut w = World::new().await;
    w.kv_trigger("slow", "orders", "slow").await;
    let worker_client = async_nats::connect(w.nats_url()).await.unwrap();
    // The first attempt says working until its lease moved, then goes quiet and never answers
    // (its answer lost with the connection, as far as the relay can tell); the next one answers.
    let (quiet, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let calls = Arc::new(AtomicUsize::new(0));
    let (worker, mut seen) = start_worker_on(worker_client.clone(), "shop", "slow", {
        let (quiet, release) = (quiet.clone(), release.clone());
        move |d: picloud_worker::Delivery| {
            let (quiet, release) = (quiet.clone(), release.clone());
            let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    d.long_running(quiet.notified()).await;
                    release.notified().await;
                }
                Ok(picloud_worker::Reply::ok(json!({})))
            }
        }
    })
    .await;
    // A deadline well after the restart: the relay has seen its connection lost by then.
    let mut config = relay_config("n");
    config.node.handler_timeout = std::time::Duration::from_secs(5);
    let relay = start_relay(w.store.clone(), &w.nats_url(), config).await;
    w.put("orders", "o-1", json!({"n": 1}), 0).await;
    let first = next(&mut seen, "the delivery").await;
    w.lease_past(first.id, w.lease_of(first.id).await, "its working to move the lease").await;
    quiet.notify_one();
    w.restart_nats_for(&worker_client).await;

    let again = next(&mut seen, "the delivery again, after its deadline").await;
    assert_eq!((again.id, again.attempt), (first.id, first.attempt), "the attempt is given back, not spent");
    w.drained().await;
    relay.stop().await;
    release.notify_one();
    worker.stop().await;
}
