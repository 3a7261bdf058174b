//! The webhook executor: POSTs a delivery's envelope, without its delivery token, to the
//! trigger's URL with the Standard Webhooks headers, and turns the HTTP answer into `ok`,
//! `retry` or `fail` (DESIGN §11). It connects only to addresses webhooks may reach: a literal
//! host is judged before the request, a name by the addresses it resolves to, so the address
//! judged is the one dialled. Its error texts never carry the URL's path, query or userinfo.

use std::error::Error as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use picloud_core::TriggerId;
use picloud_core::net::{AllowNets, Refusal, TARGET_REFUSED, literal_address};
use picloud_core::protocol::Envelope;
use picloud_core::webhook::{ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, WebhookKey};
use picloud_store::{Handler, Store};
use uuid::Uuid;

use super::{Execute, ExecutorError, Outcome, time_left};

/// The largest response body passed back as the answer's body (a larger one answers `{}`).
const MAX_REPLY_BODY: usize = 512 * 1024;
/// How much of an error response's body goes into the error text.
const ERROR_BODY_SNIPPET: usize = 200;
/// The `User-Agent` of webhook requests.
const USER_AGENT: &str = concat!("picloud-router/", env!("CARGO_PKG_VERSION"), " (webhook)");

/// POSTs deliveries to webhooks.
#[derive(Debug)]
pub(crate) struct WebhookExecutor<S> {
    store: S,
    http: reqwest::Client,
    timeout_cap: Duration,
    /// The networks webhooks may reach although they are not public.
    allow: AllowNets,
}

/// What an HTTP status means for the delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ok,
    Retry,
    Fail,
}

/// 2xx → ok; 408, 429 and 5xx → retry; anything else (other 4xx, redirects, which are not
/// followed) → fail.
fn verdict(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Ok,
        408 | 429 | 500..=599 => Verdict::Retry,
        _ => Verdict::Fail,
    }
}

/// A `Retry-After` value: delay-seconds or an HTTP-date (a date in the past means now).
fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Anything beyond a day is capped by the trigger's maximum backoff anyway.
        return Some(Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX).min(86_400)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Resolves webhook hosts with the system resolver and keeps only the addresses webhooks may
/// reach. reqwest asks it for every connection to a name, so a name that resolves to a refused
/// address — from the start, or only later (DNS rebinding) — gets no connection.
#[derive(Debug)]
struct PublicResolver {
    allow: AllowNets,
}

/// Every address a webhook's host resolved to is refused.
#[derive(Debug, thiserror::Error)]
#[error("{TARGET_REFUSED}: host {host}: {refusal}")]
struct HostRefused {
    host: String,
    /// Why the first address was refused.
    refusal: Refusal,
}

impl reqwest::dns::Resolve for PublicResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let mut refused = None;
            let kept: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|addr| match allow.check(addr.ip()) {
                    Ok(()) => true,
                    Err(refusal) => {
                        refused.get_or_insert(refusal);
                        false
                    }
                })
                .collect();
            match refused {
                Some(refusal) if kept.is_empty() => Err(Box::new(HostRefused { host, refusal }) as _),
                _ => Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

/// The refusal of the resolver somewhere in a request error's sources.
fn host_refused(e: &reqwest::Error) -> Option<&HostRefused> {
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(refused) = s.downcast_ref::<HostRefused>() {
            return Some(refused);
        }
        source = s.source();
    }
    None
}

/// An error and its sources, on one line.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let line = s.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = s.source();
    }
    text
}

impl<S: Store> WebhookExecutor<S> {
    /// An executor with its own HTTP client: no redirects followed, no proxy (the address
    /// dialled is the webhook's own), names resolved by [`PublicResolver`].
    pub(crate) fn new(store: S, timeout_cap: Duration, allow: AllowNets) -> Result<Self, ExecutorError> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(PublicResolver { allow: allow.clone() }))
            .user_agent(USER_AGENT)
            .build()
            .map_err(|e| ExecutorError::Http(e.without_url().to_string()))?;
        Ok(Self { store, http, timeout_cap, allow })
    }

    /// The trigger's URL and signing key, or the answer to give when there are none.
    async fn target(&self, trigger_id: TriggerId, app: &str) -> Result<(String, WebhookKey), Outcome> {
        let targets = self
            .store
            .delivery_targets(&[trigger_id])
            .await
            .map_err(|e| Outcome::retry(format!("reading the webhook's trigger failed: {e}")))?;
        // The trigger was deleted or changed since the relay claimed the row: retrying at once
        // hands the row back to the relay, which drops it or routes it to the new handler.
        let reroute = |why: &str| Outcome::Retry { after: Some(Duration::ZERO), error: why.to_owned() };
        let Some(target) = targets.targets.into_iter().find(|t| t.trigger.id == trigger_id) else {
            return Err(reroute("the trigger no longer exists"));
        };
        if target.app_slug.as_str() != app {
            return Err(Outcome::Fail(format!(
                "trigger {trigger_id} belongs to app {}, not to the delivery's app {app}",
                target.app_slug
            )));
        }
        let Handler::Webhook { url, secret } = target.trigger.handler else {
            return Err(reroute("the trigger's handler is no longer a webhook"));
        };
        let key = WebhookKey::from_secret(&secret)
            .map_err(|e| Outcome::Fail(format!("the trigger's webhook secret cannot be used: {e}")))?;
        Ok((url, key))
    }

    /// POSTs `body` and reads the answer. A host that is a refused address fails here: reqwest
    /// dials a literal address without asking the resolver.
    async fn post(&self, url: &str, id: Uuid, key: &WebhookKey, body: Vec<u8>, budget: Duration) -> Outcome {
        let url = match reqwest::Url::parse(url) {
            Ok(url) => url,
            Err(e) => return Outcome::Fail(format!("the webhook URL is invalid: {e}")),
        };
        if let Some(refusal) =
            url.host_str().and_then(literal_address).and_then(|ip| self.allow.check(ip).err())
        {
            return Outcome::Fail(format!("{TARGET_REFUSED}: {refusal}"));
        }
        let id = id.to_string();
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        let signature = key.sign(&id, timestamp, &body);
        let sent = self
            .http
            .post(url)
            .timeout(budget)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(ID_HEADER, &id)
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, signature)
            .body(body)
            .send()
            .await;
        let mut response = match sent {
            Ok(response) => response,
            Err(e) => return unanswered(&e.without_url(), budget),
        };
        let status = response.status();
        match verdict(status.as_u16()) {
            Verdict::Ok => {
                let body = read_capped(&mut response, MAX_REPLY_BODY).await;
                let is_json = body
                    .as_ref()
                    .is_some_and(|b| serde_json::from_slice::<&serde_json::value::RawValue>(b).is_ok());
                Outcome::Ok(match body {
                    Some(body) if is_json => body,
                    _ => Bytes::from_static(b"{}"),
                })
            }
            Verdict::Retry => {
                let after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| retry_after(v, SystemTime::now()));
                let error = format!("the webhook answered {status}{}", snippet(&mut response).await);
                Outcome::Retry { after, error }
            }
            Verdict::Fail => {
                let redirect = if status.is_redirection() { " (redirects are not followed)" } else { "" };
                Outcome::Fail(format!(
                    "the webhook answered {status}{redirect}{}",
                    snippet(&mut response).await
                ))
            }
        }
    }
}

/// The answer to a request that got no response. `e` is without its URL, so neither its text
/// nor its sources' carry the webhook's path, query or userinfo.
fn unanswered(e: &reqwest::Error, budget: Duration) -> Outcome {
    if let Some(refused) = host_refused(e) {
        Outcome::Fail(refused.to_string())
    } else if e.is_timeout() {
        Outcome::retry(format!("the webhook did not answer within {} ms", budget.as_millis()))
    } else if e.is_builder() {
        Outcome::Fail(format!("invalid webhook request: {}", describe(e)))
    } else if e.is_connect() {
        Outcome::retry(format!("connecting to the webhook failed: {}", describe(e)))
    } else {
        Outcome::retry(format!("the webhook request failed: {}", describe(e)))
    }
}

/// The response body if it is at most `cap` bytes and arrives whole.
async fn read_capped(response: &mut reqwest::Response, cap: usize) -> Option<Bytes> {
    if response.content_length().is_some_and(|n| n > cap as u64) {
        return None;
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.ok()? {
        if body.len() + chunk.len() > cap {
            return None;
        }
        body.extend_from_slice(&chunk);
    }
    Some(body.into())
}

/// `: <the start of the body>` of an error response, or nothing.
async fn snippet(response: &mut reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < ERROR_BODY_SNIPPET {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(ERROR_BODY_SNIPPET)]);
    let text = picloud_core::protocol::error_text(&text);
    if text.is_empty() { String::new() } else { format!(": {text}") }
}

impl<S: Store> Execute for WebhookExecutor<S> {
    const NAME: &'static str = "webhook";

    async fn execute(&self, mut delivery: Envelope) -> Outcome {
        let Some(trigger_id) = delivery.picloudtriggerid.map(TriggerId::from_uuid) else {
            return Outcome::Fail("a webhook delivery names its trigger (picloudtriggerid)".into());
        };
        let (url, key) = match self.target(trigger_id, &delivery.picloudapp).await {
            Ok(target) => target,
            Err(outcome) => return outcome,
        };
        // The delivery token is a bearer secret: it does not leave the platform.
        delivery.picloudtoken = None;
        let body = match serde_json::to_vec(&delivery) {
            Ok(body) => body,
            Err(e) => return Outcome::Fail(format!("the envelope does not serialize: {e}")),
        };
        let Some(budget) = time_left(delivery.piclouddeadline, self.timeout_cap) else {
            return Outcome::retry("the delivery's deadline passed before the webhook was called");
        };
        self.post(&url, delivery.id, &key, body, budget).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_ok_retry_or_fail() {
        for (status, expected) in [
            (200, Verdict::Ok),
            (202, Verdict::Ok),
            (204, Verdict::Ok),
            (408, Verdict::Retry),
            (429, Verdict::Retry),
            (500, Verdict::Retry),
            (503, Verdict::Retry),
            (599, Verdict::Retry),
            (400, Verdict::Fail),
            (401, Verdict::Fail),
            (404, Verdict::Fail),
            (410, Verdict::Fail),
            (301, Verdict::Fail),
            (307, Verdict::Fail),
        ] {
            assert_eq!(verdict(status), expected, "{status}");
        }
    }

    #[tokio::test]
    async fn the_resolver_keeps_allowed_addresses_and_names_the_host_when_none_is_left() {
        use reqwest::dns::Resolve as _;
        let resolve = |allow: &str| {
            let resolver = PublicResolver { allow: allow.parse().unwrap() };
            resolver.resolve("localhost".parse().unwrap())
        };
        let error = resolve("").await.err().expect("localhost is refused");
        let refused = error.downcast_ref::<HostRefused>().expect("a HostRefused");
        assert!(
            refused
                .to_string()
                .starts_with("webhook_target_refused: host localhost: 127.0.0.1 is a loopback"),
            "{refused}"
        );
        let kept: Vec<SocketAddr> = resolve("127.0.0.0/8").await.unwrap().collect();
        assert!(kept.iter().any(|a| a.ip() == std::net::Ipv4Addr::LOCALHOST), "{kept:?}");
    }

    #[test]
    fn retry_after_takes_seconds_or_an_http_date() {
        let now = UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(retry_after(" 0 ", now), Some(Duration::ZERO));
        // 1445412480 is Wed, 21 Oct 2015 07:28:00 GMT.
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(retry_after("99999999999999999999999", now), Some(Duration::from_secs(86_400)));
        assert_eq!(retry_after("-5", now), None);
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(retry_after("", now), None);
    }
}
