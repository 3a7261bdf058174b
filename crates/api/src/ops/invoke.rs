//! The sync call (DESIGN §8): its write, and what its answer means to the caller. The wait in
//! between is the API node's (`routes::invoke`): only it holds the reply inbox.

use std::time::Duration;

use bytes::Bytes;
use picloud_core::Capability;
use picloud_core::protocol::TriggerKind;
use picloud_dispatch::Answer;
use picloud_store::events::{self, SyncWaiter};
use picloud_store::{ClaimedDelivery, DeliveryTarget, Store, SyncCallWrite};
use serde_json::value::RawValue;

use super::Ops;
use crate::auth::{Caller, Guarded};
use crate::error::{ApiError, ErrorCode};

impl<S: Store> Ops<S> {
    /// Writes a sync call of the `http` trigger `name` with `body`, to be answered on `waiter`'s
    /// inbox: the row and where it goes; refused when there is no such trigger, or it is not an
    /// enabled `http` trigger; [stale](Guarded::Stale) when `waiter` was authorized at an epoch
    /// that has moved since.
    pub async fn write_sync_call(
        &self,
        caller: &Caller,
        name: &str,
        body: &RawValue,
        waiter: SyncWaiter<'_>,
    ) -> Result<Guarded<(Box<ClaimedDelivery>, Box<DeliveryTarget>)>, ApiError> {
        let cx = self.event_context(caller.require_app(Capability::AppInvoke)?, caller);
        match events::invoke(&self.store, &cx, name, body, waiter).await? {
            SyncCallWrite::Written { row, target } => Ok(Guarded::Written((Box::new(row), target))),
            SyncCallWrite::Stale => Ok(Guarded::Stale),
            SyncCallWrite::NoTrigger => Err(picloud_store::Error::TriggerNotFound(name.to_owned()).into()),
            SyncCallWrite::Refused(trigger) if trigger.spec.kind() != TriggerKind::Http => {
                Err(ApiError::new(
                    ErrorCode::NotAnHttpTrigger,
                    format!("trigger {name} is a {} trigger", trigger.spec.kind()),
                ))
            }
            SyncCallWrite::Refused(_) => {
                Err(ApiError::new(ErrorCode::TriggerDisabled, format!("trigger {name} is disabled")))
            }
        }
    }
}

/// What the handler's `answer` to a sync call of trigger `name` gives its caller: the handler's
/// JSON (`null` for an empty body), or why there is none.
pub fn sync_result(answer: Answer, name: &str, handler_timeout: Duration) -> Result<Bytes, ApiError> {
    let error = answer.error(handler_timeout).unwrap_or_default();
    match answer {
        Answer::Ok(body) if body.is_empty() => Ok(Bytes::from_static(b"null")),
        Answer::Ok(body) => Ok(body),
        Answer::NoResponders => {
            Err(ApiError::new(ErrorCode::NoHandler, format!("no handler serves trigger {name}")))
        }
        Answer::Interrupted(_) => Err(ApiError::new(
            ErrorCode::NatsUnavailable,
            format!("the router lost its NATS connection while the handler worked on the call: {error}"),
        )),
        Answer::Timeout => {
            Err(ApiError::new(ErrorCode::Timeout, format!("the handler did not answer: {error}")))
        }
        _ => Err(ApiError::new(ErrorCode::HandlerFailed, format!("the handler failed: {error}"))),
    }
}
