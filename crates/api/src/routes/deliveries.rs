//! Deliveries in the outbox (DESIGN §14, §15).

use axum::Json;
use axum::extract::State;
use bytes::Bytes;
use picloud_core::protocol::CancelNotice;

use crate::ApiState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::PathParams;
use crate::views::DeadLetterView;

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
    let cancelled = state.ops.cancel_delivery(&caller, &id).await?;
    if let Some(handler) = &cancelled.in_flight {
        let subject = state.config.node.subjects.cancel(cancelled.app.as_str(), handler.as_str());
        let notice = CancelNotice { id: cancelled.dead_letter.delivery_id };
        let body = Bytes::from(serde_json::to_vec(&notice).expect("a notice serializes"));
        // The cancel is committed: a handler not told only runs on, and its answer retries nothing.
        if let Err(e) = state.nats.publish(subject, body).await {
            tracing::warn!(delivery_id = %notice.id, error = %e, "cancelled, but telling its handler failed");
        }
    }
    Ok(Json(cancelled.dead_letter))
}
