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
    events::kv_put_now(s, &cx, &collection, &key, &json!({"n": n}), None).await.unwrap();
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
