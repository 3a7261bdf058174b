//! Deliveries in the outbox (DESIGN §14, §15): list, get with history, cancel.

use picloud_core::{AppSlug, Capability, HandlerName, TriggerName};
use picloud_store::events::{self, Cancel};
use picloud_store::{DeliveryFilter, DeliveryState, Store};
use uuid::Uuid;

use super::Ops;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorCode};
use crate::extract::{Page, PageQuery};
use crate::views::{DeadLetterView, DeliveryDetailView, DeliveryView};

/// Which deliveries a list shows.
#[derive(Debug, Clone, Default)]
pub struct DeliveryQuery {
    /// Only those of this trigger (by name).
    pub trigger: Option<String>,
    /// Only those in this state: `pending`, `scheduled`, `in_flight` or `waiting`.
    pub state: Option<String>,
}

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
    /// A page of the app's deliveries in the outbox, oldest first, without their events.
    pub async fn list_deliveries(
        &self,
        caller: &Caller,
        query: DeliveryQuery,
        page: &PageQuery,
    ) -> Result<Page<DeliveryView>, ApiError> {
        let app = caller.require_app(Capability::AppRead)?;
        let state = query
            .state
            .map(|s| {
                DeliveryState::parse(&s).ok_or_else(|| {
                    ApiError::invalid("state", "expected pending, scheduled, in_flight or waiting")
                })
            })
            .transpose()?;
        let trigger_id = match query.trigger {
            None => None,
            Some(name) => {
                let name = TriggerName::parse(name).map_err(|e| ApiError::invalid("trigger", e))?;
                let trigger = self.store.trigger(app.id, name.as_str()).await?;
                Some(trigger.ok_or_else(|| super::triggers::not_found(name.as_str()))?.id)
            }
        };
        let filter = DeliveryFilter { trigger_id, state };
        let found = self.store.list_deliveries(app.id, &filter, page.after_id()?, page.limit()).await?;
        let now = self.store.clock().now();
        Ok(Page::from_store(found, |d| d.id.to_string(), |d| DeliveryView::at(d, now)))
    }

    /// One delivery in the outbox, with its event and its finished attempts.
    pub async fn delivery(&self, caller: &Caller, id: &str) -> Result<DeliveryDetailView, ApiError> {
        let app = caller.require_app(Capability::AppRead)?;
        let found = self.store.delivery(app.id, delivery_id(id)?).await?.ok_or_else(|| not_found(id))?;
        Ok(DeliveryDetailView::at(found, self.store.clock().now()))
    }

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
