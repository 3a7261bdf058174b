//! Liveness and readiness.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use crate::ApiState;
use crate::views::Health;

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "health", security(), responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok".into(), down: Vec::new() })
}

/// Readiness: Postgres and NATS are reachable; names what is down.
#[utoipa::path(get, path = "/readyz", tag = "health", security(),
    responses((status = 200, body = Health), (status = 503, body = Health)))]
pub async fn readyz(State(state): State<ApiState>) -> (StatusCode, Json<Health>) {
    let mut down = Vec::new();
    if sqlx_ping(&state).await.is_err() {
        down.push("postgres".to_owned());
    }
    if state.nats.connection_state() != async_nats::connection::State::Connected {
        down.push("nats".to_owned());
    }
    if down.is_empty() {
        (StatusCode::OK, Json(Health { status: "ok".into(), down }))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(Health { status: "unavailable".into(), down }))
    }
}

async fn sqlx_ping(state: &ApiState) -> Result<(), picloud_store::Error> {
    use picloud_store::AuthRepo as _;
    state.store.app_by_slug("-").await.map(drop)
}
