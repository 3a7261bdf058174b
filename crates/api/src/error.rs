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

/// Every code an error answer carries: the one list of them, so that a code is never a string
/// written twice (DESIGN §5: stable snake_case codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// `already_replayed`
    AlreadyReplayed,
    /// `already_resolved`
    AlreadyResolved,
    /// `app_exists`
    AppExists,
    /// `app_not_found`
    AppNotFound,
    /// `conflict`
    Conflict,
    /// `database_unavailable`
    DatabaseUnavailable,
    /// `dead_letter_not_found`
    DeadLetterNotFound,
    /// `delivery_not_found`
    DeliveryNotFound,
    /// `duplicate_idempotency_key`
    DuplicateIdempotencyKey,
    /// `forbidden`
    Forbidden,
    /// `handler_failed`
    HandlerFailed,
    /// `internal`
    Internal,
    /// `invalid_body`
    InvalidBody,
    /// `invalid_cursor`
    InvalidCursor,
    /// `invalid_field`
    InvalidField,
    /// `invalid_if_match`
    InvalidIfMatch,
    /// `invalid_json`
    InvalidJson,
    /// `invalid_path`
    InvalidPath,
    /// `invalid_query`
    InvalidQuery,
    /// `invalid_text`
    InvalidText,
    /// `invalid_timeout`
    InvalidTimeout,
    /// `invalid_token`
    InvalidToken,
    /// `key_not_found`
    KeyNotFound,
    /// `max_depth`
    MaxDepth,
    /// `member_not_found`
    MemberNotFound,
    /// `method_not_allowed`
    MethodNotAllowed,
    /// `metrics_disabled`
    MetricsDisabled,
    /// `missing_token`
    MissingToken,
    /// `nats_unavailable`
    NatsUnavailable,
    /// `no_handler`
    NoHandler,
    /// `no_such_queue`
    NoSuchQueue,
    /// `not_an_http_trigger`
    NotAnHttpTrigger,
    /// `not_cancellable`
    NotCancellable,
    /// `not_found`
    NotFound,
    /// `overloaded`
    Overloaded,
    /// `payload_too_large`
    PayloadTooLarge,
    /// `principal_not_found`
    PrincipalNotFound,
    /// `queue_disabled`
    QueueDisabled,
    /// `queue_taken`
    QueueTaken,
    /// `request_timeout`
    RequestTimeout,
    /// `timeout`
    Timeout,
    /// `token_expired`
    TokenExpired,
    /// `token_not_found`
    TokenNotFound,
    /// `token_revoked`
    TokenRevoked,
    /// `too_many_sync_calls`
    TooManySyncCalls,
    /// `too_many_tails`
    TooManyTails,
    /// `trigger_disabled`
    TriggerDisabled,
    /// `trigger_exists`
    TriggerExists,
    /// `trigger_gone`
    TriggerGone,
    /// `trigger_not_found`
    TriggerNotFound,
    /// `unknown_subject`
    UnknownSubject,
    /// `version_mismatch`
    VersionMismatch,
    /// `webhook_target_refused`
    WebhookTargetRefused,
}

impl ErrorCode {
    /// The code as the answer carries it.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::AlreadyReplayed => "already_replayed",
            ErrorCode::AlreadyResolved => "already_resolved",
            ErrorCode::AppExists => "app_exists",
            ErrorCode::AppNotFound => "app_not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::DatabaseUnavailable => "database_unavailable",
            ErrorCode::DeadLetterNotFound => "dead_letter_not_found",
            ErrorCode::DeliveryNotFound => "delivery_not_found",
            ErrorCode::DuplicateIdempotencyKey => "duplicate_idempotency_key",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::HandlerFailed => "handler_failed",
            ErrorCode::Internal => "internal",
            ErrorCode::InvalidBody => "invalid_body",
            ErrorCode::InvalidCursor => "invalid_cursor",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::InvalidIfMatch => "invalid_if_match",
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidPath => "invalid_path",
            ErrorCode::InvalidQuery => "invalid_query",
            ErrorCode::InvalidText => "invalid_text",
            ErrorCode::InvalidTimeout => "invalid_timeout",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::KeyNotFound => "key_not_found",
            ErrorCode::MaxDepth => "max_depth",
            ErrorCode::MemberNotFound => "member_not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::MetricsDisabled => "metrics_disabled",
            ErrorCode::MissingToken => "missing_token",
            ErrorCode::NatsUnavailable => "nats_unavailable",
            ErrorCode::NoHandler => "no_handler",
            ErrorCode::NoSuchQueue => "no_such_queue",
            ErrorCode::NotAnHttpTrigger => "not_an_http_trigger",
            ErrorCode::NotCancellable => "not_cancellable",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::PrincipalNotFound => "principal_not_found",
            ErrorCode::QueueDisabled => "queue_disabled",
            ErrorCode::QueueTaken => "queue_taken",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::Timeout => "timeout",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::TokenNotFound => "token_not_found",
            ErrorCode::TokenRevoked => "token_revoked",
            ErrorCode::TooManySyncCalls => "too_many_sync_calls",
            ErrorCode::TooManyTails => "too_many_tails",
            ErrorCode::TriggerDisabled => "trigger_disabled",
            ErrorCode::TriggerExists => "trigger_exists",
            ErrorCode::TriggerGone => "trigger_gone",
            ErrorCode::TriggerNotFound => "trigger_not_found",
            ErrorCode::UnknownSubject => "unknown_subject",
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::WebhookTargetRefused => picloud_core::net::TARGET_REFUSED,
        }
    }
    /// The HTTP status an answer with this code has: one status per code, so that the code is
    /// the whole of an error's meaning and the status only its translation to HTTP.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::AlreadyReplayed => StatusCode::CONFLICT,
            ErrorCode::AlreadyResolved => StatusCode::CONFLICT,
            ErrorCode::AppExists => StatusCode::CONFLICT,
            ErrorCode::AppNotFound => StatusCode::NOT_FOUND,
            ErrorCode::Conflict => StatusCode::CONFLICT,
            ErrorCode::DatabaseUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::DeadLetterNotFound => StatusCode::NOT_FOUND,
            ErrorCode::DeliveryNotFound => StatusCode::NOT_FOUND,
            ErrorCode::DuplicateIdempotencyKey => StatusCode::CONFLICT,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::HandlerFailed => StatusCode::BAD_GATEWAY,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::InvalidBody => StatusCode::BAD_REQUEST,
            ErrorCode::InvalidCursor => StatusCode::BAD_REQUEST,
            ErrorCode::InvalidField => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::InvalidIfMatch => StatusCode::BAD_REQUEST,
            ErrorCode::InvalidJson => StatusCode::BAD_REQUEST,
            ErrorCode::InvalidPath => StatusCode::BAD_REQUEST,
            ErrorCode::InvalidQuery => StatusCode::BAD_REQUEST,
            ErrorCode::InvalidText => StatusCode::BAD_REQUEST,
            ErrorCode::InvalidTimeout => StatusCode::BAD_REQUEST,
            ErrorCode::InvalidToken => StatusCode::UNAUTHORIZED,
            ErrorCode::KeyNotFound => StatusCode::NOT_FOUND,
            ErrorCode::MaxDepth => StatusCode::CONFLICT,
            ErrorCode::MemberNotFound => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::MetricsDisabled => StatusCode::NOT_FOUND,
            ErrorCode::MissingToken => StatusCode::UNAUTHORIZED,
            ErrorCode::NatsUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::NoHandler => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::NoSuchQueue => StatusCode::NOT_FOUND,
            ErrorCode::NotAnHttpTrigger => StatusCode::CONFLICT,
            ErrorCode::NotCancellable => StatusCode::CONFLICT,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PrincipalNotFound => StatusCode::NOT_FOUND,
            ErrorCode::QueueDisabled => StatusCode::CONFLICT,
            ErrorCode::QueueTaken => StatusCode::CONFLICT,
            ErrorCode::RequestTimeout => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::TokenExpired => StatusCode::UNAUTHORIZED,
            ErrorCode::TokenNotFound => StatusCode::NOT_FOUND,
            ErrorCode::TokenRevoked => StatusCode::UNAUTHORIZED,
            ErrorCode::TooManySyncCalls => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::TooManyTails => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::TriggerDisabled => StatusCode::CONFLICT,
            ErrorCode::TriggerExists => StatusCode::CONFLICT,
            ErrorCode::TriggerGone => StatusCode::CONFLICT,
            ErrorCode::TriggerNotFound => StatusCode::NOT_FOUND,
            ErrorCode::UnknownSubject => StatusCode::NOT_FOUND,
            ErrorCode::VersionMismatch => StatusCode::PRECONDITION_FAILED,
            ErrorCode::WebhookTargetRefused => StatusCode::UNPROCESSABLE_ENTITY,
        }
    }
}

/// A request that failed.
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
    /// Seconds after which trying again may succeed (`Retry-After`), for 429 and 503 answers.
    retry_after: Option<u32>,
}

impl ApiError {
    /// An error with this code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), retry_after: None }
    }

    /// The same error, telling the caller to try again after `seconds` (`Retry-After`).
    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// 403: authenticated, not allowed.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    /// 422: well-formed but invalid; the message names the field.
    pub fn invalid(field: &str, message: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::InvalidField, format!("{field}: {message}"))
    }

    /// 500: a failure of ours. The detail is logged here, once, and not shown.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "request failed");
        Self::new(ErrorCode::Internal, "internal error; see the server log")
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    /// The snake_case code.
    pub fn code(&self) -> &'static str {
        self.code.as_str()
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail { code: self.code.as_str().to_owned(), message: self.message.clone() },
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code.as_str(), self.status().as_u16(), self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(self.body())).into_response();
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
            E::AppNotFound(app) => Self::new(ErrorCode::AppNotFound, format!("no app {app}")),
            E::DuplicateApp(slug) => {
                Self::new(ErrorCode::AppExists, format!("an app with slug {slug} exists already"))
            }
            E::PrincipalNotFound(id) | E::UnknownPrincipal(id) => {
                Self::new(ErrorCode::PrincipalNotFound, format!("no principal {id}"))
            }
            E::TokenNotFound(id) => Self::new(ErrorCode::TokenNotFound, format!("no token {id}")),
            E::TriggerNotFound(name) => Self::new(ErrorCode::TriggerNotFound, format!("no trigger {name}")),
            E::DuplicateTrigger(name) => Self::new(
                ErrorCode::TriggerExists,
                format!("a trigger named {name} exists already in this app"),
            ),
            E::QueueTaken(queue) => {
                Self::new(ErrorCode::QueueTaken, format!("queue {queue} has a trigger already"))
            }
            E::DeadLetterNotFound(id) => {
                Self::new(ErrorCode::DeadLetterNotFound, format!("no dead letter {id}"))
            }
            E::VersionMismatch { expected, current } => Self::new(
                ErrorCode::VersionMismatch,
                match current {
                    Some(current) => format!("If-Match {expected} but the current version is {current}"),
                    None => format!("If-Match {expected} but the key does not exist"),
                },
            ),
            E::DuplicateIdempotencyKey(key) => {
                Self::new(ErrorCode::DuplicateIdempotencyKey, format!("idempotency key {key:?} is in use"))
            }
            E::NoSuchQueue(queue) => {
                Self::new(ErrorCode::NoSuchQueue, format!("queue {queue} has no trigger"))
            }
            E::QueueDisabled(queue) => {
                Self::new(ErrorCode::QueueDisabled, format!("the trigger of queue {queue} is disabled"))
            }
            E::TooDeep { depth, max } => Self::new(
                ErrorCode::MaxDepth,
                format!("event depth {depth} reached PICLOUD_MAX_TRIGGER_DEPTH ({max}): a trigger loop?"),
            ),
            E::TooLarge { max } => Self::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "the event this write produces would be larger than the {max} bytes an event may \
                     carry (its data holds the body, and for a KV update the previous value too)"
                ),
            ),
            E::TriggerGone(name) => Self::new(
                ErrorCode::TriggerGone,
                format!("trigger {name:?} of this dead letter no longer exists"),
            ),
            E::Conflict(what) => {
                Self::new(ErrorCode::Conflict, format!("{what} changed concurrently; try again"))
            }
            other if other.is_invalid_text() => Self::new(
                ErrorCode::InvalidText,
                "a text of the request holds the NUL character (\\u0000), which cannot be stored",
            ),
            other if other.is_unavailable() => {
                tracing::warn!(error = %other, "the database is unavailable");
                Self::new(
                    ErrorCode::DatabaseUnavailable,
                    "the database cannot be reached just now; try again",
                )
                .retry_after(1)
            }
            other => Self::internal(other),
        }
    }
}
