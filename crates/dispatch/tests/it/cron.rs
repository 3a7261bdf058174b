//! The cron scheduler on a manual clock against a real Postgres: one delivery per tick however
//! many schedulers run, missed ticks coalesced, disabled triggers silent, and a tick delivered
//! end to end to a worker.

use std::time::Duration;

use picloud_core::CronSchedule;
use picloud_dispatch::{Scheduler, SchedulerConfig};
use picloud_store::cron::CronPass;
use picloud_store::*;
use picloud_worker::{Shutdown, ShutdownSender};
use time::OffsetDateTime;
use time::macros::datetime;
use tokio::task::JoinHandle;

use crate::support::*;

const T0: OffsetDateTime = datetime!(2026-03-01 00:00:00 UTC);
const MINUTE: Duration = Duration::from_secs(60);

fn cron(schedule: &str, timezone: &str) -> TriggerSpec {
    TriggerSpec::Cron { schedule: CronSchedule::parse(schedule, timezone).unwrap() }
}

/// A scheduler of `w`'s store on `clock`, with a short poll interval.
fn scheduler(w: &World, node: &str, clock: &Clock) -> Scheduler<PgStore> {
    let mut config = SchedulerConfig::new(node, &w.config);
    config.poll_interval = Duration::from_millis(50);
    Scheduler::new(w.store.clone().with_clock(clock.clone()), config)
}

/// A running scheduler that stops when asked.
struct Running {
    stop: ShutdownSender,
    task: JoinHandle<()>,
}

impl Running {
    fn start(scheduler: Scheduler<PgStore>) -> Running {
        let (stop, shutdown) = Shutdown::new();
        let task = tokio::spawn(scheduler.run(shutdown));
        Running { stop, task }
    }

    /// Stops the scheduler and waits until it has.
    async fn stop(self) {
        self.stop.send();
        self.task.await.unwrap();
    }
}

/// How many cron triggers have their next tick at `at`.
async fn next_ticks_at(w: &World, at: OffsetDateTime) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM cron_trigger_details WHERE next_tick_at = $1")
        .bind(at)
        .fetch_one(w.store.pool())
        .await
        .unwrap()
}

/// The `(trigger name, scheduled_at)` of every delivery in the outbox, sorted.
async fn fired(w: &World) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT t.name, o.payload::jsonb ->> 'scheduled_at'
           FROM outbox o JOIN triggers t ON t.id = o.trigger_id
          ORDER BY 1, 2",
    )
    .fetch_all(w.store.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn two_schedulers_on_one_database_deliver_each_tick_once() {
    let w = World::new().await;
    let names: Vec<String> = (0..20).map(|i| format!("every-minute-{i:02}")).collect();
    for name in &names {
        w.trigger(name, cron("* * * * *", "UTC"), "tick").await;
    }
    let clock = Clock::manual(T0);
    let a = Running::start(scheduler(&w, "node-a", &clock));
    let b = Running::start(scheduler(&w, "node-b", &clock));
    eventually("every trigger scheduled", || async {
        (next_ticks_at(&w, T0 + MINUTE).await == 20).then_some(())
    })
    .await;

    for minute in 1..=5 {
        clock.advance(MINUTE);
        eventually(&format!("the ticks of minute {minute}"), || async {
            (w.outbox_len().await >= 20 * minute).then_some(())
        })
        .await;
    }
    a.stop().await;
    b.stop().await;

    let mut expected = Vec::new();
    for name in &names {
        for minute in 1..=5 {
            expected.push((name.clone(), format!("2026-03-01T00:0{minute}:00.000Z")));
        }
    }
    assert_eq!(fired(&w).await, expected, "each trigger fired each tick exactly once");
}

#[tokio::test]
async fn ticks_missed_during_a_long_gap_fire_exactly_once() {
    let w = World::new().await;
    w.trigger("every-minute", cron("* * * * *", "UTC"), "tick").await;
    let clock = Clock::manual(T0);
    let s = scheduler(&w, "node-a", &clock);
    assert_eq!(s.fire_due().await.unwrap(), CronPass { triggers: 1, fired: 0, parked: 0 });

    clock.advance(5 * 60 * MINUTE + Duration::from_secs(30));
    assert_eq!(s.fire_due().await.unwrap().fired, 1);
    assert_eq!(s.fire_due().await.unwrap().fired, 0);

    assert_eq!(fired(&w).await, [("every-minute".to_owned(), "2026-03-01T05:00:00.000Z".to_owned())]);
    assert_eq!(next_ticks_at(&w, datetime!(2026-03-01 05:01:00 UTC)).await, 1);
}

#[tokio::test]
async fn a_disabled_trigger_does_not_fire_while_an_enabled_one_does() {
    let w = World::new().await;
    w.trigger("enabled", cron("* * * * *", "UTC"), "tick").await;
    w.trigger("disabled", cron("* * * * *", "UTC"), "tick").await;
    let clock = Clock::manual(T0);
    let s = scheduler(&w, "node-a", &clock);
    s.fire_due().await.unwrap();
    let disable = TriggerPatch { enabled: Some(false), ..TriggerPatch::default() };
    w.store.update_trigger(w.app.id, "disabled", &disable).await.unwrap();

    for _ in 0..3 {
        clock.advance(MINUTE);
        s.fire_due().await.unwrap();
    }

    let names: Vec<String> = fired(&w).await.into_iter().map(|(name, _)| name).collect();
    assert_eq!(names, ["enabled", "enabled", "enabled"]);
}

#[tokio::test]
async fn a_relay_delivers_a_tick_to_its_worker_as_a_cron_event() {
    let w = World::new().await;
    let trigger = w.trigger("nightly", cron("0 3 * * *", "Europe/Berlin"), "report").await;
    let (worker, mut deliveries) = start_worker(&w.nats_url(), "shop", "report", ok).await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("node-a")).await;
    let clock = Clock::manual(T0);
    let scheduler = Running::start(scheduler(&w, "node-a", &clock));
    let three_in_berlin = datetime!(2026-03-01 02:00:00 UTC);
    eventually("the trigger scheduled", || async {
        (next_ticks_at(&w, three_in_berlin).await == 1).then_some(())
    })
    .await;

    clock.advance(2 * 60 * MINUTE);
    let d = next(&mut deliveries, "the 03:00 tick").await;

    let e = &d.event;
    assert_eq!(e.picloudkind, "cron");
    assert_eq!(e.event_type, "picloud.cron.tick");
    assert_eq!(e.source, "/apps/shop/triggers/nightly");
    assert_eq!(e.subject, None);
    assert_eq!(e.time, "2026-03-01T02:00:00.000Z", "the event happened at the scheduled tick");
    assert_eq!(e.picloudtrigger.as_deref(), Some("nightly"));
    assert_eq!(e.picloudtriggerid, Some(trigger.id.as_uuid()));
    assert_eq!(e.picloudprincipal, Some(w.admin.id.as_uuid()));
    assert_eq!((d.attempt, d.depth), (1, 0));
    assert!(d.token.is_some(), "the handler may act as the trigger's principal");
    let data: serde_json::Value = d.data().unwrap();
    assert_eq!(
        data,
        serde_json::json!({
            "scheduled_at": "2026-03-01T02:00:00.000Z", "schedule": "0 3 * * *", "timezone": "Europe/Berlin"
        })
    );
    w.drained().await;
    assert!(deliveries.try_recv().is_err(), "delivered once");
    scheduler.stop().await;
    relay.stop().await;
    worker.stop().await;
}
