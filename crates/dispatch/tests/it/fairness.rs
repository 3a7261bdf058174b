//! Fairness between apps (DESIGN §13) through a running relay: one app's backlog to a handler
//! that hangs holds no more than its share of the relay's slots, and another app's deliveries go
//! through meanwhile.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use picloud_core::CollectionPattern;
use picloud_store::*;
use picloud_worker::Reply;

use crate::support::*;

/// A pubsub trigger on topic `t` of a new app `slug`, to `handler`, registered by its admin.
async fn app_with_trigger(world: &World, slug: &str, handler: &str) -> App {
    let (app, admin) = tenant(&world.store, slug).await;
    let topic = TriggerSpec::Pubsub { topic: CollectionPattern::parse("t").unwrap() };
    register(&world.store, &app, &admin, "t", topic, handler).await;
    app
}

/// Publishes `count` messages on topic `t` of `app`.
async fn publish(world: &World, app: &App, count: usize) {
    for n in 0..count {
        world.publish_to(app, "t", serde_json::json!({ "n": n }), None).await;
    }
}

#[tokio::test]
async fn a_hanging_apps_backlog_holds_its_share_of_the_slots_and_another_app_goes_through() {
    let world = World::new().await;
    let busy = app_with_trigger(&world, "busy", "hangs").await;
    let quiet = app_with_trigger(&world, "quiet", "answers").await;

    // A handler that answers only when the test is over, counting what it was handed.
    let (release, released) = tokio::sync::watch::channel(false);
    let handed = Arc::new(AtomicUsize::new(0));
    let (hanging, _) = start_worker(&world.nats_url(), "busy", "hangs", {
        let handed = handed.clone();
        move |_| {
            handed.fetch_add(1, Ordering::SeqCst);
            let mut released = released.clone();
            async move {
                released.wait_for(|r| *r).await.unwrap();
                Ok(Reply::ok(serde_json::json!({})))
            }
        }
    })
    .await;
    let (answering, mut answered) = start_worker(&world.nats_url(), "quiet", "answers", ok).await;

    let mut config = relay_config("fair");
    config.node.handler_timeout = Duration::from_secs(30);
    config.batch_size = 10;
    config.max_in_flight = 20;
    // No poll to fall back on: the relay must wake itself when the busy app's slots come back.
    config.poll_interval = Duration::from_secs(60);
    let share = config.app_share() as usize;
    assert_eq!(share, 10, "half the slots by default");
    let relay = start_relay(world.store.clone(), &world.nats_url(), config).await;

    publish(&world, &busy, 50).await;
    eventually("the busy app to hold its share", || async {
        (handed.load(Ordering::SeqCst) >= share).then_some(())
    })
    .await;
    publish(&world, &quiet, 5).await;
    for n in 0..5 {
        next(&mut answered, &format!("the quiet app's delivery {n}")).await;
    }
    assert_eq!(
        handed.load(Ordering::SeqCst),
        share,
        "the busy app never held more than its share, and none of its deliveries timed out yet"
    );

    release.send(true).unwrap();
    world.drained().await;
    relay.stop().await;
    hanging.stop().await;
    answering.stop().await;
}
