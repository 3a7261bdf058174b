//! Registering, reading, changing and removing triggers.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::IntoParams;

use crate::ApiState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{JsonBody, Page, PageQuery, PathParams, QueryParams};
use crate::views::*;

/// Register a trigger; it runs as the caller's principal.
#[utoipa::path(post, path = "/v1/apps/{app}/triggers", tag = "triggers", operation_id = "register_trigger",
    params(("app" = String, Path)), request_body = RegisterTrigger,
    responses(
        (status = 201, body = TriggerView, description = "the trigger, registered"),
        (status = 409, body = ErrorBody, description = "`trigger_exists`, `queue_taken`: the name is taken, or the queue has a trigger"),
        (status = 422, body = ErrorBody, description = "`invalid_field`: a field breaks its rule, or does not fit the kind; `webhook_target_refused`: the webhook's host is an address webhooks may not reach (DESIGN §11)")))]
pub async fn register(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams(_app): PathParams<String>,
    JsonBody(body): JsonBody<RegisterTrigger>,
) -> Result<(StatusCode, Json<TriggerView>), ApiError> {
    Ok((StatusCode::CREATED, Json(state.ops.register_trigger(&caller, body).await?)))
}

/// The app's triggers, by name.
#[utoipa::path(get, path = "/v1/apps/{app}/triggers", tag = "triggers", operation_id = "list_triggers",
    params(("app" = String, Path), PageQuery),
    responses((status = 200, body = Page<TriggerView>, description = "a page of triggers, by name")))]
pub async fn list(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams(_app): PathParams<String>,
    QueryParams(page): QueryParams<PageQuery>,
) -> Result<Json<Page<TriggerView>>, ApiError> {
    Ok(Json(state.ops.list_triggers(&caller, &page).await?))
}

/// One trigger.
#[utoipa::path(get, path = "/v1/apps/{app}/triggers/{name}", tag = "triggers", operation_id = "get_trigger",
    params(("app" = String, Path), ("name" = String, Path)),
    responses(
        (status = 200, body = TriggerView, description = "the trigger"),
        (status = 404, body = ErrorBody, description = "`trigger_not_found`: no such trigger")))]
pub async fn get(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams((_, name)): PathParams<(String, String)>,
) -> Result<Json<TriggerView>, ApiError> {
    Ok(Json(state.ops.trigger(&caller, &name).await?))
}

/// `window` of the statistics.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatsQuery {
    /// `1h` (by the minute, the default), `24h` (by ten minutes) or `7d` (by the hour).
    pub window: Option<String>,
}

/// The trigger's attempts by outcome and their latency over a window, and its deliveries now.
#[utoipa::path(get, path = "/v1/apps/{app}/triggers/{name}/stats", tag = "triggers", operation_id = "trigger_stats",
    params(("app" = String, Path), ("name" = String, Path), StatsQuery),
    responses(
        (status = 200, body = TriggerStatsView, description = "every bucket of the window, and the backlog"),
        (status = 404, body = ErrorBody, description = "`trigger_not_found`: no such trigger"),
        (status = 422, body = ErrorBody, description = "`invalid_field`: not a window")))]
pub async fn stats(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams((_, name)): PathParams<(String, String)>,
    QueryParams(q): QueryParams<StatsQuery>,
) -> Result<Json<TriggerStatsView>, ApiError> {
    Ok(Json(state.ops.trigger_stats(&caller, &name, q.window.as_deref()).await?))
}

/// Enable or disable a trigger, or change its handler or retry overrides.
#[utoipa::path(patch, path = "/v1/apps/{app}/triggers/{name}", tag = "triggers", operation_id = "update_trigger",
    params(("app" = String, Path), ("name" = String, Path)), request_body = PatchTrigger,
    responses(
        (status = 200, body = TriggerView, description = "the trigger as it is now"),
        (status = 404, body = ErrorBody, description = "`trigger_not_found`: no such trigger"),
        (status = 422, body = ErrorBody, description = "`invalid_field`: the handler or retry overrides break their rules; `webhook_target_refused`: the webhook's host is an address webhooks may not reach (DESIGN §11)")))]
pub async fn patch(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams((_, name)): PathParams<(String, String)>,
    JsonBody(body): JsonBody<PatchTrigger>,
) -> Result<Json<TriggerView>, ApiError> {
    Ok(Json(state.ops.patch_trigger(&caller, &name, body).await?))
}

/// Remove a trigger; its dead letters stay.
#[utoipa::path(delete, path = "/v1/apps/{app}/triggers/{name}", tag = "triggers", operation_id = "delete_trigger",
    params(("app" = String, Path), ("name" = String, Path)),
    responses(
        (status = 204, description = "the trigger is removed"),
        (status = 404, body = ErrorBody, description = "`trigger_not_found`: no such trigger")))]
pub async fn delete(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams((_, name)): PathParams<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.ops.delete_trigger(&caller, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
