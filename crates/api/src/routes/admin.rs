//! Apps, principals, memberships and tokens.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use picloud_core::token::{generate_api_token, hash_api_token};
use picloud_core::{AppSlug, Capability, Role, Scope, ScopeSet};
use picloud_store::{AuthRepo, NewApiToken, Transactional as _};
use uuid::Uuid;

use crate::ApiState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody, ErrorCode};
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
    caller.require(Capability::ManageApps)?;
    let slug = AppSlug::parse(body.slug).map_err(|e| ApiError::invalid("slug", e))?;
    let app = state.store.create_app(&slug).await?;
    Ok((StatusCode::CREATED, Json(app.into())))
}

/// The apps the caller can see: every app for platform admins, else the caller's.
#[utoipa::path(get, path = "/v1/apps", tag = "apps", operation_id = "list_apps", params(PageQuery),
    responses((status = 200, body = Page<AppView>, description = "a page of apps, by slug")))]
pub async fn list_apps(
    State(state): State<ApiState>,
    caller: Caller,
    QueryParams(page): QueryParams<PageQuery>,
) -> Result<Json<Page<AppView>>, ApiError> {
    let member = if caller.principal.platform_admin { None } else { Some(caller.principal.id) };
    let after = page.after()?;
    let mut found = state.store.list_apps(member, after.as_deref(), page.limit()).await?;
    if let Some(only) = caller.limited_to_app() {
        found.items.retain(|a| a.id == only);
    }
    Ok(Json(Page::from_store(found, |a| a.slug.to_string(), AppView::from)))
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
    caller.require(Capability::ManagePrincipals)?;
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::invalid("name", "expected 1 to 200 characters"));
    }
    let principal = state.store.create_principal(name, body.platform_admin).await?;
    Ok((StatusCode::CREATED, Json(principal.into())))
}

fn principal_id(raw: &str) -> Result<Uuid, ApiError> {
    raw.parse().map_err(|_| ApiError::new(ErrorCode::PrincipalNotFound, format!("no principal {raw}")))
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
    let app = caller.require_app(Capability::AppManageMembers)?;
    let role = Role::parse(&body.role)
        .ok_or_else(|| ApiError::invalid("role", "expected viewer, developer or admin"))?;
    let principal_id = principal_id(&principal)?;
    state.store.set_role(app.id, principal_id, role).await?;
    Ok(Json(MemberView { app: app.slug.to_string(), principal_id, role }))
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
    let app = caller.require_app(Capability::AppManageMembers)?;
    if state.store.remove_member(app.id, principal_id(&principal)?).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(ErrorCode::MemberNotFound, format!("{principal} is not a member of {}", app.slug)))
    }
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
    if caller.is_delivery() {
        return Err(ApiError::forbidden("delivery tokens cannot mint tokens"));
    }
    let principal_id = body.principal_id.unwrap_or(caller.principal.id);
    if principal_id != caller.principal.id {
        caller.require(Capability::ManagePrincipals)?;
    }
    let standing =
        state.store.authenticate_principal(principal_id, body.app.as_deref()).await?.ok_or_else(|| {
            ApiError::new(ErrorCode::PrincipalNotFound, format!("no principal {principal_id}"))
        })?;
    // An app the token's principal holds no role on is answered like one that does not exist:
    // the same rule as every app route, so that slugs cannot be probed here either.
    let app = match body.app.as_deref() {
        Some(slug) => Some(
            standing
                .app
                .filter(|_| standing.principal.platform_admin || standing.role.is_some())
                .ok_or_else(|| ApiError::new(ErrorCode::AppNotFound, format!("no app {slug}")))?,
        ),
        None => None,
    };
    if let Some(limited) = caller.limited_to_app()
        && app.as_ref().map(|a| a.id) != Some(limited)
    {
        return Err(ApiError::forbidden(
            "credentials limited to one app can only mint tokens limited to that app",
        ));
    }
    let scopes = body
        .scopes
        .as_ref()
        .map(|list| {
            list.iter()
                .enumerate()
                .map(|(i, s)| {
                    Scope::parse(s).ok_or_else(|| {
                        ApiError::invalid(&format!("scopes[{i}]"), "expected platform_admin, app_admin, app_write, app_publish, app_send, app_invoke or app_read")
                    })
                })
                .collect::<Result<ScopeSet, _>>()
        })
        .transpose()?;
    if let crate::auth::Via::Token(token) = &caller.via
        && let Some(held) = token.scopes
        && scopes.is_none_or(|wanted| wanted.intersect(held) != wanted)
    {
        return Err(ApiError::forbidden("a token narrowed to some scopes can only mint tokens within them"));
    }
    let expires_at = match body.expires_in_s {
        Some(s) if s == 0 || s > picloud_core::token::MAX_TOKEN_LIFETIME_S => {
            return Err(ApiError::invalid("expires_in_s", "expected 1 second to 10 years"));
        }
        Some(s) => Some(state.store.clock().now() + std::time::Duration::from_secs(s)),
        None => None,
    };
    if let crate::auth::Via::Token(token) = &caller.via
        && let Some(held) = token.expires_at
        && expires_at.is_none_or(|wanted| wanted > held)
    {
        return Err(ApiError::forbidden(format!(
            "a token that expires can only mint tokens that expire no later (this one expires at {})",
            crate::views::rfc3339(held)
        )));
    }
    let secret = generate_api_token();
    let token = state
        .store
        .create_token(&NewApiToken {
            id: Uuid::now_v7(),
            principal_id,
            token_hash: hash_api_token(&secret),
            app_id: app.as_ref().map(|a| a.id),
            scopes,
            expires_at,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(TokenCreated::new(&token, secret, app.map(|a| a.slug.into_string())))))
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
    let not_found = || ApiError::new(ErrorCode::TokenNotFound, format!("no token {id}"));
    let token_id: Uuid = id.parse().map_err(|_| not_found())?;
    let token = state.store.token(token_id).await?.ok_or_else(not_found)?;
    if token.principal_id != caller.principal.id || caller.is_delivery() {
        caller.require(Capability::ManagePrincipals)?;
    }
    // An already revoked token is as gone as one that never was; revoking it changes nothing.
    if !state.store.revoke_token(token_id).await? {
        return Err(not_found());
    }
    Ok(StatusCode::NO_CONTENT)
}
