//! Deliveries in the outbox (DESIGN §14, §15): cancel.

use picloud_core::{AppSlug, Capability, HandlerName};
use picloud_store::Store;
use picloud_store::events::{self, Cancel};
use uuid::Uuid;

use super::Ops;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorCode};
use crate::views::DeadLetterView;

/// A cancelled delivery.
#[derive(Debug)]
pub struct Cancelled {
    /// The app.
    pub app: AppSlug,
    /// The dead letter it became, resolved `ignored`.
    pub dead_letter: DeadLetterView,
    /// The function handler whose attempt was in flight: its workers are told to stop it.
    pub in_flight: Option<HandlerName>,
}

/// A delivery's id: a text that is not one names no delivery.
fn delivery_id(raw: &str) -> Result<Uuid, ApiError> {
    raw.parse().map_err(|_| not_found(raw))
}

fn not_found(id: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        ErrorCode::DeliveryNotFound,
        format!("no delivery {id} in the outbox: it finished, or never was"),
    )
}

impl<S: Store> Ops<S> {
    /// Cancels a delivery that has not finished (DESIGN §14): it becomes a dead letter with
    /// reason `cancelled`, resolved `ignored`, and is never delivered again. Sync calls (their
    /// callers wait) and deliveries of `dead_letter` triggers cannot be cancelled.
    pub async fn cancel_delivery(&self, caller: &Caller, id: &str) -> Result<Cancelled, ApiError> {
        let app = caller.require_app(Capability::AppDeadLetterManage)?;
        let id = delivery_id(id)?;
        let mut tx = self.store.begin().await?;
        match events::cancel(&self.store, &mut tx, app.id, id).await? {
            Cancel::NotFound => Err(not_found(id)),
            Cancel::NotCancellable(delivery) if delivery.sync => Err(ApiError::new(
                ErrorCode::NotCancellable,
                "a sync call cannot be cancelled: its caller waits for its answer",
            )),
            Cancel::NotCancellable(_) => Err(ApiError::new(
                ErrorCode::NotCancellable,
                "a delivery of a dead_letter trigger cannot be cancelled: it reports a dead letter and never becomes one",
            )),
            Cancel::Cancelled { dead_letter, in_flight } => {
                // Its lane's next delivery may be due now.
                events::commit_and_wake(&self.store, tx).await?;
                Ok(Cancelled { app: app.slug.clone(), dead_letter: dead_letter.into(), in_flight })
            }
        }
    }
}
