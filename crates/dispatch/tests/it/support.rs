//! A relay, a store and workers wired together for one test.

use std::future::Future;
use std::time::Duration;

use picloud_core::names::{CollectionName, KvKey};
use picloud_core::{AppSlug, CollectionPattern, HandlerName, RetryPolicy, Role, TriggerConfig, TriggerName};
use picloud_dispatch::{NodeConfig, Relay, RelayConfig};
use picloud_store::events::{self, EventContext};
use picloud_store::*;
pub use picloud_testkit::eventually;
use picloud_testkit::{NatsServer, TestDatabase};
use picloud_worker::{BatchResult, Delivery, HandlerResult, Reply, Shutdown, ShutdownSender, Worker};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub const SECRET: &[u8] = b"test-secret-0123456789";

/// Relay settings that make tests quick: short timeouts and backoffs.
pub fn relay_config(node: &str) -> RelayConfig {
    let mut c = RelayConfig::new(NodeConfig::new(node, SECRET));
    c.node.handler_timeout = Duration::from_millis(1500);
    c.node.lease_margin = Duration::from_millis(1000);
    c.poll_interval = Duration::from_millis(100);
    c.node.triggers = TriggerConfig {
        max_depth: 16,
        retry: RetryPolicy::new(3, Duration::from_millis(10), Duration::from_millis(50)).unwrap(),
        ..TriggerConfig::default()
    };
    c
}

/// A running relay that stops when asked.
pub struct RelayHandle {
    stop: ShutdownSender,
    task: JoinHandle<()>,
}

impl RelayHandle {
    /// Tells the relay to stop, without waiting.
    pub fn signal_stop(&self) {
        self.stop.send();
    }

    pub async fn stop(self) {
        self.signal_stop();
        self.task.await.unwrap();
    }
}

pub async fn start_relay<S: Store>(store: S, nats_url: &str, config: RelayConfig) -> RelayHandle {
    let client = async_nats::connect(nats_url).await.unwrap();
    run_relay(Relay::new(store, client, config))
}

/// Runs `relay` until the handle stops it.
fn run_relay<S: Store>(relay: Relay<S>) -> RelayHandle {
    let (stop, shutdown) = Shutdown::new();
    let task = tokio::spawn(async move { relay.run(shutdown).await.unwrap() });
    RelayHandle { stop, task }
}

/// A running worker whose deliveries are also reported on a channel.
pub struct WorkerHandle {
    running: picloud_worker::Running,
}

impl WorkerHandle {
    pub async fn stop(self) {
        self.running.shutdown().await;
    }
}

/// Serves `handler` of `app` with `reply`, reporting every delivery it is handed.
pub async fn start_worker<F, Fut>(
    nats_url: &str,
    app: &str,
    handler: &str,
    reply: F,
) -> (WorkerHandle, mpsc::UnboundedReceiver<Delivery>)
where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    start_worker_on(async_nats::connect(nats_url).await.unwrap(), app, handler, reply).await
}

/// [`start_worker`] on a connection the test keeps a handle of.
pub async fn start_worker_on<F, Fut>(
    client: async_nats::Client,
    app: &str,
    handler: &str,
    reply: F,
) -> (WorkerHandle, mpsc::UnboundedReceiver<Delivery>)
where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let reply = std::sync::Arc::new(reply);
    let running = Worker::new(client, app)
        .handle(handler, move |d: Delivery| {
            let _ = tx.send(d.clone());
            let reply = reply.clone();
            async move { reply(d).await }
        })
        .start()
        .await
        .unwrap();
    (WorkerHandle { running }, rx)
}

/// Serves `handler` of `app` a batch at a time with `reply`, reporting every batch it is handed.
pub async fn start_batch_worker<F, Fut>(
    nats_url: &str,
    app: &str,
    handler: &str,
    reply: F,
) -> (WorkerHandle, mpsc::UnboundedReceiver<Vec<Delivery>>)
where
    F: Fn(Vec<Delivery>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = BatchResult> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let reply = std::sync::Arc::new(reply);
    let client = async_nats::connect(nats_url).await.unwrap();
    let running = Worker::new(client, app)
        .handle_batch(handler, move |batch: Vec<Delivery>| {
            let _ = tx.send(batch.clone());
            let reply = reply.clone();
            async move { reply(batch).await }
        })
        .start()
        .await
        .unwrap();
    (WorkerHandle { running }, rx)
}

pub async fn ok(_: Delivery) -> HandlerResult {
    Ok(Reply::ok(serde_json::json!({"ok": true})))
}

/// The next delivery (or whatever else `rx` carries), or a panic naming what was awaited.
pub async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("worker gone")
}

/// A database, a nats-server, and an app `shop` whose admin registers triggers.
pub struct World {
    pub store: PgStore,
    pub nats: NatsServer,
    pub app: App,
    pub admin: Principal,
    pub config: TriggerConfig,
    db: TestDatabase,
}

impl World {
    pub async fn new() -> World {
        let db = TestDatabase::create().await.unwrap();
        let store = PgStore::connect(db.url(), 10).await.unwrap();
        pg::migrate(store.pool()).await.unwrap();
        let nats = NatsServer::start().await.unwrap();
        let (app, admin) = tenant(&store, "shop").await;
        World { store, nats, app, admin, config: relay_config("x").node.triggers, db }
    }

    pub fn nats_url(&self) -> String {
        self.nats.url()
    }

    pub fn db_url(&self) -> &str {
        self.db.url()
    }

    pub async fn trigger(&self, name: &str, spec: TriggerSpec, handler: &str) -> Trigger {
        register(&self.store, &self.app, &self.admin, name, spec, handler).await
    }

    pub async fn kv_trigger(&self, name: &str, pattern: &str, handler: &str) -> Trigger {
        let spec =
            TriggerSpec::Kv { collection: CollectionPattern::parse(pattern).unwrap(), ops: vec![KvOp::Put] };
        self.trigger(name, spec, handler).await
    }

    /// Writes a KV entry at `depth`, as the API or a handler would.
    pub async fn put(
        &self,
        collection: &str,
        key: &str,
        value: serde_json::Value,
        depth: u32,
    ) -> events::Fired {
        let cx = EventContext { app_id: self.app.id, app_slug: &self.app.slug, depth, config: &self.config };
        let mut tx = self.store.begin().await.unwrap();
        let (_, fired) = events::kv_put(
            &self.store,
            &mut tx,
            &cx,
            &CollectionName::parse(collection).unwrap(),
            &KvKey::parse(key).unwrap(),
            &value,
            None,
        )
        .await
        .unwrap();
        events::commit_and_wake(&self.store, tx).await.unwrap();
        fired
    }

    /// Writes a KV entry as the API's KV put does, on its own ([`events::kv_put_now`]): its wake-up
    /// names the rows it wrote.
    pub async fn put_now(&self, collection: &str, key: &str, value: serde_json::Value) -> events::Fired {
        let cx =
            EventContext { app_id: self.app.id, app_slug: &self.app.slug, depth: 0, config: &self.config };
        let collection = CollectionName::parse(collection).unwrap();
        let key = KvKey::parse(key).unwrap();
        events::kv_put_now(&self.store, &cx, &collection, &key, &value, None, None).await.unwrap().1
    }

    /// The relay of the node `self.store` writes for, as `serve` runs it: on a store of its own,
    /// taking the rows the writes name ([`PgStore::hand_written`]).
    pub async fn node_relay(&self, config: RelayConfig) -> RelayHandle {
        let store = PgStore::connect_relay(self.db_url(), 4).await.unwrap();
        let client = async_nats::connect(&self.nats_url()).await.unwrap();
        run_relay(Relay::new(store, client, config).taking_written(self.store.hand_written()))
    }

    /// The end of delivery `id`'s lease, as Postgres has it (`None`: not leased).
    pub async fn lease_of(&self, id: uuid::Uuid) -> Option<time::OffsetDateTime> {
        sqlx::query_scalar("SELECT leased_until FROM outbox WHERE id = $1")
            .bind(id)
            .fetch_one(self.store.pool())
            .await
            .unwrap()
    }

    /// Waits until delivery `id`'s lease ends later than `before` (`what` names why it should):
    /// the new end.
    pub async fn lease_past(
        &self,
        id: uuid::Uuid,
        before: Option<time::OffsetDateTime>,
        what: &str,
    ) -> Option<time::OffsetDateTime> {
        picloud_testkit::eventually(what, || async {
            let until = self.lease_of(id).await;
            (until > before).then_some(until)
        })
        .await
    }

    pub async fn outbox_len(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(self.store.pool()).await.unwrap()
    }

    pub async fn dead_letters(&self) -> Vec<DeadLetter> {
        self.store
            .list_dead_letters(self.app.id, &DeadLetterFilter::default(), None, 500)
            .await
            .unwrap()
            .items
    }

    /// Waits until the outbox is empty.
    pub async fn drained(&self) {
        eventually("the outbox to drain", || async { (self.outbox_len().await == 0).then_some(()) }).await;
    }

    /// Publishes `data` on `topic` with the ordering key `key`, and wakes the relays.
    pub async fn publish(&self, topic: &str, data: serde_json::Value, key: Option<&str>) {
        self.publish_to(&self.app, topic, data, key).await;
    }

    /// [`World::publish`] in `app`.
    pub async fn publish_to(&self, app: &App, topic: &str, data: serde_json::Value, key: Option<&str>) {
        let cx = EventContext { app_id: app.id, app_slug: &app.slug, depth: 0, config: &self.config };
        let message = serde_json::value::to_raw_value(&data).unwrap();
        let mut tx = self.store.begin().await.unwrap();
        let (_, fired) = events::publish(
            &self.store,
            &mut tx,
            &cx,
            &picloud_core::TopicName::parse(topic).unwrap(),
            &message,
            key,
        )
        .await
        .unwrap();
        events::commit_and_wake_for(&self.store, tx, &fired).await.unwrap();
    }

    /// Restarts the nats-server on its port and waits until `client` is connected to it again.
    pub async fn restart_nats_for(&mut self, client: &async_nats::Client) {
        let connects = || client.statistics().connects.load(std::sync::atomic::Ordering::SeqCst);
        let before = connects();
        self.nats.restart().await.unwrap();
        eventually("the client connected to the restarted server", || async {
            (connects() > before).then_some(())
        })
        .await;
    }

    /// Waits up to a minute for the outbox to drain (runs with relays that die take longer).
    pub async fn drained_within_a_minute(&self) {
        picloud_testkit::eventually_within("the outbox drains", Duration::from_secs(60), || async {
            (self.outbox_len().await == 0).then_some(())
        })
        .await;
    }
}

/// App `slug` and its admin `<slug>-admin`.
pub async fn tenant(store: &PgStore, slug: &str) -> (App, Principal) {
    let app = store.create_app(&AppSlug::parse(slug).unwrap()).await.unwrap();
    let admin = store.create_principal(&format!("{slug}-admin"), false).await.unwrap();
    store.set_role(app.id, admin.id, Role::Admin).await.unwrap();
    (app, admin)
}

/// Registers a trigger of `app` to its function `handler`, as `admin`.
pub async fn register(
    store: &PgStore,
    app: &App,
    admin: &Principal,
    name: &str,
    spec: TriggerSpec,
    handler: &str,
) -> Trigger {
    let handler = Handler::Function(HandlerName::parse(handler).unwrap());
    let new = NewTrigger::new(app.id, TriggerName::parse(name).unwrap(), spec, handler, admin.id);
    store.create_trigger(&new).await.unwrap()
}

/// A small deterministic generator (splitmix64), so that a failing seed of a generated run
/// replays.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Relay settings of generated runs: deadlines and leases short enough for a run to time
/// attempts out and outlive a dead relay's leases within seconds.
pub fn run_config(node: &str) -> RelayConfig {
    let mut c = relay_config(node);
    c.node.handler_timeout = Duration::from_millis(300);
    c.node.lease_margin = Duration::from_millis(300);
    c.poll_interval = Duration::from_millis(50);
    c
}

/// A relay of `config` that reaches the database through a proxy, so that cutting the proxy off
/// for good makes it a relay that died for the store (it is still there for NATS).
pub async fn doomed_relay(w: &World, config: RelayConfig) -> (picloud_testkit::TcpProxy, RelayHandle) {
    use sqlx::postgres::PgConnectOptions;
    let port = w.db_url().parse::<PgConnectOptions>().unwrap().get_port();
    let proxy = picloud_testkit::TcpProxy::start(([127, 0, 0, 1], port).into()).await.unwrap();
    let proxied = w.db_url().replace(&format!(":{port}/"), &format!(":{}/", proxy.port()));
    let relay = start_relay(PgStore::connect_relay(&proxied, 4).await.unwrap(), &w.nats_url(), config).await;
    (proxy, relay)
}

/// Three relays of [`run_config`] (`r`, `r1`, `r2`): the first a [`doomed_relay`].
pub async fn three_relays_one_doomed(
    w: &World,
) -> (picloud_testkit::TcpProxy, RelayHandle, Vec<RelayHandle>) {
    let (proxy, doomed) = doomed_relay(w, run_config("r")).await;
    let mut relays = Vec::new();
    for node in ["r1", "r2"] {
        relays.push(start_relay(w.store.clone(), &w.nats_url(), run_config(node)).await);
    }
    (proxy, doomed, relays)
}
