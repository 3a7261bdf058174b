//! The API's error: a status, a snake_case code and a message, always answered as
//! `{"error": {"code": …, "message": …}}`. Store failures map to their domain status; anything
//! unexpected is a 500 whose details are logged once and never shown.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// The error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable snake_case code.
    pub code: String,
    /// A human-readable explanation.
    pub message: String,
}

/// A request that failed.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Seconds after which trying again may succeed (`Retry-After`), for 429 and 503 answers.
    retry_after: Option<u32>,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after: None }
    }

    /// The same error, telling the caller to try again after `seconds` (`Retry-After`).
    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// 400: the request is malformed.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 401: no usable credentials.
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    /// 403: authenticated, not allowed.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404: no such thing.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// 409: conflicts with what exists.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 422: well-formed but invalid; the message names the field.
    pub fn invalid(field: &str, message: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", format!("{field}: {message}"))
    }

    /// 500: a failure of ours. The detail is logged here, once, and not shown.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "request failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the server log")
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The snake_case code.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody { error: ErrorDetail { code: self.code.to_owned(), message: self.message.clone() } }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.status.as_u16(), self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

impl From<picloud_store::Error> for ApiError {
    fn from(e: picloud_store::Error) -> Self {
        use picloud_store::Error as E;
        match e {
            E::AppNotFound(app) => Self::not_found("app_not_found", format!("no app {app}")),
            E::DuplicateApp(slug) => {
                Self::conflict("app_exists", format!("an app with slug {slug} exists already"))
            }
            E::PrincipalNotFound(id) | E::UnknownPrincipal(id) => {
                Self::not_found("principal_not_found", format!("no principal {id}"))
            }
            E::TokenNotFound(id) => Self::not_found("token_not_found", format!("no token {id}")),
            E::TriggerNotFound(name) => Self::not_found("trigger_not_found", format!("no trigger {name}")),
            E::DuplicateTrigger(name) => {
                Self::conflict("trigger_exists", format!("a trigger named {name} exists already in this app"))
            }
            E::QueueTaken(queue) => {
                Self::conflict("queue_taken", format!("queue {queue} has a trigger already"))
            }
            E::DeadLetterNotFound(id) => {
                Self::not_found("dead_letter_not_found", format!("no dead letter {id}"))
            }
            E::VersionMismatch { expected, current } => Self::new(
                StatusCode::PRECONDITION_FAILED,
                "version_mismatch",
                match current {
                    Some(current) => format!("If-Match {expected} but the current version is {current}"),
                    None => format!("If-Match {expected} but the key does not exist"),
                },
            ),
            E::DuplicateIdempotencyKey(key) => {
                Self::conflict("duplicate_idempotency_key", format!("idempotency key {key:?} is in use"))
            }
            E::NoSuchQueue(queue) => {
                Self::not_found("no_such_queue", format!("queue {queue} has no trigger"))
            }
            E::QueueDisabled(queue) => {
                Self::conflict("queue_disabled", format!("the trigger of queue {queue} is disabled"))
            }
            E::TooDeep { depth, max } => Self::conflict(
                "max_depth",
                format!("event depth {depth} reached PICLOUD_MAX_TRIGGER_DEPTH ({max}): a trigger loop?"),
            ),
            E::TooLarge { max } => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!(
                    "the event this write produces would be larger than the {max} bytes an event may \
                     carry (its data holds the body, and for a KV update the previous value too)"
                ),
            ),
            E::TriggerGone(name) => Self::conflict(
                "trigger_gone",
                format!("trigger {name:?} of this dead letter no longer exists"),
            ),
            E::Conflict(what) => {
                Self::conflict("conflict", format!("{what} changed concurrently; try again"))
            }
            other if other.is_invalid_text() => Self::bad_request(
                "invalid_text",
                "a text of the request holds the NUL character (\\u0000), which cannot be stored",
            ),
            other if other.is_unavailable() => {
                tracing::warn!(error = %other, "the database is unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database_unavailable",
                    "the database cannot be reached just now; try again",
                )
                .retry_after(1)
            }
            other => Self::internal(other),
        }
    }
}
