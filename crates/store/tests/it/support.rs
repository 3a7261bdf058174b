//! Builders shared by the tests: fresh stores on a manual clock, and sample records.

use std::time::Duration;

use picloud_core::protocol::{EventKind, event_type, source};
use picloud_core::{AppSlug, CollectionPattern, TriggerName};
use picloud_store::*;
use picloud_testkit::TestDatabase;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::macros::datetime;

/// Where every manual clock starts.
pub const START: OffsetDateTime = datetime!(2026-01-01 00:00:00 UTC);

/// A Postgres store on a fresh, migrated database; the database lives as long as this.
pub struct PgFixture {
    pub store: PgStore,
    /// Dropped (and the database with it) when the fixture goes.
    db: TestDatabase,
}

impl PgFixture {
    /// A store on the same database connected as a relay connects ([`PgStore::connect_relay`]),
    /// on one connection.
    pub async fn relay_store(&self) -> PgStore {
        PgStore::connect_relay(self.db.url(), 1).await.expect("connect a relay")
    }
}

pub async fn pg_store() -> PgFixture {
    let db = TestDatabase::create().await.expect("test database");
    let store = PgStore::connect(db.url(), 8).await.expect("connect");
    pg::migrate(store.pool()).await.expect("migrate");
    PgFixture { store: store.with_clock(Clock::manual(START)), db }
}

pub fn mem_store() -> MemStore {
    MemStore::new().with_clock(Clock::manual(START))
}

/// A put of `value` to `orders/o-1` of `t`'s app (`shop`) for [`KvRepo::kv_put_firing`].
pub fn orders_put<'a>(t: &Tenant, value: &'a serde_json::Value) -> FiringPut<'a> {
    FiringPut {
        app_id: t.app.id,
        source: "/apps/shop/kv/orders",
        collection: "orders",
        key: "o-1",
        ordering_key: "orders/o-1",
        value,
        depth: 0,
        default_max_attempts: 7,
        max_data_bytes: 1 << 20,
        authorized_at: None,
    }
}

/// An app, a platform-admin-less principal who is the app's admin.
pub struct Tenant {
    pub app: App,
    pub admin: Principal,
}

pub async fn tenant<S: Store>(store: &S, slug: &str) -> Tenant {
    let app = store.create_app(&AppSlug::parse(slug).unwrap()).await.unwrap();
    let admin = store.create_principal(&format!("{slug}-admin"), false).await.unwrap();
    store.set_role(app.id, admin.id, picloud_core::Role::Admin).await.unwrap();
    Tenant { app, admin }
}

pub fn new_trigger(t: &Tenant, name: &str, spec: TriggerSpec) -> NewTrigger {
    let handler = Handler::Function(picloud_core::HandlerName::parse("handle").unwrap());
    NewTrigger::new(t.app.id, TriggerName::parse(name).unwrap(), spec, handler, t.admin.id)
}

pub fn kv_spec(pattern: &str, ops: &[KvOp]) -> TriggerSpec {
    TriggerSpec::Kv { collection: CollectionPattern::parse(pattern).unwrap(), ops: ops.to_vec() }
}

pub fn json(text: &str) -> Box<RawValue> {
    RawValue::from_string(text.to_owned()).unwrap()
}

/// A KV-put delivery of `trigger`, due after `delay`.
pub fn delivery(t: &Tenant, trigger: &Trigger, delay: Duration) -> NewDelivery {
    let payload =
        json(r#"{"collection":"orders","key":"o-1","op":"put","value":{"n":1},"previous":null,"version":1}"#);
    let event = events::Event {
        kind: EventKind::Kv,
        event_type: event_type::KV_PUT,
        source: source::kv(t.app.slug.as_str(), "orders"),
        subject: Some("o-1"),
        payload: &payload,
        depth: 0,
        ordering_key: None,
    };
    NewDelivery { delay, ..event.delivery(t.app.id, Some(trigger.id), 3) }
}

/// Inserts rows in a transaction of their own.
pub async fn insert<S: Store>(store: &S, rows: &[NewDelivery]) {
    let mut tx = store.begin().await.unwrap();
    store.insert_deliveries(&mut tx, rows).await.unwrap();
    store.commit(tx).await.unwrap();
}

/// A tenant with one kv trigger on `orders`.
pub async fn tenant_with_trigger<S: Store>(store: &S, slug: &str) -> (Tenant, Trigger) {
    let t = tenant(store, slug).await;
    let trigger =
        store.create_trigger(&new_trigger(&t, "on-order", kv_spec("orders", &[KvOp::Put]))).await.unwrap();
    (t, trigger)
}

pub const LEASE: Duration = Duration::from_secs(30);

/// Instantiates each named test for both stores.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test] async fn $name() { super::$name(crate::support::mem_store()).await; })*
        }
        mod postgres {
            $(#[tokio::test] async fn $name() {
                let fixture = crate::support::pg_store().await;
                super::$name(fixture.store.clone()).await;
            })*
        }
    };
}

/// Moves a claimed row to the dead letters as `rejected`, in a transaction of its own.
pub async fn bury<S: Store>(s: &S, row: &ClaimedDelivery) -> DeadLetter {
    let mut tx = s.begin().await.unwrap();
    let bury = Bury { id: row.id, attempt: row.attempt, reason: DeadLetterReason::Rejected, error: None };
    let dead = s.bury(&mut tx, &[bury]).await.unwrap().pop().unwrap();
    s.commit(tx).await.unwrap();
    dead
}
