//! Liveness, readiness and metrics: the routes without a token (DESIGN §5).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use url::{Host, Url};
use utoipa::ToSchema;

use crate::ApiState;
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::views::Health;

/// How long `/readyz` waits for the SMTP server to accept a connection.
const SMTP_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The Prometheus text format's content type.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `/readyz`: every dependency checked, and those that make the node unready.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ok`, or `unavailable` when Postgres or NATS is not `ok`.
    pub status: String,
    /// By dependency — `postgres`, `nats`, and `smtp` while email rows wait — `ok` or what is
    /// wrong with it.
    pub checks: BTreeMap<String, String>,
    /// The dependencies that make the node unready (Postgres, NATS) and are not `ok`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub down: Vec<String>,
}

/// The dependencies a node cannot serve without: only these make it unready.
const REQUIRED: [&str; 2] = ["postgres", "nats"];

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "health", operation_id = "get_healthz", security(),
    responses((status = 200, body = Health, description = "the process answers")))]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok".into(), down: Vec::new() })
}

/// Readiness: Postgres and NATS are reachable; 503 names which is not. While email rows wait,
/// `checks.smtp` also says whether this node can send them (`PICLOUD_SMTP_URL` set, its server
/// accepting connections); that is reported but does not make the node unready: the node
/// serves everything else, and the emails wait for a node that can send them.
#[utoipa::path(get, path = "/readyz", tag = "health", operation_id = "get_readyz", security(),
    responses(
        (status = 200, body = Readiness, description = "Postgres and NATS are reachable (`checks.smtp` may still report that waiting emails cannot be sent from here)"),
        (status = 503, body = Readiness, description = "Postgres or NATS is not reachable: `down` names which")))]
pub async fn readyz(State(state): State<ApiState>) -> (StatusCode, Json<Readiness>) {
    let mut checks = BTreeMap::new();
    let emails_wait = match state.ops.store().email_rows_waiting().await {
        Ok(waiting) => {
            checks.insert("postgres", "ok".to_owned());
            waiting
        }
        Err(e) => {
            tracing::warn!(error = %e, "readiness: Postgres is unreachable");
            checks.insert("postgres", "unreachable".to_owned());
            false
        }
    };
    let nats = match state.nats.connection_state() {
        async_nats::connection::State::Connected => "ok",
        _ => "not connected",
    };
    checks.insert("nats", nats.to_owned());
    if emails_wait {
        checks.insert("smtp", smtp_check(state.config.smtp.as_ref().map(|s| s.url.as_str())).await);
    }
    let down: Vec<String> = REQUIRED
        .into_iter()
        .filter(|name| checks.get(name).is_some_and(|v| v != "ok"))
        .map(str::to_owned)
        .collect();
    let checks = checks.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    if down.is_empty() {
        (StatusCode::OK, Json(Readiness { status: "ok".into(), checks, down }))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(Readiness { status: "unavailable".into(), checks, down }))
    }
}

/// Whether the SMTP server at `url` accepts a TCP connection in time.
async fn smtp_check(url: Option<&str>) -> String {
    let Some(url) = url else { return "not configured (PICLOUD_SMTP_URL) while email rows wait".into() };
    let Some((host, port)) = smtp_address(url) else { return "unreachable".into() };
    let connect = tokio::net::TcpStream::connect((host.as_str(), port));
    match tokio::time::timeout(SMTP_CONNECT_TIMEOUT, connect).await {
        Ok(Ok(_)) => "ok".into(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, %host, port, "readiness: the SMTP server refused the connection");
            "unreachable".into()
        }
        Err(_) => {
            tracing::warn!(%host, port, timeout = ?SMTP_CONNECT_TIMEOUT, "readiness: the SMTP server did not answer");
            "unreachable".into()
        }
    }
}

/// Where the SMTP server of a `PICLOUD_SMTP_URL` listens, with the email executor's (lettre's)
/// default ports: 465 for `smtps://`, 587 for `smtp://…?tls=…`, else 25.
fn smtp_address(url: &str) -> Option<(String, u16)> {
    let url = Url::parse(url).ok()?;
    let host = match url.host()? {
        Host::Domain(domain) => domain.to_owned(),
        Host::Ipv4(ip) => ip.to_string(),
        Host::Ipv6(ip) => ip.to_string(),
    };
    let default_port = match url.scheme() {
        "smtps" => 465,
        _ if url.query_pairs().any(|(k, _)| k == "tls") => 587,
        _ => 25,
    };
    Some((host, url.port().unwrap_or(default_port)))
}

/// This node's metrics in the Prometheus text format. The database gauges are those the node
/// last read (it reads them every `PICLOUD_METRICS_INTERVAL_MS`): a scrape touches no database.
#[utoipa::path(get, path = "/metrics", tag = "health", operation_id = "get_metrics", security(), responses(
    (status = 200, content_type = "text/plain", body = String, description = "Prometheus text format; the database gauges as last read, once per `PICLOUD_METRICS_INTERVAL_MS`"),
    (status = 404, body = ErrorBody, description = "`metrics_disabled`: this node records no metrics")))]
pub async fn metrics(State(state): State<ApiState>) -> Response {
    match &state.config.metrics {
        Some(metrics) => ([(CONTENT_TYPE, PROMETHEUS_TEXT)], metrics.render()).into_response(),
        None => ApiError::new(ErrorCode::MetricsDisabled, "this node records no metrics").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smtp_addresses_default_to_the_ports_the_email_executor_uses() {
        let address = |url| smtp_address(url).map(|(host, port)| format!("{host}:{port}"));
        assert_eq!(address("smtp://mail.example.com").as_deref(), Some("mail.example.com:25"));
        assert_eq!(address("smtp://mail.example.com?tls=required").as_deref(), Some("mail.example.com:587"));
        assert_eq!(address("smtps://u:p@mail.example.com").as_deref(), Some("mail.example.com:465"));
        assert_eq!(address("smtp://127.0.0.1:2525").as_deref(), Some("127.0.0.1:2525"));
        assert_eq!(address("smtp://[::1]:2525").as_deref(), Some("::1:2525"));
        assert_eq!(address("not a url"), None);
    }
}
