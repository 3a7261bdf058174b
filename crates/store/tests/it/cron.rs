//! Firing cron ticks: the conformance suite for both stores, then what only Postgres can show
//! (concurrent transactions taking disjoint triggers).

use picloud_core::{CronSchedule, TriggerConfig};
use picloud_store::cron::{CronPass, fire_due_ticks};
use picloud_store::*;
use serde_json::{Value, json};
use time::{Duration as Span, OffsetDateTime};

use crate::support::*;

conformance!(
    a_new_cron_trigger_gets_its_first_tick_after_now_without_firing,
    a_due_tick_fires_one_delivery_of_the_cron_event_and_moves_past_now,
    ticks_missed_while_no_scheduler_ran_fire_once_as_the_latest_of_them,
    a_disabled_trigger_does_not_fire_and_enabled_again_starts_from_then,
    a_pass_takes_at_most_its_batch_new_triggers_first,
    firing_a_tick_leaves_the_configuration_epoch_as_it_is,
);

const BATCH: u32 = 100;

fn minutes(n: i64) -> OffsetDateTime {
    START + Span::minutes(n)
}

fn cron(schedule: &str, timezone: &str) -> TriggerSpec {
    TriggerSpec::Cron { schedule: CronSchedule::parse(schedule, timezone).unwrap() }
}

async fn fire<S: Store>(s: &S, now: OffsetDateTime) -> CronPass {
    fire_due_ticks(s, now, BATCH, &TriggerConfig::default()).await.unwrap()
}

/// Every delivery waiting in the outbox.
async fn ticks<S: Store>(s: &S) -> Vec<ClaimedDelivery> {
    s.claim_due(1000, LEASE, "test").await.unwrap().rows
}

fn scheduled_at(tick: &ClaimedDelivery) -> String {
    let data: Value = serde_json::from_str(tick.payload.get()).unwrap();
    data["scheduled_at"].as_str().unwrap().to_owned()
}

async fn a_new_cron_trigger_gets_its_first_tick_after_now_without_firing<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    s.create_trigger(&new_trigger(&t, "report", cron("*/5 * * * *", "UTC"))).await.unwrap();
    assert_eq!(s.next_cron_tick(minutes(1)).await.unwrap(), Some(minutes(1)), "not computed yet: look now");

    let pass = fire(&s, minutes(1)).await;

    assert_eq!(pass, CronPass { triggers: 1, fired: 0, parked: 0 });
    assert!(ticks(&s).await.is_empty(), "the first pass only schedules");
    assert_eq!(s.next_cron_tick(minutes(1)).await.unwrap(), Some(minutes(5)));
}

async fn a_due_tick_fires_one_delivery_of_the_cron_event_and_moves_past_now<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let trigger = s.create_trigger(&new_trigger(&t, "every-minute", cron("* * * * *", "UTC"))).await.unwrap();
    fire(&s, START).await;

    let now = minutes(1) + Span::milliseconds(250);
    assert_eq!(fire(&s, now).await, CronPass { triggers: 1, fired: 1, parked: 0 });
    assert_eq!(fire(&s, now).await, CronPass::default(), "the tick is not due twice");

    let fired = ticks(&s).await;
    assert_eq!(fired.len(), 1);
    let tick = &fired[0];
    assert_eq!(tick.trigger_id, Some(trigger.id));
    assert_eq!(tick.app_id, t.app.id);
    assert_eq!(tick.kind, picloud_core::protocol::EventKind::Cron);
    assert_eq!(tick.event_type, "picloud.cron.tick");
    assert_eq!(tick.source, "/apps/shop/triggers/every-minute");
    assert_eq!(tick.subject, None);
    assert_eq!(tick.depth, 0);
    assert_eq!(tick.max_attempts, TriggerConfig::default().retry.max_attempts);
    assert_eq!(tick.created_at, minutes(1), "the event happened at the scheduled tick");
    let data: Value = serde_json::from_str(tick.payload.get()).unwrap();
    assert_eq!(
        data,
        json!({"scheduled_at": "2026-01-01T00:01:00.000Z", "schedule": "* * * * *", "timezone": "UTC"})
    );
    assert_eq!(s.next_cron_tick(now).await.unwrap(), Some(minutes(2)));
}

async fn ticks_missed_while_no_scheduler_ran_fire_once_as_the_latest_of_them<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let mut new = new_trigger(&t, "every-minute", cron("* * * * *", "Europe/Berlin"));
    new.retry.max_attempts = Some(2);
    s.create_trigger(&new).await.unwrap();
    fire(&s, START).await;

    let later = minutes(3 * 60) + Span::seconds(30);
    assert_eq!(fire(&s, later).await.fired, 1);
    assert_eq!(fire(&s, later).await.fired, 0);

    let fired = ticks(&s).await;
    assert_eq!(fired.len(), 1, "180 missed ticks fire once");
    assert_eq!(scheduled_at(&fired[0]), "2026-01-01T03:00:00.000Z");
    assert_eq!(fired[0].max_attempts, 2, "the trigger's own attempts");
    assert_eq!(s.next_cron_tick(later).await.unwrap(), Some(minutes(3 * 60 + 1)));
}

async fn a_disabled_trigger_does_not_fire_and_enabled_again_starts_from_then<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    s.create_trigger(&new_trigger(&t, "every-minute", cron("* * * * *", "UTC"))).await.unwrap();
    fire(&s, START).await;
    let set_enabled = |enabled| TriggerPatch { enabled: Some(enabled), ..TriggerPatch::default() };

    s.update_trigger(t.app.id, "every-minute", &set_enabled(false)).await.unwrap();
    assert_eq!(s.next_cron_tick(minutes(5)).await.unwrap(), None);
    assert_eq!(fire(&s, minutes(5)).await, CronPass::default());

    s.update_trigger(t.app.id, "every-minute", &set_enabled(true)).await.unwrap();
    let now = minutes(7) + Span::seconds(30);
    assert_eq!(fire(&s, now).await.fired, 0, "ticks missed while disabled never fire");
    assert!(ticks(&s).await.is_empty());
    assert_eq!(fire(&s, minutes(8)).await.fired, 1);
    assert_eq!(scheduled_at(&ticks(&s).await[0]), "2026-01-01T00:08:00.000Z");
}

async fn a_pass_takes_at_most_its_batch_new_triggers_first<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    s.create_trigger(&new_trigger(&t, "old", cron("* * * * *", "UTC"))).await.unwrap();
    fire(&s, START).await;
    for name in ["new-a", "new-b"] {
        s.create_trigger(&new_trigger(&t, name, cron("* * * * *", "UTC"))).await.unwrap();
    }
    let config = TriggerConfig::default();

    let first = fire_due_ticks(&s, minutes(1), 2, &config).await.unwrap();
    let second = fire_due_ticks(&s, minutes(1), 2, &config).await.unwrap();

    assert_eq!(first, CronPass { triggers: 2, fired: 0, parked: 0 }, "the new ones, scheduled");
    assert_eq!(second, CronPass { triggers: 1, fired: 1, parked: 0 }, "then the due one");
}

async fn firing_a_tick_leaves_the_configuration_epoch_as_it_is<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let trigger = s.create_trigger(&new_trigger(&t, "every-minute", cron("* * * * *", "UTC"))).await.unwrap();
    let epoch = s.delivery_targets(&[trigger.id]).await.unwrap().config_epoch;

    fire(&s, START).await;
    fire(&s, minutes(1)).await;

    assert_eq!(ticks(&s).await.len(), 1);
    assert_eq!(s.delivery_targets(&[trigger.id]).await.unwrap().config_epoch, epoch);
}

mod postgres_only {
    use std::collections::HashMap;

    use super::*;

    /// Cron triggers firing every minute, scheduled at `START`.
    async fn every_minute(s: &PgStore, n: usize) -> Vec<Trigger> {
        let t = tenant(s, "shop").await;
        let mut made = Vec::with_capacity(n);
        for i in 0..n {
            made.push(
                s.create_trigger(&new_trigger(&t, &format!("t{i:03}"), cron("* * * * *", "UTC")))
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(fire(s, START).await.triggers, n);
        made
    }

    /// The number of outbox rows of each trigger.
    async fn rows_per_trigger(s: &PgStore) -> HashMap<uuid::Uuid, i64> {
        let rows: Vec<(uuid::Uuid, i64)> =
            sqlx::query_as("SELECT trigger_id, count(*) FROM outbox GROUP BY trigger_id")
                .fetch_all(s.pool())
                .await
                .unwrap();
        rows.into_iter().collect()
    }

    /// A schedule this version cannot parse can only have been stored by another version (every
    /// write parses it): it is parked, and the others fire.
    #[tokio::test]
    async fn a_stored_schedule_that_does_not_parse_is_parked_without_holding_up_the_others() {
        let fixture = pg_store().await;
        let s = fixture.store.clone();
        let t = tenant(&s, "shop").await;
        for (name, schedule, timezone) in
            [("broken", "61 * * * *", "UTC"), ("zoneless", "* * * * *", "Nowhere/Special")]
        {
            let stored = s.create_trigger(&new_trigger(&t, name, cron("* * * * *", "UTC"))).await.unwrap();
            sqlx::query("UPDATE cron_trigger_details SET schedule = $2, timezone = $3 WHERE trigger_id = $1")
                .bind(stored.id.as_uuid())
                .bind(schedule)
                .bind(timezone)
                .execute(s.pool())
                .await
                .unwrap();
        }
        s.create_trigger(&new_trigger(&t, "fine", cron("* * * * *", "UTC"))).await.unwrap();

        assert_eq!(fire(&s, START).await, CronPass { triggers: 3, fired: 0, parked: 2 });
        assert_eq!(s.next_cron_tick(START).await.unwrap(), Some(minutes(1)), "parked triggers are never due");
        assert_eq!(fire(&s, minutes(1)).await, CronPass { triggers: 1, fired: 1, parked: 0 });
        assert_eq!(ticks(&s).await[0].source, "/apps/shop/triggers/fine");
        let broken = s.trigger(t.app.id, "broken").await.unwrap().expect("it can still be read");
        let TriggerSpec::Cron { schedule } = broken.spec else { panic!("a cron trigger") };
        assert_eq!((schedule.expression(), schedule.timezone()), ("61 * * * *", "UTC"), "shown as stored");
        assert!(schedule.unparsed().is_some());
        assert_eq!(s.list_triggers(t.app.id, None, 10).await.unwrap().items.len(), 3);
    }

    #[tokio::test]
    async fn a_transaction_firing_skips_the_triggers_another_holds_and_never_fires_them_twice() {
        let fixture = pg_store().await;
        let s = fixture.store.clone();
        let triggers = every_minute(&s, 10).await;
        let mut holder = s.begin().await.unwrap();
        let held = s.lock_due_cron(&mut holder, minutes(1), 4).await.unwrap();
        assert_eq!(held.len(), 4);

        let other = fire(&s, minutes(1)).await;
        assert_eq!(other.fired, 6, "the six nobody held, without waiting for the holder");
        holder.rollback().await.unwrap();
        let rest = fire(&s, minutes(1)).await;
        assert_eq!(rest.fired, 4, "the held ones, once the holder let go");
        assert_eq!(fire(&s, minutes(1)).await, CronPass::default());

        let per_trigger = rows_per_trigger(&s).await;
        assert_eq!(per_trigger.len(), triggers.len());
        assert!(per_trigger.values().all(|n| *n == 1), "one row per trigger: {per_trigger:?}");
    }

    #[tokio::test]
    async fn two_transactions_firing_at_the_same_time_write_exactly_one_row_per_tick() {
        let fixture = pg_store().await;
        let s = fixture.store.clone();
        let triggers = every_minute(&s, 60).await;

        for minute in 1..=3 {
            let scheduler = |s: PgStore| async move {
                let mut fired = 0;
                loop {
                    let pass =
                        fire_due_ticks(&s, minutes(minute), 7, &TriggerConfig::default()).await.unwrap();
                    fired += pass.fired;
                    if pass.triggers == 0 {
                        return fired;
                    }
                }
            };
            let (a, b) = tokio::join!(tokio::spawn(scheduler(s.clone())), tokio::spawn(scheduler(s.clone())));
            assert_eq!(a.unwrap() + b.unwrap(), triggers.len(), "minute {minute}: every trigger fired once");
        }

        let per_trigger = rows_per_trigger(&s).await;
        assert_eq!(per_trigger.len(), triggers.len());
        assert!(per_trigger.values().all(|n| *n == 3), "one row per trigger and tick: {per_trigger:?}");
        let distinct: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT (trigger_id, payload::jsonb ->> 'scheduled_at')) FROM outbox",
        )
        .fetch_one(s.pool())
        .await
        .unwrap();
        assert_eq!(distinct as usize, 3 * triggers.len());
    }
}
