//! The API's configuration (DESIGN §10), parsed from a lookup function.

use std::net::SocketAddr;
use std::time::Duration;

use picloud_core::config::{ConfigError, parse_var};
use picloud_core::net::AllowNets;
use picloud_dispatch::{ExecutorConfig, Metrics, RelayConfig, SmtpConfig};

/// How the API and the ingest run.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// `PICLOUD_HTTP_ADDR`: where the HTTP API listens.
    pub http_addr: SocketAddr,
    /// `PICLOUD_MAX_PAYLOAD_BYTES`: larger request bodies get 413 and write nothing.
    pub max_payload_bytes: usize,
    /// `PICLOUD_SYNC_TIMEOUT_MAX_MS`: the cap on a sync caller's `Picloud-Timeout-Ms`.
    pub sync_timeout_max: Duration,
    /// The node's delivery settings: token key, handler timeout, subjects, trigger defaults. The
    /// API verifies delivery tokens with the same key and delivers its own sync calls.
    pub node: RelayConfig,
    /// `PICLOUD_SMTP_URL` (parsed as the email executor parses it): `/readyz` checks that it
    /// can be reached while email rows wait, and says that it is missing when it is.
    pub smtp: Option<SmtpConfig>,
    /// `PICLOUD_WEBHOOK_ALLOW_NETS` (parsed as the webhook executor parses it): the networks a
    /// webhook registered with a literal address may name although they are not public.
    pub webhook_allow_nets: AllowNets,
    /// The process's metrics recorder, served at `/metrics` (404 without one). The binary
    /// installs it ([`Metrics::install`]); the API never installs a global recorder itself.
    pub metrics: Option<Metrics>,
}

impl ApiConfig {
    /// Defaults around a node configuration (for tests and embedding).
    pub fn new(node: RelayConfig) -> Self {
        Self {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_payload_bytes: picloud_core::protocol::DEFAULT_MAX_PAYLOAD_BYTES,
            sync_timeout_max: Duration::from_secs(60),
            node,
            smtp: None,
            webhook_allow_nets: AllowNets::default(),
            metrics: None,
        }
    }

    /// Parses the API's variables, the node's (see [`RelayConfig::from_env`]), the SMTP server's
    /// and the webhook allow list (see [`ExecutorConfig::from_env`]). The metrics recorder is
    /// left to the caller.
    pub fn from_env(
        lookup: impl Fn(&str) -> Option<String>,
        default_node_id: &str,
    ) -> Result<Self, ConfigError> {
        let lookup: &dyn Fn(&str) -> Option<String> = &lookup;
        let node = RelayConfig::from_env(lookup, default_node_id)?;
        let default = Self::new(node);
        let http_addr = parse_var(
            lookup,
            "PICLOUD_HTTP_ADDR",
            default.http_addr,
            "an address such as 127.0.0.1:8080",
            |_| true,
        )?;
        let max_payload_bytes = parse_var(
            lookup,
            "PICLOUD_MAX_PAYLOAD_BYTES",
            default.max_payload_bytes,
            "a number of bytes from 1024 to 67108864",
            |v| (1024..=64 * 1024 * 1024).contains(v),
        )?;
        let sync_max_ms = parse_var(
            lookup,
            "PICLOUD_SYNC_TIMEOUT_MAX_MS",
            60_000u64,
            "milliseconds from 10 to 3600000",
            |v| (10..=3_600_000).contains(v),
        )?;
        let executors = ExecutorConfig::from_env(lookup)?;
        Ok(Self {
            http_addr,
            max_payload_bytes,
            sync_timeout_max: Duration::from_millis(sync_max_ms),
            smtp: executors.smtp,
            webhook_allow_nets: executors.webhook_allow_nets,
            ..default
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_webhook_allow_list_is_read_with_the_executors_parser() {
        let env = |allow: &'static str| {
            move |k: &str| match k {
                "PICLOUD_TOKEN_SECRET" => Some("0123456789abcdef0123".to_owned()),
                "PICLOUD_WEBHOOK_ALLOW_NETS" => Some(allow.to_owned()),
                _ => None,
            }
        };
        let config = ApiConfig::from_env(env("10.0.0.0/8, fd00::1"), "n").unwrap();
        assert_eq!(config.webhook_allow_nets.to_string(), "10.0.0.0/8,fd00::1/128");
        let err = ApiConfig::from_env(env("10.0.0.0/8,intranet"), "n").unwrap_err();
        assert_eq!(err.variable, "PICLOUD_WEBHOOK_ALLOW_NETS");
    }
}
