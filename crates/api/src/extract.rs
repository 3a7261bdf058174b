//! Request extraction with the API's error shape: JSON bodies within the payload limit (400 for
//! malformed JSON or wrong types, 413 past the limit — read as a stream and cut off there), path
//! parameters (400), query strings (400), and keyset cursors.

use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ErrorCode};

/// A JSON request body.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

/// A request body's bytes, within the payload limit.
pub async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|e: BytesRejection| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(ErrorCode::PayloadTooLarge, "the body exceeds PICLOUD_MAX_PAYLOAD_BYTES")
        } else {
            ApiError::new(ErrorCode::InvalidBody, e.body_text())
        }
    })
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(req, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Parses a JSON body: 400 naming the field that has the wrong type, or what is malformed.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        // `.` is the body itself, `?` a place the parser could not name: neither says more.
        let at = if matches!(path.as_str(), "." | "?") { String::new() } else { format!("{path}: ") };
        ApiError::new(ErrorCode::InvalidJson, format!("invalid JSON body: {at}{}", e.inner()))
    })?;
    de.end().map_err(|e| ApiError::new(ErrorCode::InvalidJson, format!("invalid JSON body: {e}")))?;
    Ok(value)
}

/// The route's path parameters: 400 `invalid_path` when one cannot be read (a percent-escape
/// that decodes to invalid UTF-8, a value of the wrong type).
#[derive(Debug)]
pub struct PathParams<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for PathParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state).await.map(|Path(p)| PathParams(p)).map_err(
            |e: PathRejection| {
                if e.status().is_server_error() {
                    ApiError::internal(e.body_text())
                } else {
                    ApiError::new(ErrorCode::InvalidPath, e.body_text())
                }
            },
        )
    }
}

/// A query string.
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| QueryParams(q))
            .map_err(|e: QueryRejection| ApiError::new(ErrorCode::InvalidQuery, e.body_text()))
    }
}

/// `after` and `limit` of a keyset-paged list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// The `next` cursor of the previous page.
    pub after: Option<String>,
    /// Items per page: default 50, at most 500.
    pub limit: Option<u32>,
}

impl PageQuery {
    /// The page size, clamped.
    pub fn limit(&self) -> u32 {
        picloud_store::page_limit(self.limit)
    }

    /// The decoded cursor: 400 when it is not one of ours.
    pub fn after(&self) -> Result<Option<String>, ApiError> {
        self.after
            .as_deref()
            .filter(|a| !a.is_empty())
            .map(|a| {
                URL_SAFE_NO_PAD.decode(a).ok().and_then(|b| String::from_utf8(b).ok()).ok_or_else(|| {
                    ApiError::new(ErrorCode::InvalidCursor, "`after` is not a cursor this API returned")
                })
            })
            .transpose()
    }

    /// The decoded cursor as a UUID.
    pub fn after_id(&self) -> Result<Option<uuid::Uuid>, ApiError> {
        self.after()?
            .map(|a| {
                a.parse().map_err(|_| {
                    ApiError::new(ErrorCode::InvalidCursor, "`after` is not a cursor this API returned")
                })
            })
            .transpose()
    }
}

/// One page of a list: `{"items": […], "next": "<cursor>" | null}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// The cursor of the next page, if there is one.
    pub next: Option<String>,
}

impl<T> Page<T> {
    /// A page from a store page, the cursor being `key` of its last item.
    pub fn from_store<U>(
        page: picloud_store::Page<U>,
        key: impl Fn(&U) -> String,
        view: impl Fn(U) -> T,
    ) -> Self {
        let next = if page.has_more {
            page.items.last().map(|last| URL_SAFE_NO_PAD.encode(key(last)))
        } else {
            None
        };
        Self { items: page.items.into_iter().map(view).collect(), next }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_level_json_error_names_no_path_and_a_field_error_names_its_field() {
        #[derive(Debug, Deserialize)]
        struct Body {
            #[allow(dead_code)]
            n: u32,
        }
        for body in [&b"{"[..], b"", b"[1,", b"{\"n\": 1} trailing"] {
            let message = parse_json::<Body>(body).unwrap_err().message().to_owned();
            assert!(
                message.starts_with("invalid JSON body: ")
                    && !message.contains("?:")
                    && !message.contains(".:"),
                "{message}"
            );
        }
        let message = parse_json::<Body>(br#"{"n": "x"}"#).unwrap_err().message().to_owned();
        assert!(message.starts_with("invalid JSON body: n: "), "{message}");
    }
}
