//! Apps, principals, memberships and tokens.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use crate::ApiState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{JsonBody, Page, PageQuery, PathParams, QueryParams};
use crate::views::*;

/// Create an app (platform admins).
#[utoipa::path(post, path = "/v1/apps", tag = "apps", operation_id = "create_app", request_body = CreateApp,
    responses(
        (status = 201, body = AppView, description = "the app, created"),
        (status = 403, body = ErrorBody, description = "`forbidden`: the caller may not manage apps"),
        (status = 409, body = ErrorBody, description = "`app_exists`: the slug is taken"),
        (status = 422, body = ErrorBody, description = "`invalid_field`: the slug breaks its rule")))]
pub async fn create_app(
    State(state): State<ApiState>,
    caller: Caller,
    JsonBody(body): JsonBody<CreateApp>,
) -> Result<(StatusCode, Json<AppView>), ApiError> {
    Ok((StatusCode::CREATED, Json(state.ops.create_app(&caller, body.slug).await?)))
}

/// The apps the caller can see: every app for platform admins, else the caller's.
#[utoipa::path(get, path = "/v1/apps", tag = "apps", operation_id = "list_apps", params(PageQuery),
    responses((status = 200, body = Page<AppView>, description = "a page of apps, by slug")))]
pub async fn list_apps(
    State(state): State<ApiState>,
    caller: Caller,
    QueryParams(page): QueryParams<PageQuery>,
) -> Result<Json<Page<AppView>>, ApiError> {
    Ok(Json(state.ops.list_apps(&caller, &page).await?))
}

/// Create a principal (platform admins).
#[utoipa::path(post, path = "/v1/principals", tag = "principals", operation_id = "create_principal",
    request_body = CreatePrincipal,
    responses(
        (status = 201, body = PrincipalView, description = "the principal, created"),
        (status = 403, body = ErrorBody, description = "`forbidden`: the caller may not manage principals"),
        (status = 422, body = ErrorBody, description = "`invalid_field`: the name is empty or too long")))]
pub async fn create_principal(
    State(state): State<ApiState>,
    caller: Caller,
    JsonBody(body): JsonBody<CreatePrincipal>,
) -> Result<(StatusCode, Json<PrincipalView>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(state.ops.create_principal(&caller, &body.name, body.platform_admin).await?),
    ))
}

/// Give a principal a role on the app.
#[utoipa::path(put, path = "/v1/apps/{app}/members/{principal_id}", tag = "apps", operation_id = "set_member",
    request_body = SetRole, params(("app" = String, Path), ("principal_id" = Uuid, Path)),
    responses(
        (status = 200, body = MemberView, description = "the membership as it is now"),
        (status = 404, body = ErrorBody, description = "`principal_not_found`: no such principal"),
        (status = 422, body = ErrorBody, description = "`invalid_field`: not a role")))]
pub async fn set_member(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams((_, principal)): PathParams<(String, String)>,
    JsonBody(body): JsonBody<SetRole>,
) -> Result<Json<MemberView>, ApiError> {
    Ok(Json(state.ops.set_member(&caller, &principal, &body.role).await?))
}

/// Remove a principal's role on the app.
#[utoipa::path(delete, path = "/v1/apps/{app}/members/{principal_id}", tag = "apps", operation_id = "remove_member",
    params(("app" = String, Path), ("principal_id" = Uuid, Path)),
    responses(
        (status = 204, description = "the role is removed"),
        (status = 404, body = ErrorBody, description = "`principal_not_found`, `member_not_found`: no such principal, or not a member")))]
pub async fn remove_member(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams((_, principal)): PathParams<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.ops.remove_member(&caller, &principal).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Mint a token, for the caller or (with ManagePrincipals) another principal. It can be no
/// wider than the credentials minting it, and outlive them no more.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", operation_id = "create_token", request_body = CreateToken,
    responses(
        (status = 201, body = TokenCreated, description = "the token, with its secret shown this once"),
        (status = 403, body = ErrorBody, description = "`forbidden`: a delivery token, another principal without ManagePrincipals, or a token wider or longer-lived than the caller's"),
        (status = 404, body = ErrorBody, description = "`principal_not_found`, `app_not_found`: no such principal or app"),
        (status = 422, body = ErrorBody, description = "`invalid_field`: an unknown scope, or an expiry out of range")))]
pub async fn create_token(
    State(state): State<ApiState>,
    caller: Caller,
    JsonBody(body): JsonBody<CreateToken>,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
    Ok((StatusCode::CREATED, Json(state.ops.mint_token(&caller, &body).await?)))
}

/// Revoke a token: its owner, or ManagePrincipals. A token revoked already is 404.
#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens", operation_id = "revoke_token",
    params(("id" = Uuid, Path)),
    responses(
        (status = 204, description = "the token is revoked"),
        (status = 403, body = ErrorBody, description = "`forbidden`: another principal's token, without ManagePrincipals"),
        (status = 404, body = ErrorBody, description = "`token_not_found`: no such token, or it is revoked already")))]
pub async fn revoke_token(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams(id): PathParams<String>,
) -> Result<StatusCode, ApiError> {
    state.ops.revoke_token(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
