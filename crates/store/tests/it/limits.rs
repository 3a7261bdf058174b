//! Flow limits (DESIGN §13), against both stores: `concurrency` counted across holders, `rate`
//! spent as tokens, gated rows claimed only within them, and slots a dead holder gives back.

use std::time::Duration;

use picloud_core::flow::{Flow, Rate};
use picloud_core::{CollectionPattern, TopicName, TriggerConfig, TriggerId};
use picloud_store::events::{self, EventContext};
use picloud_store::*;
use uuid::Uuid;

use crate::support::*;

conformance!(
    concurrency_is_counted_across_holders_and_a_dead_holders_slots_come_back_when_its_lease_ends,
    a_rate_spends_a_token_per_claimed_row_and_refills_at_its_rate_up_to_its_burst,
    a_patch_gates_or_frees_the_rows_already_written_and_deleting_the_trigger_frees_them,
    a_holder_gives_its_slots_back_of_the_triggers_it_names_or_of_all,
    limited_triggers_take_turns_in_a_claim,
    a_new_rate_starts_a_full_bucket,
    a_relay_waits_for_gated_rows_only_of_triggers_with_limits,
    a_holder_claims_rows_ahead_of_its_slots_unless_the_trigger_has_a_rate,
    a_holder_never_records_fewer_slots_than_it_has_in_flight_when_the_concurrency_is_lowered,
    a_holder_whose_deliveries_work_longer_keeps_its_slots_until_the_longer_lease_ends,
);

/// A pubsub trigger named `name` on topic `t` with `flow`.
async fn limited<S: Store>(s: &S, t: &Tenant, name: &str, flow: Option<Flow>) -> Trigger {
    let mut new = new_trigger(t, name, TriggerSpec::Pubsub { topic: CollectionPattern::parse("t").unwrap() });
    new.flow = flow;
    s.create_trigger(&new).await.unwrap()
}

/// Publishes `count` messages on topic `t`, in one transaction.
async fn publish<S: Store>(s: &S, t: &Tenant, count: u32) {
    let config = TriggerConfig::default();
    let cx = EventContext { app_id: t.app.id, app_slug: &t.app.slug, depth: 0, config: &config };
    let mut tx = s.begin().await.unwrap();
    for n in 0..count {
        let message = json(&format!(r#"{{"n":{n}}}"#));
        events::publish(s, &mut tx, &cx, &TopicName::parse("t").unwrap(), &message, None).await.unwrap();
    }
    s.commit(tx).await.unwrap();
}

/// Claims within the limits as `holder` with `claimed` rows of earlier claims not completed (none
/// in flight): the rows it got.
async fn claim<S: Store>(s: &S, holder: Uuid, claimed: &[(TriggerId, u32)]) -> Vec<ClaimedDelivery> {
    let busy: Vec<(TriggerId, Busy)> =
        claimed.iter().map(|(t, n)| (*t, Busy { claimed: *n, running: 0 })).collect();
    let busy = busy.as_slice();
    let claimed = s
        .claim_limited(100, LEASE, Holder { id: holder, node: "n", busy, share: AppShare::UNBOUNDED })
        .await
        .unwrap();
    assert!(claimed.claim.rows.iter().all(|r| r.gated));
    claimed.claim.rows
}

fn concurrency(n: u32) -> Option<Flow> {
    Some(Flow { concurrency: Some(n), ..Flow::default() })
}

async fn concurrency_is_counted_across_holders_and_a_dead_holders_slots_come_back_when_its_lease_ends<
    S: Store,
>(
    s: S,
) {
    let t = tenant(&s, "shop").await;
    assert!(!s.limits_exist().await.unwrap());
    let trigger = limited(&s, &t, "limited", concurrency(3)).await;
    assert!(s.limits_exist().await.unwrap());
    publish(&s, &t, 20).await;
    assert!(
        s.claim_due(100, LEASE, "n").await.unwrap().rows.is_empty(),
        "the plain claim never takes gated rows"
    );
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let first = claim(&s, a, &[]).await;
    assert_eq!(first.len(), 12, "three slots, and three rows ahead of each");
    assert!(claim(&s, b, &[]).await.is_empty(), "a holds every slot");
    s.delete_delivered(&[first[0].id]).await.unwrap();
    assert!(claim(&s, b, &[]).await.is_empty(), "a's slot is a's until a claims again");
    assert_eq!(claim(&s, a, &[(trigger.id, 11)]).await.len(), 1, "a counts what it has claimed");
    assert_eq!(claim(&s, a, &[(trigger.id, 12)]).await.len(), 0);
    s.clock().advance(LEASE);
    assert_eq!(claim(&s, b, &[]).await.len(), 12, "a died: its slots are free when its lease ends");
    assert!(claim(&s, a, &[]).await.is_empty(), "b holds them now, even against a come back");
}

async fn a_rate_spends_a_token_per_claimed_row_and_refills_at_its_rate_up_to_its_burst<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let rate = Rate { per_second: 10, burst: 5 };
    limited(&s, &t, "limited", Some(Flow { rate: Some(rate), ..Flow::default() })).await;
    publish(&s, &t, 30).await;
    let holder = Holder { id: Uuid::now_v7(), node: "n", busy: &[], share: AppShare::UNBOUNDED };
    let burst = s.claim_limited(100, LEASE, holder).await.unwrap();
    assert_eq!(burst.claim.rows.len(), 5, "a full bucket: the burst");
    assert_eq!(burst.next_token_in, Some(Duration::from_millis(100)));
    let empty = s.claim_limited(100, LEASE, holder).await.unwrap();
    assert!(empty.claim.rows.is_empty(), "waiting spends nothing");
    s.clock().advance(Duration::from_millis(250));
    let refilled = s.claim_limited(100, LEASE, holder).await.unwrap();
    assert_eq!(refilled.claim.rows.len(), 2, "2.5 tokens in 250 ms");
    assert!(refilled.claim.rows.iter().all(|r| r.attempt == 1), "waiting spent no attempt");
    assert_eq!(refilled.next_token_in, Some(Duration::from_millis(50)));
    s.clock().advance(Duration::from_secs(60));
    assert_eq!(
        s.claim_limited(100, LEASE, holder).await.unwrap().claim.rows.len(),
        5,
        "never more than the burst"
    );
    assert_eq!(s.claim_limited(3, LEASE, holder).await.unwrap().claim.rows.len(), 0);
    s.clock().advance(Duration::from_secs(60));
    assert_eq!(s.claim_limited(3, LEASE, holder).await.unwrap().claim.rows.len(), 3, "no more than wanted");
    assert_eq!(
        s.claim_limited(100, LEASE, holder).await.unwrap().claim.rows.len(),
        2,
        "and only the tokens spent"
    );
}

async fn a_patch_gates_or_frees_the_rows_already_written_and_deleting_the_trigger_frees_them<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let trigger = limited(&s, &t, "later", None).await;
    publish(&s, &t, 6).await;
    let patch = |flow| TriggerPatch { flow: Some(flow), ..TriggerPatch::default() };
    s.update_trigger(t.app.id, "later", &patch(concurrency(1))).await.unwrap();
    assert!(s.claim_due(100, LEASE, "n").await.unwrap().rows.is_empty(), "written before, gated now");
    let holder = Uuid::now_v7();
    assert_eq!(claim(&s, holder, &[]).await.len(), 4, "one in the slot, three ahead of it");
    s.update_trigger(t.app.id, "later", &patch(None)).await.unwrap();
    assert!(!s.limits_exist().await.unwrap());
    assert_eq!(s.claim_due(100, LEASE, "n").await.unwrap().rows.len(), 2, "free again");

    s.update_trigger(t.app.id, "later", &patch(concurrency(1))).await.unwrap();
    publish(&s, &t, 2).await;
    assert!(s.claim_due(100, LEASE, "n").await.unwrap().rows.is_empty());
    assert!(s.delete_trigger(t.app.id, trigger.name.as_str()).await.unwrap());
    assert_eq!(
        s.claim_due(100, LEASE, "n").await.unwrap().rows.len(),
        2,
        "the rows of a deleted trigger are claimable, for the relay to drop"
    );
    assert!(!s.limits_exist().await.unwrap());
}

async fn a_holder_gives_its_slots_back_of_the_triggers_it_names_or_of_all<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let one = limited(&s, &t, "one", concurrency(2)).await;
    let two = limited(&s, &t, "two", concurrency(2)).await;
    publish(&s, &t, 20).await;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    assert_eq!(claim(&s, a, &[]).await.len(), 16);
    s.release_slots(a, Some(&[one.id])).await.unwrap();
    let taken = claim(&s, b, &[]).await;
    assert_eq!(taken.len(), 8);
    assert!(taken.iter().all(|r| r.trigger_id == Some(one.id)), "a holds two's slots still");
    s.release_slots(a, None).await.unwrap();
    let taken = claim(&s, b, &[(one.id, 8)]).await;
    assert_eq!(taken.len(), 8, "two's slots are free now, and one's are b's");
    assert!(taken.iter().all(|r| r.trigger_id == Some(two.id)));
}

async fn limited_triggers_take_turns_in_a_claim<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let one = limited(&s, &t, "one", concurrency(10)).await;
    limited(&s, &t, "two", concurrency(10)).await;
    publish(&s, &t, 5).await;
    let rows = s
        .claim_limited(
            4,
            LEASE,
            Holder { id: Uuid::now_v7(), node: "n", busy: &[], share: AppShare::UNBOUNDED },
        )
        .await
        .unwrap();
    let of_one = rows.claim.rows.iter().filter(|r| r.trigger_id == Some(one.id)).count();
    assert_eq!((rows.claim.rows.len(), of_one), (4, 2), "two rows of each, not four of the first");
}

async fn a_new_rate_starts_a_full_bucket<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let rate = |burst| Some(Flow { rate: Some(Rate { per_second: 1, burst }), ..Flow::default() });
    limited(&s, &t, "limited", rate(2)).await;
    publish(&s, &t, 10).await;
    let holder = Uuid::now_v7();
    assert_eq!(claim(&s, holder, &[]).await.len(), 2);
    assert!(claim(&s, holder, &[]).await.is_empty());
    let patch = TriggerPatch { flow: Some(rate(3)), ..TriggerPatch::default() };
    s.update_trigger(t.app.id, "limited", &patch).await.unwrap();
    assert_eq!(claim(&s, holder, &[]).await.len(), 3);
}

async fn a_relay_waits_for_gated_rows_only_of_triggers_with_limits<S: Store>(s: S) {
    let (t, free) = tenant_with_trigger(&s, "shop").await;
    // A gated row of a trigger without limits (a writer raced their removal): no claim takes it
    // until the janitor frees it, so no relay wakes for it.
    insert(&s, &[NewDelivery { gated: true, ..delivery(&t, &free, Duration::from_secs(10)) }]).await;
    assert_eq!(s.next_due_in().await.unwrap(), None);
    let limited = limited(&s, &t, "limited", concurrency(1)).await;
    insert(&s, &[NewDelivery { gated: true, ..delivery(&t, &limited, Duration::from_secs(5)) }]).await;
    assert_eq!(s.next_due_in().await.unwrap(), Some(Duration::from_secs(5)));
}

async fn a_holder_claims_rows_ahead_of_its_slots_unless_the_trigger_has_a_rate<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let plain = limited(&s, &t, "plain", concurrency(3)).await;
    let rate = Rate { per_second: 1000, burst: 1000 };
    let rated =
        limited(&s, &t, "rated", Some(Flow { concurrency: Some(3), rate: Some(rate), ..Flow::default() }))
            .await;
    publish(&s, &t, 16).await;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let holder = |id, busy| Holder { id, node: "n", busy, share: AppShare::UNBOUNDED };
    let slots = |claim: &LimitedClaim, trigger: &Trigger| {
        claim.slots.iter().find(|(t, _)| *t == trigger.id).map(|(_, n)| *n)
    };
    let count = |claim: &LimitedClaim, trigger: &Trigger| {
        claim.claim.rows.iter().filter(|r| r.trigger_id == Some(trigger.id)).count()
    };

    let first = s.claim_limited(100, LEASE, holder(a, &[])).await.unwrap();
    assert_eq!(count(&first, &plain), 12, "three rows for its slots, three ahead of each");
    assert_eq!(count(&first, &rated), 3, "a rate's rows start at once: none ahead");
    assert_eq!((slots(&first, &plain), slots(&first, &rated)), (Some(3), Some(3)));

    let other = s.claim_limited(100, LEASE, holder(b, &[])).await.unwrap();
    assert!(other.claim.rows.is_empty(), "a holds every slot");
    assert_eq!((slots(&other, &plain), slots(&other, &rated)), (Some(0), Some(0)));

    let one = Busy { claimed: 1, running: 0 };
    let busy = [(plain.id, one), (rated.id, one)];
    let again = s.claim_limited(100, LEASE, holder(a, &busy)).await.unwrap();
    assert_eq!(count(&again, &plain), 4, "as many as were left");
    assert_eq!(slots(&again, &plain), Some(3), "one for each row it has, up to its slots");
    assert_eq!(count(&again, &rated), 2);
    s.release_slots(a, None).await.unwrap();
    let last = s.claim_limited(100, LEASE, holder(b, &[])).await.unwrap();
    assert_eq!(count(&last, &rated), 3, "a gave its slots back: b takes the last rows");
    assert_eq!(slots(&last, &plain), None, "no row of plain is claimable: its slots are not looked at");
}

async fn a_holder_never_records_fewer_slots_than_it_has_in_flight_when_the_concurrency_is_lowered<
    S: Store,
>(
    s: S,
) {
    let t = tenant(&s, "shop").await;
    let trigger = limited(&s, &t, "limited", concurrency(4)).await;
    publish(&s, &t, 20).await;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let holder = |id, busy| Holder { id, node: "n", busy, share: AppShare::UNBOUNDED };
    let slots = |claim: &LimitedClaim| claim.slots.iter().find(|(t, _)| *t == trigger.id).map(|(_, n)| *n);
    assert_eq!(s.claim_limited(2, LEASE, holder(a, &[])).await.unwrap().claim.rows.len(), 2);
    assert_eq!(s.claim_limited(2, LEASE, holder(b, &[])).await.unwrap().claim.rows.len(), 2);
    let patch = TriggerPatch { flow: Some(concurrency(3)), ..TriggerPatch::default() };
    s.update_trigger(t.app.id, "limited", &patch).await.unwrap();
    let running = [(trigger.id, Busy { claimed: 2, running: 2 })];
    let again = s.claim_limited(100, LEASE, holder(a, &running)).await.unwrap();
    assert_eq!(slots(&again), Some(2), "a runs two: b goes on counting them, though one slot is open to a");
    let ahead = [(trigger.id, Busy { claimed: 2, running: 0 })];
    let other = s.claim_limited(100, LEASE, holder(b, &ahead)).await.unwrap();
    assert_eq!(slots(&other), Some(1), "b has the one slot a left");
}

async fn a_holder_whose_deliveries_work_longer_keeps_its_slots_until_the_longer_lease_ends<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let trigger = limited(&s, &t, "limited", concurrency(1)).await;
    publish(&s, &t, 10).await;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    assert_eq!(claim(&s, a, &[]).await.len(), 4, "one slot, and three rows ahead of it");
    assert!(s.extend_slots(b, &[trigger.id], LEASE * 3).await.unwrap().is_empty(), "b holds no slot");
    assert_eq!(s.extend_slots(a, &[trigger.id], LEASE * 3).await.unwrap(), [trigger.id]);
    assert_eq!(s.extend_slots(a, &[trigger.id], LEASE).await.unwrap(), [trigger.id]);
    s.clock().advance(LEASE * 3 - Duration::from_millis(1));
    assert!(
        claim(&s, b, &[]).await.is_empty(),
        "a's slot holds until its longer lease ends, never shortened"
    );
    s.clock().advance(Duration::from_millis(1));
    assert!(
        s.extend_slots(a, &[trigger.id], LEASE).await.unwrap().is_empty(),
        "a slot that ended stays ended"
    );
    assert_eq!(claim(&s, b, &[]).await.len(), 4, "then it is free");
}
