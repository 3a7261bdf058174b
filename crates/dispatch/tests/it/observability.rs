//! What a node tells about its work: the relay's metrics, the database gauges read once per
//! refresh, emails that wait (without using up attempts) while no node sends email, and the
//! statistics a stopping relay writes before it returns.

use std::time::Duration;

use picloud_core::stats::AttemptOutcome;
use picloud_dispatch::Metrics;
use picloud_store::events::{self, EventContext};
use picloud_store::*;
use serde_json::json;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::support::*;

/// The value of the series `name` whose labels include `labels`, in a Prometheus text render.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|line| !line.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
        let matches = series_name == name
            && labels
                .iter()
                .all(|(k, v)| series_labels.split([',', '}']).any(|l| l == format!("{k}=\"{v}\"")));
        matches.then(|| value.parse().unwrap())
    })
}

/// Waits until the series reaches `expected`.
async fn reaches(metrics: &Metrics, name: &str, labels: &[(&str, &str)], expected: f64) {
    eventually(&format!("{name}{labels:?} to reach {expected}"), || async {
        (value(&metrics.render(), name, labels) == Some(expected)).then_some(())
    })
    .await;
}

/// Queues an email through `store`, as `POST /v1/apps/shop/emails` would.
async fn send_email(w: &World, store: &PgStore) -> Uuid {
    let cx = EventContext { app_id: w.app.id, app_slug: &w.app.slug, depth: 0, config: &w.config };
    let email = json!({"to": "ann@example.com", "subject": "Hi", "text": "Hello"});
    let mut tx = store.begin().await.unwrap();
    let id = events::send_email(store, &mut tx, &cx, &RawValue::from_string(email.to_string()).unwrap())
        .await
        .unwrap();
    events::commit_and_wake(store, tx).await.unwrap();
    id
}

#[tokio::test]
async fn the_relay_counts_attempts_by_outcome_times_them_and_records_its_batches() {
    let metrics = Metrics::install().unwrap();
    let w = World::new().await;
    w.kv_trigger("on-order", "orders", "process-order").await;
    w.kv_trigger("unheard", "audit", "nobody-listens").await;
    let (worker, _) = start_worker(&w.nats_url(), "shop", "process-order", ok).await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("obs-relay")).await;

    for key in ["o-1", "o-2", "o-3"] {
        w.put("orders", key, json!({}), 0).await;
    }
    w.put("audit", "a-1", json!({}), 0).await;
    let node = ("node", "obs-relay");
    reaches(&metrics, "picloud_delivery_completions_total", &[node, ("result", "delivered")], 3.0).await;
    reaches(&metrics, "picloud_delivery_completions_total", &[node, ("result", "dead_lettered")], 1.0).await;
    relay.stop().await;
    worker.stop().await;

    let text = metrics.render();
    let series = |name: &str, labels: &[(&str, &str)]| value(&text, name, &[&[node], labels].concat());
    assert_eq!(series("picloud_delivery_attempts_total", &[("outcome", "ok")]), Some(3.0));
    assert_eq!(
        series("picloud_delivery_attempts_total", &[("outcome", "no_responders")]),
        Some(3.0),
        "the unheard delivery used its three attempts"
    );
    assert_eq!(series("picloud_delivery_completions_total", &[("result", "retried")]), Some(2.0));
    assert_eq!(series("picloud_delivery_attempt_duration_seconds_count", &[("outcome", "ok")]), Some(3.0));
    assert_eq!(
        series("picloud_delivery_attempt_duration_seconds_bucket", &[("outcome", "ok"), ("le", "+Inf")]),
        Some(3.0)
    );
    assert_eq!(
        series("picloud_relay_claim_batch_rows_sum", &[]),
        Some(6.0),
        "four events, two of them retried"
    );
    assert_eq!(series("picloud_relay_completion_batch_rows_sum", &[]), Some(6.0));
}

#[tokio::test]
async fn the_database_gauges_are_read_by_a_refresh_and_rendered_as_last_read() {
    let metrics = Metrics::install().unwrap();
    let w = World::new().await;
    let store = w.store.clone().with_clock(Clock::manual(OffsetDateTime::now_utc()));
    send_email(&w, &store).await;
    send_email(&w, &store).await;
    store.clock().advance(Duration::from_secs(90));
    let unread = metrics.render();
    assert_eq!(
        value(&unread, "picloud_outbox_due_rows", &[]).map(f64::is_nan),
        Some(true),
        "unknown until read"
    );

    metrics.refresh_gauges(&store).await;
    send_email(&w, &store).await;
    let text = metrics.render();

    assert_eq!(value(&text, "picloud_outbox_due_rows", &[]), Some(2.0), "as read, not as now");
    assert_eq!(value(&text, "picloud_outbox_oldest_due_age_seconds", &[]), Some(90.0));
    assert_eq!(value(&text, "picloud_dead_letters_unresolved", &[]), Some(0.0));
    assert_eq!(value(&text, "picloud_abandoned_executions", &[]), Some(0.0));
    assert_eq!(value(&text, "picloud_gauge_reads_total", &[]), Some(1.0));
    assert!(text.contains("# TYPE picloud_outbox_due_rows gauge"), "{text}");
    metrics.refresh_gauges(&store).await;
    let again = metrics.render();
    assert_eq!(value(&again, "picloud_outbox_due_rows", &[]), Some(3.0));
    assert_eq!(value(&again, "picloud_gauge_reads_total", &[]), Some(2.0));

    // A database that cannot be read gives unknown gauges, not stale ones.
    store.pool().close().await;
    metrics.refresh_gauges(&store).await;
    let failed = metrics.render();
    assert_eq!(value(&failed, "picloud_outbox_due_rows", &[]).map(f64::is_nan), Some(true), "{failed}");
    assert_eq!(value(&failed, "picloud_gauge_reads_total", &[]), Some(3.0));
}

#[tokio::test]
async fn each_node_renders_the_gauges_its_own_refresher_read() {
    let (first, second) = (Metrics::install().unwrap(), Metrics::install().unwrap());
    let w = World::new().await;
    send_email(&w, &w.store).await;

    first.refresh_gauges(&w.store).await;

    assert_eq!(value(&first.render(), "picloud_outbox_due_rows", &[]), Some(1.0));
    assert_eq!(value(&second.render(), "picloud_gauge_reads_total", &[]), Some(0.0));
}

#[tokio::test]
async fn an_email_waits_without_using_up_its_attempts_while_no_node_sends_email() {
    let metrics = Metrics::install().unwrap();
    let w = World::new().await;
    let store = w.store.clone().with_clock(Clock::manual(OffsetDateTime::now_utc()));
    let relay = start_relay(store.clone(), &w.nats_url(), relay_config("email-wait")).await;
    let id = send_email(&w, &store).await;
    let written: OffsetDateTime = sqlx::query_scalar("SELECT created_at FROM outbox WHERE id = $1")
        .bind(id)
        .fetch_one(store.pool())
        .await
        .unwrap();

    let node = ("node", "email-wait");
    for round in 1..=5 {
        reaches(
            &metrics,
            "picloud_delivery_completions_total",
            &[node, ("result", "waiting")],
            f64::from(round),
        )
        .await;
        let (row, attempts, created_at): (Uuid, i32, OffsetDateTime) =
            sqlx::query_as("SELECT id, attempts, created_at FROM outbox")
                .fetch_one(store.pool())
                .await
                .unwrap();
        assert_eq!(
            (row, attempts, created_at),
            (id, 0, written),
            "round {round}: the email is back as written"
        );
        assert!(w.dead_letters().await.is_empty(), "round {round}: no dead letter");
        store.clock().advance(Duration::from_secs(3600));
        store.wake_relays().await.unwrap();
    }
    relay.stop().await;

    let text = metrics.render();
    assert_eq!(
        value(&text, "picloud_delivery_attempts_total", &[node, ("outcome", "no_responders")]),
        Some(5.0)
    );
    assert_eq!(value(&text, "picloud_delivery_completions_total", &[node, ("result", "retried")]), None);
}

#[tokio::test]
async fn a_sync_call_delivered_by_its_api_node_is_counted_like_a_relays_attempts() {
    let metrics = Metrics::install().unwrap();
    let w = World::new().await;
    w.trigger("call", TriggerSpec::Http, "answer").await;
    let (worker, _) = start_worker(&w.nats_url(), "shop", "answer", ok).await;
    let config = relay_config("obs-sync");
    let cx = EventContext { app_id: w.app.id, app_slug: &w.app.slug, depth: 0, config: &w.config };
    let waiter = events::SyncWaiter {
        reply_to: "_INBOX.obs",
        authorized_at: None,
        node: "obs-sync",
        lease: config.node.lease(),
    };
    let body = RawValue::from_string("{}".into()).unwrap();
    let SyncCallWrite::Written { row, target } =
        events::invoke(&w.store, &cx, "call", &body, waiter).await.unwrap()
    else {
        panic!("the call is written")
    };
    let nats = async_nats::connect(w.nats_url()).await.unwrap();
    let (reply, caller) = picloud_dispatch::sync_call();
    let connection = picloud_dispatch::ConnectionWatch::spawn(&nats);
    let delivering = tokio::spawn(picloud_dispatch::deliver_sync(
        w.store.clone(),
        picloud_dispatch::SyncAnswers::new(
            nats.clone(),
            picloud_dispatch::Reporter::spawn(w.store.clone(), nats, config.node.clone()),
        ),
        connection,
        config.node,
        row,
        *target,
        reply,
    ));

    let answer = caller.answer(Duration::from_secs(20)).await;
    assert_eq!(answer, Ok(picloud_dispatch::Answer::Ok(r#"{"ok":true}"#.into())));
    delivering.await.unwrap();
    let text = metrics.render();
    let node = ("node", "obs-sync");
    let series = |name: &str, labels: &[(&str, &str)]| value(&text, name, &[&[node], labels].concat());
    assert_eq!(series("picloud_delivery_attempts_total", &[("outcome", "ok")]), Some(1.0));
    assert_eq!(series("picloud_delivery_completions_total", &[("result", "answered")]), Some(1.0));
    assert_eq!(series("picloud_delivery_attempt_duration_seconds_count", &[("outcome", "ok")]), Some(1.0));
    worker.stop().await;
}

#[tokio::test]
async fn a_relay_that_stops_cleanly_has_written_the_statistics_of_its_last_attempts_when_it_returns() {
    let w = World::new().await;
    let trigger = w.kv_trigger("counted", "orders", "count").await;
    let (worker, mut handed) = start_worker(&w.nats_url(), "shop", "count", ok).await;
    // The relay runs as in a node's process: on a runtime of its own, dropped as soon as the
    // relay returns, which ends every task it left behind.
    let (stop, shutdown) = picloud_worker::Shutdown::new();
    let node = {
        let (db_url, nats_url) = (w.db_url().to_owned(), w.nats_url());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let store = PgStore::connect(&db_url, 2).await.unwrap();
                let nats = async_nats::connect(nats_url).await.unwrap();
                picloud_dispatch::Relay::new(store, nats, relay_config("obs-stop"))
                    .run(shutdown)
                    .await
                    .unwrap();
            });
        })
    };
    let since = OffsetDateTime::now_utc() - Duration::from_secs(60);
    for key in ["a", "b", "c"] {
        w.put("orders", key, json!(key), 0).await;
    }
    for _ in 0..3 {
        next(&mut handed, "a delivery").await;
    }
    w.drained().await;

    // The reporter merges a second of statistics before it writes them: a relay that returned
    // before they were written would leave them to a task the process's end cancels.
    stop.send();
    tokio::task::spawn_blocking(move || node.join()).await.unwrap().unwrap();
    let buckets = w.store.attempt_stats(trigger.id, since, Duration::from_secs(3600)).await.unwrap();
    let ok: u64 = buckets.iter().map(|b| b.attempts.outcomes[AttemptOutcome::Ok.index()]).sum();
    assert_eq!(ok, 3);
    worker.stop().await;
}
