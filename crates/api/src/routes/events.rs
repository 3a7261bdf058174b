//! Publishing to topics, enqueueing jobs and queueing emails.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use picloud_core::protocol::ORDERING_KEY_HEADER;
use serde_json::value::RawValue;

use crate::ApiState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{JsonBody, PathParams};
use crate::views::*;

/// Publish a message: every matching pubsub trigger gets a delivery.
#[utoipa::path(post, path = "/v1/apps/{app}/topics/{topic}/messages", tag = "events", operation_id = "publish_message",
    params(("app" = String, Path), ("topic" = String, Path),
           ("Picloud-Ordering-Key" = Option<String>, Header, nullable = false, min_length = 1, max_length = 200,
            description = "the message's ordering key: with `flow.ordering: key`, messages sharing it are handled one at a time, in order")),
    request_body(content = serde_json::Value, description = "the message: any JSON value"),
    responses(
        (status = 202, body = Published, description = "the message's id, and the deliveries written"),
        (status = 422, body = ErrorBody, description = "`invalid_field`: the topic or the ordering key breaks its rule")))]
pub async fn publish(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams((_, topic)): PathParams<(String, String)>,
    headers: HeaderMap,
    JsonBody(message): JsonBody<Box<RawValue>>,
) -> Result<(StatusCode, Json<Published>), ApiError> {
    let ordering_key = match headers.get(ORDERING_KEY_HEADER) {
        None => None,
        Some(value) => Some(
            value.to_str().map_err(|_| ApiError::invalid(ORDERING_KEY_HEADER, "expected printable UTF-8"))?,
        ),
    };
    Ok((StatusCode::ACCEPTED, Json(state.ops.publish(&caller, topic, &message, ordering_key).await?)))
}

/// Enqueue a job on a queue; a repeated idempotency key answers 200 with the first job's id.
#[utoipa::path(post, path = "/v1/apps/{app}/queues/{queue}/jobs", tag = "events", operation_id = "enqueue_job",
    params(("app" = String, Path), ("queue" = String, Path)), request_body = EnqueueJob,
    responses(
        (status = 202, body = IdView, description = "the job's id"),
        (status = 200, body = IdView, description = "the id of the job enqueued earlier with this idempotency key"),
        (status = 404, body = ErrorBody, description = "`no_such_queue`: no trigger serves the queue"),
        (status = 409, body = ErrorBody, description = "`queue_disabled`, `duplicate_idempotency_key`: the queue's trigger is disabled, or the key is in use"),
        (status = 422, body = ErrorBody, description = "`invalid_field`: the queue, delay or idempotency key breaks its rule")))]
pub async fn enqueue(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams((_, queue)): PathParams<(String, String)>,
    JsonBody(job): JsonBody<EnqueueJob>,
) -> Result<(StatusCode, Json<IdView>), ApiError> {
    let (created, id) = state.ops.enqueue(&caller, queue, &job).await?;
    Ok((if created { StatusCode::ACCEPTED } else { StatusCode::OK }, Json(id)))
}

/// Queue an email for the built-in executor (sent over SMTP, retried like any delivery).
#[utoipa::path(post, path = "/v1/apps/{app}/emails", tag = "events", operation_id = "send_email",
    params(("app" = String, Path)), request_body = SendEmail,
    responses(
        (status = 202, body = IdView, description = "the email's delivery id"),
        (status = 422, body = ErrorBody, description = "`invalid_field`: a recipient or the subject breaks its rule")))]
pub async fn send_email(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams(_app): PathParams<String>,
    JsonBody(email): JsonBody<SendEmail>,
) -> Result<(StatusCode, Json<IdView>), ApiError> {
    Ok((StatusCode::ACCEPTED, Json(state.ops.send_email(&caller, &email).await?)))
}
