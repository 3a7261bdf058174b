//! The API's configuration (DESIGN §10), parsed from a lookup function.

use std::net::SocketAddr;
use std::time::Duration;

use picloud_core::config::{ConfigError, parse_var};
use picloud_core::net::AllowNets;
use picloud_dispatch::{ExecutorConfig, Metrics, NodeConfig, SmtpConfig};

/// How the API and the ingest run.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// `PICLOUD_HTTP_ADDR`: where the HTTP API listens.
    pub http_addr: SocketAddr,
    /// `PICLOUD_MAX_PAYLOAD_BYTES`: larger request bodies get 413 and write nothing.
    pub max_payload_bytes: usize,
    /// `PICLOUD_SYNC_TIMEOUT_MAX_MS`: the cap on a sync caller's `Picloud-Timeout-Ms`.
    pub sync_timeout_max: Duration,
    /// `PICLOUD_HTTP_TIMEOUT_MS`: the longest one request may take (503 `request_timeout`);
    /// more than the longest sync wait.
    pub http_timeout: Duration,
    /// `PICLOUD_HTTP_MAX_IN_FLIGHT`: requests served at once; beyond it 503 `overloaded`.
    pub http_max_in_flight: usize,
    /// `PICLOUD_SYNC_MAX_IN_FLIGHT_PER_APP`: sync calls of one app in flight on this node, from
    /// the write of the call to the resolution of its result; beyond it 429
    /// `too_many_sync_calls` (DESIGN §13).
    pub sync_max_in_flight_per_app: usize,
    /// `PICLOUD_TAIL_MAX_PER_APP`: live tails one app may have open on this node; beyond it 429
    /// `too_many_tails` (DESIGN §15).
    pub tail_max_per_app: usize,
    /// How often an open live tail's credentials are checked again (a minute; not configured by
    /// the environment).
    pub tail_recheck: Duration,
    /// What the whole node shares: token key, handler timeout, subjects, trigger defaults. The
    /// API verifies delivery tokens with the same key and delivers its own sync calls.
    pub node: NodeConfig,
    /// The executors' SMTP server: `/readyz` checks that it can be reached while email rows
    /// wait, and says that it is missing when it is.
    pub smtp: Option<SmtpConfig>,
    /// The executors' `PICLOUD_WEBHOOK_ALLOW_NETS`: the networks a webhook registered with a
    /// literal address may name although they are not public.
    pub webhook_allow_nets: AllowNets,
    /// The process's metrics recorder, served at `/metrics` (404 without one). The binary
    /// installs it ([`Metrics::install`]); the API never installs a global recorder itself.
    pub metrics: Option<Metrics>,
}

impl ApiConfig {
    /// Defaults around a node configuration (for tests and embedding).
    pub fn new(node: NodeConfig) -> Self {
        Self {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_payload_bytes: picloud_core::protocol::DEFAULT_MAX_PAYLOAD_BYTES,
            sync_timeout_max: Duration::from_secs(60),
            http_timeout: Duration::from_secs(75),
            http_max_in_flight: 1024,
            sync_max_in_flight_per_app: 256,
            tail_max_per_app: 8,
            tail_recheck: Duration::from_secs(60),
            node,
            smtp: None,
            webhook_allow_nets: AllowNets::default(),
            metrics: None,
        }
    }

    /// Parses the API's own variables around the node's configuration, taking the SMTP server
    /// and the webhook allow list the executors were configured with. The metrics recorder is
    /// left to the caller.
    pub fn from_env(
        lookup: impl Fn(&str) -> Option<String>,
        node: NodeConfig,
        executors: &ExecutorConfig,
    ) -> Result<Self, ConfigError> {
        let lookup: &dyn Fn(&str) -> Option<String> = &lookup;
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
        let http_timeout_ms = parse_var(
            lookup,
            "PICLOUD_HTTP_TIMEOUT_MS",
            sync_max_ms + 15_000,
            &format!("milliseconds from more than PICLOUD_SYNC_TIMEOUT_MAX_MS ({sync_max_ms}) to 3700000"),
            |v| (sync_max_ms + 1..=3_700_000).contains(v),
        )?;
        let count = |variable, default: usize| {
            parse_var(lookup, variable, default, "an integer from 1 to 1000000", |v| {
                (1..=1_000_000).contains(v)
            })
        };
        Ok(Self {
            http_addr,
            max_payload_bytes,
            sync_timeout_max: Duration::from_millis(sync_max_ms),
            http_timeout: Duration::from_millis(http_timeout_ms),
            http_max_in_flight: count("PICLOUD_HTTP_MAX_IN_FLIGHT", default.http_max_in_flight)?,
            sync_max_in_flight_per_app: count(
                "PICLOUD_SYNC_MAX_IN_FLIGHT_PER_APP",
                default.sync_max_in_flight_per_app,
            )?,
            tail_max_per_app: count("PICLOUD_TAIL_MAX_PER_APP", default.tail_max_per_app)?,
            smtp: executors.smtp.clone(),
            webhook_allow_nets: executors.webhook_allow_nets.clone(),
            ..default
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ApiConfig::from_env` over `pairs`, with the default node and executors.
    fn from_pairs(pairs: &[(&str, &str)]) -> Result<ApiConfig, ConfigError> {
        let lookup = |k: &str| pairs.iter().find(|(name, _)| *name == k).map(|(_, v)| (*v).to_owned());
        ApiConfig::from_env(lookup, NodeConfig::new("n", b"0123456789abcdef"), &ExecutorConfig::default())
    }

    #[test]
    fn the_smtp_server_and_webhook_allow_list_are_the_executors() {
        let executors = ExecutorConfig {
            webhook_allow_nets: "10.0.0.0/8, fd00::1".parse().unwrap(),
            ..ExecutorConfig::default()
        };
        let config =
            ApiConfig::from_env(|_: &str| None, NodeConfig::new("n", b"0123456789abcdef"), &executors)
                .unwrap();
        assert_eq!(config.webhook_allow_nets.to_string(), "10.0.0.0/8,fd00::1/128");
    }

    #[test]
    fn the_request_timeout_must_outlast_the_longest_sync_wait() {
        let defaults = from_pairs(&[]).unwrap();
        assert_eq!(defaults.http_timeout, Duration::from_secs(75));
        assert_eq!((defaults.http_max_in_flight, defaults.sync_max_in_flight_per_app), (1024, 256));
        let err =
            from_pairs(&[("PICLOUD_SYNC_TIMEOUT_MAX_MS", "60000"), ("PICLOUD_HTTP_TIMEOUT_MS", "60000")])
                .unwrap_err();
        assert_eq!(err.variable, "PICLOUD_HTTP_TIMEOUT_MS");
        let err = from_pairs(&[("PICLOUD_SYNC_MAX_IN_FLIGHT_PER_APP", "0")]).unwrap_err();
        assert_eq!(err.variable, "PICLOUD_SYNC_MAX_IN_FLIGHT_PER_APP");
    }
}
