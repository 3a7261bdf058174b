//! NATS ingest (DESIGN §6): requests on `picloud.v1.ingest.<app>.{kv.put, kv.delete,
//! pubsub.<topic>, queue.<queue>}` with `Authorization: Bearer <token>`, served by a queue group
//! across router nodes (served by `picloud_worker::serve_queues`, the loop handlers run on). Each
//! goes through the same authorization and write functions as the HTTP API, and is answered only
//! after its transaction committed.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_nats::{HeaderMap, Message};
use bytes::Bytes;
use picloud_core::protocol::{AUTHORIZATION_HEADER, IngestOp, ORDERING_KEY_HEADER, STATUS_HEADER};
use picloud_worker::{Queue, Serving, Shutdown, serve_queues};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::ApiState;
use crate::auth::authenticate;
use crate::error::{ApiError, ErrorCode};
use crate::extract::parse_json;
use crate::views::EnqueueJob;

/// Requests served at once by one node.
const CONCURRENCY: usize = 256;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KvPut {
    collection: String,
    key: String,
    value: serde_json::Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KvDelete {
    collection: String,
    key: String,
}

/// Why the ingest could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    /// Subscribing, or the server's confirmation of the subscription, failed.
    #[error("starting the ingest's queue consumer failed: {0}")]
    Queue(#[from] picloud_worker::Error),
}

/// A started ingest consumer.
#[derive(Debug)]
pub struct Ingest {
    serving: Serving,
}

impl Ingest {
    /// Subscribes (confirmed by the server before returning) and serves until `shutdown`.
    pub async fn start(state: ApiState, shutdown: Shutdown) -> Result<Ingest, IngestError> {
        let subjects = &state.config.node.subjects;
        let queue = Queue::new(subjects.ingest_wildcard(), subjects.ingest_queue_group(), {
            let (state, refusals) = (state.clone(), Arc::new(Refusals::default()));
            move |msg| {
                let (state, refusals) = (state.clone(), refusals.clone());
                async move { answer(&state, msg, &refusals).await }
            }
        });
        let serving = serve_queues(&state.nats, vec![queue], CONCURRENCY, shutdown).await?;
        Ok(Ingest { serving })
    }

    /// Waits until the ingest has stopped after its shutdown signal: no new requests taken, those
    /// in hand answered and the answers flushed.
    pub async fn finished(self) {
        self.serving.finished().await;
    }
}

/// Whether `reply` is in the inbox namespace of the app the request names
/// ([`picloud_core::protocol::in_app_inbox`]).
fn reply_allowed(state: &ApiState, subject: &str, reply: &str) -> bool {
    state
        .config
        .node
        .subjects
        .parse_ingest(subject)
        .is_some_and(|(app, _)| picloud_core::protocol::in_app_inbox(app, reply))
}

/// How often a node logs the ingest requests it drops for their reply subject.
const REFUSALS_LOGGED_EVERY: Duration = Duration::from_secs(10);

/// Logs dropped ingest requests at most once per [`REFUSALS_LOGGED_EVERY`], with the count of
/// those it did not log: a tenant sending them in a loop must not flood the node's log (DESIGN §6).
#[derive(Debug, Default)]
struct Refusals {
    /// When the next one may be logged, and how many were dropped unlogged since the last.
    state: Mutex<(Option<Instant>, u64)>,
}

impl Refusals {
    /// One more refusal at `now`: `Some(unlogged)` when it is to be logged, with how many went
    /// unlogged before it.
    fn count(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (next, unlogged) = &mut *state;
        if next.is_some_and(|next| now < next) {
            *unlogged += 1;
            return None;
        }
        *next = Some(now + REFUSALS_LOGGED_EVERY);
        Some(std::mem::take(unlogged))
    }
}

async fn answer(state: &ApiState, msg: Message, refusals: &Refusals) {
    let Some(reply) = msg.reply.clone() else { return };
    if !reply_allowed(state, &msg.subject, &reply) {
        if let Some(unlogged) = refusals.count(Instant::now()) {
            tracing::warn!(
                subject = %msg.subject,
                reply = %reply,
                unlogged,
                "ignored an ingest request whose reply subject is outside its app's inbox prefix _INBOX_<app> \
                 (at most one is logged every 10 s; `unlogged` counts the others)"
            );
        }
        return;
    }
    let mut headers = HeaderMap::new();
    let body = match handle(state, &msg).await {
        Ok(body) => {
            headers.insert(STATUS_HEADER, "ok");
            body
        }
        Err(e) => {
            headers.insert(STATUS_HEADER, "error");
            serde_json::to_vec(&e.body()).map(Bytes::from).unwrap_or_default()
        }
    };
    if let Err(e) = state.nats.publish_with_headers(reply, headers, body).await {
        tracing::warn!(error = %e, "could not answer an ingest request");
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Bytes {
    serde_json::to_vec(value).map(Bytes::from).unwrap_or_default()
}

async fn handle(state: &ApiState, msg: &Message) -> Result<Bytes, ApiError> {
    let (app, op) = state.config.node.subjects.parse_ingest(&msg.subject).ok_or_else(|| {
        ApiError::new(ErrorCode::UnknownSubject, format!("{} is not an ingest subject", msg.subject))
    })?;
    if msg.payload.len() > state.config.max_payload_bytes {
        return Err(ApiError::new(ErrorCode::PayloadTooLarge, "the body exceeds PICLOUD_MAX_PAYLOAD_BYTES"));
    }
    let credentials = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(AUTHORIZATION_HEADER))
        .and_then(|v| v.as_str().strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| {
            ApiError::new(ErrorCode::MissingToken, "an Authorization: Bearer <token> header is required")
        })?;
    let caller = authenticate(state, credentials, Some(app)).await?;
    match op {
        IngestOp::KvPut => {
            let put: KvPut = parse_json(&msg.payload)?;
            let version = state
                .ops
                .kv_put(&caller, &put.collection, &put.key, &put.value, None, None)
                .await?
                .unguarded()?;
            Ok(to_json(&version))
        }
        IngestOp::KvDelete => {
            let delete: KvDelete = parse_json(&msg.payload)?;
            let version = state.ops.kv_delete(&caller, delete.collection, delete.key, None).await?;
            Ok(to_json(&version))
        }
        IngestOp::Pubsub(topic) => {
            let message: Box<RawValue> = parse_json(&msg.payload)?;
            let ordering_key =
                msg.headers.as_ref().and_then(|h| h.get(ORDERING_KEY_HEADER)).map(|v| v.as_str());
            Ok(to_json(&state.ops.publish(&caller, topic, &message, ordering_key).await?))
        }
        IngestOp::Queue(queue) => {
            let job: EnqueueJob = parse_json(&msg.payload)?;
            Ok(to_json(&state.ops.enqueue(&caller, queue, &job).await?.1))
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use proptest::prelude::*;
    use serde::de::DeserializeOwned;
    use serde_json::{Value, json};

    use super::*;

    /// The fields of the ingest bodies.
    const FIELDS: [&str; 6] = ["collection", "key", "value", "payload", "delay_ms", "idempotency_key"];

    /// Any JSON value a few levels deep, its objects keyed mostly by the bodies' own field names.
    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            any::<String>().prop_map(Value::from),
        ];
        let field = prop_oneof![
            4 => prop::sample::select(FIELDS.to_vec()).prop_map(str::to_owned),
            1 => any::<String>(),
        ];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(field.clone(), inner, 0..6)
                    .prop_map(|fields| Value::Object(fields.into_iter().collect())),
            ]
        })
    }

    /// Parses `bytes` as body `T`: whether it parsed, failing unless a refusal is a 400.
    fn ok_or_400<T: DeserializeOwned>(bytes: &[u8]) -> Result<bool, TestCaseError> {
        match parse_json::<T>(bytes) {
            Ok(_) => Ok(true),
            Err(e) => {
                prop_assert_eq!((e.status(), e.code()), (StatusCode::BAD_REQUEST, "invalid_json"));
                prop_assert!(!e.message().is_empty());
                Ok(false)
            }
        }
    }

    /// Every ingest body read from `bytes`: each gives Ok or a 400.
    fn every_body(bytes: &[u8]) -> Result<[bool; 4], TestCaseError> {
        Ok([
            ok_or_400::<KvPut>(bytes)?,
            ok_or_400::<KvDelete>(bytes)?,
            ok_or_400::<Box<RawValue>>(bytes)?,
            ok_or_400::<EnqueueJob>(bytes)?,
        ])
    }

    proptest! {
        #[test]
        fn any_bytes_read_as_each_ingest_body_are_accepted_or_refused_with_a_400(
            bytes in prop::collection::vec(any::<u8>(), 0..512),
        ) {
            every_body(&bytes)?;
        }

        #[test]
        fn any_json_read_as_each_ingest_body_is_accepted_or_refused_with_a_400_and_any_value_is_a_message(
            value in json(),
        ) {
            let [_, _, message, _] = every_body(&serde_json::to_vec(&value).unwrap())?;
            prop_assert!(message, "every JSON value is a pubsub message");
        }

        #[test]
        fn bodies_of_the_right_shape_are_accepted_whatever_their_strings_and_values(
            collection in any::<String>(),
            key in any::<String>(),
            value in json(),
            delay_ms in any::<Option<u64>>(),
        ) {
            let put = json!({"collection": collection, "key": key, "value": value});
            let delete = json!({"collection": collection, "key": key});
            let job = json!({"payload": value, "delay_ms": delay_ms, "idempotency_key": key});
            prop_assert!(ok_or_400::<KvPut>(put.to_string().as_bytes())?);
            prop_assert!(ok_or_400::<KvDelete>(delete.to_string().as_bytes())?);
            prop_assert!(ok_or_400::<EnqueueJob>(job.to_string().as_bytes())?);
        }
    }

    #[test]
    fn a_body_nested_deeper_than_the_parser_goes_is_a_400_not_a_stack_overflow() {
        for body in ["[".repeat(100_000), "{\"value\":".repeat(100_000)] {
            let outcome = every_body(body.as_bytes()).unwrap();
            assert_eq!(outcome, [false; 4]);
        }
    }

    #[test]
    fn refused_requests_are_logged_once_per_interval_with_the_count_of_the_others() {
        let refusals = Refusals::default();
        let start = Instant::now();
        assert_eq!(refusals.count(start), Some(0));
        assert_eq!(refusals.count(start + Duration::from_secs(1)), None);
        assert_eq!(refusals.count(start + Duration::from_secs(9)), None);
        assert_eq!(refusals.count(start + REFUSALS_LOGGED_EVERY), Some(2));
        assert_eq!(refusals.count(start + REFUSALS_LOGGED_EVERY), None);
    }
}
