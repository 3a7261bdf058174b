//! What one tenant may take of a node's shared capacity: requests in flight and their time on
//! the HTTP API (a layer over every `/v1/` route), sync calls in flight per app (DESIGN §13) and
//! live tails open per app (§15).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use picloud_core::AppId;
use tokio::sync::Semaphore;

use crate::ApiState;
use crate::error::{ApiError, ErrorCode};

/// The HTTP API's shared capacity.
#[derive(Debug)]
pub(crate) struct HttpLimits {
    /// One permit per request in flight; none left: 503 `overloaded` at once rather than a
    /// queue that grows without bound.
    in_flight: Semaphore,
}

impl HttpLimits {
    pub(crate) fn new(max_in_flight: usize) -> HttpLimits {
        HttpLimits { in_flight: Semaphore::new(max_in_flight) }
    }
}

/// Serves a `/v1/` or console request within the node's limits: 503 `overloaded` when
/// `PICLOUD_HTTP_MAX_IN_FLIGHT` requests are in flight, 503 `request_timeout` when it takes longer
/// than `PICLOUD_HTTP_TIMEOUT_MS`. Health, readiness and metrics are never held back: a busy
/// node must still say how it is.
pub async fn within_limits(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let limited =
        path.starts_with("/v1/") || (path.starts_with("/console") && !path.starts_with("/console/static/"));
    if !limited {
        return next.run(request).await;
    }
    let Ok(_permit) = state.http_limits.in_flight.try_acquire() else {
        return ApiError::new(
            ErrorCode::Overloaded,
            "this node serves as many requests as it may (PICLOUD_HTTP_MAX_IN_FLIGHT); try again",
        )
        .retry_after(1)
        .into_response();
    };
    let timeout = state.config.http_timeout;
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            ErrorCode::RequestTimeout,
            format!("the request took longer than {} ms (PICLOUD_HTTP_TIMEOUT_MS)", timeout.as_millis()),
        )
        .retry_after(1)
        .into_response(),
    }
}

/// What one app holds of something this node bounds per app: sync calls in flight (DESIGN §13),
/// live tails open (§15).
#[derive(Debug)]
pub(crate) struct AppSlots {
    max_per_app: usize,
    taken: Mutex<HashMap<AppId, usize>>,
    /// The refusal of an app that holds all of its slots.
    refusal: fn(max_per_app: usize) -> ApiError,
}

/// One app's slot: given back when this is dropped (for a sync call, once its result is resolved
/// to its caller or to the abandoned log, not when the caller stops waiting).
#[derive(Debug)]
pub(crate) struct AppSlot {
    slots: Arc<AppSlots>,
    app: AppId,
}

impl AppSlots {
    /// Sync calls in flight: beyond `max_per_app`, 429 `too_many_sync_calls`.
    pub(crate) fn sync_calls(max_per_app: usize) -> AppSlots {
        AppSlots::new(max_per_app, |max| {
            ApiError::new(
                ErrorCode::TooManySyncCalls,
                format!("this app has {max} sync calls in flight on this node (PICLOUD_SYNC_MAX_IN_FLIGHT_PER_APP)"),
            )
            .retry_after(1)
        })
    }

    /// Live tails open: beyond `max_per_app`, 429 `too_many_tails`.
    pub(crate) fn tails(max_per_app: usize) -> AppSlots {
        AppSlots::new(max_per_app, |max| {
            ApiError::new(
                ErrorCode::TooManyTails,
                format!("this app has {max} live tails open on this node (PICLOUD_TAIL_MAX_PER_APP)"),
            )
            .retry_after(5)
        })
    }

    fn new(max_per_app: usize, refusal: fn(usize) -> ApiError) -> AppSlots {
        AppSlots { max_per_app, taken: Mutex::default(), refusal }
    }

    /// A slot for one more of `app`'s: refused when it has all of its.
    pub(crate) fn take(self: &Arc<Self>, app: AppId) -> Result<AppSlot, ApiError> {
        let mut taken = self.taken.lock().unwrap_or_else(PoisonError::into_inner);
        let count = taken.entry(app).or_default();
        if *count >= self.max_per_app {
            return Err((self.refusal)(self.max_per_app));
        }
        *count += 1;
        Ok(AppSlot { slots: self.clone(), app })
    }
}

impl Drop for AppSlot {
    fn drop(&mut self) {
        let mut taken = self.slots.taken.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = taken.get_mut(&self.app) {
            *count -= 1;
            if *count == 0 {
                taken.remove(&self.app);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_apps_sync_slots_are_its_own_and_come_back_when_dropped() {
        let slots = Arc::new(AppSlots::sync_calls(2));
        let (a, b) = (AppId::new(), AppId::new());
        let first = slots.take(a).unwrap();
        let _second = slots.take(a).unwrap();
        let refused = slots.take(a).unwrap_err();
        assert_eq!(
            (refused.status(), refused.code()),
            (axum::http::StatusCode::TOO_MANY_REQUESTS, "too_many_sync_calls")
        );
        assert!(slots.take(b).is_ok(), "another app has slots of its own");
        drop(first);
        assert!(slots.take(a).is_ok());
    }
}
