//! Properties only Postgres has: concurrent claims with SKIP LOCKED, and the claim's plan at scale.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use picloud_store::*;
use picloud_testkit::eventually;
use sqlx::Row as _;

use crate::support::*;

#[tokio::test]
async fn two_connections_claiming_at_the_same_time_never_get_the_same_row() {
    let fixture = pg_store().await;
    let s = PgStore::new(fixture.store.pool().clone());
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    let rows: Vec<NewDelivery> = (0..2000).map(|_| delivery(&t, &trigger, Duration::ZERO)).collect();
    insert(&s, &rows).await;

    let claimer = |name: &'static str| {
        let s = s.clone();
        tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = s.claim_due(37, LEASE, name).await.unwrap().rows;
                if got.is_empty() {
                    return mine;
                }
                mine.extend(got.into_iter().map(|c| c.id));
            }
        })
    };
    let (a, b) = tokio::join!(claimer("a"), claimer("b"));
    let (a, b) = (a.unwrap(), b.unwrap());
    let a_set: HashSet<_> = a.iter().copied().collect();
    let b_set: HashSet<_> = b.iter().copied().collect();
    assert_eq!(a_set.len(), a.len());
    assert_eq!(b_set.len(), b.len());
    assert!(a_set.is_disjoint(&b_set), "a row was claimed by both");
    assert_eq!(a.len() + b.len(), rows.len(), "every row was claimed");
    assert!(!a.is_empty() && !b.is_empty(), "both claimers made progress: a={} b={}", a.len(), b.len());
}

/// The claim of `PgStore::claim_due` of 100 rows, every app from the first and unbounded, as
/// `EXPLAIN` when `explain`.
fn claim(explain: bool) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
    static EXPLAIN: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| format!("EXPLAIN {}", *pg::CLAIM_SHARED));
    let sql: &'static str = if explain { &EXPLAIN } else { &pg::CLAIM_SHARED };
    sqlx::query(sql)
        .bind(100i64)
        .bind(30_000i64)
        .bind(None::<time::OffsetDateTime>)
        .bind("bench")
        .bind(uuid::Uuid::nil())
        .bind(i64::from(u32::MAX))
        .bind(Vec::<uuid::Uuid>::new())
        .bind(Vec::<i64>::new())
}

/// The median time of `runs` claims of 100 rows, each in a transaction that is rolled back, so
/// every run claims from the same state.
async fn median_claim(s: &PgStore, runs: usize) -> Duration {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let mut tx = s.pool().begin().await.unwrap();
        let started = Instant::now();
        claim(false).execute(&mut *tx).await.unwrap();
        times.push(started.elapsed());
        drop(tx);
    }
    times.sort();
    times[runs / 2]
}

#[tokio::test]
async fn the_claim_on_a_million_pending_rows_uses_the_index_and_stays_within_a_few_times_the_empty_time() {
    let fixture = pg_store().await;
    let s = PgStore::new(fixture.store.pool().clone());
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    insert(&s, &(0..100).map(|_| delivery(&t, &trigger, Duration::ZERO)).collect::<Vec<_>>()).await;
    sqlx::query("VACUUM ANALYZE outbox").execute(s.pool()).await.unwrap();
    let small = median_claim(&s, 21).await;

    sqlx::query(
        "INSERT INTO outbox (id, app_id, trigger_id, kind, event_type, source, payload, max_attempts, due_at)
         SELECT gen_random_uuid(), $1, $2, 'kv', 'picloud.kv.put', '/apps/shop/kv/bench',
                '{\"id\":1,\"kind\":\"noop\",\"t_us\":0,\"pad\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}',
                8, now() - interval '1 hour' + g * interval '1 millisecond'
           FROM generate_series(1, 1000000) AS g",
    )
    .bind(t.app.id.as_uuid())
    .bind(trigger.id.as_uuid())
    .execute(s.pool())
    .await
    .unwrap();
    sqlx::query("VACUUM ANALYZE outbox").execute(s.pool()).await.unwrap();

    let plan: Vec<String> =
        claim(true).fetch_all(s.pool()).await.unwrap().iter().map(|row| row.get(0)).collect();
    let plan = plan.join("\n");
    assert!(
        plan.contains("Index Scan using outbox_app_due on outbox"),
        "the claim must walk the apps' due index:\n{plan}"
    );
    assert!(!plan.contains("Seq Scan on outbox"), "the claim must not scan the table:\n{plan}");
    assert!(!plan.contains("Sort"), "the index gives the order, no sort:\n{plan}");

    let large = median_claim(&s, 21).await;
    assert!(
        large <= small * 5 + Duration::from_millis(5),
        "claiming 100 of 1,000,000 rows took {large:?}, against {small:?} with 100 rows"
    );
}

/// A relay plans each statement once per connection (generic plans), often while the outbox is
/// empty, and keeps the plan while the outbox grows and its dead rows pile up between vacuums: a
/// plan that scans the table then reads every dead row of it in every claim (1.3 ms a claim at
/// 500 events/s, against 0.18 ms through the index).
#[tokio::test]
async fn a_relay_plans_its_claim_on_the_due_index_even_on_an_empty_outbox_and_never_compiles_it() {
    let fixture = pg_store().await;
    sqlx::query("VACUUM ANALYZE outbox").execute(fixture.store.pool()).await.unwrap();
    let relay = fixture.relay_store().await;

    let plan: Vec<String> =
        claim(true).fetch_all(relay.pool()).await.unwrap().iter().map(|row| row.get(0)).collect();
    let plan = plan.join("\n");
    assert!(!plan.contains("Seq Scan on outbox"), "the claim must not scan the table:\n{plan}");
    assert!(
        plan.contains("using outbox_app_due on outbox"),
        "the claim must walk the apps' due index:\n{plan}"
    );
    assert!(!plan.contains("JIT"), "a claim is never worth compiling:\n{plan}");
}

#[tokio::test]
async fn concurrent_first_writes_of_one_key_each_fire_with_the_value_they_replaced() {
    use picloud_core::{CollectionName, KvKey, TriggerConfig};
    use picloud_store::events::{self, EventContext};

    let fixture = pg_store().await;
    let s = PgStore::new(fixture.store.pool().clone());
    let (t, _trigger) = tenant_with_trigger(&s, "shop").await;
    let config = TriggerConfig::default();
    let writers: Vec<_> = (0..8)
        .map(|i| {
            let (s, app) = (s.clone(), t.app.clone());
            tokio::spawn(async move {
                let cx = EventContext { app_id: app.id, app_slug: &app.slug, depth: 0, config: &config };
                let (collection, key) =
                    (CollectionName::parse("orders").unwrap(), KvKey::parse("same").unwrap());
                events::kv_put_now(&s, &cx, &collection, &key, &serde_json::json!(i), None, None)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut versions = Vec::new();
    for writer in writers {
        versions.push(writer.await.unwrap().0.version);
    }
    versions.sort_unstable();
    assert_eq!(versions, (1..=8).collect::<Vec<_>>(), "every write got its own version");

    let claimed = s.claim_due(100, LEASE, "n").await.unwrap().rows;
    let mut events: Vec<serde_json::Value> =
        claimed.iter().map(|c| serde_json::from_str(c.payload.get()).unwrap()).collect();
    events.sort_by_key(|e| e["version"].as_i64());
    for pair in events.windows(2) {
        assert_eq!(pair[1]["previous"], pair[0]["value"], "each event's previous is the value it replaced");
    }
    assert_eq!(events[0]["previous"], serde_json::Value::Null);
}

#[tokio::test]
async fn the_stores_connections_leave_notices_out_of_the_log() {
    let fixture = pg_store().await;
    let level: String =
        sqlx::query_scalar("SHOW client_min_messages").fetch_one(fixture.store.pool()).await.unwrap();
    assert_eq!(level, "warning", "a migrate on every start would log a NOTICE otherwise");
    // Migrating again, as every start does, applies nothing and leaves nothing pending.
    pg::migrate(fixture.store.pool()).await.unwrap();
    assert!(pg::pending_migrations(fixture.store.pool()).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_release_never_waits_for_a_writer_holding_the_lane_and_takes_it_on_a_later_call() {
    let fixture = pg_store().await;
    let s = PgStore::new(fixture.store.pool().clone());
    let (t, mut trigger) = tenant_with_trigger(&s, "shop").await;
    let ordered = picloud_core::Flow { ordering: picloud_core::flow::Ordering::Key, ..Default::default() };
    let patch = TriggerPatch { flow: Some(Some(ordered)), ..TriggerPatch::default() };
    trigger = s.update_trigger(t.app.id, trigger.name.as_str(), &patch).await.unwrap();
    let in_lane = || NewDelivery { lane: Some("k".into()), ..delivery(&t, &trigger, Duration::ZERO) };
    insert(&s, &[in_lane(), in_lane()]).await;
    let head = s.claim_due(10, LEASE, "n").await.unwrap().rows;
    assert_eq!(head.len(), 1);

    let mut writer = s.begin().await.unwrap();
    s.insert_deliveries(&mut writer, &[in_lane()]).await.unwrap();
    s.delete_delivered(&[head[0].id]).await.unwrap();
    let started = Instant::now();
    assert_eq!(s.release_lanes(100).await.unwrap(), 0, "the writer holds the lane");
    assert!(started.elapsed() < Duration::from_secs(1), "the release did not wait: {:?}", started.elapsed());
    assert!(s.claim_due(10, LEASE, "n").await.unwrap().rows.is_empty());
    s.commit(writer).await.unwrap();
    assert_eq!(s.release_lanes(100).await.unwrap(), 1, "noted still, released now");
    assert_eq!(s.claim_due(10, LEASE, "n").await.unwrap().rows.len(), 1, "the second row heads the lane");
    assert_eq!(s.outbox_len().await.unwrap(), 2);
}

#[tokio::test]
async fn the_gauges_count_rows_waiting_in_a_lane_as_not_due() {
    let fixture = pg_store().await;
    let s = PgStore::new(fixture.store.pool().clone()).with_clock(Clock::manual(START));
    let (t, mut trigger) = tenant_with_trigger(&s, "shop").await;
    let ordered = picloud_core::Flow { ordering: picloud_core::flow::Ordering::Key, ..Default::default() };
    let patch = TriggerPatch { flow: Some(Some(ordered)), ..TriggerPatch::default() };
    trigger = s.update_trigger(t.app.id, trigger.name.as_str(), &patch).await.unwrap();
    let in_lane = || NewDelivery { lane: Some("k".into()), ..delivery(&t, &trigger, Duration::ZERO) };
    insert(&s, &[in_lane(), in_lane(), in_lane()]).await;
    s.clock().advance(Duration::from_secs(60));
    let gauges = s.gauges().await.unwrap();
    assert_eq!(gauges.due, 1, "the head is due; the two behind it wait");
    assert!((gauges.oldest_due_age_s - 60.0).abs() < 1.0, "{}", gauges.oldest_due_age_s);
}

#[tokio::test]
async fn a_put_the_one_statement_leaves_to_the_slower_path_writes_and_locks_nothing() {
    let fixture = pg_store().await;
    let s = PgStore::new(fixture.store.pool().clone());
    let (t, mut trigger) = tenant_with_trigger(&s, "shop").await;
    let first = serde_json::json!({"n": 1});
    assert!(
        s.kv_put_firing(None, &orders_put(&t, &first)).await.unwrap().is_some(),
        "no flow yet: one statement"
    );
    let ordered = picloud_core::Flow { ordering: picloud_core::flow::Ordering::Key, ..Default::default() };
    let patch = TriggerPatch { flow: Some(Some(ordered)), ..TriggerPatch::default() };
    trigger = s.update_trigger(t.app.id, trigger.name.as_str(), &patch).await.unwrap();
    assert!(trigger.flow.is_some());

    let mut tx = s.begin().await.unwrap();
    let second = serde_json::json!({"n": 2});
    let fell_back = s.kv_put_firing(Some(&mut tx), &orders_put(&t, &second)).await.unwrap();
    assert!(fell_back.is_none(), "a flow: the slower path");
    // A row lock is a write: it would give the transaction an id, and its commit a WAL flush.
    let xid: Option<String> = sqlx::query_scalar("SELECT pg_current_xact_id_if_assigned()::text")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(xid, None, "the statement that wrote nothing locked the entry");
    s.commit(tx).await.unwrap();
    assert_eq!(
        s.kv_get(t.app.id, "orders", "o-1").await.unwrap().unwrap().value,
        serde_json::json!({"n": 1})
    );
}

#[tokio::test]
async fn a_collection_refused_for_its_flow_goes_the_slower_way_without_asking_for_a_moment() {
    let fixture = pg_store().await;
    let s = PgStore::new(fixture.store.pool().clone()).with_clock(Clock::manual(START));
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    let ordered = picloud_core::Flow { ordering: picloud_core::flow::Ordering::Key, ..Default::default() };
    let flow = |flow| TriggerPatch { flow: Some(flow), ..TriggerPatch::default() };
    s.update_trigger(t.app.id, trigger.name.as_str(), &flow(Some(ordered))).await.unwrap();
    let value = serde_json::json!({"n": 1});
    assert!(s.kv_put_firing(None, &orders_put(&t, &value)).await.unwrap().is_none(), "a flow: refused");

    s.update_trigger(t.app.id, trigger.name.as_str(), &flow(None)).await.unwrap();
    assert!(
        s.kv_put_firing(None, &orders_put(&t, &value)).await.unwrap().is_none(),
        "refused a moment ago: the statement is not asked again yet"
    );
    s.clock().advance(Duration::from_secs(1));
    let (put, fired) = s.kv_put_firing(None, &orders_put(&t, &value)).await.unwrap().expect("asked again");
    assert_eq!((put.version, fired.len()), (1, 1), "no flow any more: one statement writes the put");
}

#[tokio::test]
async fn a_debounce_counts_from_its_own_write_not_from_the_start_of_a_transaction_that_waited() {
    let fixture = pg_store().await;
    let s = PgStore::new(fixture.store.pool().clone());
    let t = tenant(&s, "shop").await;
    let mut new = new_trigger(&t, "debounced", kv_spec("notes", &[KvOp::Put]));
    let debounce = picloud_core::Flow {
        ordering: picloud_core::flow::Ordering::Key,
        debounce_ms: Some(200),
        ..Default::default()
    };
    new.flow = Some(debounce);
    s.create_trigger(&new).await.unwrap();
    let config = picloud_core::TriggerConfig::default();
    let cx = picloud_store::events::EventContext {
        app_id: t.app.id,
        app_slug: &t.app.slug,
        depth: 0,
        config: &config,
    };
    let (collection, key) =
        (picloud_core::CollectionName::parse("notes").unwrap(), picloud_core::KvKey::parse("a").unwrap());
    let put = |n| serde_json::json!({"n": n});
    let mut tx = s.begin().await.unwrap();
    picloud_store::events::kv_put(&s, &mut tx, &cx, &collection, &key, &put(1), None).await.unwrap();
    s.commit(tx).await.unwrap();

    // A transaction that waits half a second before its write replaces the delivery's event.
    let mut tx = s.begin().await.unwrap();
    let started: time::OffsetDateTime =
        sqlx::query_scalar("SELECT now() FROM pg_sleep(0.5)").fetch_one(&mut *tx).await.unwrap();
    picloud_store::events::kv_put(&s, &mut tx, &cx, &collection, &key, &put(2), None).await.unwrap();
    s.commit(tx).await.unwrap();
    let due: Vec<time::OffsetDateTime> =
        sqlx::query_scalar("SELECT due_at FROM outbox").fetch_all(s.pool()).await.unwrap();
    assert_eq!(due.len(), 1, "the second write replaced the first's event");
    assert!(
        due[0] >= started + time::Duration::milliseconds(700),
        "due {} only {} after the transaction started",
        due[0],
        due[0] - started
    );
}

#[tokio::test]
async fn locking_dead_letters_waits_for_one_another_transaction_holds_and_leaves_it_once_resolved() {
    let fixture = pg_store().await;
    let s = PgStore::new(fixture.store.pool().clone());
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    insert(&s, &[delivery(&t, &trigger, Duration::ZERO), delivery(&t, &trigger, Duration::ZERO)]).await;
    let mut dead = Vec::new();
    for row in s.claim_due(2, LEASE, "n").await.unwrap().rows {
        dead.push(bury(&s, &row).await.id);
    }
    dead.sort_unstable();

    // A single replay holds the first dead letter while it resolves it.
    let mut replay = s.begin().await.unwrap();
    s.lock_dead_letter(&mut replay, t.app.id, dead[0]).await.unwrap().unwrap();
    s.resolve(&mut replay, t.app.id, dead[0], Resolution::Replayed, false).await.unwrap();
    let bulk = tokio::spawn({
        let (s, app) = (s.clone(), t.app.id);
        async move {
            let unresolved = DeadLetterFilter { resolution: Some(None), ..Default::default() };
            let mut tx = s.begin().await.unwrap();
            let locked = s.lock_dead_letters(&mut tx, app, &unresolved, None, 10).await.unwrap();
            s.commit(tx).await.unwrap();
            locked
        }
    });
    eventually("the bulk lock to wait for the replay's", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(s.pool())
        .await
        .unwrap();
        (waiting > 0).then_some(())
    })
    .await;
    s.commit(replay).await.unwrap();
    assert_eq!(bulk.await.unwrap(), [dead[1]], "the replayed one is rechecked and left, the other taken");
}

#[tokio::test]
async fn a_wake_up_for_written_rows_names_them_to_every_listener_and_any_other_names_none() {
    async fn next(listener: &mut Wakeups) -> Wakeup {
        use futures::StreamExt as _;
        tokio::time::timeout(Duration::from_secs(10), listener.next())
            .await
            .expect("woken in time")
            .expect("listening")
            .unwrap()
    }
    let fixture = pg_store().await;
    let s = PgStore::new(fixture.store.pool().clone());
    let mut first = s.listen().await.unwrap();
    let mut second = s.listen().await.unwrap();
    let written = vec![uuid::Uuid::now_v7(), uuid::Uuid::now_v7()];
    s.wake_relays_for(written.clone()).await.unwrap();
    for listener in [&mut first, &mut second] {
        assert_eq!(next(listener).await, Wakeup::Written(written.clone()));
    }
    s.wake_relays().await.unwrap();
    assert_eq!(next(&mut first).await, Wakeup::Any);
    // More than one notification names: it names none.
    s.wake_relays_for((0..201).map(|_| uuid::Uuid::now_v7()).collect()).await.unwrap();
    assert_eq!(next(&mut first).await, Wakeup::Any);
}
