//! Delivery through failures: a nats-server restart, and a cluster with two relays.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use picloud_core::RetryPolicy;
use picloud_core::protocol::{EventKind, event_type};
use picloud_store::*;
use picloud_testkit::NatsCluster;
use picloud_worker::{Delivery, HandlerResult, Reply};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::support::*;

/// `n` deliveries of `trigger`, written 1,000 per transaction.
async fn backlog(w: &World, trigger: &Trigger, n: usize) -> HashSet<Uuid> {
    let mut ids = HashSet::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let rows: Vec<NewDelivery> = chunk
            .iter()
            .map(|i| {
                let (subject, payload) =
                    (format!("k{i}"), RawValue::from_string(format!("{{\"i\":{i}}}")).unwrap());
                let event = events::Event {
                    kind: EventKind::Kv,
                    event_type: event_type::KV_PUT,
                    source: "/apps/shop/kv/bench".into(),
                    subject: Some(&subject),
                    payload: &payload,
                    depth: 0,
                    ordering_key: None,
                };
                event.delivery(w.app.id, Some(trigger.id), 50)
            })
            .collect();
        ids.extend(rows.iter().map(|r| r.id));
        let mut tx = w.store.begin().await.unwrap();
        w.store.insert_deliveries(&mut tx, &rows).await.unwrap();
        w.store.commit(tx).await.unwrap();
    }
    ids
}

type Seen = Arc<Mutex<HashMap<Uuid, Vec<u32>>>>;

fn recording(
    seen: &Seen,
) -> impl Fn(Delivery) -> std::pin::Pin<Box<dyn Future<Output = HandlerResult> + Send>> + Send + Sync + 'static
{
    let seen = seen.clone();
    move |d: Delivery| {
        seen.lock().unwrap().entry(d.id).or_default().push(d.attempt);
        Box::pin(async { Ok(Reply::ok(serde_json::json!({}))) })
    }
}

#[tokio::test]
async fn a_nats_server_restarted_during_10000_deliveries_loses_none() {
    let mut w = World::new().await;
    let trigger = w.kv_trigger("bulk", "bench", "bulk").await;
    let ids = backlog(&w, &trigger, 10_000).await;
    let seen: Seen = Arc::default();
    let (worker, _rx) = start_worker(&w.nats_url(), "shop", "bulk", recording(&seen)).await;
    let mut config = relay_config("n");
    config.node.triggers.retry =
        RetryPolicy::new(50, Duration::from_millis(20), Duration::from_millis(200)).unwrap();
    let relay = start_relay(w.store.clone(), &w.nats_url(), config).await;

    eventually("a quarter of the deliveries", || async {
        (seen.lock().unwrap().len() >= 2500).then_some(())
    })
    .await;
    w.nats.stop().await.unwrap();
    let at_restart = seen.lock().unwrap().len();
    assert!(at_restart < ids.len(), "the restart came after the last delivery");
    w.nats.restart().await.unwrap();
    w.drained().await;

    let seen = seen.lock().unwrap().clone();
    let missing: Vec<_> = ids.iter().filter(|id| !seen.contains_key(id)).collect();
    let retried = seen.values().filter(|attempts| attempts.iter().any(|a| *a > 1)).count();
    eprintln!("restarted after {at_restart} deliveries; {retried} needed another attempt");
    assert!(missing.is_empty(), "{} deliveries never reached the handler", missing.len());
    assert!(w.dead_letters().await.is_empty());
    relay.stop().await;
    worker.stop().await;
}

#[tokio::test]
async fn two_relays_and_three_workers_on_a_three_node_cluster_handle_every_delivery() {
    let w = World::new().await;
    let cluster = NatsCluster::start(3).await.unwrap();
    let urls = cluster.urls();
    let trigger = w.kv_trigger("bulk", "bench", "bulk").await;
    let seen: Seen = Arc::default();
    let mut workers = Vec::new();
    for url in &urls {
        workers.push(start_worker(url, "shop", "bulk", recording(&seen)).await.0);
    }
    let relays = [
        start_relay(w.store.clone(), &urls[0], relay_config("a")).await,
        start_relay(w.store.clone(), &urls[1], relay_config("b")).await,
    ];
    let ids = backlog(&w, &trigger, 5_000).await;
    w.drained().await;

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.keys().copied().collect::<HashSet<_>>(), ids, "every delivery was handled");
    for (id, attempts) in seen.iter() {
        let distinct: HashSet<_> = attempts.iter().collect();
        assert_eq!(
            distinct.len(),
            attempts.len(),
            "{id} was handled twice in one attempt {attempts:?}: a duplicate not explained by a new claim"
        );
    }
    let duplicates = seen.values().filter(|a| a.len() > 1).count();
    eprintln!(
        "{duplicates} of {} deliveries were handled more than once, each time in a new claim",
        ids.len()
    );
    for relay in relays {
        relay.stop().await;
    }
    for worker in workers {
        worker.stop().await;
    }
}
