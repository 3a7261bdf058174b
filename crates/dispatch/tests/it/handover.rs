//! The rows a node's writes name go to the node's own relay in memory (`PgStore::hand_written`),
//! and to every relay when it has no room for them.

use std::time::Duration;

use futures::StreamExt as _;
use picloud_store::*;
use picloud_worker::Reply;

use crate::support::*;

/// The next wake-up a listener gets.
async fn woken(listener: &mut Wakeups) -> Wakeup {
    tokio::time::timeout(Duration::from_secs(20), listener.next())
        .await
        .expect("woken in time")
        .expect("listening")
        .unwrap()
}

/// A relay of `node` that never polls within a test: only wake-ups move it.
fn polling_rarely(node: &str) -> picloud_dispatch::RelayConfig {
    let mut config = relay_config(node);
    config.poll_interval = Duration::from_secs(60);
    config
}

#[tokio::test]
async fn rows_written_on_a_node_go_to_its_relay_and_wake_no_other() {
    let world = World::new().await;
    world.kv_trigger("on-order", "orders", "h").await;
    let news = TriggerSpec::Pubsub { topic: picloud_core::CollectionPattern::parse("news").unwrap() };
    world.trigger("on-news", news, "h").await;
    let (worker, mut delivered) = start_worker(&world.nats_url(), "shop", "h", ok).await;
    let config = polling_rarely("node");
    let relay = world.node_relay(config).await;
    let mut other_relays = world.store.listen().await.unwrap();

    for n in 1..=2 {
        let fired = world.put_now("orders", &format!("o-{n}"), serde_json::json!({"n": n})).await;
        assert_eq!(fired.deliveries, 1);
        let delivery = next(&mut delivered, "the put's delivery").await;
        assert_eq!(delivery.data::<serde_json::Value>().unwrap()["value"], serde_json::json!({"n": n}));
        world.publish("news", serde_json::json!({"n": n}), None).await;
        let delivery = next(&mut delivered, "the message's delivery").await;
        assert_eq!(delivery.data::<serde_json::Value>().unwrap(), serde_json::json!({"n": n}));
    }
    // The first notification since is a marker sent by a writer of no node: the writes before
    // it sent none, and the relay woke no other for them.
    let marker = uuid::Uuid::now_v7();
    PgStore::new(world.store.pool().clone()).wake_relays_for(vec![marker]).await.unwrap();
    assert_eq!(woken(&mut other_relays).await, Wakeup::Written(vec![marker]));

    world.drained().await;
    relay.stop().await;
    worker.stop().await;
}

#[tokio::test]
async fn a_node_whose_relay_has_no_room_wakes_every_relay_for_the_rows_written_on_it() {
    let world = World::new().await;
    world.kv_trigger("slow", "slow", "hangs").await;
    world.kv_trigger("quick", "quick", "answers").await;
    let (release, released) = tokio::sync::watch::channel(false);
    let (hanging, mut hung) = start_worker(&world.nats_url(), "shop", "hangs", move |_| {
        let mut released = released.clone();
        async move {
            released.wait_for(|r| *r).await.unwrap();
            Ok(Reply::ok(serde_json::json!({})))
        }
    })
    .await;
    let (answering, mut answered) = start_worker(&world.nats_url(), "shop", "answers", ok).await;
    // Neither relay polls within the test: only a wake-up moves them.
    let mut config = polling_rarely("other");
    config.node.handler_timeout = Duration::from_secs(30);
    let other = start_relay(world.store.clone(), &world.nats_url(), config.clone()).await;
    // Once the other relay delivered a row, it idles until woken.
    world.put("quick", "warm-up", serde_json::json!({}), 0).await;
    next(&mut answered, "the warm-up delivery").await;

    config.node.node_id = "node".into();
    config.max_in_flight = 1;
    let node = world.node_relay(config).await;
    world.put_now("slow", "s-1", serde_json::json!({})).await;
    next(&mut hung, "the delivery that holds the node's one slot").await;
    world.put_now("quick", "q-1", serde_json::json!({})).await;
    let delivery = next(&mut answered, "the delivery the other relay was woken for").await;
    assert_eq!(delivery.event.subject.as_deref(), Some("q-1"));

    release.send(true).unwrap();
    world.drained().await;
    node.stop().await;
    other.stop().await;
    hanging.stop().await;
    answering.stop().await;
}

#[tokio::test]
async fn a_relay_handed_rows_without_pause_still_walks_once_a_poll_interval() {
    let world = World::new().await;
    world.kv_trigger("streamed", "s", "fast").await;
    world.kv_trigger("stranded", "d", "stranded").await;
    let (fast, mut streamed) = start_worker(&world.nats_url(), "shop", "fast", ok).await;
    let (stranded_worker, mut stranded) = start_worker(&world.nats_url(), "shop", "stranded", ok).await;
    // A row a node that died had claimed: only a walk finds it once its lease has run out.
    world.put("d", "left", serde_json::json!({}), 0).await;
    let left = world.store.claim_due(10, Duration::from_secs(60), "dead").await.unwrap().rows;
    assert_eq!(left.len(), 1);
    let mut config = relay_config("node");
    config.poll_interval = Duration::from_millis(200);
    let relay = world.node_relay(config).await;

    // Rows handed over one after another, each claimed by its id, far more often than the poll.
    let writes = async {
        for n in 0.. {
            world.put_now("s", &format!("k{n}"), serde_json::json!({})).await;
        }
    };
    let stranded_delivered = async {
        // The relay has walked once as it started, and claims by id since.
        next(&mut streamed, "a row handed over").await;
        sqlx::query("UPDATE outbox SET leased_until = now() - interval '1 second' WHERE id = $1")
            .bind(left[0].id)
            .execute(world.store.pool())
            .await
            .unwrap();
        next(&mut stranded, "the row whose lease ran out").await
    };
    tokio::select! {
        delivery = stranded_delivered => assert_eq!(delivery.id, left[0].id),
        () = writes => unreachable!("the writes go on"),
    }

    world.drained().await;
    relay.stop().await;
    fast.stop().await;
    stranded_worker.stop().await;
}
