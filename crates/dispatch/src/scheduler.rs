//! The cron scheduler every node runs (DESIGN §3). It fires due cron ticks through the store
//! ([`picloud_store::cron::fire_due_ticks`]), where one transaction per batch locks the due
//! triggers `FOR UPDATE SKIP LOCKED`, writes their deliveries and moves their next ticks past
//! now: each tick is delivered once cluster-wide however many schedulers run, with no leader to
//! elect, and ticks missed while no node ran fire once. Between passes it sleeps until the earliest
//! next tick by the store's clock ([`picloud_store::Clock`]: the system's, or a manual one in
//! tests), and at most a poll interval of real time, so triggers registered or enabled meanwhile
//! get their first tick soon.

use std::time::Duration;

use picloud_core::TriggerConfig;
use picloud_store::Store;
use picloud_store::cron::{CronPass, fire_due_ticks};
use picloud_worker::Shutdown;
use time::OffsetDateTime;

/// How a scheduler runs.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// This node's name, in logs.
    pub node_id: String,
    /// The default retry policy of tick deliveries.
    pub triggers: TriggerConfig,
    /// The longest the scheduler sleeps between two looks at the triggers: how soon a trigger
    /// registered or enabled meanwhile gets its first tick (the first after that look).
    pub poll_interval: Duration,
    /// Triggers fired per transaction.
    pub batch_size: u32,
}

impl SchedulerConfig {
    /// Defaults: a look every second, 100 triggers per transaction.
    pub fn new(node_id: impl Into<String>, triggers: &TriggerConfig) -> Self {
        Self {
            node_id: node_id.into(),
            triggers: *triggers,
            poll_interval: Duration::from_secs(1),
            batch_size: 100,
        }
    }
}

/// Fires cron ticks on one node; run one per node, as many nodes as you like.
#[derive(Debug)]
pub struct Scheduler<S> {
    store: S,
    config: SchedulerConfig,
}

impl<S: Store> Scheduler<S> {
    /// A scheduler on the store's clock; nothing runs until [`Scheduler::run`].
    pub fn new(store: S, config: impl Into<SchedulerConfig>) -> Self {
        Self { store, config: config.into() }
    }

    /// Fires every tick due now by the scheduler's clock, one transaction per batch, and
    /// computes the first tick of triggers that have none yet. Ticks that another scheduler
    /// holds at the same moment are its to fire. What [`Scheduler::run`] does on each look; tests
    /// call it to step a scheduler.
    pub async fn fire_due(&self) -> picloud_store::Result<CronPass> {
        self.fire_at(self.store.clock().now()).await
    }

    async fn fire_at(&self, now: OffsetDateTime) -> picloud_store::Result<CronPass> {
        let batch = self.config.batch_size.max(1);
        let mut total = CronPass::default();
        loop {
            let pass = fire_due_ticks(&self.store, now, batch, &self.config.triggers).await?;
            total.triggers += pass.triggers;
            total.fired += pass.fired;
            total.parked += pass.parked;
            if pass.triggers < batch as usize {
                return Ok(total);
            }
        }
    }

    /// Runs until `shutdown`; a pass under way then is finished first.
    pub async fn run(self, mut shutdown: Shutdown) {
        tracing::info!(node = %self.config.node_id, "cron scheduler started");
        loop {
            let next_tick = match self.look().await {
                Ok(next) => next,
                Err(e) => {
                    tracing::warn!(error = %e, "firing cron ticks failed; trying again after the poll");
                    None
                }
            };
            let tick = async {
                match next_tick {
                    Some(at) => self.store.clock().sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = shutdown.recv() => break,
                () = tick => {}
                () = tokio::time::sleep(self.config.poll_interval) => {}
            }
        }
        tracing::info!(node = %self.config.node_id, "cron scheduler stopped");
    }

    /// One look at the triggers: fires what is due, and returns the next tick still to come by
    /// the clock. A tick that is due but not fired here is held by another scheduler's pass; the
    /// poll interval brings the scheduler back to it.
    async fn look(&self) -> picloud_store::Result<Option<OffsetDateTime>> {
        let now = self.store.clock().now();
        let mut next = self.store.next_cron_tick(now).await?;
        if next.is_some_and(|at| at <= now) {
            let pass = self.fire_at(now).await?;
            if pass.triggers > 0 {
                tracing::debug!(fired = pass.fired, triggers = pass.triggers, "cron pass");
            }
            next = self.store.next_cron_tick(now).await?;
        }
        Ok(next.filter(|at| *at > now))
    }
}
