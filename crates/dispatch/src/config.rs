//! The relay's configuration, parsed from a lookup function (DESIGN §10 and the relay's tuning).

use std::time::Duration;

use picloud_core::TriggerConfig;
use picloud_core::config::{ConfigError, Secret, parse_var};
use picloud_core::protocol::Subjects;
use picloud_core::token::TokenKey;

/// The longest `PICLOUD_HANDLER_TIMEOUT_MS` and `PICLOUD_MAX_WORKING_MS` a node accepts, in
/// milliseconds: no attempt lasts longer.
pub const MAX_HANDLER_TIMEOUT_MS: u64 = 3_600_000;

/// How a node connects to NATS (`PICLOUD_NATS_URL`, `PICLOUD_NATS_CREDS`, `PICLOUD_NATS_USER`,
/// `PICLOUD_NATS_PASSWORD`).
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Comma-separated seed URLs.
    pub url: String,
    /// A `.creds` file, if any.
    pub creds: Option<std::path::PathBuf>,
    /// User and password, if any.
    pub user_password: Option<(String, Secret)>,
}

/// `PICLOUD_SUBJECT_PREFIX` (default `picloud`): the subjects every part of a node uses.
fn subjects_from_env(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Subjects, ConfigError> {
    let prefix = parse_var(
        lookup,
        "PICLOUD_SUBJECT_PREFIX",
        "picloud".to_string(),
        "dot-separated subject tokens",
        |p| Subjects::new(p).is_ok(),
    )?;
    Ok(Subjects::new(&prefix).expect("checked above"))
}

impl NatsConfig {
    /// Parses the NATS variables of DESIGN §10.
    pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |k: &str| lookup(k).filter(|v| !v.trim().is_empty());
        let url = get("PICLOUD_NATS_URL").unwrap_or_else(|| "nats://127.0.0.1:4222".into());
        let user_password = match (get("PICLOUD_NATS_USER"), get("PICLOUD_NATS_PASSWORD")) {
            (Some(user), Some(password)) => Some((user, Secret::new(password))),
            (None, None) => None,
            (user, _) => {
                return Err(ConfigError {
                    variable: if user.is_some() { "PICLOUD_NATS_PASSWORD" } else { "PICLOUD_NATS_USER" }
                        .into(),
                    value: String::new(),
                    accepts:
                        "a value whenever the other of PICLOUD_NATS_USER and PICLOUD_NATS_PASSWORD is set"
                            .into(),
                });
            }
        };
        Ok(Self { url, creds: get("PICLOUD_NATS_CREDS").map(Into::into), user_password })
    }

    /// Connects, naming the connection `name`; keeps reconnecting forever once connected.
    pub async fn connect(&self, name: &str) -> Result<async_nats::Client, async_nats::ConnectError> {
        let mut options = async_nats::ConnectOptions::new().name(name).retry_on_initial_connect();
        if let Some((user, password)) = &self.user_password {
            options = options.user_and_password(user.clone(), password.expose().to_owned());
        }
        if let Some(creds) = &self.creds {
            options = options.credentials_file(creds).await?;
        }
        let seeds: Vec<&str> = self.url.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
        options.connect(seeds.as_slice()).await
    }
}

/// What every part of a node shares (DESIGN §10): its name, the subjects, the delivery-token key,
/// the trigger defaults, the handler timeout and the lease margin. The binary parses it once; the
/// relay, the API (which delivers its own sync calls and verifies delivery tokens) and the
/// executors take it.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's name, in leases (`leased_by`) and logs.
    pub node_id: String,
    /// The subjects every part uses.
    pub subjects: Subjects,
    /// Signs and verifies delivery tokens.
    pub token_key: TokenKey,
    /// Depth limit and default retry policy.
    pub triggers: TriggerConfig,
    /// The deadline of one attempt (`PICLOUD_HANDLER_TIMEOUT_MS`).
    pub handler_timeout: Duration,
    /// Added to the handler timeout to make the lease: time to publish and to complete.
    pub lease_margin: Duration,
    /// How long `working` replies may keep extending one attempt, from its start
    /// (`PICLOUD_MAX_WORKING_MS`, DESIGN §14).
    pub max_working: Duration,
}

impl NodeConfig {
    /// Defaults for everything but the token secret, for tests and embedding.
    pub fn new(node_id: impl Into<String>, token_secret: &[u8]) -> Self {
        Self {
            node_id: node_id.into(),
            subjects: Subjects::default(),
            token_key: TokenKey::new(token_secret),
            triggers: TriggerConfig::default(),
            handler_timeout: Duration::from_secs(30),
            lease_margin: Duration::from_secs(10),
            max_working: Duration::from_secs(3600),
        }
    }

    /// The lease a claim takes: the handler timeout plus the margin.
    pub fn lease(&self) -> Duration {
        self.lease_until(self.handler_timeout)
    }

    /// The lease of an attempt whose deadline is `to_deadline` away: that plus the margin, the
    /// time to publish and to complete.
    pub fn lease_until(&self, to_deadline: Duration) -> Duration {
        to_deadline + self.lease_margin
    }

    /// Parses `PICLOUD_TOKEN_SECRET` (required), `PICLOUD_NODE_ID` (else `default_node_id`),
    /// `PICLOUD_SUBJECT_PREFIX`, `PICLOUD_HANDLER_TIMEOUT_MS`, `PICLOUD_LEASE_MARGIN_MS`,
    /// `PICLOUD_MAX_WORKING_MS` and the trigger variables of [`TriggerConfig::from_env`].
    pub fn from_env(
        lookup: impl Fn(&str) -> Option<String>,
        default_node_id: &str,
    ) -> Result<Self, ConfigError> {
        let lookup: &dyn Fn(&str) -> Option<String> = &lookup;
        let secret = Secret::new(lookup("PICLOUD_TOKEN_SECRET").unwrap_or_default());
        if secret.expose().len() < 16 {
            return Err(ConfigError {
                variable: "PICLOUD_TOKEN_SECRET".into(),
                value: if secret.expose().is_empty() { String::new() } else { "<hidden>".into() },
                accepts: "a secret of at least 16 bytes (required: it signs delivery tokens)".into(),
            });
        }
        let node_id =
            lookup("PICLOUD_NODE_ID").filter(|v| !v.trim().is_empty()).unwrap_or(default_node_id.into());
        let mut config = Self::new(node_id, secret.expose().as_bytes());
        config.subjects = subjects_from_env(lookup)?;
        config.triggers = TriggerConfig::from_env(lookup)?;
        config.handler_timeout =
            ms(lookup, "PICLOUD_HANDLER_TIMEOUT_MS", 30_000, 10, MAX_HANDLER_TIMEOUT_MS)?;
        config.lease_margin = ms(lookup, "PICLOUD_LEASE_MARGIN_MS", 10_000, 100, 3_600_000)?;
        config.max_working = ms(lookup, "PICLOUD_MAX_WORKING_MS", 3_600_000, 0, MAX_HANDLER_TIMEOUT_MS)?;
        Ok(config)
    }
}

/// A duration variable in milliseconds within `min..=max`.
fn ms(
    lookup: &dyn Fn(&str) -> Option<String>,
    variable: &str,
    default: u64,
    min: u64,
    max: u64,
) -> Result<Duration, ConfigError> {
    parse_var(lookup, variable, default, &format!("milliseconds from {min} to {max}"), |v| {
        (min..=max).contains(v)
    })
    .map(Duration::from_millis)
}

/// How a relay runs: the node's settings and the relay's own tuning.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// What the whole node shares.
    pub node: NodeConfig,
    /// Rows claimed per statement.
    pub batch_size: u32,
    /// Deliveries published and not yet completed, at most.
    pub max_in_flight: usize,
    /// Deliveries of one app published and not yet completed, at most (`None`: half of
    /// `max_in_flight`): another app's rows find free slots whatever one app's backlog or
    /// hanging handler holds.
    pub app_share: Option<usize>,
    /// How often to look for due rows when no notification came.
    pub poll_interval: Duration,
}

impl RelayConfig {
    /// The relay's default tuning around `node`.
    pub fn new(node: NodeConfig) -> Self {
        Self {
            node,
            batch_size: 500,
            max_in_flight: 4000,
            app_share: None,
            poll_interval: Duration::from_secs(1),
        }
    }

    /// The most deliveries of one app in flight at once: [`RelayConfig::app_share`], or half of
    /// `max_in_flight`, and one at least.
    pub fn app_share(&self) -> u32 {
        let share = self.app_share.unwrap_or(self.max_in_flight / 2).clamp(1, self.max_in_flight.max(1));
        u32::try_from(share).unwrap_or(u32::MAX)
    }

    /// Parses the relay's tuning around `node`: `PICLOUD_RELAY_BATCH`,
    /// `PICLOUD_RELAY_MAX_IN_FLIGHT`, `PICLOUD_RELAY_APP_SHARE` and `PICLOUD_RELAY_POLL_MS`.
    pub fn from_env(lookup: impl Fn(&str) -> Option<String>, node: NodeConfig) -> Result<Self, ConfigError> {
        let lookup: &dyn Fn(&str) -> Option<String> = &lookup;
        let mut config = Self::new(node);
        config.poll_interval = ms(lookup, "PICLOUD_RELAY_POLL_MS", 1_000, 10, 60_000)?;
        config.batch_size =
            parse_var(lookup, "PICLOUD_RELAY_BATCH", 500, "an integer from 1 to 5000", |v| {
                (1..=5000).contains(v)
            })?;
        config.max_in_flight = parse_var(
            lookup,
            "PICLOUD_RELAY_MAX_IN_FLIGHT",
            4000,
            "an integer from PICLOUD_RELAY_BATCH to 1000000",
            |v| (config.batch_size as usize..=1_000_000).contains(v),
        )?;
        config.app_share = Some(parse_var(
            lookup,
            "PICLOUD_RELAY_APP_SHARE",
            config.max_in_flight / 2,
            "an integer from 1 to PICLOUD_RELAY_MAX_IN_FLIGHT",
            |v| (1..=config.max_in_flight).contains(v),
        )?);
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        move |k| map.get(k).cloned()
    }

    const SECRET: (&str, &str) = ("PICLOUD_TOKEN_SECRET", "0123456789abcdef");

    #[test]
    fn the_token_secret_is_required() {
        let err = NodeConfig::from_env(env(&[]), "n").unwrap_err();
        assert_eq!(err.variable, "PICLOUD_TOKEN_SECRET");
        assert!(err.to_string().contains("at least 16 bytes"));
    }

    #[test]
    fn defaults_follow_the_design_and_the_lease_is_timeout_plus_margin() {
        let c = NodeConfig::from_env(env(&[SECRET]), "host-1").unwrap();
        assert_eq!(c.node_id, "host-1");
        assert_eq!(c.handler_timeout, Duration::from_secs(30));
        assert_eq!(c.lease(), Duration::from_secs(40));
        assert_eq!(c.max_working, Duration::from_secs(3600));
        assert_eq!(c.subjects.prefix(), "picloud");
        assert_eq!(c.triggers, TriggerConfig::default());
    }

    #[test]
    fn bad_tuning_values_name_their_variable() {
        for (var, value) in [
            ("PICLOUD_HANDLER_TIMEOUT_MS", "0"),
            ("PICLOUD_RELAY_BATCH", "x"),
            ("PICLOUD_RELAY_MAX_IN_FLIGHT", "1"),
            ("PICLOUD_RELAY_APP_SHARE", "0"),
            ("PICLOUD_RELAY_APP_SHARE", "4001"),
            ("PICLOUD_SUBJECT_PREFIX", "a.*"),
            ("PICLOUD_MAX_TRIGGER_DEPTH", "0"),
            ("PICLOUD_MAX_WORKING_MS", "3600001"),
        ] {
            let pairs = [SECRET, (var, value)];
            let lookup = env(&pairs);
            let err = NodeConfig::from_env(&lookup, "n")
                .and_then(|node| RelayConfig::from_env(&lookup, node))
                .unwrap_err();
            assert_eq!(err.variable, var);
        }
    }

    #[test]
    fn one_app_may_hold_half_the_relay_slots_unless_told_otherwise() {
        let node = || NodeConfig::from_env(env(&[SECRET]), "n").unwrap();
        let half = RelayConfig::from_env(env(&[("PICLOUD_RELAY_MAX_IN_FLIGHT", "1000")]), node()).unwrap();
        assert_eq!(half.app_share(), 500);
        let told = RelayConfig::from_env(
            env(&[("PICLOUD_RELAY_MAX_IN_FLIGHT", "1000"), ("PICLOUD_RELAY_APP_SHARE", "1000")]),
            node(),
        )
        .unwrap();
        assert_eq!(told.app_share(), 1000);
        let built = RelayConfig { max_in_flight: 10, ..RelayConfig::new(node()) };
        assert_eq!(built.app_share(), 5, "a config built in code shares half of its own slots");
    }
}
