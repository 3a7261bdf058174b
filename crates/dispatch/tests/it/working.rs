//! Long work (DESIGN §14): a handler that says `working` keeps its attempt, and its row's lease,
//! past the handler timeout.

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use picloud_core::token::{TokenError, TokenKey};
use picloud_store::AuthRepo as _;
use picloud_worker::{Delivery, Reply};
use serde_json::json;
use uuid::Uuid;

use crate::support::*;

fn unix_now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

#[tokio::test]
async fn a_handler_that_works_three_times_its_timeout_while_saying_so_runs_once() {
    let w = World::new().await;
    w.kv_trigger("on-order", "orders", "slow").await;
    let config = relay_config("n");
    let work = config.node.handler_timeout * 3;
    let (worker, mut rx) = start_worker(&w.nats_url(), "shop", "slow", move |d: Delivery| async move {
        d.long_running(tokio::time::sleep(work)).await;
        Ok(Reply::ok(json!({})))
    })
    .await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), config).await;
    w.put("orders", "o-1", json!(1), 0).await;

    let first = next(&mut rx, "the delivery").await;
    assert_eq!(first.attempt, 1);
    picloud_testkit::eventually_within("the delivery completes", work * 3, || async {
        (w.outbox_len().await == 0).then_some(())
    })
    .await;
    assert!(rx.try_recv().is_err(), "one attempt, though it took three handler timeouts");
    assert!(w.dead_letters().await.is_empty());
    relay.stop().await;
    worker.stop().await;
}

#[tokio::test]
async fn a_working_handler_gets_a_delivery_token_for_its_moved_deadline_and_the_first_one_expires() {
    let w = World::new().await;
    w.kv_trigger("on-order", "orders", "slow").await;
    let config = relay_config("n");
    let work = config.node.handler_timeout * 3;
    let (checked, mut checks) = tokio::sync::mpsc::unbounded_channel();
    // Workers use their app's inbox prefix: the relay sends renewals nowhere else.
    let client = async_nats::ConnectOptions::new()
        .custom_inbox_prefix("_INBOX_shop")
        .connect(w.nats_url())
        .await
        .unwrap();
    let (worker, mut rx) = start_worker_on(client, "shop", "slow", move |d: Delivery| {
        let checked = checked.clone();
        async move {
            d.long_running(tokio::time::sleep(work)).await;
            let now = unix_now_ms();
            let key = TokenKey::new(SECRET);
            let first = key.verify(d.token.as_deref().unwrap(), now);
            let current = key.verify(&d.current_token().unwrap(), now);
            checked.send((first, current, d.deadline_ms, d.current_deadline_ms(), now)).ok();
            Ok(Reply::ok(json!({})))
        }
    })
    .await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), config).await;
    w.put("orders", "o-1", json!(1), 0).await;

    next(&mut rx, "the delivery").await;
    let (first, current, deadline, moved_to, now) = next(&mut checks, "the handler's check").await;
    assert_eq!(first, Err(TokenError::Expired), "the envelope's token ends at the first deadline");
    let current = current.expect("the renewed token is valid past the first deadline");
    assert!(moved_to > now && moved_to > deadline, "the deadline moved: {deadline} → {moved_to} (now {now})");
    assert_eq!(current.deadline_ms, moved_to, "the token is the moved deadline's");
    assert_eq!(current.depth, 1);
    relay.stop().await;
    worker.stop().await;
}

/// A handler played by hand on `picloud.v1.handle.shop.slow`: it holds one delivery and says
/// `working` on its reply subject, naming the reply subject it likes.
struct HandHeld {
    client: async_nats::Client,
    reply_to: async_nats::Subject,
    id: Uuid,
}

impl HandHeld {
    /// Waits for the delivery of the put `orders/o-1` (a relay runs on `w`).
    async fn take(w: &World, client: async_nats::Client, mut deliveries: async_nats::Subscriber) -> HandHeld {
        w.put("orders", "o-1", json!(1), 0).await;
        let delivery =
            tokio::time::timeout(Duration::from_secs(20), deliveries.next()).await.unwrap().unwrap();
        let id = serde_json::from_slice::<serde_json::Value>(&delivery.payload).unwrap()["id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        HandHeld { client, reply_to: delivery.reply.unwrap(), id }
    }

    async fn working(&self, renew_to: &str) {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Picloud-Status", "working");
        self.client
            .publish_with_reply_and_headers(self.reply_to.clone(), renew_to.to_owned(), headers, "".into())
            .await
            .unwrap();
    }

    /// Says `working` every 50 ms until the row's lease moves past `lease`: the lease it moved to.
    async fn until_the_lease_passes(
        &self,
        w: &World,
        lease: Option<time::OffsetDateTime>,
        renew_to: &str,
    ) -> Option<time::OffsetDateTime> {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                self.working(renew_to).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                let now = w.lease_of(self.id).await;
                if now > lease {
                    return now;
                }
            }
        })
        .await
        .expect("the lease to move")
    }
}

async fn hand_held(w: &World) -> HandHeld {
    w.kv_trigger("on-order", "orders", "slow").await;
    let client = async_nats::connect(w.nats_url()).await.unwrap();
    let deliveries = client.subscribe("picloud.v1.handle.shop.slow").await.unwrap();
    picloud_worker::round_trip(&client).await.unwrap();
    HandHeld::take(w, client, deliveries).await
}

#[tokio::test]
async fn a_renewal_goes_only_to_the_apps_own_inbox_whatever_reply_subject_a_working_names() {
    let w = World::new().await;
    let watcher = async_nats::connect(w.nats_url()).await.unwrap();
    let mut aimed = watcher.subscribe("_INBOX.elsewhere.>").await.unwrap();
    let mut own = watcher.subscribe("_INBOX_shop.mine").await.unwrap();
    picloud_worker::round_trip(&watcher).await.unwrap();
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;
    let held = hand_held(&w).await;

    // The first longer lease is asked for with a reply subject outside the app's inbox.
    let first = w.lease_of(held.id).await;
    held.until_the_lease_passes(&w, first, "_INBOX.elsewhere.x").await;
    // Later ones name the app's own inbox; the first the relay does not coalesce gets a renewal.
    let renewal = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            held.working("_INBOX_shop.mine").await;
            if let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(100), own.next()).await {
                return msg;
            }
        }
    })
    .await
    .expect("a renewal in the app's own inbox");
    let renewal: picloud_core::protocol::Renewal = serde_json::from_slice(&renewal.payload).unwrap();
    assert!(TokenKey::new(SECRET).verify(&renewal.picloudtoken, unix_now_ms()).is_ok());
    // Both went out on the relay's one connection, in order: one aimed elsewhere would be here.
    assert!(
        tokio::time::timeout(Duration::from_millis(1), aimed.next()).await.is_err(),
        "the relay sent a renewal outside the app's inbox"
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_principal_that_may_no_longer_run_the_trigger_gets_no_renewed_token() {
    let w = World::new().await;
    let watcher = async_nats::connect(w.nats_url()).await.unwrap();
    let mut own = watcher.subscribe("_INBOX_shop.mine").await.unwrap();
    picloud_worker::round_trip(&watcher).await.unwrap();
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;
    let held = hand_held(&w).await;
    let lease = held.until_the_lease_passes(&w, w.lease_of(held.id).await, "_INBOX_shop.mine").await;
    tokio::time::timeout(Duration::from_secs(20), own.next()).await.expect("a renewal while it may").unwrap();

    w.store.remove_member(w.app.id, w.admin.id).await.unwrap();
    // Two more longer leases: a renewal goes out within moments of its lease, long before the
    // next one (a quarter of the handler timeout later at least).
    let lease = held.until_the_lease_passes(&w, lease, "_INBOX_shop.mine").await;
    held.until_the_lease_passes(&w, lease, "_INBOX_shop.mine").await;
    assert!(
        tokio::time::timeout(Duration::from_millis(1), own.next()).await.is_err(),
        "a token renewed for a principal that lost the right to run the trigger"
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_handler_that_stops_saying_working_is_timed_out_a_handler_timeout_after_it_last_did() {
    let w = World::new().await;
    w.kv_trigger("on-order", "orders", "stalls").await;
    let config = relay_config("n");
    let timeout = config.node.handler_timeout;
    let (worker, mut rx) = start_worker(&w.nats_url(), "shop", "stalls", move |d: Delivery| async move {
        if d.attempt == 1 {
            // Well before the deadline, once; then not a word until long after it.
            tokio::time::sleep(timeout * 2 / 3).await;
            d.working(Some(40)).await.unwrap();
            tokio::time::sleep(timeout * 3).await;
        }
        Ok(Reply::ok(json!({})))
    })
    .await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), config).await;
    w.put("orders", "o-1", json!(1), 0).await;

    let first = next(&mut rx, "the first attempt").await;
    let started = Instant::now();
    let second = next(&mut rx, "the attempt after the timeout").await;
    assert_eq!((first.id, second.attempt), (second.id, 2));
    // Timed out the handler timeout after the `working`, not after the start.
    let waited = started.elapsed();
    assert!(waited >= timeout * 2 / 3 + timeout - Duration::from_millis(100), "timed out after {waited:?}");
    w.drained().await;
    relay.stop().await;
    worker.stop().await;
}

#[tokio::test]
async fn a_relay_cut_off_while_its_handler_works_leaves_the_row_until_the_extended_lease_ends() {
    let w = World::new().await;
    w.kv_trigger("on-order", "orders", "long").await;
    let timeout = relay_config("n").node.handler_timeout;
    let (worker, mut rx) = start_worker(&w.nats_url(), "shop", "long", move |d: Delivery| async move {
        if d.attempt == 1 {
            d.long_running(tokio::time::sleep(timeout * 4)).await;
        }
        Ok(Reply::ok(json!({})))
    })
    .await;
    let (proxy, _doomed) = doomed_relay(&w, relay_config("doomed")).await;
    w.put("orders", "o-1", json!(1), 0).await;

    let first = next(&mut rx, "the first attempt").await;
    let extended_until = w.lease_past(first.id, w.lease_of(first.id).await, "the lease to move").await;
    proxy.cut().await;
    let until = w.lease_of(first.id).await;
    assert!(until >= extended_until);
    let until = until.expect("leased until the extended lease ends");

    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;
    let second = next(&mut rx, "the attempt after the extended lease").await;
    let now: time::OffsetDateTime =
        sqlx::query_scalar("SELECT now()").fetch_one(w.store.pool()).await.unwrap();
    assert_eq!(second.attempt, 2);
    assert!(now >= until, "claimed again at {now}, before the extended lease ended at {until}");
    w.drained().await;
    relay.stop().await;
    worker.stop().await;
}

#[tokio::test]
async fn a_limited_trigger_keeps_its_slot_while_a_delivery_works_so_no_other_relay_starts_one_beside_it() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use picloud_core::CollectionPattern;
    use picloud_core::flow::{Flow, Rate};
    use picloud_store::{TriggerPatch, TriggerRepo as _, TriggerSpec};

    let w = World::new().await;
    w.trigger("limited", TriggerSpec::Pubsub { topic: CollectionPattern::parse("t").unwrap() }, "limited")
        .await;
    // With a rate a relay claims no rows ahead of its slot: nothing but the longer lease keeps the
    // slot of the delivery that works.
    let rate = Rate { per_second: 100, burst: 100 };
    let flow = Flow { concurrency: Some(1), rate: Some(rate), ..Flow::default() };
    let patch = TriggerPatch { flow: Some(Some(flow)), ..TriggerPatch::default() };
    w.store.update_trigger(w.app.id, "limited", &patch).await.unwrap();
    let timeout = relay_config("n").node.handler_timeout;
    let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (now_running, seen_most) = (running.clone(), most.clone());
    let (worker, mut rx) = start_worker(&w.nats_url(), "shop", "limited", move |d: Delivery| {
        let (running, most) = (now_running.clone(), seen_most.clone());
        async move {
            most.fetch_max(running.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
            // The first works past two leases; the other answers at once.
            if d.data::<serde_json::Value>()?["n"] == 0 {
                d.long_running(tokio::time::sleep(timeout * 3)).await;
            }
            running.fetch_sub(1, Ordering::SeqCst);
            Ok(Reply::ok(json!({})))
        }
    })
    .await;
    w.publish("t", json!({"n": 0}), None).await;
    let relays = [
        start_relay(w.store.clone(), &w.nats_url(), relay_config("a")).await,
        start_relay(w.store.clone(), &w.nats_url(), relay_config("b")).await,
    ];
    let first = next(&mut rx, "the long delivery").await;
    assert_eq!(first.data::<serde_json::Value>().unwrap()["n"], 0);
    w.publish("t", json!({"n": 1}), None).await;
    picloud_testkit::eventually_within("both deliveries complete", timeout * 8, || async {
        (w.outbox_len().await == 0).then_some(())
    })
    .await;
    let second = next(&mut rx, "the other delivery").await;
    assert_eq!((second.data::<serde_json::Value>().unwrap()["n"].clone(), second.attempt), (json!(1), 1));
    assert!(rx.try_recv().is_err(), "each delivered once");
    assert_eq!(most.load(Ordering::SeqCst), 1, "concurrency 1 held while the first delivery worked");
    for relay in relays {
        relay.stop().await;
    }
    worker.stop().await;
}

#[tokio::test]
async fn a_stopping_relay_moves_no_deadline_so_it_stops_within_the_handler_timeout() {
    let w = World::new().await;
    w.kv_trigger("on-order", "orders", "long").await;
    let config = relay_config("n");
    let timeout = config.node.handler_timeout;
    let (worker, mut rx) = start_worker(&w.nats_url(), "shop", "long", move |d: Delivery| async move {
        d.long_running(tokio::time::sleep(timeout * 6)).await;
        Ok(Reply::ok(json!({})))
    })
    .await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), config).await;
    w.put("orders", "o-1", json!(1), 0).await;
    next(&mut rx, "the delivery").await;
    let stopped = tokio::time::timeout(timeout * 3, relay.stop()).await;
    assert!(stopped.is_ok(), "the relay waited for a handler that kept saying working");
    worker.stop().await;
}

#[tokio::test]
async fn working_moves_no_deadline_past_the_longest_working_time_from_the_attempts_start() {
    let w = World::new().await;
    w.kv_trigger("on-order", "orders", "endless").await;
    let mut config = relay_config("n");
    config.node.max_working = config.node.handler_timeout * 2;
    let (timeout, longest) = (config.node.handler_timeout, config.node.max_working);
    let (worker, mut rx) = start_worker(&w.nats_url(), "shop", "endless", move |d: Delivery| async move {
        if d.attempt == 1 {
            d.long_running(tokio::time::sleep(longest * 3)).await;
        }
        Ok(Reply::ok(json!({})))
    })
    .await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), config).await;
    w.put("orders", "o-1", json!(1), 0).await;

    next(&mut rx, "the first attempt").await;
    let started = Instant::now();
    let second = next(&mut rx, "the attempt after the longest working time").await;
    assert_eq!(second.attempt, 2);
    let waited = started.elapsed();
    assert!(
        waited >= longest - Duration::from_millis(100) && waited < longest + timeout * 2,
        "the first attempt ended after {waited:?}; it may work {longest:?} from its start"
    );
    w.drained().await;
    relay.stop().await;
    worker.stop().await;
}
