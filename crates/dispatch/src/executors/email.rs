//! The email executor: validates an email delivery's data (`{to, subject, text, html?}`), sends
//! it over SMTP to `PICLOUD_SMTP_URL`, and turns the SMTP answer into `ok`, `retry` (4xx,
//! connection errors, timeouts) or `fail` (5xx, invalid emails) (DESIGN §11).

use std::time::Duration;

use bytes::Bytes;
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::{AsyncSmtpTransport, AsyncTransport as _, Message, Tokio1Executor};
use picloud_core::protocol::Envelope;
use serde_json::Value;

use super::{Execute, ExecutorError, Outcome, SmtpConfig, time_left};

/// Checks that `url` is an SMTP URL lettre can connect to.
pub(super) fn check_url(url: &str) -> Result<(), String> {
    AsyncSmtpTransport::<Tokio1Executor>::from_url(url).map(|_| ()).map_err(|e| e.to_string())
}

/// Parses a `From` address (`a@b` or `Name <a@b>`).
pub(super) fn check_from(from: &str) -> Result<Mailbox, String> {
    from.parse::<Mailbox>().map_err(|e| e.to_string())
}

/// Sends emails over SMTP, one connection per email.
#[derive(Debug)]
pub(crate) struct EmailExecutor {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    timeout_cap: Duration,
}

impl EmailExecutor {
    /// An executor for `smtp`; an SMTP transaction lasts at most `timeout_cap`.
    pub(crate) fn new(smtp: &SmtpConfig, timeout_cap: Duration) -> Result<Self, ExecutorError> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(&smtp.url)
            .map_err(|e| ExecutorError::Smtp(format!("PICLOUD_SMTP_URL: {e}")))?
            .timeout(Some(timeout_cap))
            .build();
        let from =
            check_from(&smtp.from).map_err(|e| ExecutorError::Smtp(format!("PICLOUD_SMTP_FROM: {e}")))?;
        Ok(Self { transport, from, timeout_cap })
    }
}

/// An email as apps request it (`POST /v1/apps/{app}/emails`).
#[derive(Debug, Clone, PartialEq)]
struct EmailRequest {
    to: Vec<Mailbox>,
    subject: String,
    text: String,
    html: Option<String>,
}

/// Validates an email delivery's data.
fn parse_request(data: &str) -> Result<EmailRequest, String> {
    let value: Value = serde_json::from_str(data).map_err(|e| format!("the email is not JSON: {e}"))?;
    let email = value.as_object().ok_or("the email is not a JSON object")?;
    let addresses: Vec<&str> = match email.get("to") {
        None | Some(Value::Null) => {
            return Err("the email has no `to`: an address or a list of addresses".into());
        }
        Some(Value::String(one)) => vec![one],
        Some(Value::Array(list)) if list.is_empty() => return Err("`to` lists no address".into()),
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| v.as_str().ok_or("`to` lists something that is not a string"))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("`to` is an address or a list of addresses".into()),
    };
    let to = addresses
        .into_iter()
        .map(|a| a.parse::<Mailbox>().map_err(|e| format!("`to` holds an invalid address {a:?}: {e}")))
        .collect::<Result<_, _>>()?;
    let string = |field: &str| match email.get(field) {
        Some(Value::String(s)) => Ok(Some(s.clone())),
        None | Some(Value::Null) => Ok(None),
        Some(_) => Err(format!("`{field}` is not a string")),
    };
    let subject = string("subject")?.ok_or("the email has no `subject`")?;
    if subject.contains(['\r', '\n']) {
        return Err("`subject` holds a line break".into());
    }
    let text = string("text")?.ok_or("the email has no `text`")?;
    let html = string("html")?;
    Ok(EmailRequest { to, subject, text, html })
}

/// The message to send: `text` alone, or `text` and `html` as multipart/alternative. Its
/// Message-ID is built from the delivery id, so every attempt sends the same one.
fn message(request: EmailRequest, from: &Mailbox, message_id: &str) -> Result<Message, String> {
    let mut builder = Message::builder()
        .from(from.clone())
        .subject(request.subject)
        .message_id(Some(message_id.to_owned()));
    for to in request.to {
        builder = builder.to(to);
    }
    match request.html {
        Some(html) => builder.multipart(MultiPart::alternative_plain_html(request.text, html)),
        None => builder.singlepart(SinglePart::plain(request.text)),
    }
    .map_err(|e| format!("the email cannot be built: {e}"))
}

impl Execute for EmailExecutor {
    const NAME: &'static str = "email";

    async fn execute(&self, delivery: Envelope) -> Outcome {
        let request = match parse_request(delivery.data.get()) {
            Ok(request) => request,
            Err(e) => return Outcome::Fail(format!("invalid email: {e}")),
        };
        let message_id = format!("<{}@{}>", delivery.id, self.from.email.domain());
        let message = match message(request, &self.from, &message_id) {
            Ok(message) => message,
            Err(e) => return Outcome::Fail(e),
        };
        let Some(budget) = time_left(delivery.piclouddeadline, self.timeout_cap) else {
            return Outcome::retry("the delivery's deadline passed before the email was sent");
        };
        match tokio::time::timeout(budget, self.transport.send(message)).await {
            Ok(Ok(_)) => Outcome::Ok(Bytes::from(
                serde_json::to_vec(&serde_json::json!({ "message_id": message_id })).unwrap_or_default(),
            )),
            Ok(Err(e)) if e.is_permanent() => {
                Outcome::Fail(format!("the SMTP server refused the email: {e}"))
            }
            Ok(Err(e)) => Outcome::retry(format!("sending the email failed: {e}")),
            Err(_) => Outcome::retry(format!(
                "the SMTP server did not accept the email within {} ms",
                budget.as_millis()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_email_takes_one_address_or_a_list() {
        let one = parse_request(r#"{"to":"a@example.com","subject":"Hi","text":"Hello"}"#).unwrap();
        assert_eq!(one.to.len(), 1);
        assert_eq!(one.html, None);
        let many = parse_request(
            r#"{"to":["a@example.com","Bee <b@example.com>"],"subject":"Hi","text":"Hello","html":"<p>Hello</p>"}"#,
        )
        .unwrap();
        assert_eq!(many.to[1].name.as_deref(), Some("Bee"));
        assert_eq!(many.html.as_deref(), Some("<p>Hello</p>"));
    }

    #[test]
    fn invalid_emails_say_what_is_wrong() {
        for (data, says) in [
            (r#"{"subject":"Hi","text":"x"}"#, "no `to`"),
            (r#"{"to":[],"subject":"Hi","text":"x"}"#, "no address"),
            (r#"{"to":7,"subject":"Hi","text":"x"}"#, "an address or a list"),
            (r#"{"to":["a@example.com",1],"subject":"Hi","text":"x"}"#, "not a string"),
            (r#"{"to":"nobody","subject":"Hi","text":"x"}"#, "invalid address"),
            (r#"{"to":"a@example.com","text":"x"}"#, "no `subject`"),
            (r#"{"to":"a@example.com","subject":"a\r\nBcc: x@y","text":"x"}"#, "line break"),
            (r#"{"to":"a@example.com","subject":"Hi"}"#, "no `text`"),
            (r#"{"to":"a@example.com","subject":"Hi","text":"x","html":1}"#, "`html` is not a string"),
            (r#"[1]"#, "not a JSON object"),
        ] {
            let err = parse_request(data).unwrap_err();
            assert!(err.contains(says), "{data}: {err}");
        }
    }

    #[test]
    fn html_makes_a_multipart_alternative_message() {
        let from: Mailbox = "picloud@localhost".parse().unwrap();
        let request = parse_request(
            r#"{"to":"a@example.com","subject":"Order shipped","text":"Plain","html":"<b>Rich</b>"}"#,
        )
        .unwrap();
        let formatted =
            String::from_utf8(message(request, &from, "<1@localhost>").unwrap().formatted()).unwrap();
        assert!(formatted.contains("multipart/alternative"), "{formatted}");
        assert!(formatted.contains("Subject: Order shipped"), "{formatted}");
        assert!(formatted.contains("Message-ID: <1@localhost>"), "{formatted}");
        assert!(formatted.contains("Plain") && formatted.contains("<b>Rich</b>"), "{formatted}");
    }
}
