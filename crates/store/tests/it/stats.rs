//! Trigger statistics (DESIGN §15), against both stores: what relays count adds up per minute
//! and node, reads back merged into a window's buckets, and is pruned after its retention; the
//! backlogs count each trigger's deliveries by state.

use std::time::Duration;

use picloud_core::stats::bucket_of;
use picloud_core::{AttemptOutcome, TriggerId};
use picloud_store::*;

use crate::support::*;

conformance!(
    attempts_counted_in_batches_and_by_nodes_add_up_in_their_minute,
    a_window_merges_minutes_into_its_buckets_from_its_start,
    statistics_past_their_retention_are_pruned_in_batches,
    the_backlogs_count_each_triggers_deliveries_by_state,
);

fn counted(trigger_id: TriggerId, attempts: &[(AttemptOutcome, u64)]) -> AttemptStats {
    let mut stats = AttemptStats::new(trigger_id);
    for &(outcome, ms) in attempts {
        stats.record(outcome, Duration::from_millis(ms));
    }
    stats
}

async fn attempts_counted_in_batches_and_by_nodes_add_up_in_their_minute<S: Store>(s: S) {
    let (_, trigger) = tenant_with_trigger(&s, "shop").await;
    let other = TriggerId::new();
    s.record_attempts(
        "node-a",
        &[counted(trigger.id, &[(AttemptOutcome::Ok, 2), (AttemptOutcome::Timeout, 30)])],
    )
    .await
    .unwrap();
    s.clock().advance(Duration::from_secs(20));
    s.record_attempts(
        "node-a",
        &[counted(trigger.id, &[(AttemptOutcome::Ok, 4)]), counted(other, &[(AttemptOutcome::Fail, 1)])],
    )
    .await
    .unwrap();
    s.record_attempts("node-b", &[counted(trigger.id, &[(AttemptOutcome::NoHandler, 1)])]).await.unwrap();

    let buckets = s.attempt_stats(trigger.id, START, Duration::from_secs(60)).await.unwrap();
    let expected = counted(
        trigger.id,
        &[
            (AttemptOutcome::Ok, 2),
            (AttemptOutcome::Timeout, 30),
            (AttemptOutcome::Ok, 4),
            (AttemptOutcome::NoHandler, 1),
        ],
    );
    assert_eq!(buckets, vec![StatsBucket { start: START, attempts: expected }], "one minute, every node's");
    assert_eq!(
        s.attempt_stats(trigger.id, START + Duration::from_secs(60), Duration::from_secs(60)).await.unwrap(),
        []
    );
}

async fn a_window_merges_minutes_into_its_buckets_from_its_start<S: Store>(s: S) {
    let (_, trigger) = tenant_with_trigger(&s, "shop").await;
    for minute in 0..25 {
        s.record_attempts("node-a", &[counted(trigger.id, &[(AttemptOutcome::Ok, minute + 1)])])
            .await
            .unwrap();
        s.clock().advance(Duration::from_secs(60));
    }
    let since = START + Duration::from_secs(5 * 60);
    let buckets = s.attempt_stats(trigger.id, since, Duration::from_secs(600)).await.unwrap();
    let starts: Vec<_> = buckets.iter().map(|b| b.start).collect();
    assert_eq!(
        starts,
        [since, since + Duration::from_secs(600)],
        "minutes 5–14 and 15–24; none before since"
    );
    let ok = |b: &StatsBucket| b.attempts.outcomes[AttemptOutcome::Ok.index()];
    assert_eq!((ok(&buckets[0]), ok(&buckets[1])), (10, 10));
    let median = buckets[1].attempts.latencies.quantile(0.5).unwrap();
    assert_eq!(
        bucket_of(median),
        bucket_of(Duration::from_millis(20)),
        "{median:?}: the median of 16..=25 ms"
    );
}

async fn statistics_past_their_retention_are_pruned_in_batches<S: Store>(s: S) {
    let (_, trigger) = tenant_with_trigger(&s, "shop").await;
    for node in ["node-a", "node-b", "node-c"] {
        s.record_attempts(node, &[counted(trigger.id, &[(AttemptOutcome::Ok, 1)])]).await.unwrap();
    }
    s.clock().advance(Duration::from_secs(3600));
    s.record_attempts("node-a", &[counted(trigger.id, &[(AttemptOutcome::Retry, 1)])]).await.unwrap();
    let day = Duration::from_secs(86_400);
    s.clock().advance(day - Duration::from_secs(1800));
    assert_eq!(s.gc_stats(day, 2).await.unwrap(), 2, "a batch at most");
    assert_eq!(s.gc_stats(day, 2).await.unwrap(), 1);
    assert_eq!(s.gc_stats(day, 2).await.unwrap(), 0, "the newer minute is kept");
    let left = s.attempt_stats(trigger.id, START, Duration::from_secs(3600)).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].attempts.outcomes[AttemptOutcome::Retry.index()], 1);
}

async fn the_backlogs_count_each_triggers_deliveries_by_state<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    let other = s.create_trigger(&new_trigger(&t, "other", kv_spec("other", &[KvOp::Put]))).await.unwrap();
    insert(&s, &[delivery(&t, &trigger, Duration::ZERO)]).await;
    s.claim_due(10, LEASE, "node-a").await.unwrap();
    s.clock().advance(Duration::from_secs(5));
    let oldest = delivery(&t, &trigger, Duration::ZERO);
    insert(&s, std::slice::from_ref(&oldest)).await;
    s.clock().advance(Duration::from_secs(5));
    insert(
        &s,
        &[
            delivery(&t, &trigger, Duration::ZERO),
            delivery(&t, &trigger, Duration::from_secs(60)),
            NewDelivery { gated: true, ..delivery(&t, &trigger, Duration::ZERO) },
            delivery(&t, &other, Duration::ZERO),
        ],
    )
    .await;

    let mut backlogs = s.backlogs(t.app.id).await.unwrap();
    backlogs.sort_by_key(|(trigger_id, _)| *trigger_id != Some(trigger.id));
    assert_eq!(
        backlogs,
        [
            (
                Some(trigger.id),
                TriggerBacklog {
                    pending: 2,
                    scheduled: 1,
                    in_flight: 1,
                    waiting: 1,
                    oldest_due: Some(START + Duration::from_secs(5)),
                }
            ),
            (
                Some(other.id),
                TriggerBacklog {
                    pending: 1,
                    oldest_due: Some(START + Duration::from_secs(10)),
                    ..TriggerBacklog::default()
                }
            ),
        ],
        "each trigger's own"
    );
    let elsewhere = tenant(&s, "elsewhere").await;
    assert_eq!(s.backlogs(elsewhere.app.id).await.unwrap(), [], "another app's are not its");
}
