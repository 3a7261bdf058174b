//! Dead letters (list, count, get, replay, ignore) and the abandoned-executions log.

use axum::Json;
use axum::extract::State;
use picloud_core::{Capability, TriggerConfig};
use picloud_store::{AbandonedRepo, DeadLetterFilter, DeadLetterRepo, Resolution, Transactional};
use picloud_store::{PgStore, events};
use serde::Deserialize;
use utoipa::IntoParams;
use uuid::Uuid;

use crate::ApiState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::extract::{Page, PageQuery, PathParams, QueryParams};
use crate::views::*;

/// Filters of the dead-letter list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeadLetterQuery {
    /// `unresolved`, `replayed`, `ignored`, `handled_by_script` or `handler_failed`.
    pub resolution: Option<String>,
    /// Only dead letters of this trigger (by name).
    pub trigger: Option<String>,
    /// The `next` cursor of the previous page.
    pub after: Option<String>,
    /// Items per page: default 50, at most 500.
    pub limit: Option<u32>,
}

fn resolution(value: Option<&str>) -> Result<Option<Option<Resolution>>, ApiError> {
    value
        .map(|r| match r {
            "unresolved" => Ok(None),
            other => Resolution::parse(other).map(Some).ok_or_else(|| {
                ApiError::invalid(
                    "resolution",
                    "expected unresolved, replayed, ignored, handled_by_script or handler_failed",
                )
            }),
        })
        .transpose()
}

fn dead_letter_id(raw: &str) -> Result<Uuid, ApiError> {
    raw.parse().map_err(|_| ApiError::new(ErrorCode::DeadLetterNotFound, format!("no dead letter {raw}")))
}

/// The app's dead letters, newest first.
#[utoipa::path(get, path = "/v1/apps/{app}/dead-letters", tag = "dead letters", operation_id = "list_dead_letters",
    params(("app" = String, Path), DeadLetterQuery),
    responses(
        (status = 200, body = Page<DeadLetterView>, description = "a page of dead letters, newest first"),
        (status = 422, body = ErrorBody, description = "`invalid_field`: not a resolution")))]
pub async fn list(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams(_app): PathParams<String>,
    QueryParams(q): QueryParams<DeadLetterQuery>,
) -> Result<Json<Page<DeadLetterView>>, ApiError> {
    let app = caller.require_app(Capability::AppRead)?;
    let filter =
        DeadLetterFilter { resolution: resolution(q.resolution.as_deref())?, trigger_name: q.trigger };
    let page = PageQuery { after: q.after, limit: q.limit };
    let found = state.store.list_dead_letters(app.id, &filter, page.after_id()?, page.limit()).await?;
    Ok(Json(Page::from_store(found, |d| d.id.to_string(), DeadLetterView::from)))
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
    let app = caller.require_app(Capability::AppRead)?;
    if q.resolution.as_deref().is_some_and(|r| r != "unresolved") {
        return Err(ApiError::invalid("resolution", "only unresolved dead letters are counted"));
    }
    Ok(Json(CountView { count: state.store.unresolved_count(app.id).await? }))
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
    let app = caller.require_app(Capability::AppRead)?;
    let dead = state.store.dead_letter(app.id, dead_letter_id(&id)?).await?;
    Ok(Json(
        dead.ok_or_else(|| ApiError::new(ErrorCode::DeadLetterNotFound, format!("no dead letter {id}")))?
            .into(),
    ))
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
    let app = caller.require_app(Capability::AppDeadLetterManage)?;
    Ok(Json(
        replay_dead_letter(&state.store, &state.config.node.triggers, app.id, dead_letter_id(&id)?).await?,
    ))
}

/// Replays dead letter `id` of app `app_id`: a fresh delivery of its event to its trigger, and
/// the resolution `replayed`. Shared by the route and `picloud-router admin`.
pub async fn replay_dead_letter(
    store: &PgStore,
    config: &TriggerConfig,
    app_id: Uuid,
    id: Uuid,
) -> Result<Replayed, ApiError> {
    // Locked until the replay commits: a concurrent replay waits, then finds it replayed.
    let mut tx = store.begin().await?;
    let dead = store
        .lock_dead_letter(&mut tx, app_id, id)
        .await?
        .ok_or(picloud_store::Error::DeadLetterNotFound(id))?;
    if dead.resolution == Some(Resolution::Replayed) {
        return Err(ApiError::new(ErrorCode::AlreadyReplayed, "this dead letter was replayed already"));
    }
    // Everything it reads is read in this transaction: with the row locked, a second connection
    // would deadlock a pool that concurrent replays of one dead letter have filled.
    let (delivery_id, dead) = events::replay(store, &mut tx, &dead, config).await?;
    events::commit_and_wake(store, tx).await?;
    Ok(Replayed { dead_letter: dead.into(), delivery_id })
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
    let app = caller.require_app(Capability::AppDeadLetterManage)?;
    Ok(Json(ignore_dead_letter(&state.store, app.id, dead_letter_id(&id)?).await?))
}

/// Marks unresolved dead letter `id` of app `app_id` `ignored`. Shared by the route and
/// `picloud-router admin`.
pub async fn ignore_dead_letter(store: &PgStore, app_id: Uuid, id: Uuid) -> Result<DeadLetterView, ApiError> {
    let mut tx = store.begin().await?;
    let ignored = store.resolve(&mut tx, app_id, id, Resolution::Ignored, true).await?;
    store.commit(tx).await?;
    match ignored {
        Some(dead) => Ok(dead.into()),
        None => match store.dead_letter(app_id, id).await? {
            Some(_) => Err(ApiError::new(ErrorCode::AlreadyResolved, "this dead letter is resolved already")),
            None => Err(picloud_store::Error::DeadLetterNotFound(id).into()),
        },
    }
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
    let app = caller.require_app(Capability::AppRead)?;
    let found = state.store.list_abandoned(app.id, page.after_id()?, page.limit()).await?;
    Ok(Json(Page::from_store(found, |a| a.id.to_string(), AbandonedView::from)))
}
