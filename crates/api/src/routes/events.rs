//! Publishing to topics, enqueueing jobs and queueing emails.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use picloud_core::{Capability, QueueName, TopicName};
use picloud_store::Transactional;
use picloud_store::events::{self, Enqueued, Job};
use serde_json::value::RawValue;

use crate::ApiState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{JsonBody, PathParams, parse_json};
use crate::views::*;

/// The longest delay a job may ask for: a year.
const MAX_DELAY_MS: u64 = 365 * 86_400 * 1000;

/// Publish a message: every matching pubsub trigger gets a delivery.
#[utoipa::path(post, path = "/v1/apps/{app}/topics/{topic}/messages", tag = "events", operation_id = "publish_message",
    params(("app" = String, Path), ("topic" = String, Path)),
    request_body(content = serde_json::Value, description = "the message: any JSON value"),
    responses(
        (status = 202, body = Published, description = "the message's id, and the deliveries written"),
        (status = 422, body = ErrorBody, description = "`invalid_field`: the topic breaks the name rule")))]
pub async fn publish(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams((_, topic)): PathParams<(String, String)>,
    JsonBody(message): JsonBody<Box<RawValue>>,
) -> Result<(StatusCode, Json<Published>), ApiError> {
    publish_message(&state, &caller, topic, &message).await.map(|p| (StatusCode::ACCEPTED, Json(p)))
}

/// A publish, for the HTTP route and the NATS ingest.
pub(crate) async fn publish_message(
    state: &ApiState,
    caller: &Caller,
    topic: String,
    message: &RawValue,
) -> Result<Published, ApiError> {
    let app = caller.require_app(Capability::AppPublish)?;
    let topic = TopicName::parse(topic).map_err(|e| ApiError::invalid("topic", e))?;
    let cx = state.event_context(app, caller);
    let mut tx = state.store.begin().await?;
    let (id, fired) = events::publish(&state.store, &mut tx, &cx, &topic, message).await?;
    events::commit_and_wake(&state.store, tx).await?;
    Ok(Published { id, deliveries: fired.deliveries })
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
    let (created, id) = enqueue_job(&state, &caller, queue, &job).await?;
    Ok((if created { StatusCode::ACCEPTED } else { StatusCode::OK }, Json(id)))
}

/// An enqueue, for the HTTP route and the NATS ingest: whether the job is new, and its id.
pub(crate) async fn enqueue_job(
    state: &ApiState,
    caller: &Caller,
    queue: String,
    job: &EnqueueJob,
) -> Result<(bool, IdView), ApiError> {
    let app = caller.require_app(Capability::AppEnqueue)?;
    let queue = QueueName::parse(queue).map_err(|e| ApiError::invalid("queue", e))?;
    let delay = job.delay_ms.unwrap_or(0);
    if delay > MAX_DELAY_MS {
        return Err(ApiError::invalid("delay_ms", format!("expected at most {MAX_DELAY_MS} (a year)")));
    }
    if job.idempotency_key.as_ref().is_some_and(|k| k.is_empty() || k.len() > 200) {
        return Err(ApiError::invalid("idempotency_key", "expected 1 to 200 bytes"));
    }
    let cx = state.event_context(app, caller);
    let spec = Job {
        payload: &job.payload,
        delay: Duration::from_millis(delay),
        idempotency_key: job.idempotency_key.as_deref(),
    };
    let mut tx = state.store.begin().await?;
    let enqueued = events::enqueue(&state.store, &mut tx, &cx, &queue, spec).await?;
    events::commit_and_wake(&state.store, tx).await?;
    Ok(match enqueued {
        Enqueued::Created(id) | Enqueued::TooDeep(id) => (true, IdView { id }),
        Enqueued::Existing(id) => (false, IdView { id }),
    })
}

/// Whether `address` looks like one mailbox: a local part, `@`, a domain, no spaces or controls.
fn is_address(address: &str) -> bool {
    let Some((local, domain)) = address.rsplit_once('@') else { return false };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && address.len() <= 254
        && !address.chars().any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>' || c == ',')
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
    let app = caller.require_app(Capability::AppSendEmail)?;
    let recipients: Vec<&str> = match &email.to {
        serde_json::Value::String(one) => vec![one.as_str()],
        serde_json::Value::Array(many) => many.iter().map(|v| v.as_str().unwrap_or("")).collect(),
        _ => return Err(ApiError::invalid("to", "expected an address or a list of addresses")),
    };
    if recipients.is_empty() || recipients.len() > 50 {
        return Err(ApiError::invalid("to", "expected 1 to 50 addresses"));
    }
    if let Some((i, bad)) = recipients.iter().enumerate().find(|(_, a)| !is_address(a)) {
        return Err(ApiError::invalid(&format!("to[{i}]"), format!("{bad:?} is not an email address")));
    }
    if email.subject.chars().count() > 998 || email.subject.contains(['\r', '\n']) {
        return Err(ApiError::invalid("subject", "expected one line of at most 998 characters"));
    }
    let payload: Box<RawValue> = parse_json(&serde_json::to_vec(&email).map_err(ApiError::internal)?)?;
    let cx = state.event_context(app, &caller);
    let mut tx = state.store.begin().await?;
    let id = events::send_email(&state.store, &mut tx, &cx, &payload).await?;
    events::commit_and_wake(&state.store, tx).await?;
    Ok((StatusCode::ACCEPTED, Json(IdView { id })))
}

#[cfg(test)]
mod tests {
    use super::is_address;

    #[test]
    fn addresses_need_a_local_part_and_a_dotted_domain_without_spaces() {
        for ok in ["a@b.co", "first.last+tag@mail.example.org"] {
            assert!(is_address(ok), "{ok}");
        }
        for bad in ["", "a", "a@b", "@b.co", "a@.co", "a@b.", "a b@c.de", "a@b.co\r\nBcc: x@y.z", "<a@b.co>"]
        {
            assert!(!is_address(bad), "{bad:?}");
        }
    }
}
