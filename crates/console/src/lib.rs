//! The console (DESIGN §15): a web UI the router serves at `/console`, on the API's own state.
//!
//! Pages are rendered on the server from templates askama checks at compile time; the static
//! assets (a stylesheet, a small script for the live tail, a vendored htmx) are compiled into the
//! binary. A signed-in browser holds its `pcr_` token in an `HttpOnly`, `SameSite=Strict` cookie
//! (`Secure` unless the console is reached on a loopback address), and every form carries the
//! session's form token (`TokenKey::form_token`), checked before anything else.
//!
//! Architecture invariant: every page reads and every action acts through `picloud_api::Ops`
//! (or `ApiState`, which adds the NATS side of a cancel and of a tail) with the `Caller` the
//! session's token authenticates as on the page's app, so the console checks exactly the
//! capabilities the API does; it never reads the store itself.
#![warn(missing_docs)]

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use picloud_api::ApiState;

mod actions;
mod charts;
mod pages;
mod session;

/// The console's routes, all under `/console` (to be merged with the API's router, whose
/// fallback answers every other path).
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/console", get(pages::apps))
        .route("/console/login", get(session::login_page).post(session::login))
        .route("/console/logout", post(session::logout))
        .route("/console/static/{file}", get(asset))
        .route("/console/apps/{app}", get(pages::app))
        .route("/console/apps/{app}/triggers/{name}", get(pages::trigger))
        .route("/console/apps/{app}/triggers/{name}/deliveries", get(pages::trigger_deliveries))
        .route("/console/apps/{app}/triggers/{name}/tail", get(pages::tail))
        .route("/console/apps/{app}/triggers/{name}/enabled", post(actions::set_enabled))
        .route("/console/apps/{app}/triggers/{name}/delete", post(actions::delete_trigger))
        .route("/console/apps/{app}/dead-letters", get(pages::dead_letters))
        .route("/console/apps/{app}/dead-letters/bulk", post(actions::bulk))
        .route("/console/apps/{app}/dead-letters/{id}", get(pages::dead_letter))
        .route("/console/apps/{app}/dead-letters/{id}/replay", post(actions::replay))
        .route("/console/apps/{app}/dead-letters/{id}/ignore", post(actions::ignore))
        .route("/console/apps/{app}/abandoned", get(pages::abandoned))
        .route("/console/apps/{app}/deliveries/{id}", get(pages::delivery))
        .route("/console/apps/{app}/deliveries/{id}/cancel", post(actions::cancel))
        .route("/console/{*rest}", get(|| async { pages::not_found() }))
        .layer(axum::middleware::map_response(session::secure_headers))
        .layer(axum::middleware::from_fn_with_state(state.clone(), picloud_api::within_limits))
        .with_state(state)
}

/// The static assets, compiled in.
async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> axum::response::Response {
    let (body, content_type): (&'static str, &str) = match file.as_str() {
        "console.css" => (include_str!("../static/console.css"), "text/css; charset=utf-8"),
        "console.js" => (include_str!("../static/console.js"), "text/javascript; charset=utf-8"),
        "htmx.min.js" => (include_str!("../static/htmx.min.js"), "text/javascript; charset=utf-8"),
        _ => return pages::not_found(),
    };
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "public, max-age=3600")], body)
        .into_response()
}
