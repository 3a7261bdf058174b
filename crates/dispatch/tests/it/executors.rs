//! The built-in webhook and email executors end to end: the relay delivers to them over NATS,
//! they call a real HTTP server or a real SMTP server started by the test, and their answers end
//! the outbox rows.
//!
//! Webhook signatures are checked with the `standardwebhooks` crate (the reference Rust
//! implementation of the Standard Webhooks specification, independent of ours). The SMTP server
//! is the `mailin` crate's SMTP state machine driven over tokio TCP.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use picloud_core::{CollectionPattern, RetryOverrides, TriggerName};
use picloud_dispatch::executors::{self, ExecutorConfig, SmtpConfig};
use picloud_store::events::{self, EventContext};
use picloud_store::*;
use picloud_testkit::{CaughtMail, MailCatcher, MailOptions, RcptRefusal};
use picloud_worker::{Shutdown, ShutdownSender};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::support::*;

const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One request the webhook server received.
#[derive(Debug)]
struct Received {
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_else(|| panic!("no {name} header"))
    }

    /// Checks the signature with the reference implementation of Standard Webhooks.
    fn verify(&self) {
        standardwebhooks::Webhook::new(WEBHOOK_SECRET)
            .unwrap()
            .verify(&self.body, &self.headers)
            .expect("the signature verifies");
        assert!(
            standardwebhooks::Webhook::new("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD")
                .unwrap()
                .verify(&self.body, &self.headers)
                .is_err(),
            "another secret does not verify"
        );
    }
}

/// How the webhook server answers one request: status, headers, body.
type Script = (u16, Vec<(&'static str, &'static str)>, &'static str);

struct HookState {
    received: mpsc::UnboundedSender<Received>,
    script: Mutex<VecDeque<Script>>,
    /// A permit per answer; closed gates hold requests until the test opens them.
    gate: Semaphore,
}

/// A real HTTP server on 127.0.0.1 that records requests to any path and answers from a script
/// (then 200).
struct HookServer {
    /// Its `/hook`.
    url: String,
    port: u16,
    received: mpsc::UnboundedReceiver<Received>,
    state: Arc<HookState>,
    task: JoinHandle<()>,
}

impl HookServer {
    async fn start(script: Vec<Script>) -> HookServer {
        let (tx, received) = mpsc::unbounded_channel();
        let state = Arc::new(HookState {
            received: tx,
            script: Mutex::new(script.into()),
            gate: Semaphore::new(Semaphore::MAX_PERMITS),
        });
        let app = axum::Router::new().fallback(hook).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let url = format!("http://127.0.0.1:{port}/hook");
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        HookServer { url, port, received, state, task }
    }

    /// A server whose answers wait until [`HookServer::open`].
    async fn gated() -> HookServer {
        let server = HookServer::start(Vec::new()).await;
        server.state.gate.forget_permits(Semaphore::MAX_PERMITS);
        server
    }

    fn open(&self) {
        self.state.gate.add_permits(1);
    }

    async fn next(&mut self, what: &str) -> Received {
        tokio::time::timeout(Duration::from_secs(20), self.received.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("server gone")
    }
}

impl Drop for HookServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn hook(State(state): State<Arc<HookState>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let _ = state.received.send(Received { uri, headers, body });
    let permit = state.gate.acquire().await.unwrap();
    permit.forget();
    let (status, headers, body) =
        state.script.lock().unwrap().pop_front().unwrap_or((200, Vec::new(), "{\"received\":true}"));
    let mut response = (StatusCode::from_u16(status).unwrap(), body).into_response();
    for (name, value) in headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}

/// Starts the executors on their own connection, allowed to reach the test's servers on
/// 127.0.0.1; they are subscribed when this returns.
pub(crate) async fn start_executors(w: &World, smtp_url: Option<&str>) -> Executors {
    start_executors_allowing(w, smtp_url, "127.0.0.0/8").await
}

/// Started executors and their stop signal.
pub(crate) struct Executors {
    stop: ShutdownSender,
    running: executors::Running,
}

impl Executors {
    /// Stops the executors and waits until they have drained.
    pub(crate) async fn shutdown(self) {
        self.stop.send();
        self.running.finished().await;
    }
}

/// Starts the executors with `PICLOUD_WEBHOOK_ALLOW_NETS` set to `allow_nets`.
async fn start_executors_allowing(w: &World, smtp_url: Option<&str>, allow_nets: &str) -> Executors {
    let client = async_nats::connect(w.nats_url()).await.unwrap();
    let config = ExecutorConfig {
        smtp: smtp_url.map(|url| SmtpConfig { url: url.into(), from: "Shop <shop@example.com>".into() }),
        webhook_allow_nets: allow_nets.parse().unwrap(),
        ..ExecutorConfig::default()
    };
    let (stop, shutdown) = Shutdown::new();
    let running = executors::start(w.store.clone(), client, config, shutdown).await.unwrap();
    Executors { stop, running }
}

/// A `kv` trigger on collection `orders` whose handler is the webhook at `url`.
async fn webhook_trigger(w: &World, url: &str, retry: RetryOverrides) -> Trigger {
    let spec =
        TriggerSpec::Kv { collection: CollectionPattern::parse("orders").unwrap(), ops: vec![KvOp::Put] };
    let handler = Handler::Webhook { url: url.into(), secret: WEBHOOK_SECRET.into() };
    let new = NewTrigger::new(w.app.id, TriggerName::parse("to-hook").unwrap(), spec, handler, w.admin.id);
    w.store.create_trigger(&NewTrigger { retry, ..new }).await.unwrap()
}

#[tokio::test]
async fn a_webhook_receives_the_envelope_without_its_token_signed_the_standard_webhooks_way() {
    let w = World::new().await;
    let mut server = HookServer::start(Vec::new()).await;
    let trigger = webhook_trigger(&w, &server.url, RetryOverrides::default()).await;
    let executors = start_executors(&w, None).await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;

    w.put("orders", "o-1", json!({"total": 12}), 0).await;
    let request = server.next("the webhook request").await;

    request.verify();
    assert_eq!(request.header("content-type"), "application/json");
    let envelope = request.json();
    assert_eq!(
        request.header("webhook-id"),
        envelope["id"].as_str().unwrap(),
        "webhook-id is the delivery id"
    );
    let timestamp: i64 = request.header("webhook-timestamp").parse().unwrap();
    assert!((timestamp - time::OffsetDateTime::now_utc().unix_timestamp()).abs() < 60, "{timestamp}");
    assert!(request.header("webhook-signature").starts_with("v1,"));
    assert!(envelope.get("picloudtoken").is_none(), "the delivery token stays inside: {envelope}");
    assert_eq!(envelope["specversion"], "1.0");
    assert_eq!(envelope["type"], "picloud.kv.put");
    assert_eq!(envelope["picloudtriggerid"], trigger.id.to_string());
    assert_eq!(envelope["picloudtrigger"], "to-hook");
    assert_eq!(envelope["picloudattempt"], 1);
    assert_eq!(envelope["data"]["value"], json!({"total": 12}));
    assert!(envelope["piclouddeadline"].as_i64().is_some());
    w.drained().await;
    relay.stop().await;
    executors.shutdown().await;
}

#[tokio::test]
async fn a_2xx_answer_deletes_the_delivery_without_a_dead_letter() {
    let w = World::new().await;
    let mut server = HookServer::start(vec![(204, Vec::new(), "")]).await;
    webhook_trigger(&w, &server.url, RetryOverrides::default()).await;
    let executors = start_executors(&w, None).await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;

    w.put("orders", "o-1", json!(1), 0).await;
    server.next("the webhook request").await;
    w.drained().await;
    assert!(w.dead_letters().await.is_empty());
    assert!(server.received.try_recv().is_err(), "delivered once");
    relay.stop().await;
    executors.shutdown().await;
}

#[tokio::test]
async fn a_503_with_retry_after_is_retried_with_the_same_webhook_id_until_a_200_ends_it() {
    let w = World::new().await;
    let mut server = HookServer::start(vec![(503, vec![("Retry-After", "1")], "busy")]).await;
    webhook_trigger(&w, &server.url, RetryOverrides::default()).await;
    let executors = start_executors(&w, None).await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;

    w.put("orders", "o-1", json!(1), 0).await;
    let first = server.next("the first attempt").await;
    let second = server.next("the second attempt").await;
    first.verify();
    second.verify();
    assert_eq!(first.header("webhook-id"), second.header("webhook-id"), "one id across attempts");
    assert_eq!(
        (first.json()["picloudattempt"].as_u64(), second.json()["picloudattempt"].as_u64()),
        (Some(1), Some(2))
    );
    w.drained().await;
    assert!(w.dead_letters().await.is_empty());
    assert!(server.received.try_recv().is_err(), "no third attempt");
    relay.stop().await;
    executors.shutdown().await;
}

#[tokio::test]
async fn a_404_becomes_a_rejected_dead_letter_naming_the_status() {
    let w = World::new().await;
    let mut server = HookServer::start(vec![(404, Vec::new(), "no such hook")]).await;
    let trigger = webhook_trigger(&w, &server.url, RetryOverrides::default()).await;
    let executors = start_executors(&w, None).await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;

    w.put("orders", "o-1", json!(1), 0).await;
    server.next("the only attempt").await;
    let dead = eventually("the dead letter", || async { w.dead_letters().await.pop() }).await;
    assert_eq!(
        (dead.reason, dead.attempts, dead.trigger_id),
        (DeadLetterReason::Rejected, 1, Some(trigger.id))
    );
    let error = dead.last_error.unwrap();
    assert!(error.contains("404") && error.contains("no such hook"), "{error}");
    assert_eq!(w.outbox_len().await, 0);
    assert!(server.received.try_recv().is_err(), "no second attempt after a 404");
    relay.stop().await;
    executors.shutdown().await;
}

#[tokio::test]
async fn a_webhook_that_refuses_connections_is_retried_and_then_exhausted() {
    let w = World::new().await;
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let retry = RetryOverrides { max_attempts: Some(2), ..RetryOverrides::default() };
    webhook_trigger(&w, &format!("http://127.0.0.1:{port}/hook"), retry).await;
    let executors = start_executors(&w, None).await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;

    w.put("orders", "o-1", json!(1), 0).await;
    let dead = eventually("the dead letter", || async { w.dead_letters().await.pop() }).await;
    assert_eq!((dead.reason, dead.attempts), (DeadLetterReason::Exhausted, 2));
    let error = dead.last_error.unwrap();
    assert!(error.contains("connect"), "{error}");
    assert_eq!(w.outbox_len().await, 0);
    relay.stop().await;
    executors.shutdown().await;
}

#[tokio::test]
async fn a_webhook_whose_name_resolves_to_loopback_is_refused_with_an_error_that_hides_path_and_query() {
    let w = World::new().await;
    let mut server = HookServer::start(Vec::new()).await;
    let url = format!("http://localhost:{}/secret-path?token=x", server.port);
    let trigger = webhook_trigger(&w, &url, RetryOverrides::default()).await;
    let executors = start_executors_allowing(&w, None, "").await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;

    w.put("orders", "o-1", json!(1), 0).await;
    let dead = eventually("the dead letter", || async { w.dead_letters().await.pop() }).await;
    assert_eq!(
        (dead.reason, dead.attempts, dead.trigger_id),
        (DeadLetterReason::Rejected, 1, Some(trigger.id))
    );
    let error = dead.last_error.unwrap();
    assert!(error.starts_with("webhook_target_refused: host localhost: 127.0.0.1 is a loopback"), "{error}");
    assert!(!error.contains("secret-path") && !error.contains("token=x"), "{error}");
    assert_eq!(w.outbox_len().await, 0);
    relay.stop().await;
    executors.shutdown().await;
    assert!(server.received.try_recv().is_err(), "the receiver got nothing");
}

#[tokio::test]
async fn a_webhook_whose_name_resolves_to_an_allowed_net_is_delivered() {
    let w = World::new().await;
    let mut server = HookServer::start(Vec::new()).await;
    let url = format!("http://localhost:{}/secret-path?token=x", server.port);
    webhook_trigger(&w, &url, RetryOverrides::default()).await;
    let executors = start_executors_allowing(&w, None, "127.0.0.0/8,::1/128").await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;

    w.put("orders", "o-1", json!(1), 0).await;
    let request = server.next("the webhook request").await;
    assert_eq!(request.uri, "/secret-path?token=x");
    request.verify();
    w.drained().await;
    assert!(w.dead_letters().await.is_empty());
    relay.stop().await;
    executors.shutdown().await;
}

/// A delivery envelope as the relay would send it for `trigger`.
fn envelope(trigger: &Trigger, deadline_in: Duration) -> Vec<u8> {
    let deadline = (time::OffsetDateTime::now_utc() + deadline_in).unix_timestamp_nanos() / 1_000_000;
    serde_json::to_vec(&json!({
        "specversion": "1.0", "id": Uuid::now_v7(), "type": "picloud.kv.put",
        "source": "/apps/shop/kv/orders", "subject": "o-1", "time": "2026-11-28T10:00:00.123Z",
        "datacontenttype": "application/json", "data": {"key": "o-1"},
        "picloudattempt": 1, "picloudapp": "shop", "picloudkind": "kv",
        "picloudtrigger": trigger.name.as_str(), "picloudtriggerid": trigger.id,
        "piclouddepth": 0, "picloudprincipal": trigger.registered_by,
        "picloudtoken": "pdt_secret", "piclouddeadline": deadline as i64,
    }))
    .unwrap()
}

fn status_of(reply: &async_nats::Message) -> (String, Option<String>, Option<String>) {
    let header = |name| reply.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_owned());
    (header("Picloud-Status").unwrap_or_default(), header("Picloud-Error"), header("Picloud-Retry-After-Ms"))
}

#[tokio::test]
async fn over_nats_the_executor_answers_with_the_webhooks_json_body_or_its_retry_after() {
    let w = World::new().await;
    let mut server = HookServer::start(vec![
        (200, vec![("Content-Type", "application/json")], "{\"thanks\":1}"),
        (429, vec![("Retry-After", "3")], ""),
        (200, Vec::new(), "fine"),
        (410, Vec::new(), "gone"),
    ])
    .await;
    let trigger = webhook_trigger(&w, &server.url, RetryOverrides::default()).await;
    let executors = start_executors(&w, None).await;
    let client = async_nats::connect(w.nats_url()).await.unwrap();
    let ask =
        || client.request("picloud.v1.builtin.webhook", envelope(&trigger, Duration::from_secs(10)).into());

    let reply = ask().await.unwrap();
    assert_eq!(status_of(&reply), ("ok".into(), None, None));
    assert_eq!(&reply.payload[..], b"{\"thanks\":1}");
    assert!(server.next("the first request").await.json().get("picloudtoken").is_none());

    let reply = ask().await.unwrap();
    let (status, error, after) = status_of(&reply);
    assert_eq!((status.as_str(), after.as_deref()), ("retry", Some("3000")));
    assert!(error.unwrap().contains("429"));

    let reply = ask().await.unwrap();
    assert_eq!(status_of(&reply).0, "ok");
    assert_eq!(&reply.payload[..], b"{}", "a body that is not JSON answers {{}}");

    let reply = ask().await.unwrap();
    let (status, error, after) = status_of(&reply);
    assert_eq!((status.as_str(), after), ("fail", None));
    assert!(error.unwrap().contains("410 Gone"));
    serde_json::from_slice::<Value>(&reply.payload).expect("a JSON body");
    executors.shutdown().await;
}

#[tokio::test]
async fn a_webhook_on_a_literal_refused_address_fails_without_a_request() {
    let w = World::new().await;
    let mut server = HookServer::start(Vec::new()).await;
    let executors = start_executors_allowing(&w, None, "10.0.0.0/8").await;
    let client = async_nats::connect(w.nats_url()).await.unwrap();
    for host in ["127.0.0.1", "[::ffff:127.0.0.1]", "[::1]", "0.0.0.0"] {
        let url = format!("http://{host}:{}/secret-path?token=x", server.port);
        let trigger = webhook_trigger(&w, &url, RetryOverrides::default()).await;
        let body = envelope(&trigger, Duration::from_secs(10));
        let reply = client.request("picloud.v1.builtin.webhook", body.into()).await.unwrap();
        let (status, error, _) = status_of(&reply);
        let error = error.unwrap_or_default();
        assert_eq!(status, "fail", "{host}: {error}");
        assert!(error.starts_with("webhook_target_refused: "), "{host}: {error}");
        assert!(!error.contains("secret-path") && !error.contains("token=x"), "{error}");
        w.store.delete_trigger(w.app.id, "to-hook").await.unwrap();
    }
    executors.shutdown().await;
    assert!(server.received.try_recv().is_err(), "the receiver got nothing");
}

#[tokio::test]
async fn a_failing_webhook_error_carries_no_path_query_or_credentials() {
    let w = World::new().await;
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("http://hook-user:hunter2@127.0.0.1:{port}/secret-path?token=x");
    let trigger = webhook_trigger(&w, &url, RetryOverrides::default()).await;
    let executors = start_executors(&w, None).await;
    let client = async_nats::connect(w.nats_url()).await.unwrap();

    let reply = client
        .request("picloud.v1.builtin.webhook", envelope(&trigger, Duration::from_secs(10)).into())
        .await
        .unwrap();
    let (status, error, _) = status_of(&reply);
    let error = error.unwrap_or_default();
    assert_eq!(status, "retry", "{error}");
    assert!(error.contains("connect"), "{error}");
    for secret in ["secret-path", "token=x", "hook-user", "hunter2"] {
        assert!(!error.contains(secret), "{secret} in {error}");
    }
    executors.shutdown().await;
}

#[tokio::test]
async fn shutting_down_finishes_the_webhook_in_hand_and_then_takes_no_more() {
    let w = World::new().await;
    let mut server = HookServer::gated().await;
    let trigger = webhook_trigger(&w, &server.url, RetryOverrides::default()).await;
    let executors = start_executors(&w, None).await;
    let client = async_nats::connect(w.nats_url()).await.unwrap();
    let pending = tokio::spawn({
        let client = client.clone();
        let body = envelope(&trigger, Duration::from_secs(10));
        async move { client.request("picloud.v1.builtin.webhook", body.into()).await }
    });
    server.next("the request in hand").await;

    let stopping = tokio::spawn(executors.shutdown());
    server.open();
    let reply = tokio::time::timeout(Duration::from_secs(10), pending).await.unwrap().unwrap().unwrap();
    assert_eq!(status_of(&reply).0, "ok");
    tokio::time::timeout(Duration::from_secs(10), stopping).await.expect("shutdown finishes").unwrap();

    let after = client
        .request("picloud.v1.builtin.webhook", envelope(&trigger, Duration::from_secs(10)).into())
        .await;
    assert!(
        matches!(&after, Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders),
        "{after:?}"
    );
}

// ---- email ----

/// The next email `smtp` accepts, within 20 s.
pub(crate) async fn next_mail(smtp: &mut MailCatcher, what: &str) -> CaughtMail {
    tokio::time::timeout(Duration::from_secs(20), smtp.next())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Queues an email as `POST /v1/apps/shop/emails` would.
pub(crate) async fn send_email(w: &World, email: Value) -> Uuid {
    let cx = EventContext { app_id: w.app.id, app_slug: &w.app.slug, depth: 0, config: &w.config };
    let payload = RawValue::from_string(email.to_string()).unwrap();
    let mut tx = w.store.begin().await.unwrap();
    let id = events::send_email(&w.store, &mut tx, &cx, &payload).await.unwrap();
    events::commit_and_wake(&w.store, tx).await.unwrap();
    id
}

#[tokio::test]
async fn an_email_reaches_the_smtp_server_with_its_subject_text_html_and_recipients() {
    let w = World::new().await;
    let mut smtp = MailCatcher::start().await.unwrap();
    let executors = start_executors(&w, Some(&smtp.url())).await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;

    let id = send_email(
        &w,
        json!({
            "to": ["ann@example.com", "Bob <bob@example.com>"],
            "subject": "Your order shipped",
            "text": "It is on its way.",
            "html": "<p>It is on <b>its</b> way.</p>",
        }),
    )
    .await;
    let mail = next_mail(&mut smtp, "the email").await;
    assert_eq!(mail.from, "shop@example.com");
    assert_eq!(mail.to, ["ann@example.com", "bob@example.com"]);
    for part in [
        "Subject: Your order shipped",
        "From: Shop <shop@example.com>",
        "multipart/alternative",
        "It is on its way.",
        "<p>It is on <b>its</b> way.</p>",
    ] {
        assert!(mail.data.contains(part), "{part:?} missing from:\n{}", mail.data);
    }
    assert!(
        mail.data.contains(&format!("<{id}@example.com>")),
        "the Message-ID is the delivery id:\n{}",
        mail.data
    );
    w.drained().await;
    assert!(w.dead_letters().await.is_empty());
    relay.stop().await;
    executors.shutdown().await;
}

#[tokio::test]
async fn a_plain_email_to_one_address_is_sent_as_text() {
    let w = World::new().await;
    let mut smtp = MailCatcher::start().await.unwrap();
    let executors = start_executors(&w, Some(&smtp.url())).await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;

    send_email(&w, json!({"to": "ann@example.com", "subject": "Hi", "text": "Hello Ann"})).await;
    let mail = next_mail(&mut smtp, "the email").await;
    assert_eq!(mail.to, ["ann@example.com"]);
    assert!(mail.data.contains("Subject: Hi") && mail.data.contains("Hello Ann"), "{}", mail.data);
    assert!(mail.data.contains("text/plain") && !mail.data.contains("multipart"), "{}", mail.data);
    w.drained().await;
    relay.stop().await;
    executors.shutdown().await;
}

#[tokio::test]
async fn a_transient_smtp_failure_is_retried_and_then_sent() {
    let w = World::new().await;
    let mut smtp = MailCatcher::start_with(MailOptions {
        refuse_rcpt: vec![RcptRefusal::TryLater],
        ..MailOptions::default()
    })
    .await
    .unwrap();
    let executors = start_executors(&w, Some(&smtp.url())).await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;

    send_email(&w, json!({"to": "ann@example.com", "subject": "Hi", "text": "Hello"})).await;
    let mail = next_mail(&mut smtp, "the email, on the second attempt").await;
    assert_eq!(mail.to, ["ann@example.com"]);
    assert!(smtp.connections() >= 2, "the first connection was refused with 451");
    w.drained().await;
    assert!(w.dead_letters().await.is_empty());
    relay.stop().await;
    executors.shutdown().await;
}

#[tokio::test]
async fn a_permanent_smtp_failure_becomes_a_rejected_dead_letter() {
    let w = World::new().await;
    let mut smtp = MailCatcher::start_with(MailOptions {
        refuse_rcpt: vec![RcptRefusal::NoMailbox],
        ..MailOptions::default()
    })
    .await
    .unwrap();
    let executors = start_executors(&w, Some(&smtp.url())).await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;

    let id = send_email(&w, json!({"to": "nobody@example.com", "subject": "Hi", "text": "Hello"})).await;
    let dead = eventually("the dead letter", || async { w.dead_letters().await.pop() }).await;
    assert_eq!((dead.reason, dead.attempts, dead.delivery_id), (DeadLetterReason::Rejected, 1, id));
    assert_eq!(dead.kind, picloud_core::protocol::EventKind::Email);
    let error = dead.last_error.unwrap();
    assert!(error.contains("550"), "{error}");
    assert!(smtp.try_next().is_none(), "nothing was sent");
    assert_eq!(w.outbox_len().await, 0);
    relay.stop().await;
    executors.shutdown().await;
}

#[tokio::test]
async fn an_email_without_recipients_is_rejected_at_once_without_calling_the_smtp_server() {
    let w = World::new().await;
    let smtp = MailCatcher::start().await.unwrap();
    let executors = start_executors(&w, Some(&smtp.url())).await;
    let relay = start_relay(w.store.clone(), &w.nats_url(), relay_config("n")).await;

    send_email(&w, json!({"subject": "Hi", "text": "Hello"})).await;
    let dead = eventually("the dead letter", || async { w.dead_letters().await.pop() }).await;
    assert_eq!((dead.reason, dead.attempts), (DeadLetterReason::Rejected, 1));
    let error = dead.last_error.unwrap();
    assert!(error.contains("`to`"), "{error}");
    assert_eq!(smtp.connections(), 0);
    relay.stop().await;
    executors.shutdown().await;
}
