//! The live tail of an app's delivery outcomes (DESIGN §15).

use std::convert::Infallible;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{KeepAlive, Sse};
use futures::{Stream, StreamExt as _};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::ApiState;
use crate::auth::{Caller, bearer};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{PathParams, QueryParams};

/// Filters of a tail.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TailQuery {
    /// Only outcomes of this trigger (by name).
    pub trigger: Option<String>,
    /// Only outcomes of deliveries of this event kind: `kv`, `pubsub`, `queue`, `cron`,
    /// `dead_letter`, `http` or `email`.
    pub kind: Option<String>,
}

/// A live stream of the app's delivery outcomes as relays complete them, whichever relay
/// delivered: Server-Sent Events named `outcome`, each the JSON `{delivery_id, trigger, kind,
/// attempt, outcome, latency_ms, error, node, ended_at}`. A reader that falls behind is
/// disconnected; an app may have `PICLOUD_TAIL_MAX_PER_APP` tails open on a node. The token is
/// checked again every minute: the stream ends once it is revoked or expired, or its principal
/// lost the role. Delivery tokens cannot tail.
#[utoipa::path(get, path = "/v1/apps/{app}/tail", tag = "deliveries", operation_id = "tail_deliveries",
    params(("app" = String, Path), TailQuery),
    responses(
        (status = 200, content_type = "text/event-stream", body = String, description = "the outcomes, as they happen"),
        (status = 403, body = ErrorBody, description = "`forbidden`: a delivery token"),
        (status = 404, body = ErrorBody, description = "`trigger_not_found`: no such trigger"),
        (status = 422, body = ErrorBody, description = "`invalid_field`: not an event kind or a trigger name"),
        (status = 429, body = ErrorBody, description = "`too_many_tails`: the app has as many tails open on this node as it may"),
        (status = 503, body = ErrorBody, description = "`nats_unavailable`: the node cannot reach NATS")))]
pub async fn tail(
    State(state): State<ApiState>,
    caller: Caller,
    headers: HeaderMap,
    PathParams(_app): PathParams<String>,
    QueryParams(q): QueryParams<TailQuery>,
) -> Result<Sse<impl Stream<Item = Result<axum::response::sse::Event, Infallible>>>, ApiError> {
    let filter = state.ops.tail_filter(&caller, q.trigger, q.kind.as_deref()).await?;
    let events = state.open_tail(bearer(&headers)?, filter).await?;
    Ok(Sse::new(events.map(Ok)).keep_alive(KeepAlive::default()))
}
