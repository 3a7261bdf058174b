//! The deliveries API's reads (DESIGN §15), against both stores: listing by state and trigger in
//! pages, and one delivery with its event, the progress of its attempt and its history.

use std::time::Duration;

use picloud_store::*;
use time::macros::datetime;

use crate::support::*;

conformance!(
    deliveries_are_listed_oldest_first_by_state_and_trigger_in_pages,
    a_delivery_reads_back_with_its_event_its_progress_and_its_last_attempts,
);

fn record(attempt: u32, outcome: &str) -> AttemptRecord {
    AttemptRecord {
        attempt,
        started_at: datetime!(2026-01-01 00:00:00 UTC),
        ended_at: datetime!(2026-01-01 00:00:01 UTC),
        outcome: outcome.to_owned(),
        error: Some(format!("attempt {attempt}")),
        node: "node-a".to_owned(),
    }
}

async fn listed<S: Store>(s: &S, app: &App, filter: DeliveryFilter) -> Vec<uuid::Uuid> {
    s.list_deliveries(app.id, &filter, None, 100).await.unwrap().items.iter().map(|d| d.id).collect()
}

async fn deliveries_are_listed_oldest_first_by_state_and_trigger_in_pages<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    let other_trigger =
        s.create_trigger(&new_trigger(&t, "other", kv_spec("other", &[KvOp::Put]))).await.unwrap();
    let (elsewhere, elsewhere_trigger) = tenant_with_trigger(&s, "elsewhere").await;
    let leased = delivery(&t, &trigger, Duration::ZERO);
    insert(&s, std::slice::from_ref(&leased)).await;
    s.claim_due(10, LEASE, "node-a").await.unwrap();
    let pending = delivery(&t, &trigger, Duration::ZERO);
    let scheduled = delivery(&t, &trigger, Duration::from_secs(60));
    let of_other = delivery(&t, &other_trigger, Duration::ZERO);
    let limited = NewDelivery { gated: true, ..delivery(&t, &other_trigger, Duration::ZERO) };
    let limited_later = NewDelivery { gated: true, ..delivery(&t, &other_trigger, Duration::from_secs(60)) };
    insert(
        &s,
        &[pending.clone(), scheduled.clone(), of_other.clone(), limited.clone(), limited_later.clone()],
    )
    .await;
    insert(&s, &[delivery(&elsewhere, &elsewhere_trigger, Duration::ZERO)]).await;

    let all = listed(&s, &t.app, DeliveryFilter::default()).await;
    assert_eq!(
        all,
        [leased.id, pending.id, scheduled.id, of_other.id, limited.id, limited_later.id],
        "the app's own, oldest first"
    );
    let now = s.clock().now();
    for (state, expected) in [
        (DeliveryState::InFlight, vec![leased.id]),
        (DeliveryState::Pending, vec![pending.id, of_other.id]),
        (DeliveryState::Scheduled, vec![scheduled.id, limited_later.id]),
        (DeliveryState::Waiting, vec![limited.id]),
    ] {
        let filter = DeliveryFilter { state: Some(state), ..DeliveryFilter::default() };
        let page = s.list_deliveries(t.app.id, &filter, None, 100).await.unwrap().items;
        assert_eq!(page.iter().map(|d| d.id).collect::<Vec<_>>(), expected, "{state:?}");
        assert!(
            page.iter().all(|d| d.state(now) == state),
            "the list and Delivery::state agree on {state:?}"
        );
    }
    let of_trigger = DeliveryFilter { trigger_id: Some(other_trigger.id), ..DeliveryFilter::default() };
    assert_eq!(listed(&s, &t.app, of_trigger).await, [of_other.id, limited.id, limited_later.id]);

    let first = s.list_deliveries(t.app.id, &DeliveryFilter::default(), None, 3).await.unwrap();
    assert_eq!((first.items.len(), first.has_more), (3, true));
    let rest =
        s.list_deliveries(t.app.id, &DeliveryFilter::default(), Some(first.items[2].id), 3).await.unwrap();
    assert_eq!(
        (rest.items.iter().map(|d| d.id).collect::<Vec<_>>(), rest.has_more),
        (vec![of_other.id, limited.id, limited_later.id], false)
    );

    s.clock().advance(LEASE);
    let lapsed = DeliveryFilter { state: Some(DeliveryState::Pending), ..DeliveryFilter::default() };
    assert!(listed(&s, &t.app, lapsed).await.contains(&leased.id), "a lease that ran out is pending again");
    let first = &s.list_deliveries(t.app.id, &DeliveryFilter::default(), None, 1).await.unwrap().items[0];
    assert_eq!((first.trigger_name.as_deref(), first.attempts, first.sync), (Some("on-order"), 1, false));
}

async fn a_delivery_reads_back_with_its_event_its_progress_and_its_last_attempts<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    let row = delivery(&t, &trigger, Duration::ZERO);
    insert(&s, std::slice::from_ref(&row)).await;
    let fresh = s.delivery(t.app.id, row.id).await.unwrap().unwrap();
    assert_eq!((fresh.attempts.len(), fresh.delivery.progress), (0, None));
    assert_eq!(
        (fresh.headers.subject.as_deref(), fresh.headers.event_type.as_str()),
        (Some("o-1"), "picloud.kv.put")
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(fresh.payload.get()).unwrap()["value"],
        serde_json::json!({"n": 1})
    );
    assert!(s.delivery(tenant(&s, "other").await.app.id, row.id).await.unwrap().is_none(), "another app's");

    for attempt in 1..=(ATTEMPTS_KEPT as u32 + 2) {
        let claimed = s.claim_due(10, LEASE, "node-a").await.unwrap().rows;
        assert_eq!(claimed.iter().map(|c| c.attempt).collect::<Vec<_>>(), [attempt]);
        let extension = |progress| LeaseExtension { id: row.id, attempt, lease: LEASE, progress };
        s.extend_leases("node-a", &[extension(Some(40))]).await.unwrap();
        s.extend_leases("node-a", &[extension(None)]).await.unwrap();
        let working = s.delivery(t.app.id, row.id).await.unwrap().unwrap();
        assert_eq!(working.delivery.progress, Some(40), "a working without progress keeps the last one");
        let mut tx = s.begin().await.unwrap();
        let retry = Reschedule {
            id: row.id,
            attempt,
            delay: Duration::ZERO,
            error: format!("attempt {attempt}"),
            refund_attempt: false,
            record: Some(record(attempt, "retry")),
        };
        s.reschedule(&mut tx, &[retry]).await.unwrap();
        s.commit(tx).await.unwrap();
    }
    let mut tx = s.begin().await.unwrap();
    let wait = Reschedule {
        id: row.id,
        attempt: ATTEMPTS_KEPT as u32 + 2,
        delay: Duration::ZERO,
        error: "not an attempt".into(),
        refund_attempt: false,
        record: None,
    };
    assert_eq!(s.reschedule(&mut tx, &[wait]).await.unwrap(), 1, "a wait without a record is rescheduled");
    s.commit(tx).await.unwrap();

    let read = s.delivery(t.app.id, row.id).await.unwrap().unwrap();
    let numbers: Vec<u32> = read.attempts.iter().map(|a| a.attempt).collect();
    assert_eq!(
        numbers,
        (3..=ATTEMPTS_KEPT as u32 + 2).collect::<Vec<_>>(),
        "the last ATTEMPTS_KEPT, oldest first, the wait not among them"
    );
    assert_eq!(read.attempts[0], record(3, "retry"));
    s.claim_due(10, LEASE, "node-a").await.unwrap();
    let claimed_again = s.delivery(t.app.id, row.id).await.unwrap().unwrap();
    assert_eq!(claimed_again.delivery.progress, None, "a new attempt starts without progress");
}
