//! What a completion batch reports once it committed (DESIGN §15): the attempts it adds to its
//! triggers' statistics, one upsert per trigger and batch, and the outcomes it publishes to its
//! apps' live tails, one message per app and batch. Neither may hold up or undo a completion: a
//! failure is logged and the batch stays completed.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::Client;
use picloud_core::protocol::{Subjects, TailOutcome};
use picloud_core::{AppSlug, TriggerId};
use picloud_store::{AttemptStats, Store};
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::complete::Done;
use crate::config::NodeConfig;

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

/// Records the statistics of a completed batch and publishes its outcomes to the tails.
pub(crate) async fn report<S: Store>(
    store: &S,
    nats: &Client,
    subjects: &Subjects,
    node: &str,
    handler_timeout: Duration,
    batch: &[Done],
) {
    if let Err(e) = store.record_attempts(node, &attempt_stats(batch)).await {
        tracing::warn!(error = %e, rows = batch.len(), "recording attempt statistics failed; they are not counted");
    }
    for (app, outcomes) in tail_outcomes(batch, node, handler_timeout, OffsetDateTime::now_utc()) {
        let body = serde_json::to_vec(&outcomes).expect("outcomes serialize");
        if let Err(e) = nats.publish(subjects.tail(app.as_str()), body.into()).await {
            tracing::debug!(error = %e, app = %app, "publishing outcomes to the live tail failed");
        }
    }
}

/// How long the reports of sync calls gather before they are made together.
const SYNC_REPORT_EVERY: Duration = Duration::from_millis(500);

/// The reports of the sync calls a node delivers itself (`deliver_sync`): gathered for
/// [`SYNC_REPORT_EVERY`] and made as one batch, so that a sync call, one statement of its own,
/// does not become two. Reports still gathering when the node's last handle goes are made then.
#[derive(Debug, Clone)]
pub struct SyncReports {
    calls: mpsc::UnboundedSender<Done>,
}

impl SyncReports {
    /// Starts the task that makes the reports (on the current Tokio runtime).
    pub fn spawn<S: Store>(store: S, nats: Client, config: NodeConfig) -> SyncReports {
        let (calls, mut gathered) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while gathered.recv_many(&mut batch, 1000).await > 0 {
                let node = &config;
                report(&store, &nats, &node.subjects, &node.node_id, node.handler_timeout, &batch).await;
                batch.clear();
                tokio::time::sleep(SYNC_REPORT_EVERY).await;
            }
        });
        SyncReports { calls }
    }

    /// Reports a finished sync call.
    pub(crate) fn finished(&self, call: Done) {
        let _ = self.calls.send(call);
    }
}
