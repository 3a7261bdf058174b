//! Cancelling deliveries (DESIGN §14), against both stores: in each state a delivery leaves the
//! outbox for a dead letter `cancelled`, resolved `ignored`; its lane goes on; its running
//! attempt's answer changes nothing; sync calls and dead-letter deliveries stay.

use std::time::Duration;

use picloud_core::flow::{Flow, Ordering};
use picloud_core::protocol::{EventKind, event_type, source};
use picloud_core::{CollectionPattern, TriggerConfig};
use picloud_store::events::{self, Cancel};
use picloud_store::*;
use uuid::Uuid;

use crate::support::*;

conformance!(
    a_delivery_is_cancelled_in_each_state_into_an_ignored_dead_letter_and_never_claimed_again,
    a_cancelled_head_of_a_lane_lets_the_next_delivery_go_even_when_dead_letters_hold_lanes,
    the_answer_of_a_cancelled_attempt_retries_nothing_and_buries_nothing,
    sync_calls_and_dead_letter_deliveries_are_not_cancellable_and_other_apps_deliveries_not_found,
);

async fn cancel<S: Store>(s: &S, app: &App, id: Uuid) -> Cancel {
    let mut tx = s.begin().await.unwrap();
    let cancelled = events::cancel(s, &mut tx, app.id, id).await.unwrap();
    s.commit(tx).await.unwrap();
    cancelled
}

/// The dead letter a cancel made, and the handler it says to tell.
fn cancelled(outcome: Cancel) -> (DeadLetter, Option<String>) {
    match outcome {
        Cancel::Cancelled { dead_letter, in_flight } => (dead_letter, in_flight.map(|h| h.to_string())),
        other => panic!("not cancelled: {other:?}"),
    }
}

async fn a_delivery_is_cancelled_in_each_state_into_an_ignored_dead_letter_and_never_claimed_again<
    S: Store,
>(
    s: S,
) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    let in_flight = delivery(&t, &trigger, Duration::ZERO);
    insert(&s, std::slice::from_ref(&in_flight)).await;
    let claimed = s.claim_due(10, LEASE, "node-a").await.unwrap().rows;
    assert_eq!(claimed.len(), 1);
    let pending = delivery(&t, &trigger, Duration::ZERO);
    let scheduled = delivery(&t, &trigger, Duration::from_secs(60));
    insert(&s, &[pending.clone(), scheduled.clone()]).await;

    let (dead, told) = cancelled(cancel(&s, &t.app, in_flight.id).await);
    assert_eq!(told.as_deref(), Some("handle"), "the running attempt's handler is told");
    assert_eq!(
        (dead.delivery_id, dead.reason, dead.resolution, dead.attempts),
        (in_flight.id, DeadLetterReason::Cancelled, Some(Resolution::Ignored), 1)
    );
    for row in [&pending, &scheduled] {
        let (dead, told) = cancelled(cancel(&s, &t.app, row.id).await);
        assert_eq!((dead.delivery_id, dead.reason, dead.attempts), (row.id, DeadLetterReason::Cancelled, 0));
        assert_eq!(
            (dead.resolution, told),
            (Some(Resolution::Ignored), None),
            "nothing runs it: nobody to tell"
        );
        assert_eq!(dead.headers.subject.as_deref(), Some("o-1"), "the event stays, to be replayed");
    }
    assert_eq!(s.unresolved_count(t.app.id).await.unwrap(), 0, "cancelled dead letters are resolved");
    s.clock().advance(LEASE + Duration::from_secs(60));
    assert!(s.claim_due(10, LEASE, "node-a").await.unwrap().rows.is_empty(), "none is delivered again");
    assert!(matches!(cancel(&s, &t.app, pending.id).await, Cancel::NotFound), "cancelled once");
}

async fn a_cancelled_head_of_a_lane_lets_the_next_delivery_go_even_when_dead_letters_hold_lanes<S: Store>(
    s: S,
) {
    let t = tenant(&s, "shop").await;
    let mut new =
        new_trigger(&t, "ordered", TriggerSpec::Pubsub { topic: CollectionPattern::parse("t").unwrap() });
    new.flow = Some(Flow { ordering: Ordering::Key, hold_on_dead_letter: true, ..Flow::default() });
    let trigger = s.create_trigger(&new).await.unwrap();
    let rows: Vec<NewDelivery> = (1..=3)
        .map(|n| {
            let message = json(&format!(r#"{{"n":{n}}}"#));
            let event = events::Event {
                kind: EventKind::Pubsub,
                event_type: event_type::PUBSUB_MESSAGE,
                source: source::topic("shop", "t"),
                subject: None,
                payload: &message,
                depth: 0,
                ordering_key: Some("a"),
            };
            event.delivery_to(t.app.id, &trigger, &TriggerConfig::default())
        })
        .collect();
    for row in &rows {
        insert(&s, std::slice::from_ref(row)).await;
    }
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let head = s.claim_due(10, LEASE, "node-a").await.unwrap().rows;
    assert_eq!(head.iter().map(|r| r.id).collect::<Vec<_>>(), [ids[0]]);

    let (waiting, told) = cancelled(cancel(&s, &t.app, ids[1]).await);
    assert_eq!((waiting.held_lane, told), (None, None), "a waiting delivery is cancelled behind the head");
    let (head_dead, _) = cancelled(cancel(&s, &t.app, ids[0]).await);
    assert_eq!(head_dead.held_lane, None, "a cancelled dead letter never holds its lane");
    let next = s.claim_due(10, LEASE, "node-a").await.unwrap().rows;
    assert_eq!(next.iter().map(|r| r.id).collect::<Vec<_>>(), [ids[2]], "the lane goes on with the third");
}

async fn the_answer_of_a_cancelled_attempt_retries_nothing_and_buries_nothing<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    let rows: Vec<NewDelivery> = (0..3).map(|_| delivery(&t, &trigger, Duration::ZERO)).collect();
    insert(&s, &rows).await;
    let claimed = s.claim_due(10, LEASE, "node-a").await.unwrap().rows;
    for row in &claimed {
        cancelled(cancel(&s, &t.app, row.id).await);
    }
    let mut tx = s.begin().await.unwrap();
    let retry = Reschedule {
        id: claimed[0].id,
        attempt: claimed[0].attempt,
        delay: Duration::ZERO,
        error: "late retry".into(),
        refund_attempt: false,
        record: None,
    };
    assert_eq!(s.reschedule(&mut tx, &[retry]).await.unwrap(), 0, "a retry finds no row");
    let fail = Bury {
        id: claimed[1].id,
        attempt: claimed[1].attempt,
        reason: DeadLetterReason::Rejected,
        error: None,
    };
    assert!(s.bury(&mut tx, &[fail]).await.unwrap().is_empty(), "a fail writes no second dead letter");
    s.commit(tx).await.unwrap();
    assert_eq!(s.delete_delivered(&[claimed[2].id]).await.unwrap(), 0, "an ok deletes nothing");
    assert!(s.claim_due(10, LEASE, "node-a").await.unwrap().rows.is_empty());
    let filter = DeadLetterFilter::default();
    let dead = s.list_dead_letters(t.app.id, &filter, None, 10).await.unwrap().items;
    assert_eq!(dead.len(), 3);
    assert!(dead.iter().all(|d| d.reason == DeadLetterReason::Cancelled));
}

async fn sync_calls_and_dead_letter_deliveries_are_not_cancellable_and_other_apps_deliveries_not_found<
    S: Store,
>(
    s: S,
) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    let other = tenant(&s, "other").await;
    let mut call = delivery(&t, &trigger, Duration::ZERO);
    call.reply_to = Some("_INBOX.node.shop.1".into());
    let plain = delivery(&t, &trigger, Duration::ZERO);
    insert(&s, &[call.clone(), plain.clone()]).await;
    match cancel(&s, &t.app, call.id).await {
        Cancel::NotCancellable(d) => assert!(d.sync && d.id == call.id),
        other => panic!("a sync call was {other:?}"),
    }
    assert!(matches!(cancel(&s, &other.app, plain.id).await, Cancel::NotFound), "another app's delivery");
    assert!(matches!(cancel(&s, &t.app, Uuid::now_v7()).await, Cancel::NotFound));

    let (dead, _) = cancelled(cancel(&s, &t.app, plain.id).await);
    let on_dead =
        new_trigger(&t, "on-dead", TriggerSpec::DeadLetter { source_trigger: None, source_kinds: None });
    let on_dead = s.create_trigger(&on_dead).await.unwrap();
    let report = NewDelivery { dead_letter_id: Some(dead.id), ..delivery(&t, &on_dead, Duration::ZERO) };
    let report = NewDelivery { kind: EventKind::DeadLetter, ..report };
    insert(&s, std::slice::from_ref(&report)).await;
    match cancel(&s, &t.app, report.id).await {
        Cancel::NotCancellable(d) => assert!(!d.sync && d.id == report.id),
        other => panic!("a dead-letter delivery was {other:?}"),
    }
    assert_eq!(s.claim_due(10, LEASE, "n").await.unwrap().rows.len(), 2, "both are still there to deliver");
}
