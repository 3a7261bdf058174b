//! The routes of DESIGN §5, registered once for both the router and the OpenAPI document.

use std::sync::OnceLock;

use axum::Json;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::ApiState;
use crate::auth::Caller;
use crate::error::ApiError;

pub mod admin;
pub mod dead_letters;
pub mod events;
pub mod health;
pub mod invoke;
pub mod kv;
pub mod triggers;

#[derive(OpenApi)]
#[openapi(
    info(title = "picloud-router", description = "The event router of an app platform: KV, pubsub, queues, email and sync calls, delivered to triggers over NATS."),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("pcr_… or pdt_…").build(),
            ),
        );
    }
}

/// The document, built once from the routes themselves (see [`router`]).
static DOCUMENT: OnceLock<utoipa::openapi::OpenApi> = OnceLock::new();

/// This document: every route of the API.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta", responses((status = 200, description = "the OpenAPI 3 document")))]
async fn openapi_json(_caller: Caller) -> Json<utoipa::openapi::OpenApi> {
    Json(DOCUMENT.get().cloned().unwrap_or_default())
}

/// The API's router over `state`, with the OpenAPI document at `/v1/openapi.json`.
pub fn router(state: ApiState) -> axum::Router {
    let (router, document) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(admin::create_app, admin::list_apps))
        .routes(routes!(admin::create_principal))
        .routes(routes!(admin::set_member, admin::remove_member))
        .routes(routes!(admin::create_token))
        .routes(routes!(admin::revoke_token))
        .routes(routes!(kv::put, kv::get, kv::delete))
        .routes(routes!(kv::list))
        .routes(routes!(events::publish))
        .routes(routes!(events::enqueue))
        .routes(routes!(events::send_email))
        .routes(routes!(invoke::invoke))
        .routes(routes!(triggers::register, triggers::list))
        .routes(routes!(triggers::get, triggers::patch, triggers::delete))
        .routes(routes!(dead_letters::list))
        .routes(routes!(dead_letters::count))
        .routes(routes!(dead_letters::get))
        .routes(routes!(dead_letters::replay))
        .routes(routes!(dead_letters::ignore))
        .routes(routes!(dead_letters::abandoned))
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(health::metrics))
        .routes(routes!(openapi_json))
        .split_for_parts();
    DOCUMENT.get_or_init(|| document);
    let max_body = state.config.max_payload_bytes;
    router
        .fallback(|| async { ApiError::not_found("not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method",
            )
            .into_response()
        })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}
