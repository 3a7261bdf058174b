//! The abandoned-executions log (DESIGN §8): sync calls whose result nobody took — the caller's
//! wait ran out or it hung up (`sync::deliver_sync`), or the call's row outlived its lease on the
//! node that took it (`lease_expired`, recorded by the relay that finds the row).

use std::time::Duration;

use picloud_store::{AbandonReason, AbandonedExecution, Store};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::answer::Answer;
use crate::complete::Done;

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
