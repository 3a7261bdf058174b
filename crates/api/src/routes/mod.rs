//! The routes of DESIGN §5, registered once for both the router and the OpenAPI document, and
//! the error answers the document declares for what routes share (see [`SharedErrors`]).

use std::sync::OnceLock;

use axum::Json;
use axum::extract::DefaultBodyLimit;
use axum::response::IntoResponse;
use utoipa::openapi::header::Header;
use utoipa::openapi::path::{Operation, ParameterIn, PathItem};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, ObjectBuilder, Ref, RefOr, Response, Type};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::ApiState;
use crate::error::{ApiError, ErrorBody, ErrorCode};

pub mod admin;
pub mod dead_letters;
pub mod deliveries;
pub mod events;
pub mod health;
pub mod invoke;
pub mod kv;
pub mod tail;
pub mod triggers;

#[derive(OpenApi)]
#[openapi(
    info(title = "picloud-router", description = "The event router of an app platform: KV, pubsub, queues, email and sync calls, delivered to triggers over NATS."),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(ErrorBody))
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

/// The error answers an operation gives because of what it shares with other routes, declared
/// here once rather than on every route: those of the bearer token and of the node's limits
/// (every operation that takes a token), of the route's app (`/v1/apps/{app}/…`), and of the
/// extractors that read the request (`JsonBody`, `PathParams`, `QueryParams`). A status the
/// route declares itself keeps its description, extended by these.
struct SharedErrors;

/// Why an operation that takes a token can answer 503, with `Retry-After`.
const UNAVAILABLE: &str = "`overloaded`, `request_timeout`, `database_unavailable`: the node is at its \
    concurrency limit, the request ran out of time, or Postgres cannot be reached; try again after \
    Retry-After seconds";

impl Modify for SharedErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let bearer_by_default = openapi.security.as_ref().is_some_and(|s| takes_token(s));
        for (path, item) in openapi.paths.paths.iter_mut() {
            for operation in operations(item) {
                let has_token = operation.security.as_ref().map_or(bearer_by_default, |s| takes_token(s));
                let has = |place: ParameterIn| {
                    operation.parameters.iter().flatten().any(|p| p.parameter_in == place)
                };
                let (in_path, in_query) = (has(ParameterIn::Path), has(ParameterIn::Query));
                let paged = operation.parameters.iter().flatten().any(|p| p.name == "after");
                let has_body = operation.request_body.is_some();
                if has_token {
                    answer(
                        operation,
                        401,
                        "`missing_token`, `invalid_token`, `token_expired`, `token_revoked`: no usable \
                         bearer token",
                    );
                    answer(operation, 503, UNAVAILABLE);
                    retry_after(operation, 503);
                }
                if path.starts_with("/v1/apps/{app}/") {
                    answer(
                        operation,
                        403,
                        "`forbidden`: the caller sees the app but lacks the capability on it",
                    );
                    answer(
                        operation,
                        404,
                        "`app_not_found`: no such app, or the caller holds no role on it, or its \
                         credentials are limited to another app (the same answer: slugs cannot be probed)",
                    );
                }
                if has_body {
                    answer(
                        operation,
                        400,
                        "`invalid_json`, `invalid_body`: the body is not JSON of the expected shape",
                    );
                    answer(
                        operation,
                        413,
                        "`payload_too_large`: the body exceeds PICLOUD_MAX_PAYLOAD_BYTES, or the event it \
                         writes would be larger than an envelope NATS carries",
                    );
                }
                if in_path {
                    answer(operation, 400, "`invalid_path`: a path parameter cannot be read");
                }
                if in_query {
                    answer(operation, 400, "`invalid_query`: a query parameter cannot be read");
                }
                if has_token && (in_path || in_query || has_body) {
                    answer(
                        operation,
                        400,
                        "`invalid_text`: a text holds the NUL character, which cannot be stored",
                    );
                }
                if paged {
                    answer(operation, 400, "`invalid_cursor`: `after` is not a cursor this API returned");
                }
            }
        }
    }
}

/// Whether security requirements ask for a token (an empty requirement makes it optional).
fn takes_token(requirements: &[SecurityRequirement]) -> bool {
    !requirements.is_empty() && !requirements.contains(&SecurityRequirement::default())
}

/// The operations of a path.
fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
        &mut item.trace,
    ]
    .into_iter()
    .flatten()
}

/// Declares that `operation` answers `status` with the error shape for the reason `description`
/// gives, adding the reason to the description of a status it declares already.
fn answer(operation: &mut Operation, status: u16, description: &str) {
    let responses = &mut operation.responses.responses;
    match responses.get_mut(&status.to_string()) {
        Some(RefOr::T(response)) => {
            if !response.description.contains(description) {
                if !response.description.is_empty() {
                    response.description.push_str("; ");
                }
                response.description.push_str(description);
            }
        }
        Some(RefOr::Ref(_)) => {}
        None => {
            let mut response = Response::new(description);
            response.content.insert(
                "application/json".to_owned(),
                ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build(),
            );
            responses.insert(status.to_string(), RefOr::T(response));
        }
    }
}

/// Declares the `Retry-After` header on `operation`'s `status` answer.
fn retry_after(operation: &mut Operation, status: u16) {
    if let Some(RefOr::T(response)) = operation.responses.responses.get_mut(&status.to_string()) {
        let mut header = Header::new(ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0)));
        header.description = Some("seconds to wait before trying again".to_owned());
        response.headers.insert("Retry-After".to_owned(), header);
    }
}

/// The document, built once from the routes themselves (see [`router`]).
static DOCUMENT: OnceLock<utoipa::openapi::OpenApi> = OnceLock::new();

/// This document: every route of the API. It needs no token: it describes routes, not data.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta", operation_id = "get_openapi", security(),
    responses((status = 200, body = Object, description = "the OpenAPI 3.1 document")))]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(DOCUMENT.get().cloned().unwrap_or_default())
}

/// The API's router over `state`, with the OpenAPI document at `/v1/openapi.json`.
pub fn router(state: ApiState) -> axum::Router {
    let (router, mut document) = OpenApiRouter::with_openapi(ApiDoc::openapi())
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
        .routes(routes!(triggers::stats))
        .routes(routes!(dead_letters::list))
        .routes(routes!(dead_letters::count))
        .routes(routes!(dead_letters::get))
        .routes(routes!(dead_letters::replay))
        .routes(routes!(dead_letters::ignore))
        .routes(routes!(dead_letters::bulk_replay))
        .routes(routes!(dead_letters::bulk_ignore))
        .routes(routes!(dead_letters::abandoned))
        .routes(routes!(deliveries::list))
        .routes(routes!(deliveries::get))
        .routes(routes!(deliveries::cancel))
        .routes(routes!(tail::tail))
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(health::metrics))
        .routes(routes!(openapi_json))
        .split_for_parts();
    SharedErrors.modify(&mut document);
    DOCUMENT.get_or_init(|| document);
    let max_body = state.config.max_payload_bytes;
    router
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(ErrorCode::MethodNotAllowed, "this route does not take that method").into_response()
        })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(state.clone(), crate::limits::within_limits))
        .with_state(state)
}
