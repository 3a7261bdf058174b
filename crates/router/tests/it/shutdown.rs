//! Graceful shutdown of `picloud-router serve`, as a real process sent SIGTERM: what it holds —
//! a sync call whose caller still waits, one whose caller gave up, an ingest request blocked in
//! its transaction — is finished before it exits; and when NATS is gone, it gives up at its
//! shutdown deadline, naming what did not finish.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use picloud_core::token::{generate_api_token, hash_api_token};
use picloud_store::*;
use picloud_testkit::TestDatabase;
use picloud_worker::{Delivery, Reply, Worker};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::support::{Serving, Shop, nats_for_serve, shop_with_trigger};

/// How long the test waits for what it set up.
const DEADLINE: Duration = Duration::from_secs(60);

/// A handler that holds every call until the test releases it by the call's `name`.
type Held = Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>;

async fn holding_worker(nats_url: &str) -> (picloud_worker::Running, mpsc::UnboundedReceiver<String>, Held) {
    let (arrived, arrivals) = mpsc::unbounded_channel();
    let held: Held = Arc::default();
    let client = async_nats::connect(nats_url).await.unwrap();
    let holding = held.clone();
    let running = Worker::new(client, "shop")
        .handle("hold", move |d: Delivery| {
            let (arrived, holding) = (arrived.clone(), holding.clone());
            async move {
                let name = d.data::<Value>().unwrap()["name"].as_str().unwrap_or_default().to_owned();
                let (release, released) = oneshot::channel();
                holding.lock().unwrap().insert(name.clone(), release);
                arrived.send(name.clone()).unwrap();
                released.await.ok();
                Ok(Reply::ok(json!({ "call": name })))
            }
        })
        .start()
        .await
        .unwrap();
    (running, arrivals, held)
}

fn release(held: &Held, name: &str) {
    let release = held.lock().unwrap().remove(name).expect("the call is held");
    release.send(()).unwrap();
}

async fn abandoned(store: &PgStore, app: &App) -> Vec<AbandonedExecution> {
    store.list_abandoned(app.id, None, 10).await.unwrap().items
}

#[tokio::test]
async fn on_sigterm_a_node_finishes_its_sync_calls_and_ingest_requests_before_it_exits() {
    let db = TestDatabase::create().await.unwrap();
    let store = PgStore::connect(db.url(), 4).await.unwrap();
    pg::migrate(store.pool()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let nats = nats_for_serve(dir.path()).await;
    let Shop { app, admin, .. } = shop_with_trigger(&store, "hold", TriggerSpec::Http, "hold").await;
    let token = generate_api_token();
    store
        .create_token(&NewApiToken {
            id: Uuid::now_v7(),
            principal_id: admin.id,
            token_hash: hash_api_token(&token),
            app_id: None,
            scopes: None,
            expires_at: None,
        })
        .await
        .unwrap();
    let (worker, mut arrivals, held) = holding_worker(&nats.url()).await;
    let mut serving = Serving::start(
        dir.path(),
        &[
            ("PICLOUD_DATABASE_URL", db.url()),
            ("PICLOUD_NATS_URL", &nats.url()),
            ("PICLOUD_NODE_ID", "leaving"),
            ("PICLOUD_HANDLER_TIMEOUT_MS", "30000"),
        ],
    )
    .await;
    let line = serving.logged("serving").await;
    let addr = line.split("addr=").nth(1).expect("the address is logged").split_whitespace().next().unwrap();
    let invoke_url = format!("http://{addr}/v1/apps/shop/invoke/hold");
    let http = reqwest::Client::new();
    let call = |name: &'static str, timeout_ms: Option<u64>| {
        let mut request = http.post(&invoke_url).bearer_auth(&token).json(&json!({ "name": name }));
        if let Some(ms) = timeout_ms {
            request = request.header("Picloud-Timeout-Ms", ms.to_string());
        }
        async move {
            let reply = request.send().await.unwrap();
            (reply.status().as_u16(), reply.json::<Value>().await.unwrap())
        }
    };

    // An ingest request blocked in its transaction: the entry it writes is locked by the test.
    sqlx::query(
        "INSERT INTO kv_entries (app_id, collection, key, value, version) VALUES ($1, 'c', 'k', '1', 1)",
    )
    .bind(app.id.as_uuid())
    .execute(store.pool())
    .await
    .unwrap();
    let mut lock = store.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM kv_entries WHERE app_id = $1 AND key = 'k' FOR UPDATE")
        .bind(app.id.as_uuid())
        .execute(&mut *lock)
        .await
        .unwrap();
    let client = async_nats::ConnectOptions::new()
        .custom_inbox_prefix("_INBOX_shop")
        .connect(nats.url())
        .await
        .unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Authorization", format!("Bearer {token}"));
    let body = json!({"collection": "c", "key": "k", "value": 2}).to_string();
    let ingest = tokio::spawn(async move {
        let reply = client.request_with_headers("picloud.v1.ingest.shop.kv.put", headers, body.into()).await;
        let reply = reply.expect("the ingest request is answered");
        let status = reply.headers.as_ref().and_then(|h| h.get("Picloud-Status")).map(|v| v.to_string());
        (status, serde_json::from_slice::<Value>(&reply.payload).unwrap())
    });
    let deadline = Instant::now() + DEADLINE;
    while sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap()
        == 0
    {
        assert!(Instant::now() < deadline, "the ingest request never reached the lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A caller that gives up while its handler works, and one that waits.
    let gave_up = call("gave-up", Some(300)).await;
    assert_eq!((gave_up.0, gave_up.1["error"]["code"].clone()), (504, json!("timeout")));
    let waiting = tokio::spawn(call("waiting", None));
    let mut arrived = vec![arrivals.recv().await.unwrap(), arrivals.recv().await.unwrap()];
    arrived.sort();
    assert_eq!(arrived, ["gave-up", "waiting"]);

    serving.terminate();
    serving.logged("shutdown requested").await;
    release(&held, "waiting");
    assert_eq!(waiting.await.unwrap(), (200, json!({"call": "waiting"})), "the waiting caller is answered");
    lock.commit().await.unwrap();
    assert_eq!(
        ingest.await.unwrap(),
        (Some("ok".to_owned()), json!({"version": 2})),
        "the ingest request is answered after its commit"
    );
    serving.logged("waiting for sync calls to resolve their results").await;
    assert!(abandoned(&store, &app).await.is_empty(), "nothing is abandoned while the handler works");
    release(&held, "gave-up");
    let status = serving.exit_status().await;
    assert!(status.success(), "serve exits cleanly: {status}\n{}", serving.log());

    let logged = abandoned(&store, &app).await;
    assert_eq!(
        logged
            .iter()
            .map(|a| (a.reason, a.handler_status, a.result.as_ref().map(|r| r.get())))
            .collect::<Vec<_>>(),
        [(AbandonReason::NoResponders, HandlerStatus::Ok, Some(r#"{"call":"gave-up"}"#))],
        "the late result is logged before the node exits"
    );
    let outbox: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(store.pool()).await.unwrap();
    assert_eq!(outbox, 0, "both sync rows are completed, none left leased");
    let entry = store.kv_get(app.id, "c", "k").await.unwrap().unwrap();
    assert_eq!((entry.value, entry.version), (json!(2), 2));
    worker.shutdown().await;
}

#[tokio::test]
async fn on_sigterm_with_nats_gone_a_node_exits_at_its_shutdown_deadline_naming_what_did_not_finish() {
    let db = TestDatabase::create().await.unwrap();
    let store = PgStore::connect(db.url(), 2).await.unwrap();
    pg::migrate(store.pool()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut nats = nats_for_serve(dir.path()).await;
    let timeout = Duration::from_secs(3);
    let mut serving = Serving::start(
        dir.path(),
        &[
            ("PICLOUD_DATABASE_URL", db.url()),
            ("PICLOUD_NATS_URL", &nats.url()),
            ("PICLOUD_SHUTDOWN_TIMEOUT_MS", &timeout.as_millis().to_string()),
        ],
    )
    .await;
    serving.logged("serving").await;

    nats.stop().await.unwrap();
    serving.terminate();
    let terminated = Instant::now();
    let status = serving.exit_status().await;
    let took = terminated.elapsed();

    let log = serving.log();
    assert!(!status.success(), "giving up is a failure: {status}\n{log}");
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(10),
        "exits at its deadline ({timeout:?}), not later: took {took:?}\n{log}"
    );
    let unfinished: Vec<&str> =
        log.lines().filter(|l| l.contains("did not finish before PICLOUD_SHUTDOWN_TIMEOUT_MS")).collect();
    assert!(
        unfinished.iter().any(|l| l.contains("step=\"final NATS flush\"")),
        "each step that did not finish is logged by name:\n{log}"
    );
    assert!(log.contains("stopping took longer than PICLOUD_SHUTDOWN_TIMEOUT_MS (3000 ms)"), "{log}");
}
