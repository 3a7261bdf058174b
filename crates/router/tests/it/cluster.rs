//! The shipped three-node NATS cluster (`nats/cluster-{1,2,3}.conf` with `nats/tenants.conf`)
//! under real processes — what `compose.yaml` runs, without Docker: two `picloud-router serve`
//! nodes and an app's worker deliver 20,000 events while one router is killed with SIGKILL and
//! one NATS node dies, and every event still reaches the worker; and its routes refuse a server
//! that does not log in.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use picloud_core::TriggerConfig;
use picloud_core::names::QueueName;
use picloud_store::events::{self, Enqueued, EventContext, Job};
use picloud_store::*;
use picloud_testkit::{NatsCluster, NatsNodePorts, TestDatabase};
use picloud_worker::{Delivery, Reply, Worker};
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use uuid::Uuid;

use crate::support::{Shop, shop_with_trigger};

/// Events written, all for one queue trigger.
const EVENTS: usize = 20_000;
/// Events per writing transaction, and transactions writing at once.
const WRITE_BATCH: usize = 500;
const WRITERS: usize = 4;
/// `PICLOUD_RELAY_BATCH` and `PICLOUD_RELAY_MAX_IN_FLIGHT` of both routers: a relay holds
/// leases on at most `MAX_IN_FLIGHT` rows (claimed and not yet completed).
const RELAY_BATCH: usize = 100;
const MAX_IN_FLIGHT: usize = 500;
/// `PICLOUD_HANDLER_TIMEOUT_MS` and `PICLOUD_LEASE_MARGIN_MS`: the killed router's rows are
/// claimed again 3 s after its last claim.
const HANDLER_TIMEOUT_MS: u64 = 2000;
const LEASE_MARGIN_MS: u64 = 1000;
/// How long any phase may take on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(120);

fn nats_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../nats")
}

fn password(passwords: &BTreeMap<String, String>, variable: &str) -> String {
    passwords.get(variable).unwrap_or_else(|| panic!("{variable} has no password")).clone()
}

/// The passwords of the shipped configs, as an operator sets them: the users of
/// `tenants.conf` and the routes' (`PICLOUD_NATS_ROUTE_PASSWORD`), none of them nats/dev.env's
/// (which `serve` refuses).
fn operator_passwords() -> BTreeMap<String, String> {
    picloud_testkit::nats_dev_env()
        .into_keys()
        .chain(["PICLOUD_NATS_ROUTE_PASSWORD".to_owned()])
        .map(|variable| {
            let password = format!("{}-{}", variable.to_lowercase(), Uuid::now_v7().simple());
            (variable, password)
        })
        .collect()
}

/// `nats/cluster-<node + 1>.conf` with its ports moved to free loopback ports: the client
/// `port`, the monitoring `http_port`, the cluster `listen` (onto 127.0.0.1 instead of every
/// interface) and each route `$PICLOUD_NATS_ROUTE_NATS_<m>` (onto node m's cluster port, as the
/// URL compose builds: `nats-route://route:<route_password>@…`); a `store_dir` (there is none
/// today) would move into `dir`. Everything else — server and cluster names, the cluster's
/// authorization, `include "tenants.conf"` with its users and permissions — stays as shipped.
/// Panics when a line it rewrites is missing or unexpected, so that the test cannot quietly run
/// something other than the shipped files.
fn rewrite_cluster_config(
    text: &str,
    node: usize,
    ports: &[NatsNodePorts],
    route_password: &str,
    dir: &Path,
) -> String {
    let me = ports[node];
    let (mut client, mut monitoring, mut listen, mut routes) = (0, 0, 0, Vec::new());
    let mut out = String::new();
    for line in text.lines() {
        let body = line.trim_start();
        let indent = &line[..line.len() - body.len()];
        let rewritten = if body.starts_with("port:") {
            client += 1;
            format!("{indent}port: {}", me.client)
        } else if body.starts_with("http_port:") {
            monitoring += 1;
            format!("{indent}http_port: {}", me.monitoring)
        } else if body.starts_with("listen:") {
            listen += 1;
            assert!(body.ends_with(":6222"), "cluster-{}.conf: unexpected `{body}`", node + 1);
            format!("{indent}listen: 127.0.0.1:{}", me.cluster)
        } else if let Some(route) = body.strip_prefix("$PICLOUD_NATS_ROUTE_NATS_") {
            let m: usize = route
                .parse()
                .unwrap_or_else(|_| panic!("cluster-{}.conf: unexpected route `{body}`", node + 1));
            routes.push(m - 1);
            format!("{indent}\"nats-route://route:{route_password}@127.0.0.1:{}\"", ports[m - 1].cluster)
        } else if body.starts_with("store_dir") {
            format!("{indent}store_dir: {:?}", dir.join(format!("store-{}", node + 1)))
        } else {
            line.to_owned()
        };
        out.push_str(&rewritten);
        out.push('\n');
    }
    let file = format!("cluster-{}.conf", node + 1);
    assert_eq!((client, monitoring, listen), (1, 1, 1), "{file}: one port, http_port and listen each");
    routes.sort_unstable();
    let others: Vec<usize> = (0..ports.len()).filter(|&m| m != node).collect();
    assert_eq!(routes, others, "{file} routes to every other node");
    assert!(out.contains("include \"tenants.conf\""), "{file} includes tenants.conf");
    out
}

/// Starts the three nodes from the rewritten `cluster-*.conf` files (and `tenants.conf` as it
/// is, next to them in `dir`), with the passwords in the servers' environment as compose gives
/// them; returns the nodes' ports too.
async fn start_cluster(
    dir: &Path,
    passwords: &BTreeMap<String, String>,
) -> (NatsCluster, Vec<NatsNodePorts>) {
    std::fs::copy(nats_dir().join("tenants.conf"), dir.join("tenants.conf")).unwrap();
    let env: Vec<(&str, &str)> = passwords.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let route_password = password(passwords, "PICLOUD_NATS_ROUTE_PASSWORD");
    let mut booted = Vec::new();
    let cluster = NatsCluster::start_with_configs(3, &env, |node, ports| {
        booted = ports.to_vec();
        let file = format!("cluster-{}.conf", node + 1);
        let shipped = std::fs::read_to_string(nats_dir().join(&file))?;
        let path = dir.join(&file);
        std::fs::write(&path, rewrite_cluster_config(&shipped, node, ports, &route_password, dir))?;
        Ok(path)
    })
    .await
    .expect("the shipped cluster configs start and route to each other");
    (cluster, booted)
}

/// A `picloud-router serve` process with its stderr in a log file; killed when dropped and
/// when the test process dies.
struct Router {
    node_id: &'static str,
    child: Child,
    log: PathBuf,
}

impl Router {
    async fn serve(
        node_id: &'static str,
        database_url: &str,
        nats_urls: &str,
        password: &str,
        dir: &Path,
    ) -> Router {
        let log = dir.join(format!("{node_id}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_picloud-router"));
        cmd.arg("serve");
        // Only what this test sets: no PICLOUD_* of the environment the tests run in.
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("PICLOUD_")) {
            cmd.env_remove(k);
        }
        // Its database sessions carry its name, so that the test can see when they are gone.
        let separator = if database_url.contains('?') { '&' } else { '?' };
        cmd.env("PICLOUD_DATABASE_URL", format!("{database_url}{separator}application_name={node_id}"))
            .env("PICLOUD_NATS_URL", nats_urls)
            .env("PICLOUD_NATS_USER", "router")
            .env("PICLOUD_NATS_PASSWORD", password)
            .env("PICLOUD_TOKEN_SECRET", "cluster-test-secret-0123456789")
            .env("PICLOUD_HTTP_ADDR", "127.0.0.1:0")
            .env("PICLOUD_NODE_ID", node_id)
            .env("PICLOUD_HANDLER_TIMEOUT_MS", HANDLER_TIMEOUT_MS.to_string())
            .env("PICLOUD_LEASE_MARGIN_MS", LEASE_MARGIN_MS.to_string())
            .env("PICLOUD_TRIGGER_RETRY_BASE_MS", "200")
            .env("PICLOUD_TRIGGER_RETRY_MAX_MS", "2000")
            .env("PICLOUD_RELAY_BATCH", RELAY_BATCH.to_string())
            .env("PICLOUD_RELAY_MAX_IN_FLIGHT", MAX_IN_FLIGHT.to_string())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        // Tied to this process: a test killed midway leaves no router running.
        let child = picloud_testkit::spawn_tied(cmd).await.expect("start picloud-router serve");
        Router { node_id, child, log }
    }

    /// `kill -9`, and reap it.
    fn kill_9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// The last lines of its log, for failure messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- last lines of {} ---\n{}",
            self.node_id,
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 50 ms until it holds; past `DEADLINE` panics with `state()` and the
/// routers' logs.
async fn wait_for(
    what: &str,
    routers: &[&Router],
    mut state: impl FnMut() -> String,
    mut check: impl AsyncFnMut() -> bool,
) {
    let deadline = Instant::now() + DEADLINE;
    while !check().await {
        if Instant::now() >= deadline {
            let logs: Vec<String> = routers.iter().map(|r| r.log_tail()).collect();
            panic!("timed out waiting for {what}; {}\n{}", state(), logs.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The JSON body of `GET http://127.0.0.1:<port><path>` (nats-server's monitoring endpoint).
async fn monitoring_json(port: u16, path: &str) -> Option<serde_json::Value> {
    let fetch = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        let (_, body) = response.split_once("\r\n\r\n")?;
        serde_json::from_str(body).ok()
    };
    tokio::time::timeout(Duration::from_secs(5), fetch).await.ok()?
}

/// The node whose `/connz` lists a client connection named `name`.
async fn node_serving(cluster: &mut NatsCluster, name: &str) -> Option<usize> {
    for i in 0..3 {
        // A stopped node does not answer: look at the others.
        let Some(port) = cluster.node(i).monitoring_port() else { continue };
        let Some(connz) = monitoring_json(port, "/connz").await else { continue };
        let connections = connz["connections"].as_array().map(Vec::as_slice).unwrap_or_default();
        if connections.iter().any(|c| c["name"] == name) {
            return Some(i);
        }
    }
    None
}

/// Writes the events as a Rust app sharing the database does: queue jobs through
/// `picloud_store::events`, `WRITE_BATCH` per transaction, `WRITERS` transactions at a time.
/// Returns their delivery ids.
async fn write_events(store: &PgStore, app: &App) -> Vec<Uuid> {
    let config = TriggerConfig::default();
    let cx = EventContext { app_id: app.id, app_slug: &app.slug, depth: 0, config: &config };
    let queue = QueueName::parse("jobs").unwrap();
    let writer = async |first: usize| {
        let mut ids = Vec::new();
        for batch in (first..EVENTS / WRITE_BATCH).step_by(WRITERS) {
            let mut tx = store.begin().await.unwrap();
            for i in 0..WRITE_BATCH {
                let payload =
                    RawValue::from_string(format!("{{\"n\":{}}}", batch * WRITE_BATCH + i)).unwrap();
                let job = Job {
                    payload: &payload,
                    delay: Duration::ZERO,
                    idempotency_key: None,
                    ordering_key: None,
                };
                match events::enqueue(store, &mut tx, &cx, &queue, job).await.unwrap() {
                    Enqueued::Created(id) => ids.push(id),
                    other => panic!("enqueue wrote no delivery: {other:?}"),
                }
            }
            events::commit_and_wake(store, tx).await.unwrap();
        }
        ids
    };
    futures::future::join_all((0..WRITERS).map(writer)).await.concat()
}

/// The database sessions of the router `node` (its `application_name`).
async fn sessions_of(store: &PgStore, node: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
        .bind(node)
        .fetch_one(store.pool())
        .await
        .unwrap()
}

async fn outbox_len(store: &PgStore) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(store.pool()).await.unwrap()
}

/// The rows whose lease `node` holds.
async fn leases_of(store: &PgStore, node: &str) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT id FROM outbox WHERE leased_by = $1 AND leased_until > now()")
        .bind(node)
        .fetch_all(store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn every_event_survives_a_router_killed_and_a_nats_node_lost_on_the_shipped_cluster_configs() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let passwords = operator_passwords();
    let db = TestDatabase::create().await.unwrap();
    let migrate = Command::new(env!("CARGO_BIN_EXE_picloud-router"))
        .arg("migrate")
        .env("PICLOUD_DATABASE_URL", db.url())
        .output()
        .unwrap();
    assert!(migrate.status.success(), "migrate: {}", String::from_utf8_lossy(&migrate.stderr));
    let store = PgStore::connect(db.url(), WRITERS as u32 + 2).await.unwrap();
    let jobs = TriggerSpec::Queue { queue: QueueName::parse("jobs").unwrap() };
    let Shop { app, .. } = shop_with_trigger(&store, "on-job", jobs, "process").await;

    let (mut cluster, _) = start_cluster(dir.path(), &passwords).await;
    let seeds = cluster.urls();
    let seeds: Vec<&str> = seeds.iter().map(String::as_str).collect();

    // The app's worker, logged in as `app-shop` with its own inbox prefix (nats/README.md),
    // recording the attempt of each delivery it handles, by id: an id handled twice is a
    // duplicate.
    let handled: Arc<Mutex<HashMap<Uuid, Vec<u32>>>> = Arc::default();
    let distinct = Arc::new(AtomicUsize::new(0));
    let worker_client = async_nats::ConnectOptions::with_user_and_password(
        "app-shop".into(),
        password(&passwords, "PICLOUD_NATS_APP_SHOP_PASSWORD"),
    )
    .custom_inbox_prefix("_INBOX_shop")
    .name("cluster test worker")
    .connect(seeds.as_slice())
    .await
    .expect("the worker logs in as app-shop");
    let worker_node = worker_client.server_info().server_name;
    let worker = Worker::new(worker_client, "shop")
        .handle("process", {
            let (handled, distinct) = (handled.clone(), distinct.clone());
            move |d: Delivery| {
                let mut handled = handled.lock().unwrap();
                let attempts = handled.entry(d.id).or_default();
                attempts.push(d.attempt);
                if attempts.len() == 1 {
                    distinct.fetch_add(1, Ordering::SeqCst);
                }
                async { Ok(Reply::ok(serde_json::json!({}))) }
            }
        })
        .start()
        .await
        .expect("the worker subscribes under app-shop's permissions");

    // The events, written before the routers start: with a backlog, both relays hold leases on
    // up to MAX_IN_FLIGHT rows each all along, so router-a dies with work in hand.
    let writing = Instant::now();
    let ids = write_events(&store, &app).await;
    let (set_up_in, written_in) = (writing - started, writing.elapsed());

    let router_password = password(&passwords, "PICLOUD_NATS_ROUTER_PASSWORD");
    let delivering = Instant::now();
    let mut router_a =
        Router::serve("router-a", db.url(), &cluster.url_list(), &router_password, dir.path()).await;
    let mut router_b =
        Router::serve("router-b", db.url(), &cluster.url_list(), &router_password, dir.path()).await;
    let progress = || format!("{} of {EVENTS} ids handled", distinct.load(Ordering::SeqCst));

    // Midway: a quarter of the events handled, with router-a holding leases.
    wait_for(
        "a quarter of the events handled with router-a holding leases",
        &[&router_a, &router_b],
        progress,
        async || {
            distinct.load(Ordering::SeqCst) >= EVENTS / 4 && !leases_of(&store, "router-a").await.is_empty()
        },
    )
    .await;
    let killed_at = distinct.load(Ordering::SeqCst);
    router_a.kill_9();
    // A COMMIT router-a sent just before it died still lands (its last completions): read
    // what it held once Postgres has ended its sessions.
    wait_for("router-a's database sessions to end", &[&router_b], String::new, async || {
        sessions_of(&store, "router-a").await == 0
    })
    .await;
    let held_by_a = leases_of(&store, "router-a").await;

    // The NATS node that router-b (the survivor) is connected to: the choice that hurts most —
    // the only router left loses its connection with requests in flight and must fail over to
    // another seed of PICLOUD_NATS_URL and resubscribe its reply inbox, while router-a's rows
    // wait for their leases. (Which node that is varies, as async-nats shuffles the seeds; the
    // rule picking it does not.)
    let mut b_node = None;
    wait_for(
        "router-b's connection in /connz",
        &[&router_b],
        || "not found on any node".into(),
        async || {
            b_node = node_serving(&mut cluster, "picloud-router router-b").await;
            b_node.is_some()
        },
    )
    .await;
    let b_node = b_node.expect("found above");
    cluster.node(b_node).stop().await.unwrap();
    let lost_node_at = distinct.load(Ordering::SeqCst);

    wait_for("every event handled and the outbox empty", &[&router_b], progress, async || {
        distinct.load(Ordering::SeqCst) >= EVENTS && outbox_len(&store).await == 0
    })
    .await;

    let handled = handled.lock().unwrap().clone();
    let missing = ids.iter().filter(|id| !handled.contains_key(id)).count();
    assert_eq!(missing, 0, "events never handled");
    assert_eq!(handled.len(), EVENTS, "the worker saw only the events written");
    let dead: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dead_letters").fetch_one(store.pool()).await.unwrap();
    assert_eq!(dead, 0, "no dead letters\n{}", router_b.log_tail());
    assert!(router_b.is_running(), "router-b survived\n{}", router_b.log_tail());
    // router-a's rows waited for their leases and router-b claimed them again (attempt 2).
    for id in &held_by_a {
        assert!(
            handled[id].iter().any(|&a| a >= 2),
            "{id}, held by router-a, was handled at {:?}",
            handled[id]
        );
    }
    // router-b failed over to a surviving node.
    let b_now = node_serving(&mut cluster, "picloud-router router-b").await;
    assert!(b_now.is_some() && b_now != Some(b_node), "router-b is on node {b_now:?} after losing {b_node}");

    // A second handling of an id comes only from
    // - router-a's leases: the rows it held when killed (claimed; maybe handled and answered,
    //   but not completed yet) are claimed again by router-b once their leases end: at most
    //   `held_by_a.len()`, itself at most MAX_IN_FLIGHT;
    // - the lost NATS node: router-b's requests in flight through it (handled by the worker,
    //   but the answers lost with the node or with the worker's connection to it) time out and
    //   are retried: at most the rows router-b had in flight when the node died, so at most
    //   MAX_IN_FLIGHT (as long as router-b reconnects within the handler timeout, which it does
    //   in milliseconds: the next seed answers at once).
    let duplicates: usize = handled.values().map(|a| a.len() - 1).sum();
    let duplicated = handled.values().filter(|a| a.len() > 1).count();
    let retried = handled.values().filter(|a| a.iter().any(|&a| a > 1)).count();
    eprintln!(
        "cluster test: set up in {set_up_in:.1?}, {EVENTS} events written in {written_in:.1?} and \
         all handled {:.1?} after the routers started; router-a killed at {killed_at} handled, \
         holding {} leases; NATS node {} (router-b's; the worker was on {worker_node}) lost at \
         {lost_node_at} handled; {retried} ids handled at attempt 2 or later; {duplicates} \
         duplicate handlings over {duplicated} ids",
        delivering.elapsed(),
        held_by_a.len(),
        b_node + 1,
    );
    assert!(
        duplicates <= held_by_a.len() + MAX_IN_FLIGHT,
        "{duplicates} duplicates, more than router-a's {} leases plus router-b's {MAX_IN_FLIGHT} in flight\n{}",
        held_by_a.len(),
        router_b.log_tail()
    );
    worker.shutdown().await;
}

/// What a nats-server answers a route that connects to `port` with `credentials` (`user` and
/// `pass` fields of the route's `CONNECT`, or none): its first line after `CONNECT` and `PING`.
async fn route_login(port: u16, credentials: &str) -> String {
    let talk = async {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut stream = tokio::io::BufReader::new(stream);
        let mut info = String::new();
        tokio::io::AsyncBufReadExt::read_line(&mut stream, &mut info).await.unwrap();
        assert!(info.starts_with("INFO "), "a route port greets with INFO: {info:?}");
        let connect = format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false,{credentials}\"tls_required\":false,\"name\":\"intruder\",\"cluster\":\"picloud\"}}\r\nPING\r\n"
        );
        stream.get_mut().write_all(connect.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tokio::io::AsyncBufReadExt::read_line(&mut stream, &mut answer).await.unwrap();
        answer
    };
    tokio::time::timeout(Duration::from_secs(10), talk).await.expect("the server answers the route")
}

#[tokio::test]
async fn the_shipped_cluster_refuses_a_route_that_does_not_log_in_with_the_route_password() {
    let dir = tempfile::tempdir().unwrap();
    let passwords = operator_passwords();
    let (_cluster, ports) = start_cluster(dir.path(), &passwords).await;
    let route_password = password(&passwords, "PICLOUD_NATS_ROUTE_PASSWORD");

    let anonymous = route_login(ports[0].cluster, "").await;
    let wrong = route_login(ports[0].cluster, "\"user\":\"route\",\"pass\":\"guess\",").await;
    let right =
        route_login(ports[0].cluster, &format!("\"user\":\"route\",\"pass\":\"{route_password}\",")).await;

    assert!(anonymous.contains("Authorization Violation"), "a route without credentials: {anonymous:?}");
    assert!(wrong.contains("Authorization Violation"), "a route with a wrong password: {wrong:?}");
    assert!(!right.contains("-ERR"), "the route password is accepted (the check above is real): {right:?}");
}
