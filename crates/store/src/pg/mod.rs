//! The Postgres implementation of the repositories (sqlx), and the embedded migrations.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{Clock, Result, Transactional, Wakeup, WrittenHere};

mod abandoned;
mod auth;
mod cron;
mod dead_letters;
mod flow;
mod kv;
mod ops;
mod outbox;
mod pattern;
mod rows;
mod stats;
mod triggers;

pub use ops::{AdvisoryLock, Gauges};
pub use outbox::{CLAIM_SHARED, insert_deliveries};

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Applies every pending migration; running it again changes nothing.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// The versions of the embedded migrations the database has not applied (all of them on an
/// empty database): a node must not serve on an older schema than its code reads and writes.
pub async fn pending_migrations(pool: &PgPool) -> Result<Vec<i64>> {
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
        .fetch_all(pool)
        .await
        .or_else(|e| match &e {
            // undefined_table: no migration was ever applied.
            sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => Ok(Vec::new()),
            _ => Err(e),
        })?;
    Ok(MIGRATOR.iter().map(|m| m.version).filter(|v| !applied.contains(v)).collect())
}

/// The repositories over one Postgres connection pool.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    clock: Clock,
    waker: Waker,
    /// The collections whose puts the one statement refused lately.
    refused: kv::Refused,
}

/// Sends this process's wake-ups for the relays: `wake_relays` only flags that one is due, and a
/// single task sends the `NOTIFY`s one at a time, so wake-ups asked for while one is on its way
/// are folded into the next, and no writer waits on Postgres' global notify lock.
#[derive(Debug, Clone)]
struct Waker {
    /// Where the rows a wake-up names go instead of a notification: the relay of this node
    /// ([`PgStore::hand_written`]).
    local: std::sync::Arc<std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<Vec<Uuid>>>>>,
    /// What the next notification says was written.
    next: std::sync::Arc<std::sync::Mutex<Written>>,
    /// Capacity one: a full channel means a wake-up is already due.
    due: tokio::sync::mpsc::Sender<()>,
    /// The receiving end, until the first wake-up starts the task that owns it.
    pending: std::sync::Arc<std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<()>>>>,
}

/// What the wake-ups folded into one notification say was written.
#[derive(Debug, Default, PartialEq)]
struct Written {
    /// One of them named nothing, or they named too many rows: the notification names none.
    any: bool,
    /// The rows they named, while `any` is not set.
    rows: Vec<Uuid>,
}

/// The most rows one notification names: their ids, 37 bytes each with a separator, within
/// Postgres' 8000-byte payload. A notification that would name more names none.
const NAMED_PER_NOTIFICATION: usize = 200;

impl Written {
    /// Folds in a wake-up for `written` (`None`: for anything).
    fn add(&mut self, written: Option<Vec<Uuid>>) {
        match written {
            Some(rows) if !self.any && self.rows.len() + rows.len() <= NAMED_PER_NOTIFICATION => {
                self.rows.extend(rows);
            }
            _ => {
                self.any = true;
                self.rows = Vec::new();
            }
        }
    }

    /// The notification's payload: the ids, comma-separated, or nothing ([`Wakeup::Any`]).
    fn payload(self) -> String {
        if self.any {
            return String::new();
        }
        let mut payload = String::with_capacity(self.rows.len() * 37);
        for (i, id) in self.rows.iter().enumerate() {
            if i > 0 {
                payload.push(',');
            }
            payload.push_str(id.as_hyphenated().encode_lower(&mut Uuid::encode_buffer()));
        }
        payload
    }
}

/// What a notification's payload says was written: [`Written::payload`] read back, or
/// [`Wakeup::Any`] for anything else.
pub(super) fn wakeup(payload: &str) -> Wakeup {
    if payload.is_empty() {
        return Wakeup::Any;
    }
    payload
        .split(',')
        .map(Uuid::parse_str)
        .collect::<std::result::Result<_, _>>()
        .map_or(Wakeup::Any, Wakeup::Written)
}

impl Waker {
    fn new() -> Self {
        let (due, pending) = tokio::sync::mpsc::channel(1);
        Self {
            local: std::sync::Arc::default(),
            next: std::sync::Arc::default(),
            due,
            pending: std::sync::Arc::new(std::sync::Mutex::new(Some(pending))),
        }
    }

    /// Flags a wake-up for `written` (`None`: for anything), starting the sending task on first
    /// use. The task sends on a connection of its own (a wake-up must not queue behind the
    /// writes for a pooled connection), and ends once every clone of the store is dropped.
    /// Rows named go to this node's relay instead, while it takes them.
    fn wake(&self, pool: &PgPool, mut written: Option<Vec<Uuid>>) {
        if written.as_ref().is_some_and(Vec::is_empty) {
            return;
        }
        if let Some(local) = &*self.local.lock().expect("waker lock")
            && let Some(rows) = written.take()
        {
            match local.send(rows) {
                Ok(()) => return,
                Err(gone) => written = Some(gone.0),
            }
        }
        self.next.lock().expect("waker lock").add(written);
        if let Some(mut due) = self.pending.lock().expect("waker lock").take() {
            let options = pool.connect_options().as_ref().clone();
            let next = self.next.clone();
            tokio::spawn(async move {
                let mut conn: Option<sqlx::PgConnection> = None;
                while due.recv().await.is_some() {
                    if conn.is_none() {
                        conn = sqlx::ConnectOptions::connect(&options)
                            .await
                            .inspect_err(
                                |e| tracing::warn!(error = %e, "waking the relays failed; they will poll"),
                            )
                            .ok();
                    }
                    let Some(c) = conn.as_mut() else { continue };
                    let written = std::mem::take(&mut *next.lock().expect("waker lock"));
                    if !written.any && written.rows.is_empty() {
                        // Folded into the notification before.
                        continue;
                    }
                    tracing::trace!("notifying relays");
                    // The notification writes nothing (it names rows already committed), so it
                    // need not wait for the WAL flush.
                    let sent = sqlx::query(
                        "SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, $2)",
                    )
                    .bind(outbox::CHANNEL)
                    .bind(written.payload())
                    .execute(&mut *c)
                    .await;
                    if let Err(e) = sent {
                        tracing::warn!(error = %e, "waking the relays failed; they will poll");
                        conn = None;
                    }
                }
            });
        }
        let _ = self.due.try_send(());
    }
}

/// How long a relay's transaction may wait on the relay between statements before Postgres ends
/// it.
const RELAY_IDLE_IN_TRANSACTION: &str = "10s";

impl PgStore {
    /// Runs a janitor's delete of rows past their retention, one batch: `statement`'s `$1` is the
    /// retention in milliseconds, `$2` the store's fixed now (NULL: the database's), `$3` the
    /// batch. Returns how many rows went.
    async fn delete_past(&self, statement: &'static str, older_than: Duration, batch: u32) -> Result<u64> {
        let done = sqlx::query(statement)
            .bind(outbox::millis(older_than))
            .bind(self.now())
            .bind(i64::from(batch))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// A store over an existing pool, on the database's clock.
    pub fn new(pool: PgPool) -> Self {
        Self { pool, clock: Clock::system(), waker: Waker::new(), refused: kv::Refused::default() }
    }

    /// Connects a pool of up to `max_connections` to `url`.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        Self::connect_with(url.parse()?, max_connections).await
    }

    /// Connects a pool for a relay: its commits do not wait for the WAL flush
    /// (`synchronous_commit = off`). Everything a relay writes is its own bookkeeping — leases,
    /// completions, dead letters moved from the outbox — and a crash that loses the last of it
    /// only makes rows deliverable again (at least once), never loses an event a client was told
    /// about. Writes acknowledged to clients must use [`PgStore::connect`].
    /// Its statements also use generic plans (`plan_cache_mode`): they run thousands of times a
    /// second with plans that do not depend on their arguments, and re-planning
    /// `DELETE … WHERE id = ANY ($1)` for every completion cost more than executing it.
    /// Those plans are made once per connection, often while the outbox is empty, and kept while
    /// it grows and its dead rows pile up between vacuums: the planner must not choose to scan
    /// the table then (`enable_seqscan = off`: every hot statement has its index), nor compile a
    /// plan whose cost that setting inflated (`jit = off`: a compiled claim took 0.8 s).
    /// A relay's transactions never wait on its client between statements for long: one left
    /// open by a relay that was cut off mid-transaction is ended by Postgres after
    /// `RELAY_IDLE_IN_TRANSACTION` (10 s), so the lane locks it held (DESIGN §13) come free.
    pub async fn connect_relay(url: &str, max_connections: u32) -> Result<Self> {
        let options: PgConnectOptions = url.parse()?;
        let options = options.options([
            ("synchronous_commit", "off"),
            ("plan_cache_mode", "force_generic_plan"),
            ("enable_seqscan", "off"),
            ("jit", "off"),
            ("idle_in_transaction_session_timeout", RELAY_IDLE_IN_TRANSACTION),
        ]);
        Self::connect_with(options, max_connections).await
    }

    async fn connect_with(options: PgConnectOptions, max_connections: u32) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            // No ping before each use: it doubled the round trips of every statement (a token
            // look-up took 0.27 ms with it, 0.17 ms without). A connection that broke while idle
            // fails the next statement that uses it instead.
            .test_before_acquire(false)
            // Notices are for people at a psql prompt: in a node's log, the migrator's
            // `relation "_sqlx_migrations" already exists, skipping` on every start is noise.
            .connect_with(options.options([("client_min_messages", "warning")]))
            .await?;
        Ok(Self::new(pool))
    }

    /// The same store on another clock (tests move a manual clock instead of waiting).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Hands the rows this store's writes name ([`crate::OutboxRepo::wake_relays_for`]) to the
    /// relay of the same node, in memory, instead of naming them to every relay by `NOTIFY`: the
    /// relay
    /// takes them at once, or wakes every relay when it has no room for them. Once the relay is
    /// gone (the receiving end dropped) they are named by `NOTIFY` again. Every clone of this
    /// store hands its rows over.
    pub fn hand_written(&self) -> WrittenHere {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        *self.waker.local.lock().expect("waker lock") = Some(sender);
        receiver
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The time statements use: the manual clock's, or NULL for the database's `now()`.
    fn now(&self) -> Option<OffsetDateTime> {
        self.clock.fixed()
    }
}

impl Transactional for PgStore {
    type Tx = sqlx::Transaction<'static, Postgres>;

    async fn begin(&self) -> Result<Self::Tx> {
        Ok(self.pool.begin().await?)
    }

    async fn commit(&self, tx: Self::Tx) -> Result<()> {
        Ok(tx.commit().await?)
    }

    fn clock(&self) -> &Clock {
        &self.clock
    }
}

/// The name of the constraint a database error broke, with its SQLSTATE.
fn violated(err: &sqlx::Error) -> Option<(String, String)> {
    match err {
        sqlx::Error::Database(db) => Some((
            db.code().map(|c| c.into_owned()).unwrap_or_default(),
            db.constraint().unwrap_or_default().to_owned(),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<Uuid> {
        (0..n).map(|_| Uuid::now_v7()).collect()
    }

    #[test]
    fn folded_wake_ups_name_their_rows_together_unless_one_names_nothing_or_they_name_too_many() {
        let (first, second) = (ids(2), ids(3));
        let mut named = Written::default();
        named.add(Some(first.clone()));
        named.add(Some(second.clone()));
        let both: Vec<Uuid> = first.iter().chain(&second).copied().collect();
        assert_eq!(wakeup(&named.payload()), Wakeup::Written(both));

        let mut with_any = Written::default();
        with_any.add(Some(ids(2)));
        with_any.add(None);
        with_any.add(Some(ids(2)));
        assert_eq!(wakeup(&with_any.payload()), Wakeup::Any);

        let mut most = Written::default();
        most.add(Some(ids(NAMED_PER_NOTIFICATION)));
        assert!(
            matches!(wakeup(&most.payload()), Wakeup::Written(rows) if rows.len() == NAMED_PER_NOTIFICATION)
        );
        let mut too_many = Written::default();
        too_many.add(Some(ids(NAMED_PER_NOTIFICATION)));
        too_many.add(Some(ids(1)));
        assert_eq!(too_many.payload(), "", "named beyond one notification: it names none");
    }

    #[test]
    fn a_payload_that_is_not_ids_wakes_for_anything() {
        assert_eq!(wakeup(""), Wakeup::Any);
        assert_eq!(wakeup("not-an-id"), Wakeup::Any);
        let id = Uuid::now_v7();
        assert_eq!(wakeup(&format!("{id},x")), Wakeup::Any);
        assert_eq!(wakeup(&id.to_string()), Wakeup::Written(vec![id]));
    }
}
