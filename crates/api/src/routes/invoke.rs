//! Sync invocation of an `http` trigger (DESIGN §8): the caller waits on a NATS inbox while this
//! node delivers the call itself; the result reaches the caller through the inbox, or, when the
//! caller is gone, the abandoned-executions log.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use picloud_core::Capability;
use picloud_core::protocol::{ERROR_HEADER, STATUS_HEADER, TriggerKind};
use picloud_store::events;
use picloud_store::{HandlerStatus, TriggerRepo};
use serde_json::value::RawValue;

use crate::ApiState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::JsonBody;

/// The header a sync caller sets its timeout with, in milliseconds.
pub const TIMEOUT_HEADER: &str = "Picloud-Timeout-Ms";

/// Sets the flag when dropped while armed: the HTTP request future is dropped when the caller
/// hangs up, which is how the node delivering the call learns the caller is gone.
struct HangUp(Option<Arc<AtomicBool>>);

impl HangUp {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for HangUp {
    fn drop(&mut self) {
        if let Some(flag) = self.0.take() {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

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
                ApiError::bad_request(
                    "invalid_timeout",
                    format!("{TIMEOUT_HEADER} must be a positive number of milliseconds"),
                )
            }),
    }
}

/// Call an `http` trigger and wait for its handler: 200 with the handler's JSON, 502
/// `handler_failed`, 503 `no_handler`, 504 `timeout`. Never retried.
#[utoipa::path(post, path = "/v1/apps/{app}/invoke/{trigger}", tag = "events",
    params(("app" = String, Path), ("trigger" = String, Path),
           ("Picloud-Timeout-Ms" = Option<u64>, Header, description = "how long to wait, capped by PICLOUD_SYNC_TIMEOUT_MAX_MS")),
    request_body(content = Object, description = "the call's body: any JSON value"),
    responses((status = 200, description = "the handler's JSON"), (status = 502, body = ErrorBody),
              (status = 503, body = ErrorBody), (status = 504, body = ErrorBody)))]
pub async fn invoke(
    State(state): State<ApiState>,
    caller: Caller,
    headers: HeaderMap,
    Path((_, name)): Path<(String, String)>,
    JsonBody(body): JsonBody<Box<RawValue>>,
) -> Result<Response, ApiError> {
    let app = caller.require_app(Capability::AppInvoke)?;
    let wait = caller_timeout(&headers, &state)?;
    let trigger = state
        .store
        .trigger(app.id, &name)
        .await?
        .ok_or_else(|| ApiError::not_found("trigger_not_found", format!("no trigger {name}")))?;
    if trigger.spec.kind() != TriggerKind::Http {
        return Err(ApiError::conflict(
            "not_an_http_trigger",
            format!("trigger {name} is a {} trigger", trigger.spec.kind()),
        ));
    }
    if !trigger.enabled {
        return Err(ApiError::conflict("trigger_disabled", format!("trigger {name} is disabled")));
    }
    let reply_to = state.nats.new_inbox();
    let mut result = state.nats.subscribe(reply_to.clone()).await.map_err(ApiError::internal)?;
    let cx = state.event_context(app, &caller);
    let node = &state.config.node;
    let row =
        events::invoke(&state.store, &cx, &trigger, &body, &reply_to, node.lease(), &node.node_id).await?;

    let gone = Arc::new(AtomicBool::new(false));
    tokio::spawn(picloud_dispatch::deliver_sync(
        state.store.clone(),
        state.nats.clone(),
        node.clone(),
        row,
        gone.clone(),
    ));
    let mut hang_up = HangUp(Some(gone));
    let answer = tokio::time::timeout(wait, result.next()).await;
    hang_up.disarm();
    let msg = match answer {
        Ok(Some(msg)) => msg,
        Ok(None) => return Err(ApiError::internal("the result subscription closed")),
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!("no result within {} ms", wait.as_millis()),
            ));
        }
    };
    if let Some(ack) = msg.reply.clone() {
        let _ = state.nats.publish(ack, bytes::Bytes::new()).await;
    }
    let header = |name: &str| msg.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_owned());
    let error = header(ERROR_HEADER).unwrap_or_default();
    Ok(match header(STATUS_HEADER).as_deref().and_then(HandlerStatus::parse) {
        Some(HandlerStatus::Ok) => {
            let body = if msg.payload.is_empty() { bytes::Bytes::from_static(b"null") } else { msg.payload };
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Some(HandlerStatus::NoHandler) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_handler",
            format!("no handler serves trigger {name}"),
        )
        .into_response(),
        Some(HandlerStatus::Timeout) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!("the handler did not answer: {error}"),
        )
        .into_response(),
        _ => ApiError::new(StatusCode::BAD_GATEWAY, "handler_failed", format!("the handler failed: {error}"))
            .into_response(),
    })
}
