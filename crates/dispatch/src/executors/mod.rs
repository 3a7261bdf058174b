//! The built-in executors of DESIGN §11, run on every router node: queue-group consumers of
//! `picloud.v1.builtin.webhook` (POST the envelope to the trigger's URL, signed the Standard
//! Webhooks way) and `picloud.v1.builtin.email` (send the email over SMTP), answering each
//! delivery like any handler (DESIGN §6).
//!
//! Each executor is one queue of `picloud_worker::serve_queues`, the loop handlers run on too:
//! bounded concurrency, and on shutdown a drain that finishes the deliveries in hand.

mod email;
mod webhook;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::{Client, HeaderMap, Message};
use bytes::Bytes;
use picloud_core::config::ConfigError;
use picloud_core::net::{ALLOW_NETS_VAR, AllowNets};
use picloud_core::protocol::{ERROR_HEADER, Envelope, STATUS_HEADER, Subjects};
use picloud_store::Store;
use picloud_worker::{Queue, Reply, Serving, Shutdown, serve_queues};

use self::email::EmailExecutor;
use self::webhook::WebhookExecutor;
use crate::config::NodeConfig;

/// Where emails go: `PICLOUD_SMTP_URL` and `PICLOUD_SMTP_FROM`.
#[derive(Clone, PartialEq, Eq)]
pub struct SmtpConfig {
    /// `smtp://host[:port]`, `smtp://host[:port]?tls=required` (STARTTLS) or
    /// `smtps://host[:port]`; `user:password@` before the host to authenticate.
    pub url: String,
    /// The `From` address (`picloud@localhost` by default); may carry a display name.
    pub from: String,
}

impl std::fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpConfig").field("url", &redact_url(&self.url)).field("from", &self.from).finish()
    }
}

/// How the built-in executors run.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// The subjects they serve.
    pub subjects: Subjects,
    /// The SMTP server; without it the email executor does not subscribe.
    pub smtp: Option<SmtpConfig>,
    /// The longest a webhook request (or an SMTP transaction) may take, even when the
    /// delivery's deadline is further away.
    pub webhook_timeout_cap: Duration,
    /// Deliveries each executor works on at once.
    pub concurrency: usize,
    /// `PICLOUD_WEBHOOK_ALLOW_NETS`: the networks webhooks may reach although they are not
    /// public (none by default).
    pub webhook_allow_nets: AllowNets,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            subjects: Subjects::default(),
            smtp: None,
            webhook_timeout_cap: Duration::from_secs(30),
            concurrency: 64,
            webhook_allow_nets: AllowNets::default(),
        }
    }
}

/// The `From` address when `PICLOUD_SMTP_FROM` is unset.
pub const DEFAULT_SMTP_FROM: &str = "picloud@localhost";

impl ExecutorConfig {
    /// Parses `PICLOUD_SMTP_URL` (unset: no email executor), `PICLOUD_SMTP_FROM` and
    /// `PICLOUD_WEBHOOK_ALLOW_NETS`, serving `node`'s subjects; a bad value is an error naming its
    /// variable.
    pub fn from_env(lookup: impl Fn(&str) -> Option<String>, node: &NodeConfig) -> Result<Self, ConfigError> {
        let lookup: &dyn Fn(&str) -> Option<String> = &lookup;
        let get = |k: &str| lookup(k).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        let subjects = node.subjects.clone();
        let smtp = match get("PICLOUD_SMTP_URL") {
            None => None,
            Some(url) => {
                email::check_url(&url).map_err(|e| ConfigError {
                    variable: "PICLOUD_SMTP_URL".into(),
                    value: redact_url(&url),
                    accepts: format!(
                        "smtp://host[:port], smtp://host[:port]?tls=required or smtps://host[:port], \
                         optionally with user:password@ before the host ({e})"
                    ),
                })?;
                let from = get("PICLOUD_SMTP_FROM").unwrap_or_else(|| DEFAULT_SMTP_FROM.into());
                email::check_from(&from).map_err(|e| ConfigError {
                    variable: "PICLOUD_SMTP_FROM".into(),
                    value: from.clone(),
                    accepts: format!("an email address, optionally as \"Name <address>\" ({e})"),
                })?;
                Some(SmtpConfig { url, from })
            }
        };
        let webhook_allow_nets = match get(ALLOW_NETS_VAR) {
            None => AllowNets::default(),
            Some(list) => list.parse().map_err(|e| ConfigError {
                variable: ALLOW_NETS_VAR.into(),
                value: list.clone(),
                accepts: format!(
                    "comma-separated networks in CIDR notation or addresses, such as \
                     10.0.0.0/8,fd00::/8,192.0.2.7 ({e})"
                ),
            })?,
        };
        Ok(Self { subjects, smtp, webhook_allow_nets, ..Self::default() })
    }
}

/// `scheme://user:password@host…` with the credentials hidden.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://<hidden>{}", &rest[at..]),
        None => url.to_owned(),
    }
}

/// Why the executors could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecutorError {
    /// Subscribing, or the server's confirmation of the subscriptions, failed.
    #[error("starting the executors' queue consumers failed: {0}")]
    Queue(#[from] picloud_worker::Error),
    /// The SMTP transport could not be set up from the configuration.
    #[error("setting up the SMTP transport failed: {0}")]
    Smtp(String),
    /// The HTTP client of the webhook executor could not be built.
    #[error("building the webhook HTTP client failed: {0}")]
    Http(String),
}

/// Runs the executors until `shutdown`, then drains their subscriptions, finishes the deliveries
/// in hand and returns.
pub async fn run_executors<S: Store>(
    store: S,
    nats: Client,
    config: ExecutorConfig,
    shutdown: Shutdown,
) -> Result<(), ExecutorError> {
    start(store, nats, config, shutdown).await?.finished().await;
    Ok(())
}

/// Subscribes the executors and starts serving until `shutdown`; returns once the server has
/// confirmed the subscriptions. Wait for them to stop with [`Running::finished`].
pub async fn start<S: Store>(
    store: S,
    nats: Client,
    config: ExecutorConfig,
    shutdown: Shutdown,
) -> Result<Running, ExecutorError> {
    let concurrency = config.concurrency.max(1);
    let webhook = WebhookExecutor::new(store, config.webhook_timeout_cap, config.webhook_allow_nets.clone())?;
    let email = match &config.smtp {
        Some(smtp) => Some(EmailExecutor::new(smtp, config.webhook_timeout_cap)?),
        None => {
            tracing::warn!(
                "PICLOUD_SMTP_URL is unset: the email executor is not running, emails wait and retry"
            );
            None
        }
    };
    let mut queues = vec![queue(&nats, config.subjects.builtin_webhook(), webhook)];
    if let Some(email) = email {
        queues.push(queue(&nats, config.subjects.builtin_email(), email));
    }
    let serving = serve_queues(&nats, queues, concurrency, shutdown).await?;
    tracing::info!(
        email = config.smtp.is_some(),
        concurrency,
        webhook_allow_nets = %config.webhook_allow_nets,
        "built-in executors started"
    );
    Ok(Running { serving })
}

/// The queue of one executor: its subject is also its queue group, so every node's executor of a
/// kind shares the deliveries.
fn queue<E: Execute>(client: &Client, subject: String, executor: E) -> Queue {
    let (client, executor) = (client.clone(), Arc::new(executor));
    Queue::new(subject.clone(), subject, move |msg| {
        let (client, executor) = (client.clone(), executor.clone());
        async move { answer(&client, msg, &*executor).await }
    })
}

/// Started executors.
#[derive(Debug)]
pub struct Running {
    serving: Serving,
}

impl Running {
    /// Waits until the executors have stopped after their shutdown signal: nothing new taken,
    /// the deliveries in hand finished and their answers flushed.
    pub async fn finished(self) {
        self.serving.finished().await;
        tracing::info!("built-in executors stopped");
    }
}

/// An executor's answer to one delivery: a handler's [`Reply`], which it is on the wire.
pub(crate) type Outcome = Reply;

/// The headers and JSON body of an executor's answer (DESIGN §6): a handler's, except that a
/// `retry` or `fail` carries its error in the body too, as `{"error": …}`.
fn answer_message(outcome: Outcome) -> (HeaderMap, Bytes) {
    let done = matches!(outcome, Reply::Ok(_));
    let (headers, body) = outcome.into_message();
    if done {
        return (headers, body);
    }
    let error = headers.get(ERROR_HEADER).map(|v| v.as_str()).unwrap_or_default();
    let body = serde_json::to_vec(&serde_json::json!({ "error": error })).unwrap_or_default().into();
    (headers, body)
}

/// The time an executor may spend on a delivery: until its deadline (unix ms) less a margin for
/// the answer's way back, and at most `cap`. `None` when that is already over.
pub(crate) fn time_left(deadline_ms: i64, cap: Duration) -> Option<Duration> {
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    let left = Duration::from_millis(u64::try_from(deadline_ms - now_ms).ok()?);
    let margin = (left / 10).min(Duration::from_millis(250));
    Some(left.saturating_sub(margin).min(cap)).filter(|d| !d.is_zero())
}

/// What a built-in executor does with one delivery.
pub(crate) trait Execute: Send + Sync + 'static {
    /// The executor's name in logs.
    const NAME: &'static str;
    /// Carries out one delivery.
    fn execute(&self, delivery: Envelope) -> impl Future<Output = Outcome> + Send;
}

async fn answer<E: Execute>(client: &Client, msg: Message, executor: &E) {
    let Some(reply_to) = msg.reply.clone() else {
        tracing::warn!(executor = E::NAME, subject = %msg.subject, "a delivery without a reply subject is ignored");
        return;
    };
    let outcome = match serde_json::from_slice::<Envelope>(&msg.payload) {
        Ok(delivery) => {
            let (id, attempt) = (delivery.id, delivery.picloudattempt);
            let app = delivery.picloudapp.clone();
            let outcome = executor.execute(delivery).await;
            match &outcome {
                Outcome::Ok(_) => {
                    tracing::debug!(executor = E::NAME, delivery_id = %id, attempt, %app, "done");
                }
                Outcome::Retry { error, after } => {
                    tracing::info!(
                        executor = E::NAME, delivery_id = %id, attempt, %app, ?after, %error, "answering retry"
                    );
                }
                Outcome::Fail(error) => {
                    tracing::info!(
                        executor = E::NAME, delivery_id = %id, attempt, %app, %error, "answering fail"
                    );
                }
            }
            outcome
        }
        Err(e) => {
            tracing::warn!(executor = E::NAME, subject = %msg.subject, error = %e, "malformed delivery");
            Outcome::Fail(format!("malformed delivery: {e}"))
        }
    };
    let (headers, body) = answer_message(outcome);
    let status = headers.get(STATUS_HEADER).map(|v| v.as_str().to_owned()).unwrap_or_default();
    if let Err(e) = client.publish_with_headers(reply_to, headers, body).await {
        tracing::warn!(executor = E::NAME, status, error = %e, "could not send an answer");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use picloud_core::protocol::RETRY_AFTER_HEADER;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        move |k| map.get(k).cloned()
    }

    fn node() -> NodeConfig {
        NodeConfig::new("n", b"0123456789abcdef")
    }

    #[test]
    fn without_an_smtp_url_there_is_no_email_executor() {
        let c = ExecutorConfig::from_env(env(&[]), &node()).unwrap();
        assert_eq!(c.smtp, None);
        assert_eq!(c.subjects.builtin_webhook(), "picloud.v1.builtin.webhook");
        assert_eq!(c.concurrency, 64);
        assert_eq!(c.webhook_allow_nets, AllowNets::default());
    }

    #[test]
    fn the_webhook_allow_list_is_read_and_a_bad_entry_names_the_variable() {
        let c = ExecutorConfig::from_env(env(&[("PICLOUD_WEBHOOK_ALLOW_NETS", "127.0.0.0/8, ::1")]), &node())
            .unwrap();
        assert_eq!(c.webhook_allow_nets.to_string(), "127.0.0.0/8,::1/128");
        let err =
            ExecutorConfig::from_env(env(&[("PICLOUD_WEBHOOK_ALLOW_NETS", "10.0.0.0/8,intranet")]), &node())
                .unwrap_err();
        assert_eq!(err.variable, "PICLOUD_WEBHOOK_ALLOW_NETS");
        assert!(err.accepts.contains("\"intranet\""), "{err}");
    }

    #[test]
    fn the_smtp_url_and_from_address_are_read_with_a_default_sender() {
        let c =
            ExecutorConfig::from_env(env(&[("PICLOUD_SMTP_URL", "smtp://127.0.0.1:2525")]), &node()).unwrap();
        assert_eq!(
            c.smtp,
            Some(SmtpConfig { url: "smtp://127.0.0.1:2525".into(), from: "picloud@localhost".into() })
        );
        let c = ExecutorConfig::from_env(
            env(&[
                ("PICLOUD_SMTP_URL", "smtps://mailer:pw@mail.example.com"),
                ("PICLOUD_SMTP_FROM", "Shop <shop@example.com>"),
            ]),
            &NodeConfig { subjects: Subjects::new("acme").unwrap(), ..node() },
        )
        .unwrap();
        assert_eq!(c.smtp.as_ref().unwrap().from, "Shop <shop@example.com>");
        assert_eq!(c.subjects.builtin_email(), "acme.v1.builtin.email", "the node's subjects");
        assert!(!format!("{:?}", c.smtp).contains("pw"), "the password stays out of debug output");
    }

    #[test]
    fn bad_values_name_their_variable_and_hide_passwords() {
        for (var, value) in [
            ("PICLOUD_SMTP_URL", "http://mail.example.com"),
            ("PICLOUD_SMTP_URL", "not a url"),
            ("PICLOUD_SMTP_URL", "smtp://u:secret@host?tls=sometimes"),
            ("PICLOUD_SMTP_FROM", "nobody"),
        ] {
            let mut pairs = vec![(var, value)];
            if var != "PICLOUD_SMTP_URL" {
                pairs.push(("PICLOUD_SMTP_URL", "smtp://127.0.0.1:2525"));
            }
            let err = ExecutorConfig::from_env(env(&pairs), &node()).unwrap_err();
            assert_eq!(err.variable, var, "{value}");
            assert!(!err.to_string().contains("secret"), "{err}");
        }
    }

    #[test]
    fn answers_carry_the_status_header_a_one_line_error_and_a_json_body() {
        let (headers, body) = answer_message(Outcome::Ok(Bytes::from_static(b"{\"a\":1}")));
        assert_eq!(headers.get(STATUS_HEADER).unwrap().as_str(), "ok");
        assert_eq!(&body[..], b"{\"a\":1}");

        let (headers, body) = answer_message(Outcome::Retry {
            after: Some(Duration::from_millis(1500)),
            error: "busy\r\nnow".into(),
        });
        assert_eq!(headers.get(STATUS_HEADER).unwrap().as_str(), "retry");
        assert_eq!(headers.get(ERROR_HEADER).unwrap().as_str(), "busy  now");
        assert_eq!(headers.get(RETRY_AFTER_HEADER).unwrap().as_str(), "1500");
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["error"], "busy  now");

        let (headers, _) = answer_message(Outcome::Fail("x".repeat(5000)));
        assert_eq!(headers.get(STATUS_HEADER).unwrap().as_str(), "fail");
        assert_eq!(
            headers.get(ERROR_HEADER).unwrap().as_str().len(),
            picloud_core::protocol::MAX_ERROR_BYTES
        );
        assert!(headers.get(RETRY_AFTER_HEADER).is_none());
    }

    #[test]
    fn the_time_left_ends_before_the_deadline_and_is_capped() {
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
        let cap = Duration::from_secs(30);
        let left = time_left(now_ms + 2000, cap).unwrap();
        assert!(left < Duration::from_millis(2000) && left > Duration::from_millis(1500), "{left:?}");
        assert_eq!(time_left(now_ms + 120_000, cap), Some(cap));
        assert_eq!(time_left(now_ms - 1, cap), None);
    }

    #[test]
    fn credentials_are_hidden_in_urls() {
        assert_eq!(redact_url("smtp://u:p@host:25/x?tls=required"), "smtp://<hidden>@host:25/x?tls=required");
        assert_eq!(redact_url("smtp://host:25"), "smtp://host:25");
    }
}
