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

#[tokio::test]
async fn rows_written_on_a_node_go_to_its_relay_and_wake_no_other() {
    let world = World::new().await;
    world.kv_trigger("on-order", "orders", "h").await;
    let (worker, mut delivered) = start_worker(&world.nats_url(), "shop", "h", ok).await;
    let mut config = relay_config("node");
    config.poll_interval = Duration::from_secs(60);
    let relay = world.node_relay(config).await;
    let mut other_relays = world.store.listen().await.unwrap();

    let fired = world.put_now("orders", "o-1", serde_json::json!({"n": 1})).await;
    assert_eq!(fired.deliveries, 1);
    let delivery = next(&mut delivered, "the put's delivery").await;
    assert_eq!(delivery.data::<serde_json::Value>().unwrap()["value"], serde_json::json!({"n": 1}));
    // The first notification since is this one: the put sent none.
    world.store.wake_relays().await.unwrap();
    assert_eq!(woken(&mut other_relays).await, Wakeup::Any);

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
    let mut config = relay_config("other");
    config.poll_interval = Duration::from_secs(60);
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
