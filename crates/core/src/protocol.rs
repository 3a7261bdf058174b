//! The NATS protocol of DESIGN §6 in one place: subjects and queue groups, the CloudEvents
//! envelope with its `picloud…` attributes, and the answer headers.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::OffsetDateTime;
use uuid::Uuid;

/// The default subject prefix.
pub const DEFAULT_PREFIX: &str = "picloud";

/// Header with a handler's answer: `ok`, `retry` or `fail` (ingest answers `ok` or `error`).
pub const STATUS_HEADER: &str = "Picloud-Status";
/// Header of a `working` reply: how far the handler got, 0–100 (DESIGN §14).
pub const PROGRESS_HEADER: &str = "Picloud-Progress";
/// The status of a reply that is not an answer yet: the handler is still at work (DESIGN §14).
pub const WORKING_STATUS: &str = "working";
/// Header with a handler's error text.
pub const ERROR_HEADER: &str = "Picloud-Error";
/// Header with the delay a handler asks for before the next attempt, in milliseconds.
pub const RETRY_AFTER_HEADER: &str = "Picloud-Retry-After-Ms";
/// A pubsub message's ordering key (HTTP and ingest; DESIGN §13).
pub const ORDERING_KEY_HEADER: &str = "Picloud-Ordering-Key";
/// The one header of a delivery.
pub const CONTENT_TYPE_HEADER: &str = "Content-Type";
/// The content type of a delivery: structured-mode CloudEvents.
pub const CLOUDEVENTS_CONTENT_TYPE: &str = "application/cloudevents+json";
/// The content type of a batch of deliveries (DESIGN §14): a JSON array of envelopes.
pub const CLOUDEVENTS_BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";
/// The header that carries the bearer token of an ingest request.
pub const AUTHORIZATION_HEADER: &str = "Authorization";

/// `PICLOUD_MAX_PAYLOAD_BYTES` unless set: the largest request body, in bytes.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// Room a write's event data may take besides the bodies it carries: a KV update carries its
/// value and the previous value, each at most `PICLOUD_MAX_PAYLOAD_BYTES`, in a frame of names
/// and a version.
pub const EVENT_DATA_FRAME_BYTES: usize = 8 * 1024;

/// Room an envelope takes around its event data: the CloudEvents attributes (names of at most 200
/// bytes, JSON-escaped), the delivery token, and a dead letter's frame (its error text is capped
/// at [`MAX_ERROR_BYTES`]).
pub const ENVELOPE_FRAME_BYTES: usize = 32 * 1024;

/// The longest error text kept from an answer (`Picloud-Error`), in bytes.
pub const MAX_ERROR_BYTES: usize = 1000;

/// An error text as it travels and is kept (`Picloud-Error`, dead letters' `last_error`): on one
/// line, without control characters, at most [`MAX_ERROR_BYTES`] bytes (cut with `...`).
pub fn error_text(s: &str) -> String {
    let mut line: String =
        s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect::<String>().trim().to_owned();
    if line.len() > MAX_ERROR_BYTES {
        let mut end = MAX_ERROR_BYTES - 3;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
        line.push_str("...");
    }
    line
}

/// The largest event data a write may produce when bodies are capped at `max_payload_bytes`
/// (DESIGN §10): a write whose data would be larger is refused with 413 and writes nothing.
pub fn max_event_data_bytes(max_payload_bytes: usize) -> usize {
    2 * max_payload_bytes + EVENT_DATA_FRAME_BYTES
}

/// The largest envelope a node whose bodies are capped at `max_payload_bytes` can publish: NATS'
/// `max_payload` must be at least this, or some accepted events could never be delivered.
pub fn largest_envelope_bytes(max_payload_bytes: usize) -> usize {
    max_event_data_bytes(max_payload_bytes) + ENVELOPE_FRAME_BYTES
}

/// What a trigger fires on (DESIGN §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum TriggerKind {
    Kv,
    Pubsub,
    Queue,
    Cron,
    DeadLetter,
    Http,
}

impl TriggerKind {
    /// Every trigger kind.
    pub const ALL: [TriggerKind; 6] = [
        TriggerKind::Kv,
        TriggerKind::Pubsub,
        TriggerKind::Queue,
        TriggerKind::Cron,
        TriggerKind::DeadLetter,
        TriggerKind::Http,
    ];

    /// The wire and storage name.
    pub fn as_str(self) -> &'static str {
        EventKind::from(self).as_str()
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<TriggerKind> {
        TriggerKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// One attempt's outcome as a live tail shows it (DESIGN §15). A relay publishes the outcomes of
/// a completion batch as one JSON array per app on [`Subjects::tail`]; the API streams each as an
/// event of its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TailOutcome {
    /// The delivery.
    pub delivery_id: Uuid,
    /// Its trigger's name (none for an email).
    pub trigger: Option<String>,
    /// Its event kind.
    pub kind: EventKind,
    /// The attempt that ended.
    pub attempt: u32,
    /// What it came to, as the attempt history names it (`ok`, `retry`, `fail`, `timeout`, …).
    pub outcome: String,
    /// How long it took from its publishing, in milliseconds, when it was sent.
    pub latency_ms: Option<f64>,
    /// Its error, if it failed.
    pub error: Option<String>,
    /// The node whose relay delivered it.
    pub node: String,
    /// When it ended.
    #[serde(with = "time::serde::rfc3339")]
    pub ended_at: OffsetDateTime,
}

/// What an outbox row delivers: a trigger kind's event, or an email for the built-in executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum EventKind {
    Kv,
    Pubsub,
    Queue,
    Cron,
    DeadLetter,
    Http,
    Email,
}

impl EventKind {
    /// Every event kind.
    pub const ALL: [EventKind; 7] = [
        EventKind::Kv,
        EventKind::Pubsub,
        EventKind::Queue,
        EventKind::Cron,
        EventKind::DeadLetter,
        EventKind::Http,
        EventKind::Email,
    ];

    /// The wire and storage name (`picloudkind`).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Kv => "kv",
            EventKind::Pubsub => "pubsub",
            EventKind::Queue => "queue",
            EventKind::Cron => "cron",
            EventKind::DeadLetter => "dead_letter",
            EventKind::Http => "http",
            EventKind::Email => "email",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl From<TriggerKind> for EventKind {
    fn from(kind: TriggerKind) -> Self {
        match kind {
            TriggerKind::Kv => EventKind::Kv,
            TriggerKind::Pubsub => EventKind::Pubsub,
            TriggerKind::Queue => EventKind::Queue,
            TriggerKind::Cron => EventKind::Cron,
            TriggerKind::DeadLetter => EventKind::DeadLetter,
            TriggerKind::Http => EventKind::Http,
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for TriggerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// CloudEvents `type` values.
pub mod event_type {
    /// A KV put.
    pub const KV_PUT: &str = "picloud.kv.put";
    /// A KV delete.
    pub const KV_DELETE: &str = "picloud.kv.delete";
    /// A pubsub message.
    pub const PUBSUB_MESSAGE: &str = "picloud.pubsub.message";
    /// A queued job.
    pub const QUEUE_JOB: &str = "picloud.queue.job";
    /// A cron tick.
    pub const CRON_TICK: &str = "picloud.cron.tick";
    /// A dead letter was created.
    pub const DEAD_LETTER_CREATED: &str = "picloud.dead_letter.created";
    /// A sync invocation.
    pub const HTTP_INVOKE: &str = "picloud.http.invoke";
    /// An email for the built-in executor.
    pub const EMAIL_SEND: &str = "picloud.email.send";
}

/// CloudEvents `source` values.
pub mod source {
    /// `/apps/<app>/kv/<collection>`
    pub fn kv(app: &str, collection: &str) -> String {
        format!("/apps/{app}/kv/{collection}")
    }
    /// `/apps/<app>/topics/<topic>`
    pub fn topic(app: &str, topic: &str) -> String {
        format!("/apps/{app}/topics/{topic}")
    }
    /// `/apps/<app>/queues/<queue>`
    pub fn queue(app: &str, queue: &str) -> String {
        format!("/apps/{app}/queues/{queue}")
    }
    /// `/apps/<app>/triggers/<trigger>` (cron ticks and sync invocations)
    pub fn trigger(app: &str, trigger: &str) -> String {
        format!("/apps/{app}/triggers/{trigger}")
    }
    /// `/apps/<app>/dead-letters`
    pub fn dead_letters(app: &str) -> String {
        format!("/apps/{app}/dead-letters")
    }
    /// `/apps/<app>/emails`
    pub fn emails(app: &str) -> String {
        format!("/apps/{app}/emails")
    }
}

/// A handler's answer (`Picloud-Status`, and the values of a batch's `results`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplyStatus {
    /// Done: the delivery is deleted (a sync caller gets the body).
    Ok,
    /// Try again later, with backoff or the given retry-after.
    Retry,
    /// A permanent error: dead-letter at once.
    Fail,
}

impl ReplyStatus {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplyStatus::Ok => "ok",
            ReplyStatus::Retry => "retry",
            ReplyStatus::Fail => "fail",
        }
    }

    /// Parses the header value (ASCII case-insensitive).
    pub fn parse(s: &str) -> Option<ReplyStatus> {
        [ReplyStatus::Ok, ReplyStatus::Retry, ReplyStatus::Fail]
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s.trim()))
    }
}

/// A handler's answer as its headers say it (DESIGN §6), written and read by the one set of rules
/// here: by the worker SDK and the built-in executors that answer, and by the relay that reads.
/// The body (an `ok`'s JSON, for a sync caller) travels beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerHead {
    /// `ok`.
    Ok,
    /// `retry`: after the delay asked for, else with the trigger's backoff.
    Retry {
        /// `Picloud-Retry-After-Ms`.
        after: Option<Duration>,
        /// `Picloud-Error`.
        error: Option<String>,
    },
    /// `fail`: a dead letter at once.
    Fail {
        /// `Picloud-Error`.
        error: Option<String>,
    },
}

/// Why a reply's headers are not an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAnAnswer {
    /// No `Picloud-Status` header.
    #[error("reply without a {STATUS_HEADER} header")]
    NoStatus,
    /// A `Picloud-Status` that is not `ok`, `retry` or `fail`.
    #[error("reply has {STATUS_HEADER}: {0:?}; expected ok, retry or fail")]
    UnknownStatus(String),
}

impl AnswerHead {
    /// Its status.
    pub fn status(&self) -> ReplyStatus {
        match self {
            AnswerHead::Ok => ReplyStatus::Ok,
            AnswerHead::Retry { .. } => ReplyStatus::Retry,
            AnswerHead::Fail { .. } => ReplyStatus::Fail,
        }
    }

    /// The error text, if the answer has one.
    pub fn error(&self) -> Option<&str> {
        match self {
            AnswerHead::Ok => None,
            AnswerHead::Retry { error, .. } | AnswerHead::Fail { error } => error.as_deref(),
        }
    }

    /// Hands `put` each header that says it: the status, the error as [`error_text`] keeps it
    /// (when there is one left), and the delay in whole milliseconds. An `ok` allocates nothing:
    /// it is every delivery's answer.
    pub fn write_headers(&self, mut put: impl FnMut(&'static str, &str)) {
        put(STATUS_HEADER, self.status().as_str());
        if let Some(error) = self.error().map(error_text).filter(|e| !e.is_empty()) {
            put(ERROR_HEADER, &error);
        }
        if let AnswerHead::Retry { after: Some(after), .. } = self {
            put(RETRY_AFTER_HEADER, &after.as_millis().to_string());
        }
    }

    /// Reads an answer from a reply's headers (`header` looks one up by name). The status is
    /// read without regard to case or surrounding space; the error is held to [`error_text`]
    /// (an empty one is none); a delay that is not a number of milliseconds is none.
    pub fn read(header: impl Fn(&str) -> Option<String>) -> Result<AnswerHead, NotAnAnswer> {
        let status = header(STATUS_HEADER).ok_or(NotAnAnswer::NoStatus)?;
        let error = || header(ERROR_HEADER).map(|e| error_text(&e)).filter(|e| !e.is_empty());
        match ReplyStatus::parse(&status) {
            Some(ReplyStatus::Ok) => Ok(AnswerHead::Ok),
            Some(ReplyStatus::Retry) => Ok(AnswerHead::Retry {
                after: header(RETRY_AFTER_HEADER)
                    .and_then(|v| v.trim().parse().ok())
                    .map(Duration::from_millis),
                error: error(),
            }),
            Some(ReplyStatus::Fail) => Ok(AnswerHead::Fail { error: error() }),
            None => Err(NotAnAnswer::UnknownStatus(status)),
        }
    }
}

/// The inbox a node's answers come back to (DESIGN §6): a delivery's reply subject is
/// `<inbox>.<app>.<seq>`. An app's NATS user may publish to `_INBOX.*.<app>.*` and nowhere else
/// under `_INBOX.>`, so it answers its own app's deliveries (and says `working` for them as often as
/// it likes) without a per-request response permission, and no other app's: the node takes an
/// answer only when the app in its subject is the delivery's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerInbox {
    inbox: String,
}

impl AnswerInbox {
    /// Answers under `inbox` (a NATS client's `new_inbox()`, `_INBOX.<unique>`).
    pub fn new(inbox: String) -> AnswerInbox {
        AnswerInbox { inbox }
    }

    /// The subscription that reads every answer: `<inbox>.*.*`.
    pub fn subscription(&self) -> String {
        format!("{}.*.*", self.inbox)
    }

    /// The reply subject of delivery `seq` to `app`.
    pub fn reply_to(&self, app: &str, seq: u64) -> String {
        format!("{}.{app}.{seq}", self.inbox)
    }

    /// The app and the sequence number of an answer's subject.
    pub fn parse(subject: &str) -> Option<(&str, u64)> {
        let (rest, seq) = subject.rsplit_once('.')?;
        let (_, app) = rest.rsplit_once('.')?;
        Some((app, seq.parse().ok()?))
    }
}

/// A handler's `working` reply (DESIGN §14): not an answer, but word that the attempt goes on,
/// with how far it got. Written by the worker SDK, read by the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Working {
    /// `Picloud-Progress`, 0–100; a value that is not a whole number in that range is none.
    pub progress: Option<u8>,
}

impl Working {
    /// Hands `put` the headers of the reply.
    pub fn write_headers(&self, mut put: impl FnMut(&'static str, &str)) {
        put(STATUS_HEADER, WORKING_STATUS);
        if let Some(progress) = self.progress {
            put(PROGRESS_HEADER, &progress.min(100).to_string());
        }
    }

    /// Reads a reply's headers (`header` looks one up by name): `Some` when its status is
    /// `working` (without regard to case or surrounding space).
    pub fn read(header: impl Fn(&str) -> Option<String>) -> Option<Working> {
        let status = header(STATUS_HEADER)?;
        if !status.trim().eq_ignore_ascii_case(WORKING_STATUS) {
            return None;
        }
        let progress =
            header(PROGRESS_HEADER).and_then(|p| p.trim().parse::<u8>().ok()).filter(|p| *p <= 100);
        Some(Working { progress })
    }
}

/// The body of a batch's answer that overrides its `Picloud-Status` per delivery (DESIGN §14):
/// `{"results": {"<delivery id>": "ok" | "retry" | "fail", …}}`; a delivery it does not name takes
/// the header's status. Written by the worker SDK, read by the relay.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResults {
    /// The status of each delivery named.
    pub results: std::collections::BTreeMap<Uuid, ReplyStatus>,
}

impl BatchResults {
    /// Reads a batch answer's body: `None` when it is not a JSON object with `results` (the
    /// header then speaks for every delivery), an error when its `results` cannot be read.
    pub fn read(body: &[u8]) -> Result<Option<BatchResults>, String> {
        #[derive(Deserialize)]
        struct Body<'a> {
            #[serde(borrow)]
            results: Option<&'a RawValue>,
        }
        let Ok(Body { results: Some(results) }) = serde_json::from_slice::<Body<'_>>(body) else {
            return Ok(None);
        };
        serde_json::from_str(results.get()).map(|results| Some(BatchResults { results })).map_err(|e| {
            format!("the batch's results are not a map of delivery ids to ok, retry or fail: {e}")
        })
    }
}

/// The body of a cancel notice (DESIGN §14) on [`Subjects::cancel`]: the delivery whose
/// attempt in flight is to stop. Written by the API node that cancelled it, read by the worker
/// SDK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelNotice {
    /// The delivery.
    pub id: Uuid,
}

/// Whether `reply` is in the inbox namespace of app `app` (`_INBOX_<app>.`, the prefix its
/// workers must use): the only reply subjects the router answers for an app (its ingest requests,
/// the token renewals of its working deliveries). The router's NATS user may publish on
/// `_INBOX.>`, where relays read every tenant's answers, and on `picloud.>`: answering any other
/// reply subject would let an app aim the router's message at another tenant's delivery.
pub fn in_app_inbox(app: &str, reply: &str) -> bool {
    reply
        .strip_prefix("_INBOX_")
        .and_then(|r| r.strip_prefix(app))
        .and_then(|r| r.strip_prefix('.'))
        .is_some_and(|rest| !rest.is_empty())
}

/// The relay's answer to a `working` reply that carried a reply subject of its own, once the
/// attempt's deadline moved (DESIGN §14): a delivery token for the new deadline, which the first
/// one (`picloudtoken`, valid until the first deadline) does not reach. Written by the relay,
/// read by the worker SDK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renewal {
    /// The delivery token, valid until `piclouddeadline`.
    pub picloudtoken: String,
    /// The attempt's deadline now, in Unix milliseconds.
    pub piclouddeadline: i64,
}

/// What an ingest request asks for, parsed from its subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngestOp {
    /// `…kv.put`
    KvPut,
    /// `…kv.delete`
    KvDelete,
    /// `…pubsub.<topic>` (the topic may hold dots)
    Pubsub(String),
    /// `…queue.<queue>` (the queue may hold dots)
    Queue(String),
}

/// The subjects and queue groups of one deployment, under its prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Default for Subjects {
    fn default() -> Self {
        Self { prefix: DEFAULT_PREFIX.to_owned() }
    }
}

impl Subjects {
    /// Subjects under `prefix`: one or more dot-separated tokens of `[A-Za-z0-9_-]`.
    pub fn new(prefix: &str) -> Result<Self, String> {
        let valid = prefix
            .split('.')
            .all(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
        if valid {
            Ok(Self { prefix: prefix.to_owned() })
        } else {
            Err(format!(
                "invalid subject prefix {prefix:?}: expected dot-separated tokens of A-Z, a-z, 0-9, '_' and '-'"
            ))
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>.v1.handle.<app>.<handler>`: where a function handler's deliveries go.
    pub fn handle(&self, app: &str, handler: &str) -> String {
        format!("{}.v1.handle.{app}.{handler}", self.prefix)
    }

    /// `<prefix>.<app>.<handler>`: the queue group a function handler's instances share.
    pub fn handle_queue_group(&self, app: &str, handler: &str) -> String {
        format!("{}.{app}.{handler}", self.prefix)
    }

    /// `<prefix>.v1.handle.<app>.>`: every delivery of one app (for tenant permissions).
    pub fn handle_app_wildcard(&self, app: &str) -> String {
        format!("{}.v1.handle.{app}.>", self.prefix)
    }

    /// `<prefix>.v1.cancel.<app>.<handler>`: where a handler's workers are told to stop a
    /// delivery in flight (DESIGN §14). Every worker of the handler subscribes: the one running
    /// the delivery stops it.
    pub fn cancel(&self, app: &str, handler: &str) -> String {
        format!("{}.v1.cancel.{app}.{handler}", self.prefix)
    }

    /// `<prefix>.internal.tail.<app>`: where relays publish the outcomes of an app's attempts
    /// for its live tails (DESIGN §15). Only the router's own NATS user may read it: tenants'
    /// users are allowed their own subjects, none under `internal`.
    pub fn tail(&self, app: &str) -> String {
        format!("{}.internal.tail.{app}", self.prefix)
    }

    /// `<prefix>.v1.builtin.webhook`, also its queue group.
    pub fn builtin_webhook(&self) -> String {
        format!("{}.v1.builtin.webhook", self.prefix)
    }

    /// `<prefix>.v1.builtin.email`, also its queue group.
    pub fn builtin_email(&self) -> String {
        format!("{}.v1.builtin.email", self.prefix)
    }

    /// `<prefix>.v1.ingest.<app>.kv.put`
    pub fn ingest_kv_put(&self, app: &str) -> String {
        format!("{}.v1.ingest.{app}.kv.put", self.prefix)
    }

    /// `<prefix>.v1.ingest.<app>.kv.delete`
    pub fn ingest_kv_delete(&self, app: &str) -> String {
        format!("{}.v1.ingest.{app}.kv.delete", self.prefix)
    }

    /// `<prefix>.v1.ingest.<app>.pubsub.<topic>`
    pub fn ingest_pubsub(&self, app: &str, topic: &str) -> String {
        format!("{}.v1.ingest.{app}.pubsub.{topic}", self.prefix)
    }

    /// `<prefix>.v1.ingest.<app>.queue.<queue>`
    pub fn ingest_queue(&self, app: &str, queue: &str) -> String {
        format!("{}.v1.ingest.{app}.queue.{queue}", self.prefix)
    }

    /// `<prefix>.v1.ingest.>`: what the router's ingest consumers subscribe to.
    pub fn ingest_wildcard(&self) -> String {
        format!("{}.v1.ingest.>", self.prefix)
    }

    /// `<prefix>.v1.ingest.<app>.>`: one app's ingest (for tenant permissions).
    pub fn ingest_app_wildcard(&self, app: &str) -> String {
        format!("{}.v1.ingest.{app}.>", self.prefix)
    }

    /// `<prefix>.v1.ingest`: the queue group of the router's ingest consumers.
    pub fn ingest_queue_group(&self) -> String {
        format!("{}.v1.ingest", self.prefix)
    }

    /// Splits an ingest subject into the app slug (unchecked) and the operation.
    pub fn parse_ingest<'s>(&self, subject: &'s str) -> Option<(&'s str, IngestOp)> {
        let rest = subject.strip_prefix(self.prefix.as_str())?.strip_prefix(".v1.ingest.")?;
        let (app, op) = rest.split_once('.')?;
        let op = match op {
            "kv.put" => IngestOp::KvPut,
            "kv.delete" => IngestOp::KvDelete,
            _ => {
                if let Some(topic) = op.strip_prefix("pubsub.") {
                    IngestOp::Pubsub(topic.to_owned())
                } else if let Some(queue) = op.strip_prefix("queue.") {
                    IngestOp::Queue(queue.to_owned())
                } else {
                    return None;
                }
            }
        };
        Some((app, op))
    }
}

/// Formats a time as RFC 3339 UTC with milliseconds (`2026-11-28T10:00:00.123Z`).
pub fn rfc3339_millis(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// A delivery as it goes out: the CloudEvents envelope, borrowing its parts (serialize only).
#[derive(Debug, Serialize)]
pub struct EnvelopeRef<'a> {
    /// Always `1.0`.
    pub specversion: &'static str,
    /// The delivery id, stable across attempts.
    pub id: Uuid,
    /// `picloud.<kind>.<action>`.
    #[serde(rename = "type")]
    pub event_type: &'a str,
    /// Where the event happened.
    pub source: &'a str,
    /// The KV key, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<&'a str>,
    /// When the event happened (RFC 3339).
    pub time: &'a str,
    /// Always `application/json`.
    pub datacontenttype: &'static str,
    /// The event data, verbatim.
    pub data: &'a RawValue,
    /// 1, 2, …
    pub picloudattempt: u32,
    /// The app slug.
    pub picloudapp: &'a str,
    /// The event kind.
    pub picloudkind: &'a str,
    /// The trigger's name (absent for email).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub picloudtrigger: Option<&'a str>,
    /// The trigger's id (absent for email).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub picloudtriggerid: Option<Uuid>,
    /// The event's depth.
    pub piclouddepth: u32,
    /// The registering principal (absent for email).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub picloudprincipal: Option<Uuid>,
    /// The event's ordering key (DESIGN §13; absent when it has none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub picloudorderingkey: Option<&'a str>,
    /// The delivery token (absent for email, and stripped before a webhook POST).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub picloudtoken: Option<&'a str>,
    /// Unix milliseconds by which the answer must arrive.
    pub piclouddeadline: i64,
}

/// A delivery as a handler receives it: the CloudEvents envelope, owned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    /// Always `1.0`.
    pub specversion: String,
    /// The delivery id, stable across attempts: the idempotency key.
    pub id: Uuid,
    /// `picloud.<kind>.<action>`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Where the event happened.
    pub source: String,
    /// The KV key, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// When the event happened (RFC 3339).
    pub time: String,
    /// `application/json`.
    pub datacontenttype: String,
    /// The event data.
    pub data: Box<RawValue>,
    /// 1, 2, …
    pub picloudattempt: u32,
    /// The app slug.
    pub picloudapp: String,
    /// The event kind.
    pub picloudkind: String,
    /// The trigger's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub picloudtrigger: Option<String>,
    /// The trigger's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub picloudtriggerid: Option<Uuid>,
    /// The event's depth.
    pub piclouddepth: u32,
    /// The registering principal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub picloudprincipal: Option<Uuid>,
    /// The event's ordering key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub picloudorderingkey: Option<String>,
    /// The delivery token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub picloudtoken: Option<String>,
    /// Unix milliseconds by which the answer must arrive.
    pub piclouddeadline: i64,
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// An answer with any error text and delay.
    fn any_answer_head() -> impl Strategy<Value = AnswerHead> {
        let error = prop::option::of(prop_oneof![any::<String>(), "[ -~]{0,40}", "\\PC{1000,1100}"]);
        prop_oneof![
            Just(AnswerHead::Ok),
            (prop::option::of(any::<u64>()), error.clone())
                .prop_map(|(ms, error)| AnswerHead::Retry { after: ms.map(Duration::from_millis), error }),
            error.prop_map(|error| AnswerHead::Fail { error }),
        ]
    }

    /// The answer as a reader sees it: its error held to the protocol's rules.
    fn as_read(head: &AnswerHead) -> AnswerHead {
        let kept = |e: &Option<String>| e.as_deref().map(error_text).filter(|e| !e.is_empty());
        match head {
            AnswerHead::Ok => AnswerHead::Ok,
            AnswerHead::Retry { after, error } => AnswerHead::Retry { after: *after, error: kept(error) },
            AnswerHead::Fail { error } => AnswerHead::Fail { error: kept(error) },
        }
    }

    proptest! {
        #[test]
        fn an_answer_reads_back_as_written_and_its_headers_are_single_lines(head in any_answer_head()) {
            let mut headers: Vec<(&str, String)> = Vec::new();
            head.write_headers(|name, value| headers.push((name, value.to_owned())));
            for (name, value) in &headers {
                prop_assert!(!value.contains(char::is_control), "{} holds a control character", name);
                prop_assert!(value.len() <= MAX_ERROR_BYTES, "{} is {} bytes", name, value.len());
            }
            let read = AnswerHead::read(|name| {
                headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone())
            });
            prop_assert_eq!(read, Ok(as_read(&head)));
        }

        #[test]
        fn any_headers_are_read_without_panicking(
            status in prop::option::of(prop_oneof![Just("ok".to_owned()), Just(" RETRY ".to_owned()), any::<String>()]),
            error in prop::option::of(any::<String>()),
            after in prop::option::of(prop_oneof![any::<u64>().prop_map(|n| n.to_string()), any::<String>()]),
        ) {
            let read = AnswerHead::read(|name| match name {
                STATUS_HEADER => status.clone(),
                ERROR_HEADER => error.clone(),
                RETRY_AFTER_HEADER => after.clone(),
                _ => None,
            });
            match (&status, read) {
                (None, read) => prop_assert_eq!(read, Err(NotAnAnswer::NoStatus)),
                (Some(s), Ok(head)) => prop_assert_eq!(Some(head.status()), ReplyStatus::parse(s)),
                (Some(s), Err(e)) => prop_assert_eq!(e, NotAnAnswer::UnknownStatus(s.clone())),
            }
        }
    }

    #[test]
    fn an_answer_reads_its_status_in_any_case_and_its_delay_in_milliseconds() {
        let headers =
            [(STATUS_HEADER, " Retry "), (RETRY_AFTER_HEADER, " 250 "), (ERROR_HEADER, "busy\r\nX: y")];
        let read =
            AnswerHead::read(|name| headers.iter().find(|(n, _)| *n == name).map(|(_, v)| (*v).to_owned()));
        assert_eq!(
            read,
            Ok(AnswerHead::Retry {
                after: Some(Duration::from_millis(250)),
                error: Some("busy  X: y".into())
            })
        );
        let mut headers = Vec::new();
        AnswerHead::Fail { error: Some("   ".into()) }
            .write_headers(|name, value| headers.push((name, value.to_owned())));
        assert_eq!(
            headers,
            [(STATUS_HEADER, "fail".to_owned())],
            "an error that is empty once kept to one line is not sent"
        );
    }

    #[test]
    fn an_answer_subject_names_the_app_and_the_delivery_under_the_inbox() {
        let inbox = AnswerInbox::new("_INBOX.abc".into());
        assert_eq!(inbox.subscription(), "_INBOX.abc.*.*");
        let reply = inbox.reply_to("shop", 42);
        assert_eq!(reply, "_INBOX.abc.shop.42");
        assert_eq!(AnswerInbox::parse(&reply), Some(("shop", 42)));
        assert_eq!(AnswerInbox::parse("_INBOX.abc.shop.x"), None);
        assert_eq!(AnswerInbox::parse("42"), None);
    }

    #[test]
    fn a_working_reply_reads_back_with_its_progress_and_is_no_answer() {
        let read = |headers: &[(&str, String)]| {
            Working::read(|name| headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone()))
        };
        for progress in [None, Some(0), Some(42), Some(100)] {
            let mut headers = Vec::new();
            Working { progress }.write_headers(|name, value| headers.push((name, value.to_owned())));
            assert_eq!(read(&headers), Some(Working { progress }));
            let answer =
                AnswerHead::read(|name| headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone()));
            assert_eq!(answer, Err(NotAnAnswer::UnknownStatus("working".into())), "working is not an answer");
        }
        let status = (STATUS_HEADER, " WORKING ".to_owned());
        for junk in ["101", "-1", "half", "4.5", ""] {
            let headers = [status.clone(), (PROGRESS_HEADER, junk.to_owned())];
            assert_eq!(read(&headers), Some(Working { progress: None }), "progress {junk:?}");
        }
        assert_eq!(read(&[(STATUS_HEADER, "ok".to_owned())]), None);
        assert_eq!(read(&[]), None);
    }

    #[test]
    fn subjects_and_queue_groups_follow_the_design() {
        let s = Subjects::default();
        assert_eq!(s.handle("shop", "process-order"), "picloud.v1.handle.shop.process-order");
        assert_eq!(s.cancel("shop", "process-order"), "picloud.v1.cancel.shop.process-order");
        assert_eq!(s.handle_queue_group("shop", "process-order"), "picloud.shop.process-order");
        assert_eq!(s.builtin_webhook(), "picloud.v1.builtin.webhook");
        assert_eq!(s.builtin_email(), "picloud.v1.builtin.email");
        assert_eq!(s.ingest_kv_put("shop"), "picloud.v1.ingest.shop.kv.put");
        assert_eq!(s.ingest_kv_delete("shop"), "picloud.v1.ingest.shop.kv.delete");
        assert_eq!(s.ingest_pubsub("shop", "news"), "picloud.v1.ingest.shop.pubsub.news");
        assert_eq!(s.ingest_queue("shop", "mail"), "picloud.v1.ingest.shop.queue.mail");
        assert_eq!(Subjects::new("acme.prod").unwrap().handle("a", "h"), "acme.prod.v1.handle.a.h");
    }

    #[test]
    fn only_the_apps_own_inbox_namespace_is_its_inbox() {
        assert!(in_app_inbox("shop", "_INBOX_shop.abc.renew.1"));
        for other in [
            "_INBOX_shop",
            "_INBOX_shop.",
            "_INBOX_shopping.x",
            "_INBOX_demo.x",
            "_INBOX.n.shop.1",
            "picloud.v1.handle.shop.h",
        ] {
            assert!(!in_app_inbox("shop", other), "{other}");
        }
    }

    #[test]
    fn a_prefix_with_wildcards_or_empty_tokens_is_refused() {
        for bad in ["", "a..b", "a.*", ">", "a b", ".a"] {
            assert!(Subjects::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ingest_subjects_parse_into_app_and_operation() {
        let s = Subjects::default();
        assert_eq!(s.parse_ingest("picloud.v1.ingest.shop.kv.put"), Some(("shop", IngestOp::KvPut)));
        assert_eq!(s.parse_ingest("picloud.v1.ingest.shop.kv.delete"), Some(("shop", IngestOp::KvDelete)));
        assert_eq!(
            s.parse_ingest("picloud.v1.ingest.shop.pubsub.news.eu"),
            Some(("shop", IngestOp::Pubsub("news.eu".into())))
        );
        assert_eq!(
            s.parse_ingest("picloud.v1.ingest.shop.queue.mail"),
            Some(("shop", IngestOp::Queue("mail".into())))
        );
        assert_eq!(s.parse_ingest("picloud.v1.ingest.shop.kv.get"), None);
        assert_eq!(s.parse_ingest("other.v1.ingest.shop.kv.put"), None);
    }

    #[test]
    fn kinds_round_trip_their_names() {
        for kind in EventKind::ALL {
            assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
        }
        for kind in TriggerKind::ALL {
            assert_eq!(TriggerKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(TriggerKind::parse("email"), None);
    }

    #[test]
    fn reply_statuses_parse_case_insensitively() {
        assert_eq!(ReplyStatus::parse("ok"), Some(ReplyStatus::Ok));
        assert_eq!(ReplyStatus::parse("RETRY"), Some(ReplyStatus::Retry));
        assert_eq!(ReplyStatus::parse(" fail "), Some(ReplyStatus::Fail));
        assert_eq!(ReplyStatus::parse("maybe"), None);
    }

    #[test]
    fn an_envelope_carries_every_attribute_and_reads_back() {
        let data = RawValue::from_string(r#"{"key":"o-1","op":"put"}"#.into()).unwrap();
        let id = Uuid::now_v7();
        let time =
            rfc3339_millis(OffsetDateTime::from_unix_timestamp_nanos(1_764_324_000_123_000_000).unwrap());
        assert_eq!(time, "2025-11-28T10:00:00.123Z");
        let out = EnvelopeRef {
            specversion: "1.0",
            id,
            event_type: event_type::KV_PUT,
            source: "/apps/shop/kv/orders:eu",
            subject: Some("o-1"),
            time: &time,
            datacontenttype: "application/json",
            data: &data,
            picloudattempt: 2,
            picloudapp: "shop",
            picloudkind: "kv",
            picloudtrigger: Some("on-order"),
            picloudtriggerid: Some(id),
            piclouddepth: 1,
            picloudprincipal: Some(id),
            picloudorderingkey: Some("orders:eu/o-1"),
            picloudtoken: Some("pdt_x"),
            piclouddeadline: 42,
        };
        let json: serde_json::Value = serde_json::to_value(&out).unwrap();
        for attr in [
            "specversion",
            "id",
            "type",
            "source",
            "subject",
            "time",
            "datacontenttype",
            "data",
            "picloudattempt",
            "picloudapp",
            "picloudkind",
            "picloudtrigger",
            "picloudtriggerid",
            "piclouddepth",
            "picloudprincipal",
            "picloudorderingkey",
            "picloudtoken",
            "piclouddeadline",
        ] {
            assert!(json.get(attr).is_some(), "missing {attr}");
        }
        let back: Envelope = serde_json::from_value(json).unwrap();
        assert_eq!(back.id, id);
        assert_eq!(back.data.get(), data.get());
        assert_eq!(back.picloudattempt, 2);
        assert_eq!(back.picloudorderingkey.as_deref(), Some("orders:eu/o-1"));
    }

    proptest! {
        #[test]
        fn every_handle_subject_has_exactly_five_tokens_for_valid_names(
            app in "[a-z][a-z0-9-]{0,20}", handler in "[a-z0-9][a-z0-9_-]{0,20}"
        ) {
            let subject = Subjects::default().handle(&app, &handler);
            prop_assert_eq!(subject.split('.').count(), 5);
            prop_assert!(!subject.contains(['*', '>', ' ']));
        }
    }
}
