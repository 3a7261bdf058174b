//! The Postgres implementation of the repositories (sqlx), and the embedded migrations.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};
use time::OffsetDateTime;

use crate::{Clock, Result, Transactional};

mod abandoned;
mod auth;
mod dead_letters;
mod kv;
mod outbox;
mod rows;
mod triggers;

pub use outbox::insert_deliveries;

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Applies every pending migration; running it again changes nothing.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// The repositories over one Postgres connection pool.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    clock: Clock,
}

impl PgStore {
    /// A store over an existing pool, on the database's clock.
    pub fn new(pool: PgPool) -> Self {
        Self { pool, clock: Clock::system() }
    }

    /// Connects a pool of up to `max_connections` to `url`.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        Ok(Self::new(pool))
    }

    /// The same store on another clock (tests move a manual clock instead of waiting).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
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
