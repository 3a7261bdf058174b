//! Dead letters (list, count, get, replay, ignore, and both in bulk) and the
//! abandoned-executions log.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use utoipa::IntoParams;

use crate::ApiState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{JsonBody, Page, PageQuery, PathParams, QueryParams};
use crate::ops::dead_letters::{BulkAction, DeadLetterQuery as Filter};
use crate::views::*;

/// Filters of the dead-letter list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeadLetterQuery {
    /// `unresolved`, `replayed`, `ignored`, `handled_by_script` or `handler_failed`.
    pub resolution: Option<String>,
    /// Only dead letters of this trigger (by name).
    pub trigger: Option<String>,
    /// Only those that died for this reason: `exhausted`, `rejected`, `max_depth`,
    /// `unauthorized` or `cancelled`.
    pub reason: Option<String>,
    /// Only those created after this time (RFC 3339).
    pub created_after: Option<String>,
    /// Only those created before this time (RFC 3339).
    pub created_before: Option<String>,
    /// The `next` cursor of the previous page.
    pub after: Option<String>,
    /// Items per page: default 50, at most 500.
    pub limit: Option<u32>,
}

/// The app's dead letters, newest first.
#[utoipa::path(get, path = "/v1/apps/{app}/dead-letters", tag = "dead letters", operation_id = "list_dead_letters",
    params(("app" = String, Path), DeadLetterQuery),
    responses(
        (status = 200, body = Page<DeadLetterView>, description = "a page of dead letters, newest first"),
        (status = 422, body = ErrorBody, description = "`invalid_field`: not a resolution, a trigger name, a reason or a time")))]
pub async fn list(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams(_app): PathParams<String>,
    QueryParams(q): QueryParams<DeadLetterQuery>,
) -> Result<Json<Page<DeadLetterView>>, ApiError> {
    let filter = Filter {
        resolution: q.resolution,
        trigger: q.trigger,
        reason: q.reason,
        created_after: q.created_after,
        created_before: q.created_before,
    };
    let page = PageQuery { after: q.after, limit: q.limit };
    Ok(Json(state.ops.list_dead_letters(&caller, filter, &page).await?))
}

/// `resolution` of the count.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CountQuery {
    /// Only `unresolved` is counted (the dashboard badge).
    pub resolution: Option<String>,
}

/// How many dead letters are unresolved.
#[utoipa::path(get, path = "/v1/apps/{app}/dead-letters/count", tag = "dead letters", operation_id = "count_dead_letters",
    params(("app" = String, Path), CountQuery),
    responses(
        (status = 200, body = CountView, description = "how many dead letters are unresolved"),
        (status = 422, body = ErrorBody, description = "`invalid_field`: a resolution other than unresolved")))]
pub async fn count(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams(_app): PathParams<String>,
    QueryParams(q): QueryParams<CountQuery>,
) -> Result<Json<CountView>, ApiError> {
    Ok(Json(state.ops.count_dead_letters(&caller, q.resolution.as_deref()).await?))
}

/// One dead letter, with its event.
#[utoipa::path(get, path = "/v1/apps/{app}/dead-letters/{id}", tag = "dead letters", operation_id = "get_dead_letter",
    params(("app" = String, Path), ("id" = Uuid, Path)),
    responses(
        (status = 200, body = DeadLetterView, description = "the dead letter, with its event"),
        (status = 404, body = ErrorBody, description = "`dead_letter_not_found`: no such dead letter")))]
pub async fn get(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams((_, id)): PathParams<(String, String)>,
) -> Result<Json<DeadLetterView>, ApiError> {
    Ok(Json(state.ops.dead_letter(&caller, &id).await?))
}

/// Deliver the dead letter's event again to its trigger (attempts reset); it becomes `replayed`.
#[utoipa::path(post, path = "/v1/apps/{app}/dead-letters/{id}/replay", tag = "dead letters", operation_id = "replay_dead_letter",
    params(("app" = String, Path), ("id" = Uuid, Path)),
    responses(
        (status = 200, body = Replayed, description = "the dead letter, now replayed, and the new delivery"),
        (status = 404, body = ErrorBody, description = "`dead_letter_not_found`: no such dead letter"),
        (status = 409, body = ErrorBody, description = "`already_replayed`, `trigger_gone`: replayed already, or its trigger no longer exists")))]
pub async fn replay(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams((_, id)): PathParams<(String, String)>,
) -> Result<Json<Replayed>, ApiError> {
    Ok(Json(state.ops.replay_dead_letter(&caller, &id).await?))
}

/// Mark an unresolved dead letter `ignored`.
#[utoipa::path(post, path = "/v1/apps/{app}/dead-letters/{id}/ignore", tag = "dead letters", operation_id = "ignore_dead_letter",
    params(("app" = String, Path), ("id" = Uuid, Path)),
    responses(
        (status = 200, body = DeadLetterView, description = "the dead letter, now ignored"),
        (status = 404, body = ErrorBody, description = "`dead_letter_not_found`: no such dead letter"),
        (status = 409, body = ErrorBody, description = "`already_resolved`: the dead letter is resolved already")))]
pub async fn ignore(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams((_, id)): PathParams<(String, String)>,
) -> Result<Json<DeadLetterView>, ApiError> {
    Ok(Json(state.ops.ignore_dead_letter(&caller, &id).await?))
}

/// Replay every dead letter the body's filter takes, each once, however many replays race for
/// it: `resolution` may be `unresolved` (the default), `ignored`, `handled_by_script` or
/// `handler_failed`, never `replayed`. Dead letters whose trigger was deleted cannot be
/// replayed: they are left as they are (ignore them to resolve them) and not counted. It works
/// in batches, each committed before the next: a request that runs out of time keeps the
/// batches it finished, and calling again replays the rest.
#[utoipa::path(post, path = "/v1/apps/{app}/dead-letters/replay", tag = "dead letters", operation_id = "replay_dead_letters",
    params(("app" = String, Path)), request_body = BulkDeadLetters,
    responses(
        (status = 200, body = CountView, description = "how many dead letters this call replayed, one new delivery each; with `dry_run`, how many it would replay"),
        (status = 422, body = ErrorBody, description = "`invalid_field`: a field breaks its rule (the message names it), or `resolution` is `replayed`")))]
pub async fn bulk_replay(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams(_app): PathParams<String>,
    JsonBody(body): JsonBody<BulkDeadLetters>,
) -> Result<Json<CountView>, ApiError> {
    Ok(Json(state.ops.bulk_dead_letters(&caller, BulkAction::Replay, &body).await?))
}

/// Mark every unresolved dead letter the body's filter takes `ignored`, each once, however many
/// actions race for it: `resolution` may only be `unresolved` (the default). It works in batches,
/// each committed before the next: a request that runs out of time keeps the batches it
/// finished, and calling again ignores the rest.
#[utoipa::path(post, path = "/v1/apps/{app}/dead-letters/ignore", tag = "dead letters", operation_id = "ignore_dead_letters",
    params(("app" = String, Path)), request_body = BulkDeadLetters,
    responses(
        (status = 200, body = CountView, description = "how many dead letters this call ignored; with `dry_run`, how many it would ignore"),
        (status = 422, body = ErrorBody, description = "`invalid_field`: a field breaks its rule (the message names it), or `resolution` is not `unresolved`")))]
pub async fn bulk_ignore(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams(_app): PathParams<String>,
    JsonBody(body): JsonBody<BulkDeadLetters>,
) -> Result<Json<CountView>, ApiError> {
    Ok(Json(state.ops.bulk_dead_letters(&caller, BulkAction::Ignore, &body).await?))
}

/// Sync results nobody waited for, newest first.
#[utoipa::path(get, path = "/v1/apps/{app}/abandoned-executions", tag = "dead letters", operation_id = "list_abandoned_executions",
    params(("app" = String, Path), PageQuery),
    responses((status = 200, body = Page<AbandonedView>, description = "a page of abandoned executions, newest first")))]
pub async fn abandoned(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams(_app): PathParams<String>,
    QueryParams(page): QueryParams<PageQuery>,
) -> Result<Json<Page<AbandonedView>>, ApiError> {
    Ok(Json(state.ops.list_abandoned(&caller, &page).await?))
}
