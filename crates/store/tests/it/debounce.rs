//! Debounced deliveries (DESIGN §13), against both stores: a burst of writes to one key reaches
//! the handler once, with the last value, the id of the first and the `previous` of the oldest.

use std::time::Duration;

use picloud_core::flow::{Flow, Ordering};
use picloud_core::{CollectionName, KvKey, TriggerConfig};
use picloud_store::events::{self, EventContext};
use picloud_store::*;
use serde_json::{Value, json};

use crate::support::*;

conformance!(
    a_burst_of_writes_to_a_key_reaches_the_handler_once_with_the_last_value,
    a_write_after_the_delivery_started_is_a_delivery_of_its_own_behind_it,
    a_debounced_job_is_delayed_and_enqueueing_again_answers_the_id_of_the_one_it_joined,
    jobs_with_an_idempotency_key_and_replays_are_deliveries_of_their_own,
);

const DEBOUNCE: Duration = Duration::from_millis(200);

async fn debounced<S: Store>(s: &S, t: &Tenant) {
    let mut new = new_trigger(t, "debounced", kv_spec("notes", &[KvOp::Put]));
    new.flow = Some(Flow { ordering: Ordering::Key, debounce_ms: Some(200), ..Flow::default() });
    s.create_trigger(&new).await.unwrap();
}

async fn put<S: Store>(s: &S, t: &Tenant, key: &str, n: u32) {
    let config = TriggerConfig::default();
    let cx = EventContext { app_id: t.app.id, app_slug: &t.app.slug, depth: 0, config: &config };
    let (collection, key) = (CollectionName::parse("notes").unwrap(), KvKey::parse(key).unwrap());
    events::kv_put_now(s, &cx, &collection, &key, &json!({"n": n}), None, None).await.unwrap();
}

fn data(row: &ClaimedDelivery) -> Value {
    serde_json::from_str(row.payload.get()).unwrap()
}

async fn claim<S: Store>(s: &S) -> Vec<ClaimedDelivery> {
    let mut rows = s.claim_due(100, LEASE, "n").await.unwrap().rows;
    rows.sort_by_key(|r| r.subject.clone());
    rows
}

async fn a_burst_of_writes_to_a_key_reaches_the_handler_once_with_the_last_value<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    debounced(&s, &t).await;
    for n in 1..=3 {
        if n > 1 {
            s.clock().advance(Duration::from_millis(100));
        }
        put(&s, &t, "a", n).await;
    }
    put(&s, &t, "b", 9).await;
    s.clock().advance(DEBOUNCE - Duration::from_millis(1));
    assert!(claim(&s).await.is_empty(), "each write moved the delivery on");
    s.clock().advance(Duration::from_millis(1));
    let rows = claim(&s).await;
    assert_eq!(rows.len(), 2, "one delivery per key: {rows:?}");
    let a = data(&rows[0]);
    assert_eq!((&a["value"], &a["previous"], &a["version"]), (&json!({"n": 3}), &Value::Null, &json!(3)));
    assert_eq!(data(&rows[1])["value"], json!({"n": 9}));
}

async fn a_write_after_the_delivery_started_is_a_delivery_of_its_own_behind_it<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    debounced(&s, &t).await;
    put(&s, &t, "a", 1).await;
    s.clock().advance(DEBOUNCE);
    let first = claim(&s).await;
    assert_eq!(first.len(), 1);
    put(&s, &t, "a", 2).await;
    put(&s, &t, "a", 3).await;
    s.clock().advance(DEBOUNCE);
    assert!(claim(&s).await.is_empty(), "the next waits behind the one in flight");
    s.delete_delivered(&[first[0].id]).await.unwrap();
    let next = claim(&s).await;
    assert_eq!(next.len(), 1);
    let data = data(&next[0]);
    assert_eq!((&data["value"], &data["previous"]), (&json!({"n": 3}), &json!({"n": 1})));
}

/// A queue trigger `jobs` on queue `q`, ordering by key with a debounce.
async fn jobs<S: Store>(s: &S, t: &Tenant) {
    let queue = picloud_core::QueueName::parse("q").unwrap();
    let mut new = new_trigger(t, "jobs", TriggerSpec::Queue { queue });
    new.flow = Some(Flow { ordering: Ordering::Key, debounce_ms: Some(200), ..Flow::default() });
    s.create_trigger(&new).await.unwrap();
}

/// Enqueues `{"n": n}` on `q` with the ordering key `k` (and `idempotency_key`).
async fn enqueue<S: Store>(s: &S, t: &Tenant, n: u32, idempotency_key: Option<&str>) -> events::Enqueued {
    let config = TriggerConfig::default();
    let cx = EventContext { app_id: t.app.id, app_slug: &t.app.slug, depth: 0, config: &config };
    let payload = json(&format!(r#"{{"n":{n}}}"#));
    let job =
        events::Job { payload: &payload, delay: Duration::ZERO, idempotency_key, ordering_key: Some("k") };
    let mut tx = s.begin().await.unwrap();
    let enqueued =
        events::enqueue(s, &mut tx, &cx, &picloud_core::QueueName::parse("q").unwrap(), job).await.unwrap();
    s.commit(tx).await.unwrap();
    enqueued
}

async fn a_debounced_job_is_delayed_and_enqueueing_again_answers_the_id_of_the_one_it_joined<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    jobs(&s, &t).await;
    let first = enqueue(&s, &t, 1, None).await;
    let second = enqueue(&s, &t, 2, None).await;
    assert_eq!(first, second, "the second job joined the first's delivery");
    assert!(claim(&s).await.is_empty(), "a debounced job waits its debounce");
    s.clock().advance(DEBOUNCE);
    let rows = claim(&s).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(events::Enqueued::Created(rows[0].id), first);
    assert_eq!(data(&rows[0]), json!({"n": 2}));
}

async fn jobs_with_an_idempotency_key_and_replays_are_deliveries_of_their_own<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    jobs(&s, &t).await;
    let plain = enqueue(&s, &t, 1, None).await;
    let keyed = enqueue(&s, &t, 2, Some("once")).await;
    assert_ne!(plain, keyed, "a job with an idempotency key is a delivery of its own");
    s.clock().advance(DEBOUNCE);
    let rows = claim(&s).await;
    assert_eq!(rows.len(), 1, "one at a time in the lane");
    let dead = bury(&s, &rows[0]).await;
    enqueue(&s, &t, 3, None).await;
    let mut tx = s.begin().await.unwrap();
    let (replayed, _) = events::replay(&s, &mut tx, &dead, &TriggerConfig::default()).await.unwrap();
    s.commit(tx).await.unwrap();
    s.clock().advance(DEBOUNCE);
    let next = claim(&s).await;
    assert_eq!(data(&next[0]), json!({"n": 2}), "the keyed job is next in the lane");
    s.delete_delivered(&[next[0].id]).await.unwrap();
    let next = claim(&s).await;
    assert_eq!(data(&next[0]), json!({"n": 3}), "the job enqueued after the dead letter");
    s.delete_delivered(&[next[0].id]).await.unwrap();
    let last = claim(&s).await;
    assert_eq!((last[0].id, data(&last[0])), (replayed, json!({"n": 1})), "the replay kept its own event");
}
