//! The janitor: deletes resolved dead letters, abandoned executions and trigger statistics past
//! their retention (DESIGN §7, §8, §15), in batches, on one node at a time. Unresolved dead letters are never deleted.
//! It also lets out of their lanes the rows of triggers that are gone, which a writer racing the
//! trigger's (or its app's) deletion can leave waiting where nothing would make them heads.
//!
//! Every node runs one; a sweep starts at start-up and then every [`JanitorConfig::interval`].
//! Time comes from the store's clock (the database's `now()` in production).

use std::time::Duration;

use picloud_core::TriggerConfig;
use picloud_core::stats::STATS_RETENTION;
use picloud_store::pg::AdvisoryLock;
use picloud_store::{AbandonedRepo as _, DeadLetterRepo as _, PgStore, StatsRepo as _};
use picloud_worker::Shutdown;

use crate::metrics;

/// The key of the janitor's advisory lock: "picloud" in ASCII.
const LOCK_KEY: i64 = 0x0070_6963_6c6f_7564;

/// How the janitor runs.
#[derive(Debug, Clone)]
pub struct JanitorConfig {
    /// This node's name, in logs and metrics.
    pub node_id: String,
    /// Resolved dead letters are deleted this long after their resolution
    /// (`PICLOUD_DEAD_LETTER_RETENTION_DAYS`).
    pub dead_letter_retention: Duration,
    /// Abandoned executions are deleted this long after they were recorded
    /// (`PICLOUD_ABANDONED_EXECUTIONS_RETENTION_DAYS`).
    pub abandoned_retention: Duration,
    /// Rows deleted per statement: bounds how long one statement holds its locks and how much
    /// WAL it writes at once.
    pub batch_size: u32,
    /// The pause between sweeps.
    pub interval: Duration,
}

impl JanitorConfig {
    /// The retentions of `triggers`, batches of 1000 rows, a sweep every ten minutes.
    pub fn new(node_id: impl Into<String>, triggers: &TriggerConfig) -> Self {
        Self {
            node_id: node_id.into(),
            dead_letter_retention: triggers.dead_letter_retention,
            abandoned_retention: triggers.abandoned_retention,
            batch_size: 1000,
            interval: Duration::from_secs(600),
        }
    }
}

/// What one sweep deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Resolved dead letters.
    pub dead_letters: u64,
    /// Abandoned executions.
    pub abandoned: u64,
    /// Outbox rows nothing would have claimed, let free (DESIGN §13): rows in the lanes of a
    /// trigger that is gone, gated rows of a trigger without limits.
    pub unclaimable_freed: u64,
    /// Minutes of trigger statistics older than the longest window (DESIGN §15).
    pub stats: u64,
}

/// What a sweep goes through, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Table {
    DeadLetters,
    Abandoned,
    Stats,
    Unclaimable,
}

/// Deletes what outlived its retention; see the module documentation.
#[derive(Debug)]
pub struct Janitor {
    store: PgStore,
    config: JanitorConfig,
}

/// The right to sweep, held by one janitor of the cluster at a time.
///
/// It is a session-level advisory lock (`pg_try_advisory_lock`) taken on a connection opened for
/// this sweep alone, while the deletes run on the store's pool. A session lock rather than
/// `pg_try_advisory_xact_lock` in each batch's transaction, because the store's deletes commit
/// on their own (one statement per batch, so no transaction is held open across a sweep), and
/// because one lock for the whole sweep keeps a second node from starting halfway through it. A
/// connection of its own, rather than a pooled one, because a session lock lives as long as its
/// connection: this one is unlocked and closed when the sweep ends, and if the node dies its
/// connection dies with it and Postgres releases the lock. The lock saves duplicated work and
/// contention; correctness does not depend on it (two sweeps would delete the same rows once).
#[derive(Debug)]
pub struct SweepLock<'a> {
    janitor: &'a Janitor,
    /// The advisory lock on its own session. Dropping it without [`SweepLock::sweep`] closes
    /// the socket, and Postgres releases the lock once it notices.
    lock: AdvisoryLock,
}

impl Janitor {
    /// A janitor over `store`; nothing runs until [`Janitor::run`] or [`Janitor::sweep_once`].
    pub fn new(store: PgStore, config: JanitorConfig) -> Self {
        Self { store, config }
    }

    /// Sweeps at once and then every interval until `shutdown`; a sweep in progress finishes its
    /// batch first. Failed sweeps are logged and tried again at the next interval.
    pub async fn run(self, mut shutdown: Shutdown) {
        tracing::info!(node = %self.config.node_id, "janitor started");
        loop {
            match self.try_lock().await {
                Ok(Some(lock)) => {
                    if let Err(e) = lock.sweep_while(|| !shutdown.is_shutdown()).await {
                        tracing::warn!(error = %e, "the janitor's sweep failed; trying again later");
                    }
                }
                Ok(None) => tracing::debug!("another node is sweeping"),
                Err(e) => {
                    tracing::warn!(error = %e, "the janitor could not take its lock; trying again later");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.interval) => {}
                () = shutdown.recv() => break,
            }
        }
        tracing::info!("janitor stopped");
    }

    /// One sweep, unless another janitor is sweeping (then `None`, and nothing is deleted).
    pub async fn sweep_once(&self) -> picloud_store::Result<Option<Swept>> {
        match self.try_lock().await? {
            Some(lock) => lock.sweep().await.map(Some),
            None => Ok(None),
        }
    }

    /// Takes the cluster's sweep lock, unless another janitor holds it.
    pub async fn try_lock(&self) -> picloud_store::Result<Option<SweepLock<'_>>> {
        Ok(self.store.try_advisory_lock(LOCK_KEY).await?.map(|lock| SweepLock { janitor: self, lock }))
    }
}

impl SweepLock<'_> {
    /// Deletes every row past its retention, batch after batch, then releases the lock.
    pub async fn sweep(self) -> picloud_store::Result<Swept> {
        self.sweep_while(|| true).await
    }

    /// Sweeps while `go_on` says so (it is asked after each batch), then releases the lock.
    async fn sweep_while(self, go_on: impl Fn() -> bool) -> picloud_store::Result<Swept> {
        let swept = self.delete_batches(go_on).await;
        let released = self.lock.release().await;
        let swept = swept?;
        released?;
        let config = &self.janitor.config;
        if swept != Swept::default() {
            tracing::info!(
                node = %config.node_id,
                dead_letters = swept.dead_letters,
                abandoned_executions = swept.abandoned,
                unclaimable_freed = swept.unclaimable_freed,
                stats = swept.stats,
                "janitor deleted rows past their retention"
            );
        }
        Ok(swept)
    }

    async fn delete_batches(&self, go_on: impl Fn() -> bool) -> picloud_store::Result<Swept> {
        let Janitor { store, config } = self.janitor;
        let batch = config.batch_size.max(1);
        let mut swept = Swept::default();
        let node = &config.node_id;
        let tables = [
            ("dead_letters", Table::DeadLetters),
            ("abandoned_executions", Table::Abandoned),
            ("trigger_stats", Table::Stats),
            ("outbox", Table::Unclaimable),
        ];
        for (name, table) in tables {
            loop {
                let deleted = match table {
                    Table::DeadLetters => store.gc_dead_letters(config.dead_letter_retention, batch).await?,
                    Table::Abandoned => store.gc_abandoned(config.abandoned_retention, batch).await?,
                    Table::Stats => store.gc_stats(STATS_RETENTION, batch).await?,
                    Table::Unclaimable => store.free_unclaimable(batch).await?,
                };
                *match table {
                    Table::DeadLetters => &mut swept.dead_letters,
                    Table::Abandoned => &mut swept.abandoned,
                    Table::Stats => &mut swept.stats,
                    Table::Unclaimable => &mut swept.unclaimable_freed,
                } += deleted;
                if table != Table::Unclaimable {
                    metrics::janitor_deleted(node, name, deleted);
                }
                if deleted < u64::from(batch) {
                    break;
                }
                if !go_on() {
                    return Ok(swept);
                }
            }
        }
        Ok(swept)
    }
}
