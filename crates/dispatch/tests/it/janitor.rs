//! The janitor: what it deletes, what it keeps, and that one node sweeps at a time.

use std::time::Duration;

use picloud_core::TriggerConfig;
use picloud_core::protocol::EventKind;
use picloud_dispatch::{Janitor, JanitorConfig, Swept};
use picloud_store::*;
use picloud_worker::Shutdown;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::support::*;

const DAY: Duration = Duration::from_secs(86_400);

/// A store on a manual clock over the world's database.
fn manual_store(w: &World) -> PgStore {
    w.store.clone().with_clock(Clock::manual(OffsetDateTime::now_utc()))
}

/// A janitor keeping resolved dead letters 30 days and abandoned executions 7.
fn janitor(store: &PgStore, node: &str, batch_size: u32) -> Janitor {
    let triggers = TriggerConfig {
        dead_letter_retention: 30 * DAY,
        abandoned_retention: 7 * DAY,
        ..TriggerConfig::default()
    };
    let mut config = JanitorConfig::new(node, &triggers);
    config.batch_size = batch_size;
    Janitor::new(store.clone(), config)
}

/// Writes `n` unresolved dead letters now; resolves them `ignored` when `resolved`.
async fn dead_letters(w: &World, store: &PgStore, n: usize, resolved: bool) -> Vec<Uuid> {
    let rows: Vec<NewDeadLetter> = (0..n)
        .map(|_| NewDeadLetter {
            id: Uuid::now_v7(),
            app_id: w.app.id,
            trigger_id: None,
            trigger_name: Some("on-order".into()),
            kind: EventKind::Kv,
            delivery_id: Uuid::now_v7(),
            payload: RawValue::from_string("{}".into()).unwrap(),
            headers: EventHeaders {
                event_type: "picloud.kv.put".into(),
                source: "/apps/shop/kv/orders".into(),
                subject: None,
                time: OffsetDateTime::now_utc(),
                depth: 0,
                ordering_key: None,
            },
            attempts: 3,
            reason: DeadLetterReason::Exhausted,
            last_error: None,
        })
        .collect();
    let mut tx = store.begin().await.unwrap();
    let written = store.insert_dead_letters(&mut tx, &rows).await.unwrap();
    if resolved {
        for dl in &written {
            store.resolve(&mut tx, w.app.id, dl.id, Resolution::Ignored, true).await.unwrap();
        }
    }
    store.commit(tx).await.unwrap();
    written.iter().map(|dl| dl.id).collect()
}

/// Records `n` abandoned executions now.
async fn abandoned(w: &World, store: &PgStore, n: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let row = store
            .insert_abandoned(&AbandonedExecution {
                id: Uuid::now_v7(),
                app_id: w.app.id,
                trigger_id: None,
                trigger_name: "invoke-me".into(),
                outbox_id: Uuid::now_v7(),
                reply_to: "_INBOX.gone".into(),
                reason: AbandonReason::NoResponders,
                handler_status: HandlerStatus::Ok,
                result: None,
                error: None,
                created_at: OffsetDateTime::now_utc(),
            })
            .await
            .unwrap();
        ids.push(row.id);
    }
    ids
}

async fn ids_in(w: &World, table: &str) -> Vec<Uuid> {
    sqlx::query_scalar(&format!("SELECT id FROM {table} ORDER BY id"))
        .fetch_all(w.store.pool())
        .await
        .unwrap()
}

fn sorted(mut ids: Vec<Uuid>) -> Vec<Uuid> {
    ids.sort();
    ids
}

#[tokio::test]
async fn resolved_dead_letters_and_abandoned_executions_past_their_retention_go_and_the_rest_stay() {
    let w = World::new().await;
    let store = manual_store(&w);
    dead_letters(&w, &store, 2, true).await;
    let old_unresolved = dead_letters(&w, &store, 2, false).await;
    abandoned(&w, &store, 2).await;
    store.clock().advance(25 * DAY);
    let younger_resolved = dead_letters(&w, &store, 1, true).await;
    let young_abandoned = abandoned(&w, &store, 1).await;
    store.clock().advance(6 * DAY);

    let swept = janitor(&store, "node-a", 100).sweep_once().await.unwrap();

    assert_eq!(swept, Some(Swept { dead_letters: 2, abandoned: 2, unclaimable_freed: 0, stats: 0 }));
    assert_eq!(
        ids_in(&w, "dead_letters").await,
        sorted([old_unresolved, younger_resolved].concat()),
        "unresolved letters stay however old; resolved ones stay for 30 days"
    );
    assert_eq!(ids_in(&w, "abandoned_executions").await, young_abandoned, "abandoned ones stay for 7 days");
}

#[tokio::test]
async fn more_rows_than_one_batch_all_go_in_one_sweep() {
    let w = World::new().await;
    let store = manual_store(&w);
    dead_letters(&w, &store, 25, true).await;
    abandoned(&w, &store, 23).await;
    store.clock().advance(31 * DAY);

    let swept = janitor(&store, "node-a", 10).sweep_once().await.unwrap();

    assert_eq!(swept, Some(Swept { dead_letters: 25, abandoned: 23, unclaimable_freed: 0, stats: 0 }));
    assert!(ids_in(&w, "dead_letters").await.is_empty());
    assert!(ids_in(&w, "abandoned_executions").await.is_empty());
}

#[tokio::test]
async fn while_one_janitor_sweeps_another_deletes_nothing() {
    let w = World::new().await;
    let store = manual_store(&w);
    dead_letters(&w, &store, 3, true).await;
    store.clock().advance(31 * DAY);
    let (a, b) = (janitor(&store, "node-a", 100), janitor(&store, "node-b", 100));

    let a_sweeping = a.try_lock().await.unwrap().expect("the first janitor takes the lock");
    assert_eq!(b.sweep_once().await.unwrap(), None, "the second janitor sees the first one sweeping");
    assert_eq!(ids_in(&w, "dead_letters").await.len(), 3, "and deletes nothing");
    assert_eq!(
        a_sweeping.sweep().await.unwrap(),
        Swept { dead_letters: 3, abandoned: 0, unclaimable_freed: 0, stats: 0 }
    );

    assert_eq!(
        b.sweep_once().await.unwrap(),
        Some(Swept::default()),
        "the lock is free again once a sweep ends"
    );
}

#[tokio::test]
async fn a_running_janitor_sweeps_at_start_and_stops_when_told() {
    let w = World::new().await;
    let store = manual_store(&w);
    dead_letters(&w, &store, 2, true).await;
    store.clock().advance(31 * DAY);
    let (stop, shutdown) = Shutdown::new();
    let running = tokio::spawn(janitor(&store, "node-a", 100).run(shutdown));

    eventually("the janitor's first sweep", || async {
        ids_in(&w, "dead_letters").await.is_empty().then_some(())
    })
    .await;
    stop.send();

    tokio::time::timeout(Duration::from_secs(10), running).await.expect("the janitor stops").unwrap();
}

#[tokio::test]
async fn rows_left_in_lanes_or_gated_where_nothing_claims_them_are_let_free() {
    let w = World::new().await;
    let store = manual_store(&w);
    let live = w.kv_trigger("live", "orders", "h").await;
    let in_lane = |trigger: picloud_core::TriggerId| NewDelivery {
        lane: Some("k".into()),
        ..events::Event {
            kind: EventKind::Kv,
            event_type: "picloud.kv.put",
            source: "/apps/shop/kv/orders".into(),
            subject: None,
            payload: &RawValue::from_string("{}".into()).unwrap(),
            depth: 0,
            ordering_key: Some("k"),
        }
        .delivery(w.app.id, Some(trigger), 3)
    };
    // A writer that saw a trigger being deleted put rows in its lane: nothing makes them heads.
    let gone = picloud_core::TriggerId::new();
    // And a writer that read a trigger's limits as they were being removed wrote a gated row
    // that no claim within limits would take.
    let gated = |trigger| NewDelivery { lane: None, gated: true, ..in_lane(trigger) };
    let rows =
        [in_lane(gone), in_lane(gone), in_lane(live.id), in_lane(live.id), gated(gone), gated(live.id)];
    let mut tx = store.begin().await.unwrap();
    store.insert_deliveries(&mut tx, &rows).await.unwrap();
    store.commit(tx).await.unwrap();
    let heads = store.claim_due(10, Duration::from_secs(30), "n").await.unwrap().rows;
    assert_eq!(heads.len(), 2, "one head per lane");

    let swept = janitor(&store, "node-a", 100).sweep_once().await.unwrap().unwrap();
    assert_eq!(
        swept.unclaimable_freed, 4,
        "both rows of the gone trigger's lane, its gated row and the live trigger's, none of the live lane's"
    );
    let mut freed: Vec<Uuid> =
        store.claim_due(10, Duration::from_secs(30), "n").await.unwrap().rows.iter().map(|r| r.id).collect();
    freed.sort_unstable();
    let mut orphans = vec![rows[1].id, rows[4].id, rows[5].id];
    orphans.sort_unstable();
    assert_eq!(freed, orphans, "the waiting and the gated orphans are claimable");
}
