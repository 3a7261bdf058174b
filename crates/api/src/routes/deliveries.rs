//! Deliveries in the outbox (DESIGN §14, §15).

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use utoipa::IntoParams;

use crate::ApiState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{Page, PageQuery, PathParams, QueryParams};
use crate::ops::deliveries::DeliveryQuery as Filter;
use crate::views::{DeadLetterView, DeliveryDetailView, DeliveryView};

/// Filters of the delivery list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeliveryQuery {
    /// Only deliveries of this trigger (by name).
    pub trigger: Option<String>,
    /// Only deliveries in this state: `pending`, `scheduled`, `in_flight` or `waiting`.
    pub state: Option<String>,
    /// The `next` cursor of the previous page.
    pub after: Option<String>,
    /// Items per page: default 50, at most 500.
    pub limit: Option<u32>,
}

/// The app's deliveries in the outbox, oldest first, without their events.
#[utoipa::path(get, path = "/v1/apps/{app}/deliveries", tag = "deliveries", operation_id = "list_deliveries",
    params(("app" = String, Path), DeliveryQuery),
    responses(
        (status = 200, body = Page<DeliveryView>, description = "a page of deliveries, oldest first"),
        (status = 404, body = ErrorBody, description = "`trigger_not_found`: no trigger of that name"),
        (status = 422, body = ErrorBody, description = "`invalid_field`: not a state, or not a trigger name")))]
pub async fn list(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams(_app): PathParams<String>,
    QueryParams(q): QueryParams<DeliveryQuery>,
) -> Result<Json<Page<DeliveryView>>, ApiError> {
    let filter = Filter { trigger: q.trigger, state: q.state };
    let page = PageQuery { after: q.after, limit: q.limit };
    Ok(Json(state.ops.list_deliveries(&caller, filter, &page).await?))
}

/// One delivery in the outbox, with its event and its finished attempts (the last 20).
#[utoipa::path(get, path = "/v1/apps/{app}/deliveries/{id}", tag = "deliveries", operation_id = "get_delivery",
    params(("app" = String, Path), ("id" = Uuid, Path)),
    responses(
        (status = 200, body = DeliveryDetailView, description = "the delivery, its event and its attempt history"),
        (status = 404, body = ErrorBody, description = "`delivery_not_found`: no such delivery in the outbox (it finished, or never was)")))]
pub async fn get(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams((_, id)): PathParams<(String, String)>,
) -> Result<Json<DeliveryDetailView>, ApiError> {
    Ok(Json(state.ops.delivery(&caller, &id).await?))
}

/// Cancel a delivery that has not finished: it becomes a dead letter with reason `cancelled`,
/// resolved `ignored`, and is never delivered again; a function handler running it is told to
/// stop on `picloud.v1.cancel.<app>.<handler>`.
#[utoipa::path(post, path = "/v1/apps/{app}/deliveries/{id}/cancel", tag = "deliveries", operation_id = "cancel_delivery",
    params(("app" = String, Path), ("id" = Uuid, Path)),
    responses(
        (status = 200, body = DeadLetterView, description = "the dead letter the delivery became, resolved `ignored`"),
        (status = 404, body = ErrorBody, description = "`delivery_not_found`: no such delivery in the outbox (it finished, or never was)"),
        (status = 409, body = ErrorBody, description = "`not_cancellable`: a sync call, or a delivery of a `dead_letter` trigger")))]
pub async fn cancel(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams((_, id)): PathParams<(String, String)>,
) -> Result<Json<DeadLetterView>, ApiError> {
    Ok(Json(state.cancel_delivery(&caller, &id).await?))
}
