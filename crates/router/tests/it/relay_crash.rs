//! A relay process killed with SIGKILL in the middle of a batch.

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use picloud_core::protocol::EventKind;
use picloud_store::*;
use picloud_testkit::{TestDatabase, eventually_within};
use serde_json::value::RawValue;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::support::{Shop, nats_for_serve, shop_with_trigger};

/// How long the relays may take: the second waits out the first one's lease.
const WAIT: Duration = Duration::from_secs(60);

/// A `picloud-router serve` process, killed if the test ends early.
struct RouterProcess(Child);

impl RouterProcess {
    fn serve(node: &str, database_url: &str, nats_url: &str) -> RouterProcess {
        let child = Command::new(env!("CARGO_BIN_EXE_picloud-router"))
            .arg("serve")
            .env("PICLOUD_DATABASE_URL", database_url)
            .env("PICLOUD_NATS_URL", nats_url)
            .env("PICLOUD_NODE_ID", node)
            .env("PICLOUD_TOKEN_SECRET", "crash-test-secret-0123456789")
            .env("PICLOUD_HANDLER_TIMEOUT_MS", "3000")
            .env("PICLOUD_LEASE_MARGIN_MS", "1000")
            .env("PICLOUD_RELAY_POLL_MS", "100")
            .env("PICLOUD_RELAY_BATCH", "50")
            .env("PICLOUD_RELAY_MAX_IN_FLIGHT", "50")
            // One app: it may hold every slot, so that the relay holds one whole batch.
            .env("PICLOUD_RELAY_APP_SHARE", "50")
            .env("PICLOUD_HTTP_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("start picloud-router serve");
        RouterProcess(child)
    }

    fn kill_9(&mut self) {
        self.0.kill().expect("SIGKILL");
        self.0.wait().expect("reap");
    }
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Job `i` for `trigger` of `app`, due now.
fn job(app: &App, trigger: &Trigger, i: usize) -> NewDelivery {
    let payload = RawValue::from_string(format!("{{\"i\":{i}}}")).unwrap();
    let event = events::Event {
        kind: EventKind::Queue,
        event_type: "picloud.queue.job",
        source: "/apps/shop/queues/q".into(),
        subject: None,
        payload: &payload,
        depth: 0,
        ordering_key: None,
    };
    event.delivery(app.id, Some(trigger.id), 5)
}

/// What the handler saw: per delivery id, each attempt and when it arrived.
type Seen = Arc<Mutex<HashMap<Uuid, Vec<(u32, OffsetDateTime)>>>>;

#[tokio::test]
async fn a_relay_killed_mid_batch_leaves_rows_that_another_relay_delivers_after_the_lease() {
    let db = TestDatabase::create().await.unwrap();
    let store = PgStore::connect(db.url(), 4).await.unwrap();
    pg::migrate(store.pool()).await.unwrap();
    let nats_dir = tempfile::tempdir().unwrap();
    let nats = nats_for_serve(nats_dir.path()).await;
    let Shop { app, trigger, .. } = shop_with_trigger(&store, "hold", TriggerSpec::Http, "hold").await;
    let rows: Vec<NewDelivery> = (0..120).map(|i| job(&app, &trigger, i)).collect();
    let mut tx = store.begin().await.unwrap();
    store.insert_deliveries(&mut tx, &rows).await.unwrap();
    store.commit(tx).await.unwrap();

    // The handler records every delivery; it answers only once `answering` is set.
    let seen: Seen = Arc::default();
    let answering = Arc::new(AtomicBool::new(false));
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut sub =
        client.queue_subscribe("picloud.v1.handle.shop.hold", "picloud.shop.hold".into()).await.unwrap();
    client.flush().await.unwrap();
    let handler = tokio::spawn({
        let (seen, answering, client) = (seen.clone(), answering.clone(), client.clone());
        async move {
            while let Some(msg) = sub.next().await {
                let e: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
                let id: Uuid = e["id"].as_str().unwrap().parse().unwrap();
                let attempt = e["picloudattempt"].as_u64().unwrap() as u32;
                seen.lock()
                    .unwrap()
                    .entry(id)
                    .or_default()
                    .push((attempt, OffsetDateTime::from(SystemTime::now())));
                if answering.load(Ordering::SeqCst) {
                    let mut ok = async_nats::HeaderMap::new();
                    ok.insert("Picloud-Status", "ok");
                    client.publish_with_headers(msg.reply.unwrap(), ok, "{}".into()).await.unwrap();
                }
            }
        }
    });

    let mut relay_a = RouterProcess::serve("relay-a", db.url(), &nats.url());
    eventually_within("relay-a's first batch to reach the handler", WAIT, || async {
        (seen.lock().unwrap().len() >= 50).then_some(())
    })
    .await;
    relay_a.kill_9();
    let held: Vec<(Uuid, OffsetDateTime)> =
        sqlx::query_as("SELECT id, leased_until FROM outbox WHERE leased_by = 'relay-a'")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(held.len(), 50, "relay-a held one batch when it died");

    answering.store(true, Ordering::SeqCst);
    let _relay_b = RouterProcess::serve("relay-b", db.url(), &nats.url());
    eventually_within("the outbox to drain", WAIT, || async {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(store.pool()).await.unwrap();
        (left == 0).then_some(())
    })
    .await;

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), rows.len(), "every row reached the handler");
    let tolerance = time::Duration::milliseconds(50);
    for (id, leased_until) in &held {
        let attempts = &seen[id];
        let (_, redelivered_at) =
            attempts.iter().find(|(a, _)| *a == 2).expect("a held row is delivered again");
        assert!(
            *redelivered_at + tolerance >= *leased_until,
            "{id} was delivered again at {redelivered_at}, before its lease ended at {leased_until}"
        );
    }
    let dead: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dead_letters").fetch_one(store.pool()).await.unwrap();
    assert_eq!(dead, 0);
    handler.abort();
}

#[tokio::test]
async fn a_relay_killed_while_its_handler_works_leaves_the_row_until_the_extended_lease_ends() {
    let db = TestDatabase::create().await.unwrap();
    let store = PgStore::connect(db.url(), 4).await.unwrap();
    pg::migrate(store.pool()).await.unwrap();
    let nats_dir = tempfile::tempdir().unwrap();
    let nats = nats_for_serve(nats_dir.path()).await;
    let Shop { app, trigger, .. } = shop_with_trigger(&store, "long", TriggerSpec::Http, "long").await;
    let row = job(&app, &trigger, 0);
    let mut tx = store.begin().await.unwrap();
    store.insert_deliveries(&mut tx, std::slice::from_ref(&row)).await.unwrap();
    store.commit(tx).await.unwrap();
    let lease_end = || async {
        let until: OffsetDateTime = sqlx::query_scalar("SELECT leased_until FROM outbox WHERE id = $1")
            .bind(row.id)
            .fetch_one(store.pool())
            .await
            .unwrap();
        until
    };

    // The handler says `working` every half second on its first attempt, and answers `ok` on the
    // next; it notes when each attempt arrived.
    let seen: Seen = Arc::default();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut sub =
        client.queue_subscribe("picloud.v1.handle.shop.long", "picloud.shop.long".into()).await.unwrap();
    client.flush().await.unwrap();
    let handler = tokio::spawn({
        let (seen, client) = (seen.clone(), client.clone());
        async move {
            while let Some(msg) = sub.next().await {
                let e: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
                let attempt = e["picloudattempt"].as_u64().unwrap() as u32;
                seen.lock()
                    .unwrap()
                    .entry(row.id)
                    .or_default()
                    .push((attempt, OffsetDateTime::from(SystemTime::now())));
                let (reply, client) = (msg.reply.unwrap(), client.clone());
                let mut headers = async_nats::HeaderMap::new();
                if attempt == 1 {
                    headers.insert("Picloud-Status", "working");
                    tokio::spawn(async move {
                        let mut every = tokio::time::interval(Duration::from_millis(500));
                        loop {
                            every.tick().await;
                            client
                                .publish_with_headers(reply.clone(), headers.clone(), "".into())
                                .await
                                .unwrap();
                        }
                    });
                } else {
                    headers.insert("Picloud-Status", "ok");
                    client.publish_with_headers(reply, headers, "{}".into()).await.unwrap();
                }
            }
        }
    });

    let mut relay_a = RouterProcess::serve("relay-a", db.url(), &nats.url());
    eventually_within("the first attempt to reach the handler", WAIT, || async {
        (!seen.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    let claimed_until = lease_end().await;
    eventually_within("relay-a to extend the lease", WAIT, || async {
        (lease_end().await > claimed_until).then_some(())
    })
    .await;
    relay_a.kill_9();
    let extended_until = lease_end().await;

    let _relay_b = RouterProcess::serve("relay-b", db.url(), &nats.url());
    eventually_within("the row to be delivered again and completed", WAIT, || async {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(store.pool()).await.unwrap();
        (left == 0).then_some(())
    })
    .await;
    let attempts = seen.lock().unwrap()[&row.id].clone();
    let (_, again) = attempts.iter().find(|(a, _)| *a == 2).expect("delivered again");
    let tolerance = time::Duration::milliseconds(50);
    assert!(
        *again + tolerance >= extended_until,
        "delivered again at {again}, before the extended lease ended at {extended_until} (claimed until {claimed_until})"
    );
    handler.abort();
}
