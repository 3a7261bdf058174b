//! A handler's answer to one delivery, read from its NATS reply (or the lack of one).

use std::time::Duration;

use async_nats::{Message, StatusCode};
use bytes::Bytes;
use picloud_core::AttemptOutcome;
use picloud_core::protocol::{AnswerHead, BatchResults, NotAnAnswer, ReplyStatus, Working, error_text};
use picloud_store::HandlerStatus;
use uuid::Uuid;

/// What became of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The handler answered `ok`, with its body.
    Ok(Bytes),
    /// The handler answered `retry`, optionally asking for a delay.
    Retry {
        /// The delay the handler asked for.
        after: Option<Duration>,
        /// Its error text, if any.
        error: Option<String>,
    },
    /// The handler answered `fail`: a permanent error.
    Fail(Option<String>),
    /// The reply could not be understood.
    Invalid(String),
    /// No answer before the deadline.
    Timeout,
    /// Nobody subscribed to the subject (NATS "no responders").
    NoResponders,
    /// The delivery could not be published.
    Failed(String),
    /// The attempt was cut short by the platform, not by the delivery: the store could not be
    /// read, or the NATS connection its answer would have come back on was lost. Tried again
    /// soon, without spending an attempt.
    Interrupted(String),
    /// The registering principal no longer holds the capability the trigger needs.
    Unauthorized(String),
    /// The row's trigger or app no longer exists.
    Orphaned,
    /// A sync call's row found with its lease run out: the node that took the call did not
    /// complete it (it died, or could not reach Postgres after the handler answered). Its caller
    /// is gone with that node or has its answer already, so the handler is not called again.
    LeaseExpired,
}

/// A reply's header `name`.
fn header(msg: &Message, name: &str) -> Option<String> {
    msg.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_owned())
}

/// A `working` reply (DESIGN §14): no answer yet, but word that the attempt goes on.
pub fn working(msg: &Message) -> Option<Working> {
    Working::read(|name| header(msg, name))
}

impl Answer {
    /// What the attempt came to, as metrics label it and the attempt history names it.
    pub fn outcome(&self) -> &'static str {
        match self {
            Answer::Ok(_) => "ok",
            Answer::Retry { .. } => "retry",
            Answer::Fail(_) => "fail",
            Answer::Invalid(_) => "invalid",
            Answer::Timeout => "timeout",
            Answer::NoResponders => "no_responders",
            Answer::Failed(_) => "error",
            Answer::Interrupted(_) => "interrupted",
            Answer::Unauthorized(_) => "unauthorized",
            Answer::Orphaned => "orphaned",
            Answer::LeaseExpired => "lease_expired",
        }
    }

    /// What the statistics count the attempt as (DESIGN §15); none for what was not an attempt
    /// of the handler (the platform cut it short, or never sent it).
    pub fn counted(&self) -> Option<AttemptOutcome> {
        match self {
            Answer::Ok(_) => Some(AttemptOutcome::Ok),
            Answer::Retry { .. } => Some(AttemptOutcome::Retry),
            Answer::Fail(_) | Answer::Invalid(_) | Answer::Failed(_) => Some(AttemptOutcome::Fail),
            Answer::Timeout => Some(AttemptOutcome::Timeout),
            Answer::NoResponders => Some(AttemptOutcome::NoHandler),
            Answer::Interrupted(_) | Answer::Unauthorized(_) | Answer::Orphaned | Answer::LeaseExpired => {
                None
            }
        }
    }

    /// The handler's own status, if the handler answered.
    fn reply_status(&self) -> Option<ReplyStatus> {
        match self {
            Answer::Ok(_) => Some(ReplyStatus::Ok),
            Answer::Retry { .. } => Some(ReplyStatus::Retry),
            Answer::Fail(_) => Some(ReplyStatus::Fail),
            _ => None,
        }
    }

    /// Reads a reply message.
    pub fn from_message(msg: &Message) -> Answer {
        if msg.status == Some(StatusCode::NO_RESPONDERS) {
            return Answer::NoResponders;
        }
        match AnswerHead::read(|name| header(msg, name)) {
            Ok(AnswerHead::Ok) => Answer::Ok(msg.payload.clone()),
            Ok(AnswerHead::Retry { after, error }) => Answer::Retry { after, error },
            Ok(AnswerHead::Fail { error }) => Answer::Fail(error),
            Err(why) => match (why, msg.status) {
                (NotAnAnswer::NoStatus, Some(status)) => {
                    Answer::Invalid(format!("NATS status {status} instead of a reply"))
                }
                (why, _) => Answer::Invalid(why.to_string()),
            },
        }
    }

    /// The status a sync caller (or the abandoned log) sees.
    pub fn handler_status(&self) -> HandlerStatus {
        match self {
            Answer::Ok(_) => HandlerStatus::Ok,
            Answer::Retry { .. } => HandlerStatus::Retry,
            Answer::Fail(_) => HandlerStatus::Fail,
            Answer::Timeout => HandlerStatus::Timeout,
            Answer::NoResponders => HandlerStatus::NoHandler,
            Answer::Invalid(_)
            | Answer::Failed(_)
            | Answer::Interrupted(_)
            | Answer::Unauthorized(_)
            | Answer::Orphaned => HandlerStatus::Error,
            Answer::LeaseExpired => HandlerStatus::Unknown,
        }
    }

    /// The error to record, for every answer but `ok`: on one line, within the protocol's cap
    /// ([`error_text`]), whoever wrote it.
    pub fn error(&self, handler_timeout: Duration) -> Option<String> {
        self.untrimmed_error(handler_timeout).map(|e| error_text(&e))
    }

    fn untrimmed_error(&self, handler_timeout: Duration) -> Option<String> {
        match self {
            Answer::Ok(_) => None,
            Answer::Retry { error, .. } => {
                Some(error.clone().unwrap_or_else(|| "handler asked to retry".into()))
            }
            Answer::Fail(error) => {
                Some(error.clone().unwrap_or_else(|| "handler failed the delivery".into()))
            }
            Answer::Invalid(e) | Answer::Failed(e) | Answer::Interrupted(e) | Answer::Unauthorized(e) => {
                Some(e.clone())
            }
            Answer::Timeout => Some(format!(
                "no answer within {} ms of the attempt's start or of its last `working`",
                handler_timeout.as_millis()
            )),
            Answer::NoResponders => Some("no handler is subscribed (no responders)".into()),
            Answer::Orphaned => Some("the trigger or app no longer exists".into()),
            Answer::LeaseExpired => Some(
                "the node that took this sync call did not complete it before its lease ran out; \
                 the handler is not called again"
                    .into(),
            ),
        }
    }
}

/// A batch's answer (DESIGN §14): what its reply says of every delivery, and the `results`
/// that override it per delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchAnswer {
    /// The answer of every delivery the results do not name.
    pub all: Answer,
    /// The deliveries the results name.
    pub results: BatchResults,
}

impl BatchAnswer {
    /// Reads the reply to a request: a batch's (`batched`), or a single delivery's, which has no
    /// `results` (its body goes to a sync caller).
    pub fn read(msg: &Message, batched: bool) -> BatchAnswer {
        if batched {
            BatchAnswer::from_message(msg)
        } else {
            BatchAnswer { all: Answer::from_message(msg), results: BatchResults::default() }
        }
    }

    /// Reads a batch's reply: its status header, and its body's `results` if it has them. A body
    /// that is not an object with `results` leaves the header to speak for every delivery; one
    /// whose `results` cannot be read makes the whole answer invalid (tried again, like any reply
    /// the relay cannot understand).
    fn from_message(msg: &Message) -> BatchAnswer {
        let all = Answer::from_message(msg);
        if all.reply_status().is_none() {
            return BatchAnswer { all, results: BatchResults::default() };
        }
        match BatchResults::read(&msg.payload) {
            Ok(results) => BatchAnswer { all, results: results.unwrap_or_default() },
            Err(why) => BatchAnswer { all: Answer::Invalid(why), results: BatchResults::default() },
        }
    }

    /// The answer of delivery `id`: the header's, unless the results name another status (the
    /// header's error text and delay go only with its own status).
    pub fn of(&self, id: Uuid) -> Answer {
        match self.results.results.get(&id) {
            None => self.all.clone(),
            Some(&status) if Some(status) == self.all.reply_status() => self.all.clone(),
            Some(ReplyStatus::Ok) => Answer::Ok(Bytes::new()),
            Some(ReplyStatus::Retry) => Answer::Retry { after: None, error: None },
            Some(ReplyStatus::Fail) => Answer::Fail(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use async_nats::HeaderMap;
    use async_nats::header::{HeaderName, HeaderValue};
    use picloud_core::protocol::{ERROR_HEADER, RETRY_AFTER_HEADER, STATUS_HEADER};
    use proptest::prelude::*;

    use super::*;

    fn reply(headers: &[(&str, &str)], status: Option<StatusCode>) -> Message {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(*k, *v);
        }
        Message {
            subject: "_INBOX.x.1".into(),
            reply: None,
            payload: Bytes::from_static(b"{\"done\":true}"),
            headers: (!headers.is_empty()).then_some(map),
            status,
            description: None,
            length: 0,
        }
    }

    #[test]
    fn replies_are_read_by_their_status_header() {
        assert_eq!(
            Answer::from_message(&reply(&[("Picloud-Status", "ok")], None)),
            Answer::Ok(Bytes::from_static(b"{\"done\":true}"))
        );
        assert_eq!(
            Answer::from_message(&reply(
                &[("Picloud-Status", "retry"), ("Picloud-Retry-After-Ms", "250"), ("Picloud-Error", "busy")],
                None
            )),
            Answer::Retry { after: Some(Duration::from_millis(250)), error: Some("busy".into()) }
        );
        assert_eq!(
            Answer::from_message(&reply(&[("Picloud-Status", "fail"), ("Picloud-Error", "bad input")], None)),
            Answer::Fail(Some("bad input".into()))
        );
    }

    #[test]
    fn a_handlers_error_text_is_kept_on_one_line_within_the_protocols_cap() {
        let long = format!("column one\tcolumn two\u{7} {}", "x".repeat(5000));
        let Answer::Fail(Some(error)) =
            Answer::from_message(&reply(&[("Picloud-Status", "fail"), ("Picloud-Error", &long)], None))
        else {
            panic!("a fail with its error")
        };
        assert_eq!(error.len(), picloud_core::protocol::MAX_ERROR_BYTES);
        assert!(error.starts_with("column one column two") && !error.contains(char::is_control), "{error}");
    }

    #[test]
    fn no_responders_and_malformed_replies_are_told_apart() {
        assert_eq!(Answer::from_message(&reply(&[], Some(StatusCode::NO_RESPONDERS))), Answer::NoResponders);
        assert!(
            matches!(Answer::from_message(&reply(&[], None)), Answer::Invalid(e) if e.contains("Picloud-Status"))
        );
        assert!(matches!(
            Answer::from_message(&reply(&[("Picloud-Status", "maybe")], None)),
            Answer::Invalid(e) if e.contains("maybe")
        ));
    }

    fn batch_reply(status: &str, body: &'static str) -> Message {
        Message {
            payload: Bytes::from_static(body.as_bytes()),
            ..reply(&[("Picloud-Status", status), ("Picloud-Error", "busy")], None)
        }
    }

    #[test]
    fn a_batchs_results_override_its_status_per_delivery_and_the_rest_take_the_header() {
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let body: &'static str =
            format!(r#"{{"results": {{"{a}": "ok", "{b}": "fail", "{c}": "retry"}}}}"#).leak();
        let answer = BatchAnswer::from_message(&batch_reply("retry", body));
        assert_eq!(answer.of(a), Answer::Ok(Bytes::new()));
        assert_eq!(answer.of(b), Answer::Fail(None));
        let kept = Answer::Retry { after: None, error: Some("busy".into()) };
        assert_eq!((answer.of(c), answer.of(Uuid::now_v7())), (kept.clone(), kept));
    }

    #[test]
    fn a_batch_without_results_answers_by_its_header_and_unreadable_results_are_invalid() {
        let id = Uuid::now_v7();
        assert_eq!(
            BatchAnswer::from_message(&batch_reply("ok", r#"{"done": 3}"#)).of(id),
            Answer::Ok(Bytes::from_static(br#"{"done": 3}"#))
        );
        assert_eq!(
            BatchAnswer::from_message(&batch_reply("fail", "")).of(id),
            Answer::Fail(Some("busy".into()))
        );
        for bad in [
            r#"{"results": {"x": "ok"}}"#,
            r#"{"results": {"0193a0c4-0000-7000-8000-000000000000": "maybe"}}"#,
            r#"{"results": []}"#,
        ] {
            assert!(
                matches!(BatchAnswer::from_message(&batch_reply("ok", bad)).of(id), Answer::Invalid(e) if e.contains("results")),
                "{bad}"
            );
        }
        let alone: &'static str = format!(r#"{{"results": {{"{id}": "fail"}}}}"#).leak();
        assert_eq!(
            BatchAnswer::read(&batch_reply("ok", alone), false).of(id),
            Answer::Ok(Bytes::from_static(alone.as_bytes())),
            "a single delivery's body is its answer's, never results"
        );
        let silent =
            Message { status: Some(StatusCode::NO_RESPONDERS), ..batch_reply("ok", r#"{"results": {}}"#) };
        assert_eq!(BatchAnswer::from_message(&silent).of(id), Answer::NoResponders);
    }

    /// A header name: mostly the protocol's own, in any case, else anything NATS allows.
    fn header_name() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => prop::sample::select(vec![STATUS_HEADER, ERROR_HEADER, RETRY_AFTER_HEADER]).prop_map(str::to_owned),
            1 => prop::sample::select(vec![STATUS_HEADER, ERROR_HEADER, RETRY_AFTER_HEADER])
                .prop_map(str::to_lowercase),
            1 => "[!-9;-~]{1,20}",
        ]
    }

    /// A header value: mostly what the protocol means, else any text.
    fn header_value() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec!["ok", "retry", "fail", "OK", " ok", ""]).prop_map(str::to_owned),
            any::<u64>().prop_map(|n| n.to_string()),
            any::<String>(),
        ]
    }

    /// A reply: any headers, any NATS status, any payload.
    fn any_reply() -> impl Strategy<Value = Message> {
        (
            prop::option::of(prop::collection::vec((header_name(), header_value()), 0..5)),
            prop::option::of(prop_oneof![Just(503u16), Just(408), Just(100), any::<u16>()]),
            prop::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(headers, status, payload)| Message {
                subject: "_INBOX.x.1".into(),
                reply: None,
                payload: Bytes::from(payload),
                headers: headers.map(|pairs| {
                    let mut map = HeaderMap::new();
                    for (name, value) in pairs {
                        if let (Ok(name), Ok(value)) =
                            (name.parse::<HeaderName>(), value.parse::<HeaderValue>())
                        {
                            map.append(name, value);
                        }
                    }
                    map
                }),
                status: status.and_then(|s| StatusCode::from_u16(s).ok()),
                description: None,
                length: 0,
            })
    }

    proptest! {
        #[test]
        fn any_reply_is_read_without_panicking_and_an_ok_keeps_its_payload(reply in any_reply()) {
            let answer = Answer::from_message(&reply);
            let status =
                reply.headers.as_ref().and_then(|h| h.get(STATUS_HEADER)).map(|v| v.as_str().to_owned());
            if reply.status == Some(StatusCode::NO_RESPONDERS) {
                prop_assert_eq!(&answer, &Answer::NoResponders);
            } else if status.as_deref() == Some("ok") {
                prop_assert_eq!(&answer, &Answer::Ok(reply.payload));
            }
            let error = answer.error(Duration::from_millis(1500));
            prop_assert_eq!(error.is_none(), matches!(answer, Answer::Ok(_)));
            prop_assert_eq!(answer.handler_status() == HandlerStatus::Ok, matches!(answer, Answer::Ok(_)));
        }
    }
}
