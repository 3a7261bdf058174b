//! Publishing to topics, enqueueing jobs and queueing emails.

use std::time::Duration;

use picloud_core::flow::check_ordering_key;
use picloud_core::protocol::ORDERING_KEY_HEADER;
use picloud_core::{Capability, QueueName, TopicName};
use picloud_store::Store;
use picloud_store::events::{self, Enqueued, Job};
use serde_json::value::RawValue;

use super::Ops;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::parse_json;
use crate::views::{EnqueueJob, IdView, Published, SendEmail};

/// The longest delay a job may ask for: a year.
const MAX_DELAY_MS: u64 = 365 * 86_400 * 1000;

/// Whether `address` looks like one mailbox: a local part, `@`, a domain, no spaces or controls.
fn is_address(address: &str) -> bool {
    let Some((local, domain)) = address.rsplit_once('@') else { return false };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && address.len() <= 254
        && !address.chars().any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>' || c == ',')
}

impl<S: Store> Ops<S> {
    /// Publishes a message on `topic`, with the ordering key of its `Picloud-Ordering-Key`
    /// header if it has one: every matching pubsub trigger gets a delivery.
    pub async fn publish(
        &self,
        caller: &Caller,
        topic: String,
        message: &RawValue,
        ordering_key: Option<&str>,
    ) -> Result<Published, ApiError> {
        let app = caller.require_app(Capability::AppPublish)?;
        let topic = TopicName::parse(topic).map_err(|e| ApiError::invalid("topic", e))?;
        if let Some(key) = ordering_key {
            check_ordering_key(key).map_err(|e| ApiError::invalid(ORDERING_KEY_HEADER, e))?;
        }
        let cx = self.event_context(app, caller);
        let mut tx = self.store.begin().await?;
        let (id, fired) = events::publish(&self.store, &mut tx, &cx, &topic, message, ordering_key).await?;
        events::commit_and_wake_for(&self.store, tx, &fired).await?;
        Ok(Published { id, deliveries: fired.deliveries })
    }

    /// Enqueues a job on `queue`: whether it is new (else an earlier job holds its idempotency
    /// key), and the job's id.
    pub async fn enqueue(
        &self,
        caller: &Caller,
        queue: String,
        job: &EnqueueJob,
    ) -> Result<(bool, IdView), ApiError> {
        let app = caller.require_app(Capability::AppEnqueue)?;
        let queue = QueueName::parse(queue).map_err(|e| ApiError::invalid("queue", e))?;
        let delay = job.delay_ms.unwrap_or(0);
        if delay > MAX_DELAY_MS {
            return Err(ApiError::invalid("delay_ms", format!("expected at most {MAX_DELAY_MS} (a year)")));
        }
        if job.idempotency_key.as_ref().is_some_and(|k| k.is_empty() || k.len() > 200) {
            return Err(ApiError::invalid("idempotency_key", "expected 1 to 200 bytes"));
        }
        if let Some(key) = &job.ordering_key {
            check_ordering_key(key).map_err(|e| ApiError::invalid("ordering_key", e))?;
        }
        let cx = self.event_context(app, caller);
        let spec = Job {
            payload: &job.payload,
            delay: Duration::from_millis(delay),
            idempotency_key: job.idempotency_key.as_deref(),
            ordering_key: job.ordering_key.as_deref(),
        };
        let mut tx = self.store.begin().await?;
        let enqueued = events::enqueue(&self.store, &mut tx, &cx, &queue, spec).await?;
        events::commit_and_wake(&self.store, tx).await?;
        Ok(match enqueued {
            Enqueued::Created(id) | Enqueued::TooDeep(id) => (true, IdView { id }),
            Enqueued::Existing(id) => (false, IdView { id }),
        })
    }

    /// Queues an email for the built-in executor (sent over SMTP, retried like any delivery):
    /// its delivery id.
    pub async fn send_email(&self, caller: &Caller, email: &SendEmail) -> Result<IdView, ApiError> {
        let app = caller.require_app(Capability::AppSendEmail)?;
        let recipients: Vec<&str> = match &email.to {
            serde_json::Value::String(one) => vec![one.as_str()],
            serde_json::Value::Array(many) => many.iter().map(|v| v.as_str().unwrap_or("")).collect(),
            _ => return Err(ApiError::invalid("to", "expected an address or a list of addresses")),
        };
        if recipients.is_empty() || recipients.len() > 50 {
            return Err(ApiError::invalid("to", "expected 1 to 50 addresses"));
        }
        if let Some((i, bad)) = recipients.iter().enumerate().find(|(_, a)| !is_address(a)) {
            return Err(ApiError::invalid(&format!("to[{i}]"), format!("{bad:?} is not an email address")));
        }
        if email.subject.chars().count() > 998 || email.subject.contains(['\r', '\n']) {
            return Err(ApiError::invalid("subject", "expected one line of at most 998 characters"));
        }
        let payload: Box<RawValue> = parse_json(&serde_json::to_vec(email).map_err(ApiError::internal)?)?;
        let cx = self.event_context(app, caller);
        let mut tx = self.store.begin().await?;
        let id = events::send_email(&self.store, &mut tx, &cx, &payload).await?;
        events::commit_and_wake(&self.store, tx).await?;
        Ok(IdView { id })
    }
}

#[cfg(test)]
mod tests {
    use super::is_address;

    #[test]
    fn addresses_need_a_local_part_and_a_dotted_domain_without_spaces() {
        for ok in ["a@b.co", "first.last+tag@mail.example.org"] {
            assert!(is_address(ok), "{ok}");
        }
        for bad in ["", "a", "a@b", "@b.co", "a@.co", "a@b.", "a b@c.de", "a@b.co\r\nBcc: x@y.z", "<a@b.co>"]
        {
            assert!(!is_address(bad), "{bad:?}");
        }
    }
}
