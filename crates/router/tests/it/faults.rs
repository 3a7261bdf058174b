//! The fault suite: a steady open-loop load of 500 events/s of mixed kinds — KV puts, pubsub
//! publishes, queue jobs, emails and sync calls, all over HTTP — through real `serve` processes
//! on a real Postgres and nats-server, delivered to a real handler (the worker SDK, in this
//! process) and a real SMTP server; while it runs, one fault per test. Afterwards every
//! acknowledged event was delivered at least once, and every event delivered twice was
//! delivered again because of the fault: it was in flight when the fault hit, or while the node
//! worked through the backlog the fault left.
//!
//! `cargo test -p picloud-router --test it faults -- --nocapture` prints one `FAULT` line per
//! scenario: the figures of docs/reliability.md, which also says what each figure means.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use picloud_core::token::{generate_api_token, hash_api_token};
use picloud_core::{CollectionPattern, HandlerName, QueueName, TriggerName};
use picloud_store::*;
use picloud_testkit::{CaughtMail, MailCatcher, NatsServer, PgOptions, PgServer, PgShutdown, TcpProxy};
use picloud_worker::{Delivery, Reply, Worker};
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::task::{JoinHandle, JoinSet};
use uuid::Uuid;

use crate::support::{Serving, Shop, nats_for_serve, shop_with_trigger};

/// The load: `RATE` events per second, one every `PERIOD`, open loop (event n is sent at
/// `n × PERIOD` whether or not earlier ones were answered), for `LOAD` at least.
const RATE: u64 = 500;
const PERIOD: Duration = Duration::from_micros(1_000_000 / RATE);
const LOAD: Duration = Duration::from_secs(15);
/// When the fault is injected, counted from the start of the load: more than a lease into it,
/// so that the events of the first seconds were delivered too early to have been in flight when
/// the fault hit, and a duplicate of one of them is never taken for one the fault explains.
const FAULT_AT: Duration = Duration::from_secs(5);
/// How long the network cut lasts, and how long the handler hangs on first attempts.
const OUTAGE: Duration = Duration::from_secs(5);
/// The load goes on past `LOAD` until an event sent after the fault is delivered, but not past
/// this: a node that has not recovered by then fails the test.
const LOAD_MAX: Duration = Duration::from_secs(60);
/// `PICLOUD_HANDLER_TIMEOUT_MS` and `PICLOUD_LEASE_MARGIN_MS` of the nodes: short, so that the
/// rows of a killed node come back within seconds.
const HANDLER_TIMEOUT_MS: u64 = 2000;
const LEASE_MARGIN_MS: u64 = 1000;
const LEASE: Duration = Duration::from_millis(HANDLER_TIMEOUT_MS + LEASE_MARGIN_MS);
/// How long every acknowledged event may take to be delivered once the load stopped.
const DRAIN: Duration = Duration::from_secs(120);
/// How long the load's client waits for an answer before counting the request as refused.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long waiting for anything else may take (a killed node's sessions to end).
const DEADLINE: Duration = Duration::from_secs(60);
/// The handler function every trigger delivers to.
const HANDLER: &str = "record";

/// The scenarios run one at a time: each must see 500 events/s of its own on a 2-core machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The kinds of events, in the load's round-robin order: event n is of kind `n % 5`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Kv,
    Pubsub,
    Queue,
    Email,
    Sync,
}

const KINDS: [Kind; 5] = [Kind::Kv, Kind::Pubsub, Kind::Queue, Kind::Email, Kind::Sync];

impl Kind {
    fn of(n: u64) -> Kind {
        KINDS[(n % KINDS.len() as u64) as usize]
    }
}

/// Whether the hanging handler hangs on event `n`: a tenth of the events of each kind.
fn hangs_on(n: u64) -> bool {
    (n / KINDS.len() as u64).is_multiple_of(10)
}

/// One time the handler (or the SMTP server) was handed an event.
#[derive(Debug, Clone)]
struct Handling {
    delivery: Uuid,
    /// The attempt (unknown for emails: the SMTP server does not see it).
    attempt: Option<u32>,
    at: Instant,
    /// The same moment on the wall clock, to compare with the database's times (leases).
    wall: SystemTime,
    /// The handler hung on it instead of answering: not a delivery.
    hung: bool,
}

/// Every handling, by event number.
type Handled = Arc<Mutex<HashMap<u64, Vec<Handling>>>>;

/// The event number the load put into a delivery's data (a KV put carries it in its value).
fn event_number(d: &Delivery) -> Option<u64> {
    let data: Value = d.data().ok()?;
    match d.event.picloudkind.as_str() {
        "kv" => data["value"]["n"].as_u64(),
        _ => data["n"].as_u64(),
    }
}

/// The event number and delivery id of an email the load sent (`Subject: event <n>`,
/// `Message-ID: <delivery id@domain>`).
fn mail_event(mail: &CaughtMail) -> Option<(u64, Uuid)> {
    let n = mail.subject.strip_prefix("event ")?.parse().ok()?;
    let id = mail.message_id.strip_prefix('<')?.split('@').next()?.parse().ok()?;
    Some((n, id))
}

fn until_unix_ms(deadline_ms: i64) -> Duration {
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as i64;
    Duration::from_millis(u64::try_from(deadline_ms - now_ms).unwrap_or(0))
}

/// A `serve` process of the test.
struct Node {
    name: &'static str,
    serving: Serving,
    /// `http://127.0.0.1:<port>`.
    base: String,
}

impl Node {
    fn log_tail(&self) -> String {
        let log = self.serving.log();
        let lines: Vec<&str> = log.lines().collect();
        format!("--- last lines of {} ---\n{}", self.name, lines[lines.len().saturating_sub(40)..].join("\n"))
    }
}

/// What every scenario runs on: a durable Postgres, a nats-server, an SMTP server, app `shop`
/// with a trigger of each kind delivering to one handler, a token, and the handler itself.
struct Rig {
    dir: tempfile::TempDir,
    /// Durable (every setting at its default): an immediate shutdown must not lose what was
    /// acknowledged, and the testkit's default commits without waiting for the WAL.
    postgres: PgServer,
    /// Straight to Postgres, for checking: its connections are tested before each use, so that
    /// the checks go on across a restart of Postgres.
    check: sqlx::PgPool,
    nats: NatsServer,
    smtp: MailCatcher,
    token: String,
    handled: Handled,
    /// While set, the handler hangs until its deadline on the first attempt of a tenth of the
    /// events.
    hanging: Arc<AtomicBool>,
    worker: picloud_worker::Running,
}

impl Rig {
    async fn start() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let postgres = PgServer::start(PgOptions { durable: true, ..PgOptions::default() }).await.unwrap();
        let store = PgStore::connect(&postgres.url("postgres"), 4).await.unwrap();
        pg::migrate(store.pool()).await.unwrap();
        let orders =
            TriggerSpec::Kv { collection: CollectionPattern::parse("orders").unwrap(), ops: vec![KvOp::Put] };
        let Shop { app, admin, .. } = shop_with_trigger(&store, "on-order", orders, HANDLER).await;
        let others = [
            ("on-news", TriggerSpec::Pubsub { topic: CollectionPattern::parse("news").unwrap() }),
            ("on-job", TriggerSpec::Queue { queue: QueueName::parse("jobs").unwrap() }),
            ("call", TriggerSpec::Http),
        ];
        for (name, spec) in others {
            let handler = Handler::Function(HandlerName::parse(HANDLER).unwrap());
            let new = NewTrigger::new(app.id, TriggerName::parse(name).unwrap(), spec, handler, admin.id);
            store.create_trigger(&new).await.unwrap();
        }
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
        let check = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .test_before_acquire(true)
            .connect(&postgres.url("postgres"))
            .await
            .unwrap();
        let nats = nats_for_serve(dir.path()).await;
        let smtp = MailCatcher::start().await.expect("start the SMTP catcher");
        let handled: Handled = Arc::default();
        let hanging = Arc::new(AtomicBool::new(false));
        let client = async_nats::connect(nats.url()).await.unwrap();
        let worker = Worker::new(client, "shop")
            .handle(HANDLER, {
                let (handled, hanging) = (handled.clone(), hanging.clone());
                move |d: Delivery| {
                    let n = event_number(&d);
                    let hang = n.is_some_and(|n| {
                        hanging.load(Ordering::SeqCst)
                            && d.attempt == 1
                            && Kind::of(n) != Kind::Sync
                            && hangs_on(n)
                    });
                    if let Some(n) = n {
                        let handling = Handling {
                            delivery: d.id,
                            attempt: Some(d.attempt),
                            at: Instant::now(),
                            wall: SystemTime::now(),
                            hung: hang,
                        };
                        handled.lock().unwrap().entry(n).or_default().push(handling);
                    }
                    let deadline_ms = d.deadline_ms;
                    async move {
                        let Some(n) = n else { return Ok(Reply::fail("not an event of the load")) };
                        if hang {
                            tokio::time::sleep(until_unix_ms(deadline_ms)).await;
                            return Ok(Reply::retry("hung until the deadline"));
                        }
                        Ok(Reply::ok(json!({ "n": n })))
                    }
                }
            })
            .start()
            .await
            .unwrap();
        Rig { dir, postgres, check, nats, smtp, token, handled, hanging, worker }
    }

    /// Starts `serve` as node `name` on `database_url` (its sessions carry its name).
    async fn serve(&self, name: &'static str, database_url: &str) -> Node {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let database_url = format!("{database_url}?application_name={name}");
        let (nats_url, timeout, margin) =
            (self.nats.url(), HANDLER_TIMEOUT_MS.to_string(), LEASE_MARGIN_MS.to_string());
        let mut serving = Serving::start(
            &dir,
            &[
                ("PICLOUD_DATABASE_URL", &database_url),
                ("PICLOUD_NATS_URL", &nats_url),
                ("PICLOUD_NODE_ID", name),
                ("PICLOUD_SMTP_URL", &self.smtp.url()),
                ("PICLOUD_HANDLER_TIMEOUT_MS", &timeout),
                ("PICLOUD_LEASE_MARGIN_MS", &margin),
                ("PICLOUD_TRIGGER_RETRY_BASE_MS", "200"),
                ("PICLOUD_TRIGGER_RETRY_MAX_MS", "2000"),
            ],
        )
        .await;
        let addr = serving.http_addr().await;
        Node { name, serving, base: format!("http://{addr}") }
    }

    /// Every handling so far, the SMTP server's included.
    fn handlings(&self) -> HashMap<u64, Vec<Handling>> {
        let mut all = self.handled.lock().unwrap().clone();
        for mail in self.smtp.caught() {
            if let Some((n, delivery)) = mail_event(&mail) {
                let handling =
                    Handling { delivery, attempt: None, at: mail.at, wall: mail.wall, hung: false };
                all.entry(n).or_default().push(handling);
            }
        }
        all
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.check).await.unwrap()
    }

    /// Keeps the load running until `LOAD` has passed and an event sent after the fault's end
    /// was delivered; stops it and waits for every answer; waits until the outbox is empty;
    /// prints the `FAULT` line; checks that no acknowledged event is lost, that every duplicate
    /// is explained by the fault, that no delivery ran out of attempts and that `nodes` (the
    /// nodes that must have survived) still run; and returns the figures.
    async fn finish(&self, load: Load, fault: Fault, nodes: &mut [Node]) -> Figures {
        let schedule = load.schedule;
        let first_after_fault = schedule.first_sent_after(fault.end);
        let recovered =
            || self.handlings().iter().any(|(&n, hs)| n >= first_after_fault && hs.iter().any(|h| !h.hung));
        while schedule.started.elapsed() < LOAD || !recovered() {
            if schedule.started.elapsed() >= LOAD_MAX {
                let logs: Vec<String> = nodes.iter().map(Node::log_tail).collect();
                panic!(
                    "{}: no event sent after the fault was delivered within {LOAD_MAX:?}\n{}",
                    fault.name,
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let load_ran = schedule.started.elapsed();
        let sent = load.stop().await;
        let acknowledged: Vec<u64> = sent.iter().filter(|s| s.answer.is_ok()).map(|s| s.n).collect();
        let undelivered = |handlings: &HashMap<u64, Vec<Handling>>| -> Vec<u64> {
            acknowledged
                .iter()
                .copied()
                .filter(|n| Kind::of(*n) != Kind::Sync)
                .filter(|n| !handlings.get(n).is_some_and(|hs| hs.iter().any(|h| !h.hung)))
                .collect()
        };
        // Every request is answered: once the outbox is empty nothing is delivered any more (a
        // row is deleted only after its delivery was handled), so what is missing then is lost.
        let drain_deadline = Instant::now() + DRAIN;
        loop {
            let outbox = self.count("SELECT count(*) FROM outbox").await;
            if outbox == 0 {
                break;
            }
            if Instant::now() >= drain_deadline {
                let missing = undelivered(&self.handlings());
                let logs: Vec<String> = nodes.iter().map(Node::log_tail).collect();
                panic!(
                    "{}: {outbox} rows left in the outbox after {DRAIN:?}, {} acknowledged events not delivered \
                     (first: {:?})\n{}",
                    fault.name,
                    missing.len(),
                    &missing[..missing.len().min(20)],
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let handlings = self.handlings();
        let caught_up = catch_up(&handlings, &sent, &schedule, &fault);
        let refusals = || sent.iter().filter_map(|s| s.answer.as_ref().err());
        let figures = Figures {
            sent: sent.len(),
            acknowledged: acknowledged.len(),
            refused_after_fault: refusals().filter(|r| r.at > fault.end).count(),
            refused: refusals().fold(BTreeMap::new(), |mut by_reason, refusal| {
                *by_reason.entry(refusal.why.clone()).or_insert(0) += 1;
                by_reason
            }),
            lost: undelivered(&handlings),
            duplicates: duplicates(&handlings, &fault, caught_up),
            recover: recovery(&handlings, &schedule, &fault),
            caught_up,
            hung: handlings.values().flatten().filter(|h| h.hung).count(),
            dead_letters: self.count("SELECT count(*) FROM dead_letters").await,
            abandoned: self.count("SELECT count(*) FROM abandoned_executions").await,
            load_ran,
        };
        figures.print(fault.name);
        for node in nodes.iter_mut() {
            let exited = node.serving.child.try_wait().unwrap();
            assert!(
                exited.is_none(),
                "{} exited ({exited:?}) after {}\n{}",
                node.name,
                fault.name,
                node.log_tail()
            );
        }
        assert!(
            figures.lost.is_empty(),
            "{}: acknowledged events lost (first: {:?})\n{}",
            fault.name,
            &figures.lost[..figures.lost.len().min(20)],
            nodes.iter().map(Node::log_tail).collect::<Vec<_>>().join("\n")
        );
        assert!(
            figures.duplicates.unexplained.is_empty(),
            "{}: duplicates not explained by the fault: {:#?}",
            fault.name,
            figures.duplicates.unexplained
        );
        assert_eq!(figures.dead_letters, 0, "{}: deliveries ran out of attempts", fault.name);
        // A fault is no bug: it is answered with a status that says try again, never a 500.
        let bugs: Vec<_> = figures.refused.keys().filter(|why| why.starts_with("500")).collect();
        assert!(bugs.is_empty(), "{}: refused as if by a bug: {bugs:?}", fault.name);
        figures
    }
}

/// One fault: when it began and ended, and whether it may deliver an event twice.
struct Fault {
    name: &'static str,
    start: Instant,
    end: Instant,
    /// Whether a delivery in flight when it hit may be delivered again: true for every fault
    /// that loses answers or completions (restarts, cuts, a killed node), false for a hanging
    /// handler (its hung attempts are not deliveries, and nothing else is disturbed).
    redelivers: bool,
}

/// One request of the load and its answer: when it was acknowledged, or refused.
struct Sent {
    n: u64,
    answer: Result<Instant, Refusal>,
}

/// A request that was not acknowledged: when its answer (or error) came, and why.
struct Refusal {
    at: Instant,
    /// `<status> <error code>`, or what the connection ran into.
    why: String,
}

/// When the load sends each event.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    started: Instant,
}

impl Schedule {
    /// Waits until `at` into the load.
    async fn reach(&self, at: Duration) {
        tokio::time::sleep_until((self.started + at).into()).await;
    }

    /// When event `n` is sent (at the earliest: a late load sends it later).
    fn scheduled(&self, n: u64) -> Instant {
        self.started + PERIOD * n as u32
    }

    /// The first event sent at or after `t`.
    fn first_sent_after(&self, t: Instant) -> u64 {
        let since = t.saturating_duration_since(self.started);
        since.as_micros().div_ceil(PERIOD.as_micros()) as u64
    }
}

/// The open-loop load, running in a task of its own.
struct Load {
    schedule: Schedule,
    stop: Arc<AtomicBool>,
    task: JoinHandle<Vec<Sent>>,
}

impl Load {
    /// Starts sending event after event, each to the next of `bases` in turn.
    fn start(bases: Vec<String>, token: String) -> Load {
        let client = reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build().unwrap();
        let schedule = Schedule { started: Instant::now() };
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut requests = JoinSet::new();
                let mut sent = Vec::new();
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    tokio::time::sleep_until(schedule.scheduled(n).into()).await;
                    let base = bases[n as usize % bases.len()].clone();
                    requests.spawn(send(client.clone(), base, token.clone(), n));
                    n += 1;
                    while let Some(done) = requests.try_join_next() {
                        sent.push(done.expect("a request task panicked"));
                    }
                }
                while let Some(done) = requests.join_next().await {
                    sent.push(done.expect("a request task panicked"));
                }
                sent.sort_by_key(|s| s.n);
                sent
            }
        });
        Load { schedule, stop, task }
    }

    /// Stops sending and returns every request with its answer, once all are answered.
    async fn stop(self) -> Vec<Sent> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

/// Sends event `n` as its kind says, and says whether it was acknowledged.
async fn send(client: reqwest::Client, base: String, token: String, n: u64) -> Sent {
    let app = format!("{base}/v1/apps/shop");
    let request = match Kind::of(n) {
        Kind::Kv => client.put(format!("{app}/kv/orders/o-{n}")).json(&json!({ "n": n })),
        Kind::Pubsub => client.post(format!("{app}/topics/news/messages")).json(&json!({ "n": n })),
        Kind::Queue => client.post(format!("{app}/queues/jobs/jobs")).json(&json!({ "payload": { "n": n } })),
        Kind::Email => client.post(format!("{app}/emails")).json(&json!({
            "to": "orders@example.com", "subject": format!("event {n}"), "text": "an event of the fault suite"
        })),
        Kind::Sync => client.post(format!("{app}/invoke/call")).json(&json!({ "n": n })),
    };
    let answer = async {
        let response = request.bearer_auth(token).send().await.map_err(|e| transport_error(&e))?;
        let status = response.status();
        // A 503 tells the client to come back: without a Retry-After it does not say when.
        let unsaid = status == reqwest::StatusCode::SERVICE_UNAVAILABLE
            && !response.headers().contains_key(reqwest::header::RETRY_AFTER);
        let body = response.bytes().await.map_err(|e| transport_error(&e))?;
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if !status.is_success() {
            let code = body["error"]["code"].as_str().unwrap_or("?");
            let unsaid = if unsaid { " without Retry-After" } else { "" };
            return Err(format!("{} {code}{unsaid}", status.as_u16()));
        }
        // A sync call is acknowledged by the handler's own answer.
        if Kind::of(n) == Kind::Sync {
            assert_eq!(body, json!({ "n": n }), "the answer of sync call {n}");
        }
        Ok(())
    };
    let answer = match answer.await {
        Ok(()) => Ok(Instant::now()),
        Err(why) => Err(Refusal { at: Instant::now(), why }),
    };
    Sent { n, answer }
}

/// What a request that got no HTTP answer ran into.
fn transport_error(e: &reqwest::Error) -> String {
    if e.is_connect() {
        "connection refused".into()
    } else if e.is_timeout() {
        "no answer in time".into()
    } else {
        "connection lost".into()
    }
}

/// Events delivered more than once, and why.
#[derive(Debug, Default)]
struct Duplicates {
    /// Deliveries beyond each event's first.
    count: usize,
    /// Of those, how many came again at the same attempt (given back without spending one: an
    /// answer lost with a NATS connection, or a claim lost in a crash), at a later attempt (a
    /// lease ran out: a completion lost or delayed, a node killed), or as an email (whose
    /// attempt the SMTP server does not see). Every one of them is a redelivery of the same
    /// delivery id whose earlier delivery was made while the fault's effects lasted: from a
    /// lease before it began (in flight when it hit) until a lease after the backlog it left
    /// was delivered (`caught_up`: a delivery made while the node worked through that backlog
    /// may wait for its completion past its lease).
    same_attempt: usize,
    later_attempt: usize,
    email: usize,
    /// The others, described: event number and its deliveries, in milliseconds from the
    /// fault's start.
    unexplained: Vec<String>,
}

fn duplicates(handlings: &HashMap<u64, Vec<Handling>>, fault: &Fault, caught_up: Duration) -> Duplicates {
    let effects_end = (fault.start + caught_up).max(fault.end) + LEASE;
    let mut found = Duplicates::default();
    for (&n, hs) in handlings {
        let mut delivered: Vec<&Handling> = hs.iter().filter(|h| !h.hung).collect();
        delivered.sort_by_key(|h| h.at);
        for pair in delivered.windows(2) {
            let (earlier, again) = (pair[0], pair[1]);
            found.count += 1;
            let during_fault = earlier.at + LEASE >= fault.start && earlier.at <= effects_end;
            if !(fault.redelivers && during_fault && earlier.delivery == again.delivery) {
                found.unexplained.push(describe(n, hs, fault));
                continue;
            }
            match (earlier.attempt, again.attempt) {
                (Some(a), Some(b)) if a == b => found.same_attempt += 1,
                (Some(_), Some(_)) => found.later_attempt += 1,
                _ => found.email += 1,
            }
        }
    }
    found
}

/// Event `n` and its handlings, timed from the fault's start.
fn describe(n: u64, hs: &[Handling], fault: &Fault) -> String {
    let ms = |at: Instant| match at.checked_duration_since(fault.start) {
        Some(after) => format!("+{}ms", after.as_millis()),
        None => format!("-{}ms", fault.start.duration_since(at).as_millis()),
    };
    let hs: Vec<String> = hs
        .iter()
        .map(|h| {
            format!(
                "{} attempt {:?} at {}{}",
                h.delivery,
                h.attempt,
                ms(h.at),
                if h.hung { " (hung)" } else { "" }
            )
        })
        .collect();
    format!("event {n} ({:?}; the fault ended at {}): {}", Kind::of(n), ms(fault.end), hs.join(", "))
}

/// From the fault's start to the first delivery of an event sent after it began.
fn recovery(handlings: &HashMap<u64, Vec<Handling>>, schedule: &Schedule, fault: &Fault) -> Duration {
    let first = schedule.first_sent_after(fault.start);
    handlings
        .iter()
        .filter(|&(&n, _)| n >= first)
        .flat_map(|(_, hs)| hs.iter().filter(|h| !h.hung))
        .map(|h| h.at.saturating_duration_since(fault.start))
        .min()
        .unwrap_or_default()
}

/// From the fault's start until every event acknowledged and sent before the fault ended had
/// been delivered (the backlog the fault left behind is gone).
fn catch_up(
    handlings: &HashMap<u64, Vec<Handling>>,
    sent: &[Sent],
    schedule: &Schedule,
    fault: &Fault,
) -> Duration {
    sent.iter()
        .filter(|s| s.answer.is_ok() && Kind::of(s.n) != Kind::Sync && schedule.scheduled(s.n) < fault.end)
        .filter_map(|s| handlings.get(&s.n)?.iter().filter(|h| !h.hung).map(|h| h.at).min())
        .map(|at| at.saturating_duration_since(fault.start))
        .max()
        .unwrap_or_default()
}

/// What a scenario measured.
#[derive(Debug)]
struct Figures {
    sent: usize,
    acknowledged: usize,
    /// Refused requests by reason (`<status> <error code>`, or what the connection ran into).
    refused: BTreeMap<String, usize>,
    /// Refusals answered after the fault ended (e.g. a pooled connection that broke while idle
    /// fails the statement that next uses it).
    refused_after_fault: usize,
    /// Acknowledged events never delivered.
    lost: Vec<u64>,
    duplicates: Duplicates,
    recover: Duration,
    caught_up: Duration,
    /// Attempts the handler hung on.
    hung: usize,
    dead_letters: i64,
    /// Sync results whose caller was gone (DESIGN §8).
    abandoned: i64,
    /// How long the load ran.
    load_ran: Duration,
}

impl Figures {
    /// Writes that met a Postgres restart were refused with `503 database_unavailable`, and
    /// every refusal was a 503 with a `Retry-After` (requests that piled up behind the outage may
    /// also be shed as `overloaded`).
    fn refused_only_while_the_database_was_unavailable(&self) {
        assert!(
            self.refused.contains_key("503 database_unavailable"),
            "no write met the restart: {:?}",
            self.refused
        );
        assert!(
            self.refused.keys().all(|why| why.starts_with("503 ") && !why.ends_with("without Retry-After")),
            "refused otherwise: {:?}",
            self.refused
        );
    }

    fn print(&self, scenario: &str) {
        let refused: usize = self.refused.values().sum();
        let reasons: Vec<String> = self.refused.iter().map(|(why, n)| format!("{why}: {n}")).collect();
        eprintln!(
            "FAULT {scenario} sent={} acknowledged={} refused={refused} lost={} duplicates={} \
             (same_attempt={} later_attempt={} email={}) recover_ms={} caught_up_ms={} hung={} dead_letters={} \
             abandoned={} load_s={:.1} refused_by=[{}] refused_after_fault={}",
            self.sent,
            self.acknowledged,
            self.lost.len(),
            self.duplicates.count,
            self.duplicates.same_attempt,
            self.duplicates.later_attempt,
            self.duplicates.email,
            self.recover.as_millis(),
            self.caught_up.as_millis(),
            self.hung,
            self.dead_letters,
            self.abandoned,
            self.load_ran.as_secs_f64(),
            reasons.join(", "),
            self.refused_after_fault,
        );
    }
}

#[tokio::test]
async fn postgres_restarted_fast_under_load_loses_no_acknowledged_event() {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::start().await;
    let mut node = rig.serve("node-a", &rig.postgres.url("postgres")).await;
    let load = Load::start(vec![node.base.clone()], rig.token.clone());

    load.schedule.reach(FAULT_AT).await;
    let start = Instant::now();
    rig.postgres.restart(PgShutdown::Fast).await.unwrap();
    let fault = Fault { name: "postgres-restarted-fast", start, end: Instant::now(), redelivers: true };

    let figures = rig.finish(load, fault, std::slice::from_mut(&mut node)).await;
    figures.refused_only_while_the_database_was_unavailable();
    rig.worker.shutdown().await;
}

#[tokio::test]
async fn postgres_restarted_immediate_under_load_loses_no_acknowledged_event() {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::start().await;
    let mut node = rig.serve("node-a", &rig.postgres.url("postgres")).await;
    let load = Load::start(vec![node.base.clone()], rig.token.clone());

    load.schedule.reach(FAULT_AT).await;
    let start = Instant::now();
    rig.postgres.restart(PgShutdown::Immediate).await.unwrap();
    let fault = Fault { name: "postgres-restarted-immediate", start, end: Instant::now(), redelivers: true };

    let figures = rig.finish(load, fault, std::slice::from_mut(&mut node)).await;
    figures.refused_only_while_the_database_was_unavailable();
    rig.worker.shutdown().await;
}

#[tokio::test]
async fn nats_server_restarted_under_load_loses_no_acknowledged_event() {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::start().await;
    let mut node = rig.serve("node-a", &rig.postgres.url("postgres")).await;
    let load = Load::start(vec![node.base.clone()], rig.token.clone());

    load.schedule.reach(FAULT_AT).await;
    let start = Instant::now();
    rig.nats.restart().await.unwrap();
    let fault = Fault { name: "nats-server-restarted", start, end: Instant::now(), redelivers: true };

    rig.finish(load, fault, std::slice::from_mut(&mut node)).await;
    rig.worker.shutdown().await;
}

/// The sessions of node `name` in Postgres.
async fn sessions_of(check: &sqlx::PgPool, name: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
        .bind(name)
        .fetch_one(check)
        .await
        .unwrap()
}

/// The rows node `name` holds a lease on, with the lease's end.
/// The rows `name` holds leases on: id, lease end, and whether it is a sync call.
async fn leases_of(check: &sqlx::PgPool, name: &str) -> Vec<(Uuid, OffsetDateTime, bool)> {
    sqlx::query_as(
        "SELECT id, leased_until, reply_to IS NOT NULL FROM outbox WHERE leased_by = $1 AND leased_until > now()",
    )
        .bind(name)
        .fetch_all(check)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_router_node_killed_with_kill_9_loses_no_acknowledged_event_and_its_rows_wait_for_their_lease() {
    let _serial = SERIAL.lock().await;
    let rig = Rig::start().await;
    let mut killed = rig.serve("node-a", &rig.postgres.url("postgres")).await;
    let mut survivor = rig.serve("node-b", &rig.postgres.url("postgres")).await;
    let load = Load::start(vec![killed.base.clone(), survivor.base.clone()], rig.token.clone());

    load.schedule.reach(FAULT_AT).await;
    // A fast handler answers within a millisecond, and the node's completions may all commit
    // between seeing a lease and the kill: the kill waits until the node holds a row the handler
    // hangs on, which it holds until the handler's deadline.
    rig.hanging.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let hung: HashSet<Uuid> =
            rig.handlings().into_values().flatten().filter(|h| h.hung).map(|h| h.delivery).collect();
        if leases_of(&rig.check, killed.name).await.iter().any(|(id, _, _)| hung.contains(id)) {
            break;
        }
        assert!(Instant::now() < deadline, "the node to kill never held a row its handler hung on");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let start = Instant::now();
    killed.serving.child.kill().unwrap();
    killed.serving.child.wait().unwrap();
    rig.hanging.store(false, Ordering::SeqCst);
    let fault = Fault { name: "router-node-killed", start, end: Instant::now(), redelivers: true };
    // A COMMIT the node sent just before it died still lands: read its leases once Postgres
    // has ended its sessions.
    let deadline = Instant::now() + DEADLINE;
    while sessions_of(&rig.check, killed.name).await > 0 {
        assert!(Instant::now() < deadline, "the killed node's sessions never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held = leases_of(&rig.check, killed.name).await;
    eprintln!("FAULT {} held={} (rows leased by the killed node)", fault.name, held.len());

    rig.finish(load, fault, std::slice::from_mut(&mut survivor)).await;
    assert!(!held.is_empty(), "the killed node held no lease: the fault hit nothing");
    let handlings: Vec<Handling> = rig.handlings().into_values().flatten().collect();
    let tolerance = time::Duration::milliseconds(50);
    for (id, leased_until, sync) in &held {
        let again =
            handlings.iter().filter(|h| h.delivery == *id && !h.hung).map(|h| OffsetDateTime::from(h.wall));
        if *sync {
            // A sync call's caller died with the node: the call is recorded abandoned, never
            // run again.
            assert!(
                again.clone().all(|at| at + tolerance < *leased_until),
                "sync call {id} was run again after its lease: {:?}",
                again.collect::<Vec<_>>()
            );
            let reason: Option<String> =
                sqlx::query_scalar("SELECT reason FROM abandoned_executions WHERE outbox_id = $1")
                    .bind(id)
                    .fetch_optional(&rig.check)
                    .await
                    .unwrap();
            assert_eq!(reason.as_deref(), Some("lease_expired"), "sync call {id}");
            continue;
        }
        assert!(
            again.clone().any(|at| at + tolerance >= *leased_until),
            "{id}, leased by the killed node until {leased_until}, was delivered only at {:?}",
            again.collect::<Vec<_>>()
        );
    }
    rig.worker.shutdown().await;
}

#[tokio::test]
async fn a_handler_that_hangs_until_its_deadline_for_a_tenth_of_the_events_loses_none_of_them() {
    let _serial = SERIAL.lock().await;
    let rig = Rig::start().await;
    let mut node = rig.serve("node-a", &rig.postgres.url("postgres")).await;
    let load = Load::start(vec![node.base.clone()], rig.token.clone());

    load.schedule.reach(FAULT_AT).await;
    let start = Instant::now();
    rig.hanging.store(true, Ordering::SeqCst);
    // The length of the fault is part of the workload, like the load's pacing.
    load.schedule.reach(FAULT_AT + OUTAGE).await;
    rig.hanging.store(false, Ordering::SeqCst);
    let fault = Fault { name: "handler-hangs", start, end: Instant::now(), redelivers: false };

    let figures = rig.finish(load, fault, std::slice::from_mut(&mut node)).await;
    assert!(figures.hung > 0, "the handler never hung: the fault hit nothing");
    // Every event hung on was retried and then delivered (`finish` saw each delivered).
    for (n, hs) in rig.handlings() {
        if hs.iter().any(|h| h.hung) {
            assert!(
                hs.iter().any(|h| !h.hung && h.attempt.is_some_and(|a| a >= 2)),
                "event {n} was hung on and never delivered at a later attempt: {hs:?}"
            );
        }
    }
    rig.worker.shutdown().await;
}

#[tokio::test]
async fn the_network_between_router_and_postgres_cut_for_5_s_under_load_loses_no_acknowledged_event() {
    let _serial = SERIAL.lock().await;
    let rig = Rig::start().await;
    let proxy = TcpProxy::start(([127, 0, 0, 1], rig.postgres.port()).into()).await.unwrap();
    let through_proxy = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port());
    let mut node = rig.serve("node-a", &through_proxy).await;
    let load = Load::start(vec![node.base.clone()], rig.token.clone());

    load.schedule.reach(FAULT_AT).await;
    let start = Instant::now();
    proxy.cut().await;
    // The length of the fault is part of the workload, like the load's pacing.
    load.schedule.reach(FAULT_AT + OUTAGE).await;
    proxy.restore();
    let fault = Fault { name: "postgres-network-cut-5s", start, end: Instant::now(), redelivers: true };

    rig.finish(load, fault, std::slice::from_mut(&mut node)).await;
    rig.worker.shutdown().await;
}
