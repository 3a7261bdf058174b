//! What a completion batch reports once it committed (DESIGN §15): the attempts it adds to its
//! triggers' statistics, and the outcomes it publishes to its apps' live tails.
//!
//! A [`Reporter`] takes the reports of a relay's completion batches, or of the sync calls a node
//! delivers itself: each report is computed where the batch completed (counting and encoding,
//! no I/O) and queued, and the reporter's own task makes them: it publishes each report's
//! outcomes as it takes the report (between its statistics' writes), a message per app and
//! chunk, and merges the statistics of up to a second into one upsert per trigger. Neither a slow
//! database nor a slow NATS holds up a completion or the slots it frees: a report that finds the
//! queue full is dropped (and counted in the log), and a failure to make one is logged. A node
//! that stops cleanly [flushes](Reporter::flush) its reporter, so that the statistics it merged
//! are written before it exits.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::Client;
use bytes::Bytes;
use picloud_core::protocol::TailOutcome;
use picloud_core::{AppSlug, TriggerId};
use picloud_store::{AttemptStats, Store};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

use crate::complete::Done;
use crate::config::NodeConfig;

/// Reports queued and not yet made; past this, reports are dropped.
const QUEUED_REPORTS: usize = 256;
/// How long attempts are merged before they are written: a trigger's statistics cost a reporter
/// one upsert a second at most, however many batches complete, and count each attempt in the minute
/// it was written, up to this much after it ended.
const STATS_EVERY: Duration = Duration::from_secs(1);
/// The longest a stopping node waits for its reporter ([`Reporter::flush`]): a NATS or a
/// database that does not answer must not hold up the node's exit.
const FLUSH_WITHIN: Duration = Duration::from_secs(5);
/// The most outcomes one tail message carries (a tail's reader queues messages, and NATS caps a
/// message's size).
const TAIL_CHUNK: usize = 256;

/// The attempts of `batch` its statistics count, per trigger, each trigger once.
pub(crate) fn attempt_stats(batch: &[Done]) -> Vec<AttemptStats> {
    let mut per_trigger: HashMap<TriggerId, AttemptStats> = HashMap::new();
    for d in batch {
        if let (Some(trigger_id), Some(outcome), Some(latency)) =
            (d.trigger_id, d.answer.counted(), d.latency)
        {
            per_trigger
                .entry(trigger_id)
                .or_insert_with(|| AttemptStats::new(trigger_id))
                .record(outcome, latency);
        }
    }
    per_trigger.into_values().collect()
}

/// The outcomes of `batch` a tail shows, per app: every attempt that was sent.
pub(crate) fn tail_outcomes<'a>(
    batch: &'a [Done],
    node: &str,
    handler_timeout: Duration,
    ended_at: OffsetDateTime,
) -> HashMap<&'a AppSlug, Vec<TailOutcome>> {
    let mut per_app: HashMap<&AppSlug, Vec<TailOutcome>> = HashMap::new();
    for d in batch {
        let (Some(app), Some(latency)) = (&d.app_slug, d.latency) else { continue };
        per_app.entry(app).or_default().push(TailOutcome {
            delivery_id: d.id,
            trigger: d.trigger_name.clone(),
            kind: d.kind,
            attempt: d.attempt,
            outcome: d.answer.outcome().to_owned(),
            latency_ms: Some(latency.as_secs_f64() * 1e3),
            error: d.answer.error(handler_timeout),
            node: node.to_owned(),
            ended_at,
        });
    }
    per_app
}

/// Writes the attempts merged since the last write, one upsert for every trigger.
async fn record<S: Store>(store: &S, node: &str, pending: &mut HashMap<TriggerId, AttemptStats>) {
    if pending.is_empty() {
        return;
    }
    let stats: Vec<AttemptStats> = pending.drain().map(|(_, counted)| counted).collect();
    if let Err(e) = store.record_attempts(node, &stats).await {
        tracing::warn!(error = %e, triggers = stats.len(), "recording attempt statistics failed; they are not counted");
    }
}

/// One batch's report, ready to be made.
#[derive(Debug)]
struct Report {
    stats: Vec<AttemptStats>,
    /// Tail messages: subject and body.
    tails: Vec<(String, Bytes)>,
}

/// What a reporter's task is handed.
#[derive(Debug)]
enum Queued {
    Report(Report),
    /// Write what is merged, then say so.
    Flush(oneshot::Sender<()>),
}

/// Makes the reports of completed batches on a task of its own; see the module documentation.
#[derive(Debug, Clone)]
pub struct Reporter {
    reports: mpsc::Sender<Queued>,
    config: NodeConfig,
}

impl Reporter {
    /// Starts the reporter's task (on the current Tokio runtime); it ends once every handle is
    /// dropped and what was queued is made.
    pub fn spawn<S: Store>(store: S, nats: Client, config: NodeConfig) -> Reporter {
        let (reports, mut queued) = mpsc::channel::<Queued>(QUEUED_REPORTS);
        let node = config.node_id.clone();
        tokio::spawn(async move {
            let mut pending: HashMap<TriggerId, AttemptStats> = HashMap::new();
            let mut write_at = None;
            loop {
                let next = match write_at {
                    Some(at) => tokio::time::timeout_at(at, queued.recv()).await,
                    None => Ok(queued.recv().await),
                };
                let report = match next {
                    Ok(Some(Queued::Report(report))) => report,
                    Ok(Some(Queued::Flush(done))) => {
                        record(&store, &node, &mut pending).await;
                        write_at = None;
                        let _ = done.send(());
                        continue;
                    }
                    Ok(None) => break,
                    Err(_) => {
                        record(&store, &node, &mut pending).await;
                        write_at = None;
                        continue;
                    }
                };
                for counted in report.stats {
                    match pending.get_mut(&counted.trigger_id) {
                        Some(merged) => merged.merge(&counted),
                        None => drop(pending.insert(counted.trigger_id, counted)),
                    }
                }
                if write_at.is_none() && !pending.is_empty() {
                    write_at = Some(tokio::time::Instant::now() + STATS_EVERY);
                }
                for (subject, body) in report.tails {
                    if let Err(e) = nats.publish(subject, body).await {
                        tracing::debug!(error = %e, "publishing outcomes to the live tail failed");
                    }
                }
            }
            record(&store, &node, &mut pending).await;
        });
        Reporter { reports, config }
    }

    /// Queues the report of a completed `batch`; never waits.
    pub fn report(&self, batch: &[Done]) {
        let config = &self.config;
        let outcomes =
            tail_outcomes(batch, &config.node_id, config.handler_timeout, OffsetDateTime::now_utc());
        let mut tails = Vec::new();
        for (app, outcomes) in outcomes {
            for chunk in outcomes.chunks(TAIL_CHUNK) {
                let body = serde_json::to_vec(chunk).expect("outcomes serialize");
                tails.push((config.subjects.tail(app.as_str()), Bytes::from(body)));
            }
        }
        let report = Report { stats: attempt_stats(batch), tails };
        if self.reports.try_send(Queued::Report(report)).is_err() {
            tracing::warn!(
                rows = batch.len(),
                "the reporter is behind: a batch's statistics and tail outcomes are dropped"
            );
        }
    }

    /// Waits until every report queued before this call is made, and the statistics merged so
    /// far are written (or their write failed and was logged), for [`FLUSH_WITHIN`] at most. A
    /// node calls it once its last batch completed, before it exits.
    pub async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        let flushing = async {
            if self.reports.send(Queued::Flush(done)).await.is_ok() {
                let _ = flushed.await;
            }
        };
        if tokio::time::timeout(FLUSH_WITHIN, flushing).await.is_err() {
            tracing::warn!(
                "the reporter did not finish in time: the last statistics and tail outcomes are dropped"
            );
        }
    }
}
