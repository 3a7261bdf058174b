//! Forwarding a sync row's result to the caller's inbox (DESIGN §8): a NATS request from a
//! dedicated inbox subscription, so that "no responders" is observable; when nobody acknowledges,
//! the result goes to `abandoned_executions`. A call whose row outlived its lease has no result:
//! it goes there at once (`lease_expired`).

use std::time::Duration;

use async_nats::{Client, HeaderMap, StatusCode};
use bytes::Bytes;
use futures::StreamExt as _;
use picloud_core::protocol::{ERROR_HEADER, STATUS_HEADER};
use picloud_store::{AbandonReason, AbandonedExecution, Store};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::answer::Answer;
use crate::complete::Done;

/// Sends `done`'s result to its `reply_to` and records it as abandoned if nobody takes it.
pub(crate) async fn forward<S: Store>(
    store: S,
    nats: Client,
    done: Done,
    handler_timeout: Duration,
    ack_timeout: Duration,
) {
    let Some(reply_to) = done.reply_to.as_deref() else { return };
    if done.answer == Answer::LeaseExpired {
        return abandon(&store, &done, AbandonReason::LeaseExpired, handler_timeout).await;
    }
    if let Err(reason) = deliver(&nats, reply_to, &done, handler_timeout, ack_timeout).await {
        abandon(&store, &done, reason, handler_timeout).await;
    }
}

/// Records the result of sync row `done`, which its caller did not take, in
/// `abandoned_executions`.
pub(crate) async fn abandon<S: Store>(
    store: &S,
    done: &Done,
    reason: AbandonReason,
    handler_timeout: Duration,
) {
    let result = match &done.answer {
        Answer::Ok(body) => {
            std::str::from_utf8(body).ok().and_then(|s| RawValue::from_string(s.to_owned()).ok())
        }
        _ => None,
    };
    let record = AbandonedExecution {
        id: Uuid::now_v7(),
        app_id: done.app_id,
        trigger_id: done.trigger_id,
        trigger_name: done.trigger_name.clone().unwrap_or_default(),
        outbox_id: done.id,
        reply_to: done.reply_to.clone().unwrap_or_default(),
        reason,
        handler_status: done.answer.handler_status(),
        result,
        error: done.answer.error(handler_timeout),
        created_at: time::OffsetDateTime::now_utc(),
    };
    match store.insert_abandoned(&record).await {
        Ok(_) => tracing::info!(delivery_id = %done.id, reason = reason.as_str(), "sync result abandoned"),
        Err(e) => {
            tracing::error!(delivery_id = %done.id, error = %e, "could not record an abandoned sync result");
        }
    }
}

/// One request to the caller's inbox; `Err` says why nobody took it.
async fn deliver(
    nats: &Client,
    reply_to: &str,
    done: &Done,
    handler_timeout: Duration,
    ack_timeout: Duration,
) -> Result<(), AbandonReason> {
    let inbox = nats.new_inbox();
    let mut ack = nats.subscribe(inbox.clone()).await.map_err(|_| AbandonReason::AckTimeout)?;
    let mut headers = HeaderMap::new();
    headers.insert(STATUS_HEADER, done.answer.handler_status().as_str());
    if let Some(error) = done.answer.error(handler_timeout) {
        headers.insert(ERROR_HEADER, error.replace(['\r', '\n'], " "));
    }
    let body = match &done.answer {
        Answer::Ok(body) => body.clone(),
        _ => Bytes::new(),
    };
    nats.publish_with_reply_and_headers(reply_to.to_owned(), inbox, headers, body)
        .await
        .map_err(|_| AbandonReason::AckTimeout)?;
    match tokio::time::timeout(ack_timeout, ack.next()).await {
        Ok(Some(msg)) if msg.status == Some(StatusCode::NO_RESPONDERS) => Err(AbandonReason::NoResponders),
        Ok(Some(_)) => Ok(()),
        Ok(None) | Err(_) => Err(AbandonReason::AckTimeout),
    }
}
