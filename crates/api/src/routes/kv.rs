//! KV entries: put (with `If-Match`), get, delete, list by prefix.

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use picloud_core::Capability;
use serde::Deserialize;
use utoipa::IntoParams;

use crate::ApiState;
use crate::auth::{Caller, bearer, confirmed, kept_caller, write_as};
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::extract::{Page, PageQuery, PathParams, QueryParams, body_bytes, parse_json};
use crate::views::*;

/// The `If-Match` version, if given: 400 when it is not a whole number.
fn if_match(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    headers
        .get(axum::http::header::IF_MATCH)
        .map(|v| {
            v.to_str()
                .ok()
                .map(|s| s.trim().trim_matches('"'))
                .and_then(|s| s.parse::<i64>().ok())
                .filter(|v| *v > 0)
                .ok_or_else(|| ApiError::new(ErrorCode::InvalidIfMatch, "If-Match must be a version number"))
        })
        .transpose()
}

/// Upsert an entry; `If-Match: <version>` makes it conditional (412 on mismatch).
// The caller's authorization is kept for its next put, guarded by the configuration epoch it was
// read at (`auth::KeptAuthorizations`).
#[utoipa::path(put, path = "/v1/apps/{app}/kv/{collection}/{key}", tag = "kv", operation_id = "put_kv_entry",
    params(("app" = String, Path), ("collection" = String, Path), ("key" = String, Path),
           ("If-Match" = Option<i64>, Header, nullable = false, minimum = 1, description = "the version the entry must have")),
    request_body(content = serde_json::Value, description = "the value: any JSON value"),
    responses(
        (status = 200, body = VersionView, description = "the entry's new version"),
        (status = 400, body = ErrorBody, description = "`invalid_if_match`: If-Match is not a version number"),
        (status = 409, body = ErrorBody, description = "`conflict`: concurrent writers kept changing the entry; try again"),
        (status = 412, body = ErrorBody, description = "`version_mismatch`: the entry does not have the If-Match version"),
        (status = 422, body = ErrorBody, description = "`invalid_field`: the collection or key breaks the name rule")))]
pub async fn put(
    State(state): State<ApiState>,
    headers: HeaderMap,
    PathParams((app, collection, key)): PathParams<(String, String, String)>,
    request: Request,
) -> Result<Json<VersionView>, ApiError> {
    let credentials = bearer(&headers)?;
    let write = Capability::AppWriteKv;
    let authorized = kept_caller(&state, credentials, &app, write).await?;
    let read = async {
        let value: serde_json::Value = parse_json(&body_bytes(request, &state).await?)?;
        Ok::<_, ApiError>((if_match(&headers)?, value))
    };
    let (expected, value) = match read.await {
        Ok(read) => read,
        Err(bad) => return Err(confirmed(&state, credentials, &app, write, authorized.1, bad).await),
    };
    let (ops, collection, key, value) = (&state.ops, &collection, &key, &value);
    let version =
        write_as(&state, credentials, &app, write, authorized, |caller, authorized_at| async move {
            ops.kv_put(&caller, collection, key, value, expected, authorized_at).await
        })
        .await?;
    Ok(Json(version))
}

/// Read an entry.
#[utoipa::path(get, path = "/v1/apps/{app}/kv/{collection}/{key}", tag = "kv", operation_id = "get_kv_entry",
    params(("app" = String, Path), ("collection" = String, Path), ("key" = String, Path)),
    responses(
        (status = 200, body = KvValue, description = "the value and its version"),
        (status = 404, body = ErrorBody, description = "`key_not_found`: no such key")))]
pub async fn get(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams((_, collection, key)): PathParams<(String, String, String)>,
) -> Result<Json<KvValue>, ApiError> {
    Ok(Json(state.ops.kv_get(&caller, &collection, &key).await?))
}

/// Delete an entry; `If-Match` makes it conditional.
#[utoipa::path(delete, path = "/v1/apps/{app}/kv/{collection}/{key}", tag = "kv", operation_id = "delete_kv_entry",
    params(("app" = String, Path), ("collection" = String, Path), ("key" = String, Path),
           ("If-Match" = Option<i64>, Header, nullable = false, minimum = 1, description = "the version the entry must have")),
    responses(
        (status = 204, description = "the entry is deleted"),
        (status = 400, body = ErrorBody, description = "`invalid_if_match`: If-Match is not a version number"),
        (status = 404, body = ErrorBody, description = "`key_not_found`: no such key"),
        (status = 412, body = ErrorBody, description = "`version_mismatch`: the entry does not have the If-Match version")))]
pub async fn delete(
    State(state): State<ApiState>,
    caller: Caller,
    headers: HeaderMap,
    PathParams((_, collection, key)): PathParams<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    let expected = if_match(&headers)?;
    state.ops.kv_delete(&caller, collection, key, expected).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `prefix` of a key list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct KeyQuery {
    /// Only keys starting with this.
    #[serde(default)]
    pub prefix: String,
    /// The `next` cursor of the previous page.
    pub after: Option<String>,
    /// Items per page: default 50, at most 500.
    pub limit: Option<u32>,
}

/// List a collection's keys, by key, paged.
#[utoipa::path(get, path = "/v1/apps/{app}/kv/{collection}", tag = "kv", operation_id = "list_kv_keys",
    params(("app" = String, Path), ("collection" = String, Path), KeyQuery),
    responses((status = 200, body = Page<KvKeyView>, description = "a page of keys, by key")))]
pub async fn list(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams((_, collection)): PathParams<(String, String)>,
    QueryParams(q): QueryParams<KeyQuery>,
) -> Result<Json<Page<KvKeyView>>, ApiError> {
    let page = PageQuery { after: q.after, limit: q.limit };
    Ok(Json(state.ops.kv_list(&caller, &collection, &q.prefix, &page).await?))
}
