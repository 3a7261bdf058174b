//! An API over a fresh database and nats-server, with principals of every standing and their
//! tokens, and a one-call HTTP client that drives the router in process.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt as _;
use picloud_api::{ApiConfig, ApiState};
use picloud_core::token::{DeliveryToken, generate_api_token, hash_api_token};
use picloud_core::{AppSlug, PrincipalId, RetryPolicy, Role, ScopeSet, TriggerConfig};
use picloud_dispatch::{NodeConfig, Relay, RelayConfig};
use picloud_store::*;
pub use picloud_testkit::eventually;
use picloud_testkit::{NatsServer, TestDatabase};
use picloud_worker::{Shutdown, ShutdownSender};
use serde_json::Value;
use tower::ServiceExt as _;
use uuid::Uuid;

pub const SECRET: &[u8] = b"api-test-secret-0123456789";

/// What the API node and its test relays share: short timeouts and backoffs, a low depth limit.
pub fn node_config(node: &str) -> NodeConfig {
    let mut c = NodeConfig::new(node, SECRET);
    c.handler_timeout = Duration::from_millis(1500);
    c.lease_margin = Duration::from_millis(500);
    c.triggers = TriggerConfig {
        max_depth: 4,
        retry: RetryPolicy::new(2, Duration::from_millis(10), Duration::from_millis(20)).unwrap(),
        ..TriggerConfig::default()
    };
    c
}

/// A relay of the test node that polls often.
pub fn relay_config(node: &str) -> RelayConfig {
    RelayConfig { poll_interval: Duration::from_millis(100), ..RelayConfig::new(node_config(node)) }
}

/// A response: status and JSON body (Null when empty).
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
}

impl Reply {
    /// The error code of an error body.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    pub fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }
}

/// Everything a test needs.
pub struct Api {
    pub router: Router,
    pub state: ApiState,
    pub nats: NatsServer,
    pub app: App,
    /// Tokens by standing: platform admin; viewer, developer and admin of `shop`; admin of `other`.
    pub root: String,
    pub viewer: String,
    pub developer: String,
    pub admin: String,
    pub other_admin: String,
    pub admin_principal: Principal,
    _db: TestDatabase,
}

async fn mint(store: &PgStore, principal: PrincipalId) -> String {
    let secret = generate_api_token();
    store
        .create_token(&NewApiToken {
            id: Uuid::now_v7(),
            principal_id: principal,
            token_hash: hash_api_token(&secret),
            app_id: None,
            scopes: None,
            expires_at: None,
        })
        .await
        .unwrap();
    secret
}

impl Api {
    pub async fn start() -> Api {
        Self::start_with(|_| {}).await
    }

    /// [`Api::start`] with the test's changes to the node's configuration.
    pub async fn start_with(configure: impl FnOnce(&mut ApiConfig)) -> Api {
        Self::start_on(Clock::system(), configure).await
    }

    /// [`Api::start_with`], its store (and so the API's every reading of the time) on `clock`.
    pub async fn start_on(clock: Clock, configure: impl FnOnce(&mut ApiConfig)) -> Api {
        let db = TestDatabase::create().await.unwrap();
        let store = PgStore::connect(db.url(), 10).await.unwrap().with_clock(clock);
        pg::migrate(store.pool()).await.unwrap();
        let nats = NatsServer::start().await.unwrap();
        let client = async_nats::connect(nats.url()).await.unwrap();
        let mut config = ApiConfig::new(node_config("api-node"));
        config.max_payload_bytes = 64 * 1024;
        config.sync_timeout_max = Duration::from_secs(5);
        configure(&mut config);
        let state = ApiState::new(store.clone(), client, config);
        let router = picloud_api::router(state.clone());

        let root_p = store.create_principal("root", true).await.unwrap();
        let app = store.create_app(&AppSlug::parse("shop").unwrap()).await.unwrap();
        let other = store.create_app(&AppSlug::parse("other").unwrap()).await.unwrap();
        let mut tokens = Vec::new();
        for (name, app_id, role) in [
            ("viewer", app.id, Role::Viewer),
            ("developer", app.id, Role::Developer),
            ("admin", app.id, Role::Admin),
            ("other-admin", other.id, Role::Admin),
        ] {
            let p = store.create_principal(name, false).await.unwrap();
            store.set_role(app_id, p.id, role).await.unwrap();
            tokens.push((p.clone(), mint(&store, p.id).await));
        }
        Api {
            router,
            root: mint(&store, root_p.id).await,
            viewer: tokens[0].1.clone(),
            developer: tokens[1].1.clone(),
            admin: tokens[2].1.clone(),
            admin_principal: tokens[2].0.clone(),
            other_admin: tokens[3].1.clone(),
            state,
            nats,
            app,
            _db: db,
        }
    }

    pub fn store(&self) -> &PgStore {
        self.state.ops.store()
    }

    /// A delivery token for the shop admin, as the relay would sign it.
    pub fn delivery_token(&self, depth: u32) -> String {
        let deadline_ms = (time::OffsetDateTime::now_utc().unix_timestamp() + 60) * 1000;
        self.state.config.node.token_key.sign(&DeliveryToken {
            principal: self.admin_principal.id,
            app: self.app.id,
            depth,
            deadline_ms,
            scopes: ScopeSet::for_role(Role::Admin),
        })
    }

    /// One request through the router: `token` as bearer, `body` as JSON (raw bytes when given
    /// as `Body::Raw`).
    pub async fn call(&self, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> Reply {
        self.call_with(method, path, token, body.map(|b| b.to_string().into_bytes()), &[]).await
    }

    pub async fn call_with(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(token) = token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        if body.is_some() {
            request = request.header("Content-Type", "application/json");
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(body.map(Body::from).unwrap_or_else(Body::empty)).unwrap();
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Reply { status, body }
    }

    /// Starts a sync call of `trigger` with `{}` as the developer, with `headers`, in a task of
    /// its own: it ends with the call's answer.
    pub fn invoke_in_background(
        &self,
        trigger: &str,
        headers: &[(&'static str, &'static str)],
    ) -> tokio::task::JoinHandle<axum::response::Response> {
        let mut request = Request::post(format!("/v1/apps/shop/invoke/{trigger}"))
            .header("Authorization", format!("Bearer {}", self.developer));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let (router, request) = (self.router.clone(), request.body(Body::from("{}")).unwrap());
        tokio::spawn(async move { router.oneshot(request).await.unwrap() })
    }

    /// Registers a trigger as the shop admin; panics unless 201.
    pub async fn trigger(&self, body: Value) -> Value {
        let reply = self.call(Method::POST, "/v1/apps/shop/triggers", Some(&self.admin), Some(body)).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
        reply.body
    }

    pub async fn outbox_len(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(self.store().pool()).await.unwrap()
    }

    /// A relay on this API's database and NATS, stopped when the handle is.
    pub async fn relay(&self) -> RelayHandle {
        let client = async_nats::connect(self.nats.url()).await.unwrap();
        let (stop, shutdown) = Shutdown::new();
        let relay = Relay::new(self.store().clone(), client, relay_config("relay"));
        let task = tokio::spawn(async move { relay.run(shutdown).await.unwrap() });
        RelayHandle { stop, task }
    }
}

pub struct RelayHandle {
    stop: ShutdownSender,
    task: tokio::task::JoinHandle<()>,
}

impl RelayHandle {
    pub async fn stop(self) {
        self.stop.send();
        self.task.await.unwrap();
    }
}
