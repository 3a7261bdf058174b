//! The HTTP API (axum) and the NATS ingest of picloud-router (DESIGN §5, §6, §8, §9).
//!
//! Architecture invariant: the API and the ingest write events and their outbox rows in one
//! transaction (through `picloud_store::events`) and never deliver async events themselves; the
//! one delivery an API node makes is the sync call its own caller waits on
//! (`picloud_dispatch::deliver_sync`). It depends on `core`, `store`, `dispatch` (that sync
//! delivery, the node's configuration) and `worker` (the queue loop the ingest runs on, and the
//! stop signal), never on the binary.
#![warn(missing_docs)]

use std::sync::Arc;

use picloud_store::PgStore;
use tokio_util::task::TaskTracker;

mod auth;
mod config;
mod error;
mod extract;
mod ingest;
mod limits;
pub mod ops;
pub mod routes;
mod tail;
pub mod views;

use auth::KeptAuthorizations;
pub use auth::{Caller, Via, authenticate};
pub use config::ApiConfig;
pub use error::{ApiError, ErrorBody, ErrorCode};
pub use extract::{Page, PageQuery};
pub use ingest::{Ingest, IngestError};
pub use limits::within_limits;
pub use ops::Ops;
pub use routes::router;

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// The operations, over the store whose commits wait for the WAL flush (writes are
    /// acknowledged to clients).
    pub ops: Ops<PgStore>,
    /// The node's NATS connection.
    pub nats: async_nats::Client,
    /// The configuration.
    pub config: Arc<ApiConfig>,
    /// The sync calls this node delivers: they run past their HTTP request when the caller gives
    /// up first, and shutdown waits for them ([`ApiState::finish_sync_calls`]).
    sync_calls: TaskTracker,
    /// Callers' authorizations, for the writes that guard themselves with the epoch they were
    /// read at (sync invocations, KV puts).
    kept: Arc<KeptAuthorizations>,
    /// Losses of the NATS connection: a sync call in flight on a lost connection answers at once.
    connection: picloud_dispatch::ConnectionWatch,
    /// Where the answers to this node's sync calls come back.
    sync_answers: picloud_dispatch::SyncAnswers,
    /// Requests in flight on the HTTP API.
    http_limits: Arc<limits::HttpLimits>,
    /// Sync calls in flight, by app.
    sync_slots: Arc<limits::AppSlots>,
    /// Live tails open, by app.
    tails: Arc<tail::Tails>,
}

impl ApiState {
    /// The state of a node's API and ingest. The events it writes are held to what the NATS
    /// server can carry for bodies of `config.max_payload_bytes`
    /// (`TriggerConfig::max_event_data_bytes`).
    pub fn new(store: PgStore, nats: async_nats::Client, mut config: ApiConfig) -> ApiState {
        config.node.triggers.max_event_data_bytes =
            picloud_core::protocol::max_event_data_bytes(config.max_payload_bytes);
        ApiState {
            ops: Ops::new(store.clone(), config.node.triggers, config.webhook_allow_nets.clone()),
            connection: picloud_dispatch::ConnectionWatch::spawn(&nats),
            sync_answers: picloud_dispatch::SyncAnswers::new(
                nats.clone(),
                picloud_dispatch::Reporter::spawn(store, nats.clone(), config.node.clone()),
            ),
            nats,
            sync_calls: TaskTracker::new(),
            kept: Arc::default(),
            http_limits: Arc::new(limits::HttpLimits::new(config.http_max_in_flight)),
            sync_slots: Arc::new(limits::AppSlots::sync_calls(config.sync_max_in_flight_per_app)),
            tails: Arc::new(tail::Tails::new(config.tail_max_per_app)),
            config: Arc::new(config),
        }
    }

    /// Waits until every sync call this node started has resolved its result — to its caller or
    /// to the abandoned log — completed its row and had its statistics written. Call it once no
    /// more requests come in.
    pub async fn finish_sync_calls(&self) {
        self.sync_calls.close();
        if !self.sync_calls.is_empty() {
            tracing::info!(calls = self.sync_calls.len(), "waiting for sync calls to resolve their results");
        }
        self.sync_calls.wait().await;
        self.sync_answers.flush_reports().await;
    }

    /// Cancels a delivery ([`Ops::cancel_delivery`]) and, when an attempt of it was in flight,
    /// tells its handler's workers on `picloud.v1.cancel.<app>.<handler>` (DESIGN §14), after the
    /// cancel committed: the dead letter it became.
    pub async fn cancel_delivery(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<views::DeadLetterView, ApiError> {
        let cancelled = self.ops.cancel_delivery(caller, id).await?;
        if let Some(handler) = &cancelled.in_flight {
            let subject = self.config.node.subjects.cancel(cancelled.app.as_str(), handler.as_str());
            let notice = picloud_core::protocol::CancelNotice { id: cancelled.dead_letter.delivery_id };
            let body = serde_json::to_vec(&notice).expect("a notice serializes");
            // The cancel is committed: a handler not told only runs on, and its answer retries nothing.
            if let Err(e) = self.nats.publish(subject, body.into()).await {
                tracing::warn!(delivery_id = %notice.id, error = %e, "cancelled, but telling its handler failed");
            }
        }
        Ok(cancelled.dead_letter)
    }
}

/// Serves `app` (the API's [`router`] over `state`, with whatever the node adds to it) on
/// `listener` until `shutdown`; requests in progress are finished, and so are the sync calls they
/// started. Live tails end at once.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    state: ApiState,
    mut shutdown: picloud_worker::Shutdown,
) -> std::io::Result<()> {
    let tails = state.tails.clone();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.recv().await;
            tails.close();
        })
        .await;
    state.finish_sync_calls().await;
    served
}
