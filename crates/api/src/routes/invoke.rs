//! Sync invocation of an `http` trigger (DESIGN §8): the row is written with a `reply_to` inbox
//! and this node delivers the call itself; the result reaches the waiting request, or, when the
//! caller is gone, the abandoned-executions log.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use picloud_core::Capability;
use picloud_dispatch::NoAnswer;
use picloud_store::events::SyncWaiter;
use serde_json::value::RawValue;

use crate::ApiState;
use crate::auth::{bearer, confirmed, kept_caller, write_as};
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::extract::{PathParams, body_bytes, parse_json};
use crate::ops::invoke::sync_result;

/// The header a sync caller sets its timeout with, in milliseconds.
pub const TIMEOUT_HEADER: &str = "Picloud-Timeout-Ms";

fn caller_timeout(headers: &HeaderMap, state: &ApiState) -> Result<Duration, ApiError> {
    let max = state.config.sync_timeout_max;
    match headers.get(TIMEOUT_HEADER) {
        None => Ok(state.config.node.handler_timeout.min(max)),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|ms| *ms > 0)
            .map(|ms| Duration::from_millis(ms).min(max))
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidTimeout,
                    format!("{TIMEOUT_HEADER} must be a positive number of milliseconds"),
                )
            }),
    }
}

/// Call an `http` trigger and wait for its handler: 200 with the handler's JSON, 502
/// `handler_failed`, 503 `no_handler`, 504 `timeout`. Never retried.
#[utoipa::path(post, path = "/v1/apps/{app}/invoke/{trigger}", tag = "events", operation_id = "invoke_trigger",
    params(("app" = String, Path), ("trigger" = String, Path),
           ("Picloud-Timeout-Ms" = Option<u64>, Header, nullable = false, minimum = 1, description = "how long to wait, capped by PICLOUD_SYNC_TIMEOUT_MAX_MS")),
    request_body(content = serde_json::Value, description = "the call's body: any JSON value"),
    responses(
        (status = 200, body = serde_json::Value, description = "the handler's JSON: any JSON value"),
        (status = 400, body = ErrorBody, description = "`invalid_timeout`: Picloud-Timeout-Ms is not a positive number"),
        (status = 404, body = ErrorBody, description = "`trigger_not_found`: no such trigger"),
        (status = 409, body = ErrorBody, description = "`not_an_http_trigger`, `trigger_disabled`, `max_depth`: not an enabled http trigger, or a call at the depth limit"),
        (status = 429, body = ErrorBody, description = "`too_many_sync_calls`: the app has as many sync calls waiting as it may"),
        (status = 502, body = ErrorBody, description = "`handler_failed`: the handler failed the call, or its answer was not understood"),
        (status = 503, body = ErrorBody, description = "`no_handler`: no handler serves the trigger; `nats_unavailable`: the node lost NATS while the handler worked on the call (its answer cannot arrive); or one of the answers every route shares"),
        (status = 504, body = ErrorBody, description = "`timeout`: no answer in time")))]
pub async fn invoke(
    State(state): State<ApiState>,
    headers: HeaderMap,
    PathParams((app, name)): PathParams<(String, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    let credentials = bearer(&headers)?;
    let invoke = Capability::AppInvoke;
    let (caller, authorized_at) = kept_caller(&state, credentials, &app, invoke).await?;
    let read = async {
        let wait = caller_timeout(&headers, &state)?;
        let body: Box<RawValue> = parse_json(&body_bytes(request, &state).await?)?;
        Ok::<_, ApiError>((wait, body))
    };
    let (wait, body) = match read.await {
        Ok(read) => read,
        Err(bad) => return Err(confirmed(&state, credentials, &app, invoke, authorized_at, bad).await),
    };
    // Held until the call's result is resolved, which may outlast this request.
    let slot = state.sync_slots.take(caller.require_app(invoke)?.id)?;
    let node = &state.config.node;
    let reply_to = state.nats.new_inbox();
    let authorized = (caller, authorized_at);
    let (ops, name, body, reply_to) = (&state.ops, &name, &body, &reply_to);
    let (row, target) = write_as(&state, credentials, &app, invoke, authorized, |caller, authorized_at| {
        let waiter = SyncWaiter { reply_to, authorized_at, node: &node.node_id, lease: node.lease() };
        async move { ops.write_sync_call(&caller, name, body, waiter).await }
    })
    .await?;
    let row = *row;
    let (reply, waiting) = picloud_dispatch::sync_call();
    let delivering = picloud_dispatch::deliver_sync(
        state.ops.store().clone(),
        state.sync_answers.clone(),
        state.connection.clone(),
        node.clone(),
        row,
        *target,
        reply,
    );
    state.sync_calls.spawn(async move {
        delivering.await;
        drop(slot);
    });
    let answer = match waiting.answer(wait).await {
        Ok(answer) => answer,
        Err(NoAnswer::TimedOut) => {
            return Err(ApiError::new(
                ErrorCode::Timeout,
                format!("no result within {} ms", wait.as_millis()),
            ));
        }
        Err(NoAnswer::Lost) => return Err(ApiError::internal("the call's delivery ended without an answer")),
    };
    let result = sync_result(answer, name, node.handler_timeout)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], result).into_response())
}
