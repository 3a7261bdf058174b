//! A sync invocation delivered by the API node its caller waits on (DESIGN §8): the node writes
//! its own row claimed, delivers it directly, and hands the result to the waiting request — or,
//! when the caller is gone, to the abandoned log. A row that outlives its lease (the node died,
//! or could not complete it) is found by a relay, which logs it `lease_expired` and never runs
//! the call again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{Client, HeaderMap, Message};
use futures::StreamExt as _;
use picloud_core::protocol::{AnswerInbox, CLOUDEVENTS_CONTENT_TYPE, CONTENT_TYPE_HEADER};
use picloud_store::{AbandonReason, ClaimedDelivery, DeliveryTarget, Store};
use tokio::sync::{OnceCell, oneshot};

use crate::abandoned::abandon;
use crate::answer::Answer;
use crate::config::NodeConfig;
use crate::connection::ConnectionWatch;
use crate::envelope::envelope;
use crate::metrics::RelayMetrics;
use crate::relay::{done_for, plan, unix_millis_after};
use crate::report::Reporter;

/// A sync call's two ends on the node its caller waits on: [`SyncReply`] for the task that
/// delivers the call, [`SyncCaller`] for the HTTP request waiting for the answer. The answer is
/// handed over in memory — the node that would take it from the `reply_to` inbox is this one —
/// and acknowledged once the request has it, as a request to the inbox would be. An answer nobody
/// acknowledged goes to `abandoned_executions`, with the reason a request to the inbox would have
/// found: `no_responders` when the caller's wait ran out, `caller_gone` when it hung up.
pub fn sync_call() -> (SyncReply, SyncCaller) {
    let (answer, waiting) = oneshot::channel();
    let hung_up = Arc::new(AtomicBool::new(false));
    (SyncReply { answer, hung_up: hung_up.clone() }, SyncCaller { answer: waiting, hung_up, waiting: true })
}

/// An answer, and how its taker acknowledges it.
type Handover = (Answer, oneshot::Sender<()>);

/// The delivering end of [`sync_call`].
#[derive(Debug)]
pub struct SyncReply {
    /// Where the answer goes; closed once the caller stopped waiting.
    answer: oneshot::Sender<Handover>,
    /// Set by the caller's end when it is dropped while waiting (the HTTP caller hung up).
    hung_up: Arc<AtomicBool>,
}

impl SyncReply {
    /// Hands `answer` to the caller and waits for its acknowledgement, or says why it is
    /// abandoned.
    async fn send(self, answer: Answer) -> Result<(), AbandonReason> {
        let (ack, acked) = oneshot::channel();
        let reason = || {
            if self.hung_up.load(Ordering::SeqCst) {
                AbandonReason::CallerGone
            } else {
                AbandonReason::NoResponders
            }
        };
        if self.answer.send((answer, ack)).is_err() {
            return Err(reason());
        }
        // Dropped unacknowledged: the caller went away with the answer in its channel.
        acked.await.map_err(|_| reason())
    }
}

/// Why [`SyncCaller::answer`] has no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoAnswer {
    /// The caller's wait ran out first.
    TimedOut,
    /// The delivering task ended without answering (it panicked).
    Lost,
}

/// The waiting end of [`sync_call`]. Dropped while it waits — axum drops a request's future when
/// its caller hangs up — it marks the call `caller_gone` before letting go of the channel, and an
/// answer already in it is then never acknowledged.
#[derive(Debug)]
pub struct SyncCaller {
    /// The answer with its acknowledgement.
    answer: oneshot::Receiver<Handover>,
    /// Shared with [`SyncReply`]: set when this end is dropped while `waiting`.
    hung_up: Arc<AtomicBool>,
    /// Whether [`SyncCaller::answer`] has not finished yet.
    waiting: bool,
}

impl SyncCaller {
    /// The handler's answer, if it comes within `wait`; taking it acknowledges it. An answer
    /// that comes later is recorded as abandoned (`no_responders`) instead.
    pub async fn answer(mut self, wait: Duration) -> Result<Answer, NoAnswer> {
        let handover = match tokio::time::timeout(wait, &mut self.answer).await {
            Ok(handover) => handover.map_err(|_| NoAnswer::Lost),
            Err(_) => {
                self.answer.close();
                self.answer.try_recv().map_err(|_| NoAnswer::TimedOut)
            }
        };
        self.waiting = false;
        let (answer, ack) = handover?;
        let _ = ack.send(());
        Ok(answer)
    }
}

impl Drop for SyncCaller {
    fn drop(&mut self) {
        if self.waiting {
            self.hung_up.store(true, Ordering::SeqCst);
        }
    }
}

/// The answers to a node's sync calls: one subscription to an [`AnswerInbox`] of the node's
/// connection, taken at the first call, from which each answer goes to the call waiting for it,
/// and only from the call's own app. A `working` reply is no answer: a sync call keeps its
/// deadline (the handler timeout: its caller waits). Each finished call is reported (its
/// statistics and its tail) through the node's [`Reporter`].
#[derive(Debug, Clone)]
pub struct SyncAnswers {
    nats: Client,
    inbox: Arc<OnceCell<Inbox>>,
    reports: Reporter,
}

/// The calls waiting for answers, by sequence number: each call's app and where its answer goes.
type Waiting = Arc<Mutex<HashMap<u64, (String, oneshot::Sender<Message>)>>>;

/// The subscription's inbox and the calls waiting on it.
#[derive(Debug)]
struct Inbox {
    answers: AnswerInbox,
    next_seq: AtomicU64,
    waiting: Waiting,
}

/// One call's wait for its answer; dropping it stops waiting.
struct Expected {
    answer: oneshot::Receiver<Message>,
    seq: u64,
    waiting: Waiting,
}

impl Drop for Expected {
    fn drop(&mut self) {
        self.waiting.lock().expect("sync answers lock").remove(&self.seq);
    }
}

impl SyncAnswers {
    /// The answers of `nats`'s sync calls, reported to `reports`; nothing is subscribed before
    /// the first call.
    pub fn new(nats: Client, reports: Reporter) -> SyncAnswers {
        SyncAnswers { nats, inbox: Arc::default(), reports }
    }

    /// Waits until the calls reported so far are written to the statistics
    /// ([`Reporter::flush`]): once the last call finished, before the node exits.
    pub async fn flush_reports(&self) {
        self.reports.flush().await;
    }

    /// A reply subject for a call to `app`, and the wait for its answer.
    async fn expect(&self, app: &str) -> Result<(String, Expected), async_nats::SubscribeError> {
        let inbox = self.inbox.get_or_try_init(|| self.subscribe()).await?;
        let seq = inbox.next_seq.fetch_add(1, Ordering::Relaxed);
        let (tx, answer) = oneshot::channel();
        inbox.waiting.lock().expect("sync answers lock").insert(seq, (app.to_owned(), tx));
        let expected = Expected { answer, seq, waiting: inbox.waiting.clone() };
        Ok((inbox.answers.reply_to(app, seq), expected))
    }

    async fn subscribe(&self) -> Result<Inbox, async_nats::SubscribeError> {
        let answers = AnswerInbox::new(self.nats.new_inbox());
        let mut replies = self.nats.subscribe(answers.subscription()).await?;
        let waiting = Waiting::default();
        let handing = waiting.clone();
        tokio::spawn(async move {
            while let Some(msg) = replies.next().await {
                let Some((app, seq)) = AnswerInbox::parse(&msg.subject) else { continue };
                if crate::answer::working(&msg).is_some() {
                    continue;
                }
                let mut waiting = handing.lock().expect("sync answers lock");
                if waiting.get(&seq).is_some_and(|(of, _)| of == app)
                    && let Some((_, answer)) = waiting.remove(&seq)
                {
                    let _ = answer.send(msg);
                }
            }
        });
        Ok(Inbox { answers, next_seq: AtomicU64::new(0), waiting })
    }
}

/// Delivers sync call `row` to `target`, both as [`picloud_store::events::invoke`] wrote them
/// (already claimed by this node), hands the answer to the caller waiting on `reply` or records
/// it as abandoned, and completes the row. Runs to the end of the handler's deadline whatever
/// the caller does.
pub async fn deliver_sync<S: Store>(
    store: S,
    answers: SyncAnswers,
    connection: ConnectionWatch,
    config: NodeConfig,
    row: ClaimedDelivery,
    target: DeliveryTarget,
    reply: SyncReply,
) {
    let started = std::time::Instant::now();
    let (answer, mut done) = attempt(&answers, &connection, &config, &row, &target).await;
    let took = started.elapsed();
    RelayMetrics::new(&config.node_id).sync_call(&answer, took);
    done.answer = answer.clone();
    done.latency = Some(took);
    if let Err(reason) = reply.send(answer).await {
        abandon(&store, &done, reason, config.handler_timeout).await;
    }
    if let Err(e) = store.delete_delivered(&[row.id]).await {
        tracing::warn!(delivery_id = %row.id, error = %e, "completing a sync call failed; its lease will run out");
    }
    answers.reports.report(std::slice::from_ref(&done));
}

/// One attempt: the handler's answer, and the completion record to resolve it with. A lost
/// connection ends the wait at once: the answer cannot arrive on it.
async fn attempt(
    answers: &SyncAnswers,
    connection: &ConnectionWatch,
    config: &NodeConfig,
    row: &ClaimedDelivery,
    target: &DeliveryTarget,
) -> (Answer, crate::complete::Done) {
    let mut done = done_for(row, config.triggers.retry, Answer::Timeout);
    let deadline_ms = unix_millis_after(config.handler_timeout);
    let plan = match plan(config, row, Some(target), None, deadline_ms) {
        Ok(plan) => plan,
        Err(answer) => return (answer, done),
    };
    done.app_slug = Some(plan.app.clone());
    done.trigger_name = plan.trigger_name.clone();
    let body = envelope(row, plan.app.as_str(), plan.run_as.as_ref(), deadline_ms);
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE_HEADER, CLOUDEVENTS_CONTENT_TYPE);
    // The node's one subscription to its answer inbox: no subscription of its own per call,
    // and "no responders" still comes back there as such.
    let losses = connection.losses();
    let (reply_to, mut expected) = match answers.expect(plan.app.as_str()).await {
        Ok(expected) => expected,
        Err(e) => return (Answer::Failed(format!("subscribing to the answer inbox failed: {e}")), done),
    };
    let published =
        answers.nats.publish_with_reply_and_headers(plan.subject.clone(), reply_to, headers, body.into());
    if let Err(e) = published.await {
        return (Answer::Failed(format!("the request failed: {e}")), done);
    }
    let answer = tokio::select! {
        answered = tokio::time::timeout(config.handler_timeout, &mut expected.answer) => match answered {
            Ok(Ok(msg)) => Answer::from_message(&msg),
            Ok(Err(_)) => Answer::Failed("the node's answer inbox closed".into()),
            Err(_) => Answer::Timeout,
        },
        _ = connection.lost_since(losses) => Answer::Interrupted(
            "the NATS connection was lost while the handler worked on the call; its answer cannot arrive".into(),
        ),
    };
    (answer, done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer() -> Answer {
        Answer::Ok(bytes::Bytes::from_static(b"{}"))
    }

    #[tokio::test]
    async fn an_answer_taken_in_time_is_acknowledged() {
        let (reply, caller) = sync_call();
        let sent = tokio::spawn(reply.send(answer()));
        assert_eq!(caller.answer(Duration::from_secs(30)).await, Ok(answer()));
        assert_eq!(sent.await.unwrap(), Ok(()));
    }

    #[tokio::test]
    async fn an_answer_left_in_the_channel_by_a_caller_that_hung_up_is_abandoned_as_caller_gone() {
        let (reply, caller) = sync_call();
        let mut sent = Box::pin(reply.send(answer()));
        assert!(futures::poll!(&mut sent).is_pending(), "the answer is in the channel, unacknowledged");
        drop(caller);
        assert_eq!(sent.await, Err(AbandonReason::CallerGone));
    }

    #[tokio::test]
    async fn an_answer_after_the_callers_wait_ran_out_is_abandoned_as_no_responders() {
        let (reply, caller) = sync_call();
        assert_eq!(caller.answer(Duration::from_millis(1)).await, Err(NoAnswer::TimedOut));
        assert_eq!(reply.send(answer()).await, Err(AbandonReason::NoResponders));
    }

    #[tokio::test]
    async fn a_delivery_that_ends_without_answering_leaves_the_caller_no_answer_at_once() {
        let (reply, caller) = sync_call();
        drop(reply);
        assert_eq!(caller.answer(Duration::from_secs(30)).await, Err(NoAnswer::Lost));
    }
}
