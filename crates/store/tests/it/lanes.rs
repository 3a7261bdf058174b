//! Ordered deliveries (DESIGN §13), against both stores: lanes hand out one delivery at a time,
//! in write order, through retries, dead letters, replays and leases that run out.

use std::collections::BTreeSet;
use std::time::Duration;

use picloud_core::flow::{Flow, Ordering};
use picloud_core::{CollectionName, CollectionPattern, KvKey, TopicName, TriggerConfig};
use picloud_store::events::{self, EventContext};
use picloud_store::*;

use crate::support::*;

conformance!(
    a_lane_hands_out_one_delivery_at_a_time_in_write_order,
    a_retry_keeps_its_place_through_its_backoff,
    a_lease_that_runs_out_gives_the_lane_back_to_the_same_delivery,
    a_dead_letter_releases_its_lane_unless_the_trigger_holds_it,
    the_replay_of_a_held_dead_letter_goes_before_what_it_held_back,
    ordering_by_trigger_makes_the_whole_trigger_one_lane,
    kv_puts_carry_the_entry_as_their_ordering_key_and_ordered_triggers_take_them_in_version_order,
    a_flow_reads_back_and_a_patch_changes_or_removes_it,
    deleting_a_trigger_lets_its_waiting_rows_out_to_be_dropped_even_behind_a_held_dead_letter,
    an_idempotent_job_joins_its_lane_once,
);

fn flow(ordering: Ordering, hold_on_dead_letter: bool) -> Flow {
    Flow { ordering, hold_on_dead_letter, ..Flow::default() }
}

/// A pubsub trigger on topic `t` with `flow`.
async fn ordered<S: Store>(s: &S, t: &Tenant, flow: Flow) -> Trigger {
    let mut new =
        new_trigger(t, "ordered", TriggerSpec::Pubsub { topic: CollectionPattern::parse("t").unwrap() });
    new.flow = Some(flow);
    s.create_trigger(&new).await.unwrap()
}

fn cx<'a>(t: &'a Tenant, config: &'a TriggerConfig) -> EventContext<'a> {
    EventContext { app_id: t.app.id, app_slug: &t.app.slug, depth: 0, config }
}

/// Publishes `{"n": n}` on topic `t` with `key`, each in its own transaction.
async fn publish<S: Store>(s: &S, t: &Tenant, messages: &[(Option<&str>, u32)]) {
    let config = TriggerConfig::default();
    for (key, n) in messages {
        let mut tx = s.begin().await.unwrap();
        let message = json(&format!(r#"{{"n":{n}}}"#));
        events::publish(s, &mut tx, &cx(t, &config), &TopicName::parse("t").unwrap(), &message, *key)
            .await
            .unwrap();
        s.commit(tx).await.unwrap();
    }
}

fn n(row: &ClaimedDelivery) -> u32 {
    let data: serde_json::Value = serde_json::from_str(row.payload.get()).unwrap();
    data["n"].as_u64().unwrap() as u32
}

/// Claims what is due: the messages' numbers, as a set (rows due at one instant come in any
/// order), and the rows.
async fn claim<S: Store>(s: &S) -> (BTreeSet<u32>, Vec<ClaimedDelivery>) {
    let rows = s.claim_due(100, LEASE, "n").await.unwrap().rows;
    (rows.iter().map(n).collect(), rows)
}

fn set(ns: &[u32]) -> BTreeSet<u32> {
    ns.iter().copied().collect()
}

async fn delivered<S: Store>(s: &S, rows: &[ClaimedDelivery]) {
    s.delete_delivered(&rows.iter().map(|r| r.id).collect::<Vec<_>>()).await.unwrap();
}

async fn a_lane_hands_out_one_delivery_at_a_time_in_write_order<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    ordered(&s, &t, flow(Ordering::Key, false)).await;
    publish(&s, &t, &[(Some("a"), 1), (Some("a"), 2), (Some("b"), 3), (Some("a"), 4), (None, 5), (None, 6)])
        .await;
    let (first, rows) = claim(&s).await;
    assert_eq!(first, set(&[1, 3, 5, 6]), "each key's first, and every unkeyed message");
    assert!(rows.iter().filter(|r| n(r) != 5 && n(r) != 6).all(|r| r.in_lane));
    assert_eq!(rows.iter().find(|r| n(r) == 3).unwrap().ordering_key.as_deref(), Some("b"));
    assert!(claim(&s).await.0.is_empty(), "nothing more while the heads are in flight");

    s.delete_delivered(&[rows.iter().find(|r| n(r) == 1).unwrap().id]).await.unwrap();
    assert_eq!(s.release_lanes(100).await.unwrap(), 0, "released by the delete: nothing left noted");
    let (second, rows_2) = claim(&s).await;
    assert_eq!(second, set(&[2]), "a's next, once a's first is done");
    let mut tx = s.begin().await.unwrap();
    s.delete_deliveries(&mut tx, &rows.iter().filter(|r| n(r) == 3).map(|r| r.id).collect::<Vec<_>>())
        .await
        .unwrap();
    s.commit(tx).await.unwrap();
    assert!(claim(&s).await.0.is_empty(), "b had one message; a's second is in flight");
    delivered(&s, &rows_2).await;
    assert_eq!(claim(&s).await.0, set(&[4]));
}

async fn a_retry_keeps_its_place_through_its_backoff<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    ordered(&s, &t, flow(Ordering::Key, false)).await;
    publish(&s, &t, &[(Some("a"), 1), (Some("a"), 2)]).await;
    let (_, rows) = claim(&s).await;
    let retry = Reschedule {
        id: rows[0].id,
        attempt: 1,
        delay: Duration::from_secs(10),
        error: "later".into(),
        refund_attempt: false,
        record: None,
    };
    let mut tx = s.begin().await.unwrap();
    s.reschedule(&mut tx, &[retry]).await.unwrap();
    s.commit(tx).await.unwrap();
    assert!(claim(&s).await.0.is_empty(), "the second waits through the first's backoff");
    assert_eq!(s.next_due_in().await.unwrap(), Some(Duration::from_secs(10)), "a waiting row is not due");
    s.clock().advance(Duration::from_secs(10));
    let (again, rows) = claim(&s).await;
    assert_eq!((again, rows[0].attempt), (set(&[1]), 2));
    delivered(&s, &rows).await;
    assert_eq!(claim(&s).await.0, set(&[2]));
}

async fn a_lease_that_runs_out_gives_the_lane_back_to_the_same_delivery<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    ordered(&s, &t, flow(Ordering::Key, false)).await;
    publish(&s, &t, &[(Some("a"), 1), (Some("a"), 2)]).await;
    claim(&s).await;
    s.clock().advance(LEASE);
    let (again, rows) = claim(&s).await;
    assert_eq!((again, rows[0].attempt), (set(&[1]), 2), "the head again, never the next");
}

async fn a_dead_letter_releases_its_lane_unless_the_trigger_holds_it<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let trigger = ordered(&s, &t, flow(Ordering::Key, false)).await;
    publish(&s, &t, &[(Some("a"), 1), (Some("a"), 2)]).await;
    let (_, rows) = claim(&s).await;
    let dead = bury(&s, &rows[0]).await;
    assert_eq!((dead.headers.ordering_key.as_deref(), dead.held_lane), (Some("a"), None));
    let (next, rows) = claim(&s).await;
    assert_eq!(next, set(&[2]), "by default the key goes on");
    delivered(&s, &rows).await;

    let patch = TriggerPatch { flow: Some(Some(flow(Ordering::Key, true))), ..TriggerPatch::default() };
    s.update_trigger(t.app.id, trigger.name.as_str(), &patch).await.unwrap();
    publish(&s, &t, &[(Some("a"), 3), (Some("a"), 4), (Some("b"), 5)]).await;
    let (_, rows) = claim(&s).await;
    let three = rows.iter().find(|r| n(r) == 3).unwrap();
    let dead = bury(&s, three).await;
    assert_eq!(dead.held_lane.as_deref(), Some("a"));
    publish(&s, &t, &[(Some("a"), 6)]).await;
    assert!(claim(&s).await.0.is_empty(), "the dead letter holds a: neither 4 nor a later 6 goes");
    delivered(&s, &rows.iter().filter(|r| n(r) == 5).cloned().collect::<Vec<_>>()).await;
    publish(&s, &t, &[(Some("b"), 7)]).await;
    assert_eq!(claim(&s).await.0, set(&[7]), "other keys go on");

    let mut tx = s.begin().await.unwrap();
    let ignored = s.resolve(&mut tx, t.app.id, dead.id, Resolution::Ignored, true).await.unwrap().unwrap();
    s.commit(tx).await.unwrap();
    assert_eq!(ignored.held_lane, None);
    let (released, rows) = claim(&s).await;
    assert_eq!(released, set(&[4]), "resolved, the dead letter lets the next one go");
    delivered(&s, &rows).await;
    assert_eq!(claim(&s).await.0, set(&[6]));
}

async fn the_replay_of_a_held_dead_letter_goes_before_what_it_held_back<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    ordered(&s, &t, flow(Ordering::Key, true)).await;
    publish(&s, &t, &[(Some("a"), 1), (Some("a"), 2), (Some("a"), 3)]).await;
    let (_, rows) = claim(&s).await;
    let dead = bury(&s, &rows[0]).await;
    let mut tx = s.begin().await.unwrap();
    let (replay_id, replayed) = events::replay(&s, &mut tx, &dead, &TriggerConfig::default()).await.unwrap();
    s.commit(tx).await.unwrap();
    assert_eq!((replayed.resolution, replayed.held_lane), (Some(Resolution::Replayed), None));
    let (first, rows) = claim(&s).await;
    assert_eq!((first, rows[0].id, rows[0].ordering_key.as_deref()), (set(&[1]), replay_id, Some("a")));
    delivered(&s, &rows).await;
    let (next, rows) = claim(&s).await;
    assert_eq!(next, set(&[2]));
    delivered(&s, &rows).await;
    assert_eq!(claim(&s).await.0, set(&[3]));
}

async fn ordering_by_trigger_makes_the_whole_trigger_one_lane<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    ordered(&s, &t, flow(Ordering::Trigger, false)).await;
    publish(&s, &t, &[(Some("a"), 1), (Some("b"), 2), (None, 3)]).await;
    for expected in 1..=3 {
        let (got, rows) = claim(&s).await;
        assert_eq!(got, set(&[expected]));
        delivered(&s, &rows).await;
    }
    assert!(claim(&s).await.0.is_empty());
}

async fn kv_puts_carry_the_entry_as_their_ordering_key_and_ordered_triggers_take_them_in_version_order<
    S: Store,
>(
    s: S,
) {
    let t = tenant(&s, "shop").await;
    s.create_trigger(&new_trigger(&t, "free", kv_spec("notes", &[KvOp::Put]))).await.unwrap();
    let config = TriggerConfig::default();
    let put = |key: &'static str, version: u32| {
        let s = &s;
        let t = &t;
        let config = &config;
        async move {
            let (collection, key) = (CollectionName::parse("notes").unwrap(), KvKey::parse(key).unwrap());
            events::kv_put_now(
                s,
                &cx(t, config),
                &collection,
                &key,
                &serde_json::json!({"n": version}),
                None,
                None,
            )
            .await
            .unwrap();
        }
    };
    put("k1", 1).await;
    let rows = s.claim_due(100, LEASE, "n").await.unwrap().rows;
    assert_eq!(rows[0].ordering_key.as_deref(), Some("notes/k1"));
    assert!(!rows[0].in_lane, "an unordered trigger's deliveries are in no lane");
    delivered(&s, &rows).await;

    let mut by_key = new_trigger(&t, "by-key", kv_spec("notes", &[KvOp::Put]));
    by_key.flow = Some(flow(Ordering::Key, false));
    s.create_trigger(&by_key).await.unwrap();
    put("k1", 2).await;
    put("k1", 3).await;
    put("k2", 4).await;
    let rows = s.claim_due(100, LEASE, "n").await.unwrap().rows;
    let version = |r: &ClaimedDelivery| {
        let data: serde_json::Value = serde_json::from_str(r.payload.get()).unwrap();
        (
            r.trigger_id == Some(by_key.id),
            data["key"].as_str().unwrap().to_owned(),
            data["version"].as_i64().unwrap(),
        )
    };
    let got: BTreeSet<_> = rows.iter().map(version).collect();
    let expected: BTreeSet<_> = [
        (false, "k1".into(), 2),
        (false, "k1".into(), 3),
        (false, "k2".into(), 1),
        (true, "k1".into(), 2),
        (true, "k2".into(), 1),
    ]
    .into_iter()
    .collect();
    assert_eq!(got, expected, "the ordered trigger holds k1's version 3 back");
    delivered(&s, &rows.iter().filter(|r| r.trigger_id == Some(by_key.id)).cloned().collect::<Vec<_>>())
        .await;
    let rows = s.claim_due(100, LEASE, "n").await.unwrap().rows;
    assert_eq!(rows.iter().map(version).collect::<Vec<_>>(), [(true, "k1".to_owned(), 3)]);
}

async fn a_flow_reads_back_and_a_patch_changes_or_removes_it<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let trigger = ordered(&s, &t, flow(Ordering::Key, true)).await;
    let read = s.trigger(t.app.id, "ordered").await.unwrap().unwrap();
    assert_eq!(read.flow, Some(flow(Ordering::Key, true)));
    let unrelated = TriggerPatch { enabled: Some(false), ..TriggerPatch::default() };
    let patched = s.update_trigger(t.app.id, trigger.name.as_str(), &unrelated).await.unwrap();
    assert_eq!(patched.flow, read.flow, "a patch without a flow keeps it");
    let removed = TriggerPatch { flow: Some(None), ..TriggerPatch::default() };
    let patched = s.update_trigger(t.app.id, trigger.name.as_str(), &removed).await.unwrap();
    assert_eq!(patched.flow, None);
}

async fn deleting_a_trigger_lets_its_waiting_rows_out_to_be_dropped_even_behind_a_held_dead_letter<
    S: Store,
>(
    s: S,
) {
    let t = tenant(&s, "shop").await;
    let trigger = ordered(&s, &t, flow(Ordering::Key, true)).await;
    publish(&s, &t, &[(Some("a"), 1), (Some("a"), 2), (Some("b"), 3), (Some("b"), 4)]).await;
    let (_, rows) = claim(&s).await;
    bury(&s, rows.iter().find(|r| n(r) == 1).unwrap()).await;
    assert!(s.delete_trigger(t.app.id, trigger.name.as_str()).await.unwrap());
    s.clock().advance(LEASE);
    let (orphans, _) = claim(&s).await;
    assert_eq!(orphans, set(&[2, 3, 4]), "every row left is claimable, for the relay to drop");
}

async fn an_idempotent_job_joins_its_lane_once<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let queue = picloud_core::QueueName::parse("q").unwrap();
    let mut new = new_trigger(&t, "jobs", TriggerSpec::Queue { queue: queue.clone() });
    new.flow = Some(flow(Ordering::Key, false));
    s.create_trigger(&new).await.unwrap();
    let config = TriggerConfig::default();
    let enqueue = |n: u32, idempotency_key: Option<&'static str>| {
        let (s, t, queue, config) = (&s, &t, &queue, &config);
        async move {
            let payload = json(&format!(r#"{{"n":{n}}}"#));
            let job = events::Job {
                payload: &payload,
                delay: Duration::ZERO,
                idempotency_key,
                ordering_key: Some("u"),
            };
            let mut tx = s.begin().await.unwrap();
            let enqueued = events::enqueue(s, &mut tx, &cx(t, config), queue, job).await.unwrap();
            s.commit(tx).await.unwrap();
            enqueued
        }
    };
    let first = enqueue(1, Some("once")).await;
    assert_eq!(
        enqueue(2, Some("once")).await,
        events::Enqueued::Existing(match first {
            events::Enqueued::Created(id) => id,
            other => panic!("{other:?}"),
        })
    );
    enqueue(3, None).await;
    let (head, rows) = claim(&s).await;
    assert_eq!(head, set(&[1]), "the repeated job wrote nothing; the third waits");
    delivered(&s, &rows).await;
    assert_eq!(claim(&s).await.0, set(&[3]));
}
