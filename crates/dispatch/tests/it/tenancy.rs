//! The tenant permissions of `nats/tenants.conf` (DESIGN §6, "Multi-tenancy on NATS") on a
//! real nats-server: what an app's worker user may and may not see or send.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event, HeaderMap, Message, Subscriber};
use bytes::Bytes;
use futures::StreamExt as _;
use picloud_testkit::NatsServer;
use picloud_worker::{Delivery, Reply, Worker};
use serde_json::json;
use tokio::sync::mpsc;

use crate::support::*;

/// How long any awaited message or event may take.
const WAIT: Duration = Duration::from_secs(10);

fn nats_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../nats")
}

fn password(variable: &str) -> String {
    picloud_testkit::nats_dev_env()
        .remove(variable)
        .unwrap_or_else(|| panic!("{variable} is not in nats/dev.env"))
}

/// nats-server running `nats/tenants.conf` as it is. The file takes its passwords from the
/// environment, which a test cannot set for the server alone: the server runs a copy of the
/// file headed by the definitions of those variables (nats-server resolves a `$VAR` from the
/// file's own variables first, then from the environment).
struct TenantServer {
    server: NatsServer,
    _dir: tempfile::TempDir,
}

impl TenantServer {
    async fn start() -> TenantServer {
        let tenants = std::fs::read_to_string(nats_dir().join("tenants.conf")).unwrap();
        let mut conf = String::new();
        for (k, v) in picloud_testkit::nats_dev_env() {
            conf.push_str(&format!("{k} = {}\n", serde_json::to_string(&v).unwrap()));
        }
        conf.push_str(&tenants);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.conf");
        std::fs::write(&path, conf).unwrap();
        let server = NatsServer::start_with_config(&path).await.unwrap();
        TenantServer { server, _dir: dir }
    }

    fn url(&self) -> String {
        self.server.url()
    }

    /// Connects as `user`, with `inbox_prefix` if given, reporting the server's errors
    /// (permission violations among them) on the returned channel.
    async fn connect(
        &self,
        user: &str,
        password_variable: &str,
        inbox_prefix: Option<&str>,
    ) -> (Client, mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut options = ConnectOptions::with_user_and_password(user.into(), password(password_variable))
            .name(format!("tenancy test {user}"))
            .event_callback(move |event| {
                let tx = tx.clone();
                async move {
                    if let Event::ServerError(error) = event {
                        let _ = tx.send(error.to_string());
                    }
                }
            });
        if let Some(prefix) = inbox_prefix {
            options = options.custom_inbox_prefix(prefix);
        }
        let client = options.connect(self.url()).await.unwrap_or_else(|e| panic!("connect as {user}: {e}"));
        (client, rx)
    }

    /// The router, app `demo` (A) and app `shop` (B) connected, each app with its inbox prefix,
    /// and the errors the server reports to B.
    async fn router_a_and_b(&self) -> (Client, Client, Client, mpsc::UnboundedReceiver<String>) {
        let (router, _) = self.connect("router", "PICLOUD_NATS_ROUTER_PASSWORD", None).await;
        let (a, _) = self.connect("app-demo", "PICLOUD_NATS_APP_DEMO_PASSWORD", Some("_INBOX_demo")).await;
        let (b, b_errors) =
            self.connect("app-shop", "PICLOUD_NATS_APP_SHOP_PASSWORD", Some("_INBOX_shop")).await;
        (router, a, b, b_errors)
    }
}

/// Waits until the server has handled everything `client` sent so far: a message to a fresh
/// inbox of the client's own comes back only after the server processed the earlier
/// subscriptions and publishes of this connection (`flush` only empties the local buffer).
async fn round_trip(client: &Client) {
    let inbox = client.new_inbox();
    let mut echo = client.subscribe(inbox.clone()).await.unwrap();
    client.publish(inbox, Bytes::from_static(b"echo")).await.unwrap();
    tokio::time::timeout(WAIT, echo.next())
        .await
        .expect("timed out waiting for the round trip to the client's own inbox")
        .expect("inbox subscription closed");
}

async fn next(sub: &mut Subscriber, what: &str) -> Message {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap_or_else(|| panic!("subscription closed waiting for {what}"))
}

/// Whether no message is waiting in `sub` right now.
fn nothing_waiting(sub: &mut Subscriber) -> bool {
    futures::FutureExt::now_or_never(sub.next()).is_none()
}

/// Waits until the server has reported a permissions violation for each `(kind, subject)`
/// (`kind`: `Subscription` or `Publish`), in any order.
async fn violations(errors: &mut mpsc::UnboundedReceiver<String>, expected: &[(&str, &str)]) {
    let mut missing: Vec<String> = expected
        .iter()
        .map(|(kind, subject)| format!("permissions violation for {kind} to \"{subject}\"").to_lowercase())
        .collect();
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(WAIT, async {
        while !missing.is_empty() {
            let Some(error) = errors.recv().await else { break };
            missing.retain(|wanted| !error.to_lowercase().contains(wanted.as_str()));
            seen.push(error);
        }
    })
    .await;
    assert!(missing.is_empty(), "the server never reported {missing:?}; it reported {seen:?}");
}

fn status(status: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Picloud-Status", status);
    headers
}

fn status_of(msg: &Message) -> Option<String> {
    msg.headers.as_ref()?.get("Picloud-Status").map(|v| v.as_str().to_owned())
}

#[tokio::test]
async fn app_b_cannot_read_app_as_deliveries_nor_publish_to_app_as_ingest_while_app_a_can() {
    let server = TenantServer::start().await;
    let (router, a, b, mut b_errors) = server.router_a_and_b().await;

    // The router, as the relay does: its replies come to `<inbox>.<app>.<seq>`; as the ingest
    // does: a queue group on every app's ingest subjects.
    let relay_inbox = router.new_inbox();
    assert!(relay_inbox.starts_with("_INBOX."), "{relay_inbox}");
    let mut answers = router.subscribe(format!("{relay_inbox}.*.*")).await.unwrap();
    let mut ingest = router.queue_subscribe("picloud.v1.ingest.>", "picloud.ingest".into()).await.unwrap();
    round_trip(&router).await;

    // A serves its handler `h`; B tries to listen to A's deliveries and to every answer the
    // relay receives.
    let mut handler = a.queue_subscribe("picloud.v1.handle.demo.h", "picloud.demo.h".into()).await.unwrap();
    round_trip(&a).await;
    let mut snoop_deliveries = b.subscribe("picloud.v1.handle.demo.>").await.unwrap();
    let mut snoop_answers = b.subscribe("_INBOX.>").await.unwrap();
    round_trip(&b).await;

    // A delivery to A's handler reaches A, and A's answer reaches the relay.
    let mut ce = HeaderMap::new();
    ce.insert("Content-Type", "application/cloudevents+json");
    let reply_to = format!("{relay_inbox}.demo.1");
    router
        .publish_with_reply_and_headers(
            "picloud.v1.handle.demo.h",
            reply_to.clone(),
            ce,
            Bytes::from_static(br#"{"specversion":"1.0","id":"d-1","picloudapp":"demo"}"#),
        )
        .await
        .unwrap();
    let delivery = next(&mut handler, "A's delivery").await;
    assert_eq!(delivery.payload.as_ref(), br#"{"specversion":"1.0","id":"d-1","picloudapp":"demo"}"#);
    let delivery_reply = delivery.reply.clone().expect("a delivery is a request");
    assert_eq!(delivery_reply.as_str(), reply_to);

    // B forges an answer to A's delivery on the relay's reply subject: refused. Once B's round
    // trip came back, the server has handled the forgery; A's answer, sent after it, must be the
    // first (and only) message the relay gets on that subject.
    b.publish_with_headers(reply_to.clone(), status("fail"), Bytes::from_static(b"{\"forged\":true}"))
        .await
        .unwrap();
    round_trip(&b).await;
    a.publish_with_headers(delivery_reply, status("ok"), Bytes::from_static(b"{\"done\":true}"))
        .await
        .unwrap();
    let answer = next(&mut answers, "A's answer at the relay").await;
    assert_eq!(answer.subject.as_str(), reply_to);
    assert_eq!(status_of(&answer).as_deref(), Some("ok"));
    assert_eq!(answer.payload.as_ref(), b"{\"done\":true}");

    // B saw neither the delivery nor the answer: both were routed before B's last round trip
    // came back, so they would be waiting in B's subscriptions by now.
    round_trip(&b).await;
    assert!(nothing_waiting(&mut snoop_deliveries), "B read a delivery of A");
    assert!(nothing_waiting(&mut snoop_answers), "B read an answer meant for the relay");

    // B publishes to A's ingest: refused. A's own ingest request, sent after the server handled
    // B's, is the first message the router's ingest gets, and the router's reply reaches A.
    b.publish("picloud.v1.ingest.demo.kv.put", Bytes::from_static(br#"{"from":"shop"}"#)).await.unwrap();
    round_trip(&b).await;

    let request = {
        let a = a.clone();
        tokio::spawn(async move {
            let mut headers = HeaderMap::new();
            headers.insert("Authorization", "Bearer pcr_test");
            a.request_with_headers(
                "picloud.v1.ingest.demo.kv.put",
                headers,
                Bytes::from_static(br#"{"collection":"c","key":"k","value":1}"#),
            )
            .await
        })
    };
    let put = next(&mut ingest, "A's ingest request").await;
    assert_eq!(put.subject.as_str(), "picloud.v1.ingest.demo.kv.put");
    assert_eq!(put.payload.as_ref(), br#"{"collection":"c","key":"k","value":1}"#);
    let put_reply = put.reply.clone().expect("an ingest request has a reply subject");
    assert!(put_reply.starts_with("_INBOX_demo."), "A's replies come to its own inbox: {put_reply}");
    router
        .publish_with_headers(put_reply, status("ok"), Bytes::from_static(b"{\"version\":1}"))
        .await
        .unwrap();
    let reply = tokio::time::timeout(WAIT, request).await.expect("A's ingest reply").unwrap().unwrap();
    assert_eq!(status_of(&reply).as_deref(), Some("ok"));
    assert_eq!(reply.payload.as_ref(), b"{\"version\":1}");

    // B's own ingest works: the permissions confine B, they do not lock it out.
    b.publish("picloud.v1.ingest.shop.kv.put", Bytes::from_static(br#"{"from":"shop"}"#)).await.unwrap();
    let own = next(&mut ingest, "B's publish to its own ingest").await;
    assert_eq!(own.subject.as_str(), "picloud.v1.ingest.shop.kv.put");
    assert_eq!(own.payload.as_ref(), br#"{"from":"shop"}"#);

    // And the server told B each time.
    violations(
        &mut b_errors,
        &[
            ("Subscription", "picloud.v1.handle.demo.>"),
            ("Subscription", "_INBOX.>"),
            ("Publish", &reply_to),
            ("Publish", "picloud.v1.ingest.demo.kv.put"),
        ],
    )
    .await;
}

#[tokio::test]
async fn an_apps_workers_hear_their_own_cancel_notices_and_no_other_apps() {
    let server = TenantServer::start().await;
    let (router, a, b, mut b_errors) = server.router_a_and_b().await;
    let mut own = a.subscribe("picloud.v1.cancel.demo.h").await.unwrap();
    round_trip(&a).await;
    let mut snoop = b.subscribe("picloud.v1.cancel.demo.>").await.unwrap();
    round_trip(&b).await;

    let notice = Bytes::from_static(br#"{"id":"0193a7c0-0000-7000-8000-000000000001"}"#);
    router.publish("picloud.v1.cancel.demo.h", notice.clone()).await.unwrap();
    assert_eq!(next(&mut own, "A's cancel notice").await.payload, notice);
    round_trip(&b).await;
    assert!(nothing_waiting(&mut snoop), "B heard a cancel notice of A");
    violations(&mut b_errors, &[("Subscription", "picloud.v1.cancel.demo.>")]).await;
}

#[tokio::test]
async fn the_relay_as_router_user_delivers_to_a_worker_logged_in_as_its_app() {
    // `World` brings the database and the app `shop`; its own unauthenticated nats-server is
    // left unused.
    let w = World::new().await;
    w.kv_trigger("on-order", "orders:*", "process-order").await;
    let server = TenantServer::start().await;

    let (worker_client, mut worker_errors) =
        server.connect("app-shop", "PICLOUD_NATS_APP_SHOP_PASSWORD", Some("_INBOX_shop")).await;
    let (tx, mut deliveries) = mpsc::unbounded_channel();
    let (renewed_tx, mut renewed) = mpsc::unbounded_channel();
    let worker = Worker::new(worker_client, "shop")
        .handle("process-order", move |d: Delivery| {
            let _ = tx.send(d.clone());
            let renewed = renewed_tx.clone();
            async move {
                // Some work first, so that the deadline `working` asks for is a later one.
                tokio::time::sleep(Duration::from_millis(50)).await;
                // As often as it likes: no response permission runs out.
                for progress in [10, 50, 90] {
                    d.working(Some(progress)).await?;
                }
                // The relay's token for the moved deadline reaches the app's own inbox.
                let waited = tokio::time::timeout(WAIT, async {
                    while d.current_deadline_ms() == d.deadline_ms {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                });
                let _ = renewed.send(waited.await.is_ok() && d.current_token() != d.token);
                Ok(Reply::ok(json!({"processed": d.id})))
            }
        })
        .start()
        .await
        .expect("the worker subscribes and confirms with a round trip under its app's permissions");

    let (router, _) = server.connect("router", "PICLOUD_NATS_ROUTER_PASSWORD", None).await;
    let (stop, shutdown) = picloud_worker::Shutdown::new();
    let relay = picloud_dispatch::Relay::new(w.store.clone(), router, relay_config("tenancy"));
    let relay = tokio::spawn(relay.run(shutdown));

    w.put("orders:eu", "o-1", json!({"total": 3}), 0).await;
    let delivery = tokio::time::timeout(WAIT, deliveries.recv())
        .await
        .expect("timed out waiting for the delivery")
        .expect("worker gone");
    assert_eq!(delivery.attempt, 1);
    assert_eq!(delivery.event.picloudapp, "shop");
    let renewal = tokio::time::timeout(WAIT, renewed.recv()).await.expect("the handler's answer").unwrap();
    assert!(renewal, "the relay's token for the moved deadline reached the worker");
    w.drained().await;
    assert!(w.dead_letters().await.is_empty(), "the answer was accepted: {:?}", w.dead_letters().await);
    assert!(worker_errors.try_recv().is_err(), "the server refused the worker something");

    stop.send();
    relay.await.unwrap().unwrap();
    worker.shutdown().await;
}

#[tokio::test]
async fn an_answer_from_another_app_under_its_own_name_is_ignored_by_the_relay() {
    let w = World::new().await;
    w.kv_trigger("on-order", "orders", "process-order").await;
    let server = TenantServer::start().await;
    let (shop, _) = server.connect("app-shop", "PICLOUD_NATS_APP_SHOP_PASSWORD", Some("_INBOX_shop")).await;
    let (demo, mut demo_errors) =
        server.connect("app-demo", "PICLOUD_NATS_APP_DEMO_PASSWORD", Some("_INBOX_demo")).await;
    let mut handler = shop
        .queue_subscribe("picloud.v1.handle.shop.process-order", "picloud.shop.process-order".into())
        .await
        .unwrap();
    round_trip(&shop).await;
    let (router, _) = server.connect("router", "PICLOUD_NATS_ROUTER_PASSWORD", None).await;
    let (stop, shutdown) = picloud_worker::Shutdown::new();
    let relay =
        tokio::spawn(picloud_dispatch::Relay::new(w.store.clone(), router, relay_config("r")).run(shutdown));

    w.put("orders", "o-1", json!(1), 0).await;
    let delivery = next(&mut handler, "shop's delivery").await;
    let reply = delivery.reply.clone().expect("a delivery is a request").to_string();
    assert!(reply.contains(".shop."), "{reply}");
    // demo may publish where its own name stands: the server lets the forgeries through, the
    // relay must take neither. shop's replies, sent after the server handled them, are the real
    // ones.
    let mut forged_working = status("working");
    forged_working.insert("Picloud-Progress", "13");
    let forged = reply.replace(".shop.", ".demo.");
    demo.publish_with_headers(forged.clone(), forged_working, Bytes::new()).await.unwrap();
    demo.publish_with_headers(forged, status("fail"), Bytes::new()).await.unwrap();
    round_trip(&demo).await;
    assert!(demo_errors.try_recv().is_err(), "the server refused demo's publish");
    // shop's own working moves the lease; had demo's been taken, its progress would be there.
    let leased = |w: &World| {
        let pool = w.store.pool().clone();
        async move {
            sqlx::query_as::<_, (Option<time::OffsetDateTime>, Option<i16>)>(
                "SELECT leased_until, progress FROM outbox",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let (claimed, _) = leased(&w).await;
    shop.publish_with_headers(reply.clone(), status("working"), Bytes::new()).await.unwrap();
    let progress = picloud_testkit::eventually("shop's working to move the lease", || async {
        let (lease, progress) = leased(&w).await;
        (lease > claimed).then_some(progress)
    })
    .await;
    assert_eq!(progress, None, "demo's working was taken for shop's delivery");
    shop.publish_with_headers(reply, status("ok"), Bytes::from_static(b"{}")).await.unwrap();
    w.drained().await;
    assert!(w.dead_letters().await.is_empty(), "the forged fail was taken: {:?}", w.dead_letters().await);

    stop.send();
    relay.await.unwrap().unwrap();
}
