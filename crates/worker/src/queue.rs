//! The queue-group consumer loop of DESIGN §6, written once: the worker SDK's handlers, the
//! router's built-in executors and its NATS ingest all serve their subjects with it.
//!
//! Each [`Queue`] is one queue-group subscription with its own loop. The loop takes a message only
//! once one of its `concurrency` slots is free (so a busy consumer leaves messages to the other
//! members of the group), runs the queue's function on it in a task of its own, and on the
//! [`Shutdown`] signal drains the subscription (the server sends nothing new, what it already sent
//! is still taken), finishes every message in hand and ends. [`Serving::finished`] then flushes
//! the replies those messages sent.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, Message, Subscriber};
use bytes::Bytes;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::{Error, Shutdown};

/// What a queue does with one message, replies included.
type OnMessage = Arc<dyn Fn(Message) -> BoxFuture<'static, ()> + Send + Sync>;

/// One queue-group subscription to serve and what to do with each of its messages.
pub struct Queue {
    subject: String,
    queue_group: String,
    on_message: OnMessage,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("subject", &self.subject)
            .field("queue_group", &self.queue_group)
            .finish()
    }
}

impl Queue {
    /// Serves `subject` (wildcards allowed) as a member of `queue_group` with `on_message`, which
    /// owns the message: it answers on its reply subject itself, or ignores it.
    pub fn new<F, Fut>(subject: impl Into<String>, queue_group: impl Into<String>, on_message: F) -> Queue
    where
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Queue {
            subject: subject.into(),
            queue_group: queue_group.into(),
            on_message: Arc::new(move |msg| Box::pin(on_message(msg))),
        }
    }
}

/// Subscribes every queue, waits until the server has the subscriptions (so what is published
/// after this returns reaches them), and serves each with at most `concurrency` messages in hand
/// until `shutdown`. Wait for the drain with [`Serving::finished`].
pub async fn serve_queues(
    client: &Client,
    queues: Vec<Queue>,
    concurrency: usize,
    shutdown: Shutdown,
) -> Result<Serving, Error> {
    let mut subscriptions = Vec::with_capacity(queues.len());
    for queue in queues {
        let sub = client.queue_subscribe(queue.subject.clone(), queue.queue_group).await?;
        subscriptions.push((queue.subject, sub, queue.on_message));
    }
    round_trip(client).await?;
    let mut loops = JoinSet::new();
    let signals = std::iter::repeat_n(shutdown, subscriptions.len());
    for ((subject, sub, on_message), shutdown) in subscriptions.into_iter().zip(signals) {
        loops.spawn(serve(subject, sub, on_message, concurrency.max(1), shutdown));
    }
    Ok(Serving { client: client.clone(), loops })
}

/// Returns once the server has processed everything `client` sent before: a message to a fresh
/// inbox of its own comes back only after the server handled the subscriptions queued ahead of it
/// (`flush` only empties the local write buffer). Services call it before reporting ready.
pub async fn round_trip(client: &Client) -> Result<(), Error> {
    let inbox = client.new_inbox();
    let mut echo = client.subscribe(inbox.clone()).await?;
    client.publish(inbox, Bytes::new()).await.map_err(|e| Error::Sync(e.to_string()))?;
    match tokio::time::timeout(Duration::from_secs(30), echo.next()).await {
        Ok(Some(_)) => Ok(()),
        _ => Err(Error::Sync("no echo from the NATS server within 30 s".into())),
    }
}

/// Queues being served by [`serve_queues`].
#[derive(Debug)]
pub struct Serving {
    /// The connection the replies go out on, flushed once every loop has ended.
    client: Client,
    /// One loop per queue; each ends after its drain.
    loops: JoinSet<()>,
}

impl Serving {
    /// Waits until every queue has drained after the shutdown signal (nothing new taken, every
    /// message in hand finished), then flushes the replies.
    pub async fn finished(mut self) {
        while self.loops.join_next().await.is_some() {}
        self.client.flush().await.ok();
    }
}

/// One queue's loop: take a message once a slot is free, run `on_message` on it in a task, and on
/// the shutdown signal drain the subscription, finish what is buffered and running, and return.
async fn serve(
    subject: String,
    mut sub: Subscriber,
    on_message: OnMessage,
    concurrency: usize,
    mut shutdown: Shutdown,
) {
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut running = JoinSet::new();
    let mut draining = false;
    loop {
        let msg = tokio::select! {
            msg = sub.next() => msg,
            () = shutdown.recv(), if !draining => {
                draining = true;
                if let Err(e) = sub.drain().await {
                    tracing::warn!(%subject, error = %e, "draining a queue subscription failed");
                }
                continue;
            }
        };
        let Some(msg) = msg else { break };
        let slot = slots.clone().acquire_owned().await.expect("the slot semaphore is never closed");
        let handled = on_message(msg);
        running.spawn(async move {
            handled.await;
            drop(slot);
        });
        while running.try_join_next().is_some() {}
    }
    while running.join_next().await.is_some() {}
}
