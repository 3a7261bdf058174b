//! What a node tells Prometheus: the metric names, the process-wide recorder, the relay's
//! counters and histograms, and the database gauges, read on a timer.
//!
//! Counters and histograms are recorded where the work happens (the relay, the completer, the
//! janitor) through the `metrics` facade, labelled with the node. Gauges that describe the
//! database — the due backlog, the age of its oldest row, unresolved dead letters, abandoned
//! executions — are the same for every node; each node reads them once per interval
//! ([`Metrics::refresh_gauges_every`], `PICLOUD_METRICS_INTERVAL_MS`) and `/metrics` renders the
//! values last read. `/metrics` needs no token, so however often it is scraped it costs no
//! query: `picloud_gauge_reads_total` counts the reads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use metrics::{SharedString, Unit};
use metrics_exporter_prometheus::formatting::{write_help_line, write_type_line};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use picloud_store::PgStore;
use picloud_worker::Shutdown;

use crate::answer::Answer;
use crate::complete::{Completed, Done};

/// Attempts by outcome (labels `node`, `outcome`).
pub const DELIVERY_ATTEMPTS: &str = "picloud_delivery_attempts_total";
/// Seconds from publishing a delivery to its answer or its deadline (labels `node`, `outcome`).
pub const ATTEMPT_DURATION: &str = "picloud_delivery_attempt_duration_seconds";
/// What completions did with the rows (labels `node`, `result`).
pub const COMPLETIONS: &str = "picloud_delivery_completions_total";
/// Rows per non-empty claim (label `node`).
pub const CLAIM_BATCH: &str = "picloud_relay_claim_batch_rows";
/// Rows per completion transaction (label `node`).
pub const COMPLETION_BATCH: &str = "picloud_relay_completion_batch_rows";
/// Rows the janitor deleted (labels `node`, `table`).
pub const JANITOR_DELETED: &str = "picloud_janitor_deleted_total";
/// Outbox rows due now and not leased: what relays have yet to claim.
pub const DUE_BACKLOG: &str = "picloud_outbox_due_rows";
/// How long the oldest of those rows has been due, in seconds (0 when none is).
pub const OLDEST_DUE_AGE: &str = "picloud_outbox_oldest_due_age_seconds";
/// Dead letters without a resolution.
pub const UNRESOLVED_DEAD_LETTERS: &str = "picloud_dead_letters_unresolved";
/// Rows of `abandoned_executions` (kept for their retention).
pub const ABANDONED_EXECUTIONS: &str = "picloud_abandoned_executions";
/// Reads of the database gauges by this node: one per interval, however often it is scraped.
pub const GAUGE_READS: &str = "picloud_gauge_reads_total";

/// The database gauges and what each says, in the order they are rendered.
const DATABASE_GAUGES: [(&str, &str); 4] = [
    (DUE_BACKLOG, "Outbox rows due now and not leased by a relay."),
    (OLDEST_DUE_AGE, "How long the oldest due, unleased outbox row has been due, in seconds."),
    (UNRESOLVED_DEAD_LETTERS, "Dead letters without a resolution."),
    (ABANDONED_EXECUTIONS, "Sync results nobody took, kept for their retention."),
];

/// Upper bounds of the attempt-duration buckets, in seconds: from a local handler's millisecond
/// to the longest handler timeout worth telling apart.
const DURATION_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
/// Upper bounds of the batch-size buckets, in rows (a claim takes at most 5000, a completion
/// at most 2000).
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0];
/// How often recorded histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Why the recorder could not be installed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("installing the metrics recorder failed: {0}")]
pub struct MetricsError(String);

/// The process's Prometheus recorder and one node's database gauges; renders both.
#[derive(Debug, Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
    /// Written by the node's gauge reader, read by every render.
    gauges: Arc<Gauges>,
}

/// The database gauges as last read.
#[derive(Debug)]
struct Gauges {
    /// In the order of [`DATABASE_GAUGES`]; `NaN` (unknown) before the first read and after a
    /// read that failed, rather than a stale value.
    values: Mutex<[f64; 4]>,
    /// Reads so far ([`GAUGE_READS`]).
    reads: AtomicU64,
}

impl Default for Gauges {
    fn default() -> Self {
        Self { values: Mutex::new([f64::NAN; 4]), reads: AtomicU64::new(0) }
    }
}

/// The recorder of this process, once installed (or why installing it failed).
static INSTALLED: OnceLock<Result<PrometheusHandle, MetricsError>> = OnceLock::new();

impl Metrics {
    /// Installs the Prometheus recorder as this process's global `metrics` recorder, on first
    /// call; later calls share it, so a test binary that builds many nodes may call it for each.
    /// Each call has database gauges of its own, for the node it serves. Fails if another
    /// recorder was installed first.
    ///
    /// Metrics recorded before the recorder is installed are lost: install it before starting
    /// relays. A background thread folds histogram samples into their buckets every few
    /// seconds, so memory stays bounded when nobody scrapes.
    pub fn install() -> Result<Metrics, MetricsError> {
        let handle = INSTALLED.get_or_init(install).clone()?;
        Ok(Metrics { handle, gauges: Arc::default() })
    }

    /// Everything this process recorded and the database gauges as last read, in the
    /// Prometheus text format. Touches no database.
    pub fn render(&self) -> String {
        let mut text = self.handle.render();
        let values = *self.gauges.values.lock().unwrap_or_else(PoisonError::into_inner);
        for ((name, help), value) in DATABASE_GAUGES.iter().zip(values) {
            write_help_line(&mut text, name, None, None, help);
            write_type_line(&mut text, name, None, None, "gauge");
            text.push_str(&format!("{name} {value}\n"));
        }
        let reads = self.gauges.reads.load(Ordering::Relaxed);
        write_help_line(&mut text, GAUGE_READS, None, None, "Reads of the database gauges by this node.");
        write_type_line(&mut text, GAUGE_READS, None, None, "counter");
        text.push_str(&format!("{GAUGE_READS} {reads}\n"));
        text
    }

    /// Reads the database gauges from `store` once (one query) and keeps them for
    /// [`Metrics::render`]. When the database cannot be read the gauges say `NaN` (unknown)
    /// until the next read, rather than keep a stale value.
    pub async fn refresh_gauges(&self, store: &PgStore) {
        let values = match store.gauges().await {
            Ok(g) => [
                g.due as f64,
                g.oldest_due_age_s,
                g.unresolved_dead_letters as f64,
                g.abandoned_executions as f64,
            ],
            Err(e) => {
                tracing::warn!(error = %e, "reading the database gauges failed; they read NaN");
                [f64::NAN; 4]
            }
        };
        *self.gauges.values.lock().unwrap_or_else(PoisonError::into_inner) = values;
        self.gauges.reads.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads the database gauges every `interval`, the first time at once, until `shutdown`. A
    /// read that takes longer than the interval delays the next one: reads never pile up.
    pub async fn refresh_gauges_every(self, store: PgStore, interval: Duration, mut shutdown: Shutdown) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let refreshing = async {
            loop {
                ticks.tick().await;
                self.refresh_gauges(&store).await;
            }
        };
        tokio::select! {
            () = shutdown.recv() => {}
            _ = refreshing => {}
        }
    }
}

fn install() -> Result<PrometheusHandle, MetricsError> {
    let error = |e: metrics_exporter_prometheus::BuildError| MetricsError(e.to_string());
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(ATTEMPT_DURATION.into()), DURATION_BUCKETS)
        .map_err(error)?
        .set_buckets_for_metric(Matcher::Full(CLAIM_BATCH.into()), BATCH_BUCKETS)
        .map_err(error)?
        .set_buckets_for_metric(Matcher::Full(COMPLETION_BATCH.into()), BATCH_BUCKETS)
        .map_err(error)?
        .install_recorder()
        .map_err(error)?;
    describe();
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("picloud-metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            }
        })
        .map_err(|e| MetricsError(format!("starting the upkeep thread: {e}")))?;
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_histogram};
    describe_counter!(DELIVERY_ATTEMPTS, "Delivery attempts by what they came to.");
    describe_histogram!(
        ATTEMPT_DURATION,
        Unit::Seconds,
        "Time from publishing a delivery to its answer (or its deadline)."
    );
    describe_counter!(
        COMPLETIONS,
        "Rows completed by what became of them: delivered, retried, dead_lettered, answered, \
         orphaned, dropped (a dead-letter delivery that ended without success), waiting (an email \
         while no node sends email)."
    );
    describe_histogram!(CLAIM_BATCH, Unit::Count, "Rows taken by one claim that found any.");
    describe_histogram!(COMPLETION_BATCH, Unit::Count, "Rows completed by one transaction.");
    describe_counter!(JANITOR_DELETED, "Rows the janitor deleted past their retention.");
}

/// What one relay records, labelled with its node.
#[derive(Debug, Clone)]
pub(crate) struct RelayMetrics {
    node: SharedString,
}

impl RelayMetrics {
    pub(crate) fn new(node: &str) -> Self {
        Self { node: SharedString::from_shared(Arc::from(node)) }
    }

    /// A claim took `rows` rows (at least one).
    pub(crate) fn claimed(&self, rows: usize) {
        metrics::histogram!(CLAIM_BATCH, "node" => self.node.clone()).record(rows as f64);
    }

    /// A published delivery got `answer` (or its deadline passed) `after` publishing.
    pub(crate) fn answered(&self, answer: &Answer, after: Duration) {
        metrics::histogram!(ATTEMPT_DURATION, "node" => self.node.clone(), "outcome" => answer.outcome())
            .record(after.as_secs_f64());
    }

    /// A sync call delivered by the node its caller waits on got `answer` `after` publishing, and
    /// its result was resolved (to the caller, or to the abandoned log).
    pub(crate) fn sync_call(&self, answer: &Answer, after: Duration) {
        self.answered(answer, after);
        let label = answer.outcome();
        metrics::counter!(DELIVERY_ATTEMPTS, "node" => self.node.clone(), "outcome" => label).increment(1);
        metrics::counter!(COMPLETIONS, "node" => self.node.clone(), "result" => "answered").increment(1);
    }

    /// A completion transaction committed `batch`, doing `stats`.
    pub(crate) fn completed(&self, batch: &[Done], stats: &Completed) {
        metrics::histogram!(COMPLETION_BATCH, "node" => self.node.clone()).record(batch.len() as f64);
        let mut by_outcome: Vec<(&'static str, u64)> = Vec::new();
        for done in batch {
            let label = done.answer.outcome();
            match by_outcome.iter_mut().find(|(l, _)| *l == label) {
                Some((_, n)) => *n += 1,
                None => by_outcome.push((label, 1)),
            }
        }
        for (label, n) in by_outcome {
            metrics::counter!(DELIVERY_ATTEMPTS, "node" => self.node.clone(), "outcome" => label)
                .increment(n);
        }
        let results = [
            ("delivered", stats.delivered),
            ("retried", stats.retried),
            ("dead_lettered", stats.dead_lettered),
            ("answered", stats.answered),
            ("orphaned", stats.orphaned),
            ("dropped", stats.dead_letter_deliveries_failed),
            ("waiting", stats.waiting),
        ];
        for (result, n) in results.into_iter().filter(|(_, n)| *n > 0) {
            metrics::counter!(COMPLETIONS, "node" => self.node.clone(), "result" => result)
                .increment(n as u64);
        }
    }
}

/// The janitor deleted `rows` rows of `table`.
pub(crate) fn janitor_deleted(node: &str, table: &'static str, rows: u64) {
    metrics::counter!(JANITOR_DELETED, "node" => node.to_owned(), "table" => table).increment(rows);
}
