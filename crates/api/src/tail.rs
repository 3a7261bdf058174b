//! Live tails (DESIGN §15): one app's delivery outcomes as Server-Sent Events, read from the
//! subject its relays publish them on (`Subjects::tail`), on any API node.
//!
//! The relays publish whether or not anybody tails, and never wait for a reader. Each tail is a
//! subscription of the node's connection, read at once by a task of its own into a short queue
//! that the response drains: a reader that falls [`BEHIND`] batches behind is disconnected
//! (an `EventSource` reconnects), so a slow reader holds up neither the node's connection nor
//! anybody else. An app has at most `PICLOUD_TAIL_MAX_PER_APP` tails open on a node, and every
//! tail ends when the node stops. A tail's credentials are checked again every
//! `ApiConfig::tail_recheck` (a minute): it ends within that of its token's revocation or expiry,
//! or of its caller's losing the role.

use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::Event;
use futures::{Stream, StreamExt as _};
use picloud_core::protocol::{EventKind, TailOutcome};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ApiState;
use crate::error::{ApiError, ErrorCode};
use crate::limits::AppSlots;
use crate::ops::tail::TailFilter;

/// How many messages of outcomes (each at most 256 of them, as the relays' `Reporter` cuts
/// them) a reader may have waiting before it is disconnected.
pub(crate) const BEHIND: usize = 16;
/// How long opening a tail waits for the NATS server to confirm its subscription.
const SUBSCRIBED_WITHIN: Duration = Duration::from_secs(5);

/// The node's live tails.
#[derive(Debug)]
pub(crate) struct Tails {
    /// Tails open, by app.
    slots: Arc<AppSlots>,
    /// Cancelled when the node stops: every tail ends, so the HTTP drain does not wait on them.
    closing: CancellationToken,
}

impl Tails {
    pub(crate) fn new(max_per_app: usize) -> Tails {
        Tails { slots: Arc::new(AppSlots::tails(max_per_app)), closing: CancellationToken::new() }
    }

    /// Ends every tail, and every tail opened from now on at once.
    pub(crate) fn close(&self) {
        self.closing.cancel();
    }
}

impl ApiState {
    /// A tail of `filter`'s app, as asked for with `credentials`: subscribed (and the
    /// subscription confirmed by the server) before this returns, so every outcome published
    /// after it is shown.
    pub async fn open_tail(
        &self,
        credentials: &str,
        filter: TailFilter,
    ) -> Result<impl Stream<Item = Event> + use<>, ApiError> {
        let slot = self.tails.slots.take(filter.app_id)?;
        let unavailable = |e: &dyn std::fmt::Display| {
            tracing::warn!(error = %e, "opening a live tail failed");
            ApiError::new(ErrorCode::NatsUnavailable, "NATS is unavailable; try again")
        };
        let subject = self.config.node.subjects.tail(filter.app.as_str());
        let mut outcomes = self.nats.subscribe(subject).await.map_err(|e| unavailable(&e))?;
        match tokio::time::timeout(SUBSCRIBED_WITHIN, self.nats.flush()).await {
            Ok(flushed) => flushed.map_err(|e| unavailable(&e))?,
            Err(e) => return Err(unavailable(&e)),
        }
        let (tx, rx) = mpsc::channel::<Vec<TailOutcome>>(BEHIND);
        let closing = self.tails.closing.clone();
        let (state, credentials) = (self.clone(), credentials.to_owned());
        tokio::spawn(async move {
            let _slot = slot;
            let every = state.config.tail_recheck;
            let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                let message = tokio::select! {
                    () = closing.cancelled() => return,
                    () = tx.closed() => return,
                    _ = recheck.tick() => {
                        if !state.may_still_tail(&credentials, &filter).await {
                            return;
                        }
                        continue;
                    }
                    message = outcomes.next() => match message {
                        Some(message) => message,
                        None => return,
                    },
                };
                let Ok(batch) = serde_json::from_slice::<Vec<TailOutcome>>(&message.payload) else {
                    continue;
                };
                let shown: Vec<TailOutcome> = batch.into_iter().filter(|o| filter.admits(o)).collect();
                if shown.is_empty() {
                    continue;
                }
                if tx.try_send(shown).is_err() {
                    tracing::info!(app = %filter.app, "a live tail fell behind, or its reader left; it is closed");
                    return;
                }
            }
        });
        let batches =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|batch| (batch, rx)) });
        Ok(batches.flat_map(futures::stream::iter).map(|outcome| {
            Event::default().event("outcome").json_data(&outcome).expect("an outcome serializes")
        }))
    }
}

impl ApiState {
    /// Whether `credentials` may still open the tail `filter` is.
    async fn may_still_tail(&self, credentials: &str, filter: &TailFilter) -> bool {
        let Ok(caller) = crate::auth::authenticate(self, credentials, Some(filter.app.as_str())).await else {
            return false;
        };
        let trigger = filter.trigger.as_ref().map(|t| t.as_str().to_owned());
        self.ops.tail_filter(&caller, trigger, filter.kind.map(EventKind::as_str)).await.is_ok()
    }
}
