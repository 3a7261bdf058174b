//! A sync invocation delivered by the API node its caller waits on (DESIGN §8): the node claims
//! its own row, delivers it directly, and resolves the result to the caller's inbox like any
//! relay would — so the result is logged as abandoned when the caller is gone, and a node that
//! dies after writing the row leaves it to the relays once its lease runs out.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use async_nats::{Client, HeaderMap, StatusCode};
use futures::StreamExt as _;
use picloud_core::protocol::{CLOUDEVENTS_CONTENT_TYPE, CONTENT_TYPE_HEADER};
use picloud_store::{ClaimedDelivery, Store};
use uuid::Uuid;

use crate::answer::Answer;
use crate::config::RelayConfig;
use crate::envelope::envelope;
use crate::forward::forward;
use crate::relay::{done_for, plan, unix_millis_after};

/// Returns once the server has processed everything `client` sent before: a message to a fresh
/// inbox of its own comes back only after the subscriptions queued ahead of it were handled
/// (`flush` only empties the local write buffer). Services call it before reporting ready.
pub async fn round_trip(client: &Client) -> Result<(), String> {
    let inbox = client.new_inbox();
    let mut echo = client.subscribe(inbox.clone()).await.map_err(|e| e.to_string())?;
    client.publish(inbox, bytes::Bytes::new()).await.map_err(|e| e.to_string())?;
    match tokio::time::timeout(std::time::Duration::from_secs(30), echo.next()).await {
        Ok(Some(_)) => Ok(()),
        _ => Err("no echo from the NATS server within 30 s".into()),
    }
}

/// Delivers sync call `row`, written already claimed by this node
/// ([`picloud_store::events::invoke`]), resolves its result to the row's `reply_to` and
/// completes the row. Runs to the end of the handler's deadline whatever the caller does;
/// `caller_gone` says whether the caller hung up.
pub async fn deliver_sync<S: Store>(
    store: S,
    nats: Client,
    config: RelayConfig,
    row: ClaimedDelivery,
    caller_gone: Arc<AtomicBool>,
) {
    let (answer, mut done) = attempt(&store, &nats, &config, &row).await;
    done.answer = answer;
    forward(store.clone(), nats, done, config.handler_timeout, config.forward_ack_timeout, Some(caller_gone))
        .await;
    if let Err(e) = store.delete_delivered(&[row.id]).await {
        tracing::warn!(delivery_id = %row.id, error = %e, "completing a sync call failed; its lease will run out");
    }
}

/// One attempt: the handler's answer, and the completion record to resolve it with.
async fn attempt<S: Store>(
    store: &S,
    nats: &Client,
    config: &RelayConfig,
    row: &ClaimedDelivery,
) -> (Answer, crate::complete::Done) {
    let mut done = done_for(row, config.triggers.retry, Answer::Timeout);
    let ids: Vec<Uuid> = row.trigger_id.into_iter().collect();
    let targets = match store.delivery_targets(&ids).await {
        Ok(targets) => targets.targets,
        Err(e) => return (Answer::Failed(format!("store error: {e}")), done),
    };
    let deadline_ms = unix_millis_after(config.handler_timeout);
    let plan = match plan(config, row, targets.first(), None, deadline_ms) {
        Ok(plan) => plan,
        Err(answer) => return (answer, done),
    };
    done.app_slug = Some(plan.app.clone());
    done.trigger_name = plan.trigger_name.clone();
    let body = envelope(row, plan.app.as_str(), plan.run_as(), deadline_ms);
    let inbox = nats.new_inbox();
    let mut reply = match nats.subscribe(inbox.clone()).await {
        Ok(sub) => sub,
        Err(e) => return (Answer::Failed(format!("subscribing failed: {e}")), done),
    };
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE_HEADER, CLOUDEVENTS_CONTENT_TYPE);
    if let Err(e) =
        nats.publish_with_reply_and_headers(plan.subject.clone(), inbox, headers, body.into()).await
    {
        return (Answer::Failed(format!("publishing failed: {e}")), done);
    }
    let answer = match tokio::time::timeout(config.handler_timeout, reply.next()).await {
        Ok(Some(msg)) if msg.status == Some(StatusCode::NO_RESPONDERS) => Answer::NoResponders,
        Ok(Some(msg)) => Answer::from_message(&msg),
        Ok(None) => Answer::Failed("the reply subscription closed".into()),
        Err(_) => Answer::Timeout,
    };
    (answer, done)
}
