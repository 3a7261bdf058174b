//! Serve picloud-router deliveries from a Rust process.
//!
//! A [`Worker`] subscribes to `picloud.v1.handle.<app>.<handler>` in the queue group
//! `picloud.<app>.<handler>` for each handler, so every delivery goes to one instance wherever it
//! runs; it hands each delivery to your function as a typed [`Delivery`] and sends back the
//! [`Reply`]. A delivery cancelled while it runs (DESIGN §14: a notice on
//! `picloud.v1.cancel.<app>.<handler>`) has its future dropped and its
//! [`Delivery::cancellation`] fired. On shutdown it stops taking deliveries, finishes the ones in
//! hand and flushes the replies.
//!
//! ```no_run
//! use picloud_worker::{Delivery, Reply, Worker};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct Order { key: String, value: serde_json::Value }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), picloud_worker::Error> {
//!     Worker::connect("nats://127.0.0.1:4222", "shop")
//!         .await?
//!         .handle("process-order", |delivery: Delivery| async move {
//!             let order: Order = delivery.data()?;
//!             println!("order {} = {} (attempt {})", order.key, order.value, delivery.attempt);
//!             Ok(Reply::ok(serde_json::json!({ "processed": order.key })))
//!         })
//!         .run(async { tokio::signal::ctrl_c().await.ok(); })
//!         .await
//! }
//! ```
//!
//! Its building blocks serve the router's own NATS consumers too: [`serve_queues`] is the one
//! queue-group loop (subscribe, confirm, bounded concurrency, drain) under the worker, the
//! built-in executors and the ingest, and [`Shutdown`] is the stop signal every part of a node
//! takes.
//!
//! It depends on `core` (the protocol) and async-nats only, never on the store: handlers talk to
//! the platform over NATS and HTTP, not to its database. Nothing of the router may move in here
//! (the store, the relay, the API): this crate is what a handler process compiles.
#![warn(missing_docs)]

mod in_hand;
mod queue;
mod record;
mod shutdown;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, HeaderMap, Message};
use bytes::Bytes;
use futures::future::BoxFuture;
use in_hand::{InHand, Renewed};
use picloud_core::protocol::{AnswerHead, Envelope, EventKind, Subjects, Working};
use picloud_core::{AppSlug, HandlerName, NameError};
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use uuid::Uuid;

pub use queue::{Queue, Serving, round_trip, serve_queues};
pub use record::{Handed, Record};
pub use shutdown::{Shutdown, ShutdownSender};
pub use tokio_util::sync::CancellationToken;

/// What can go wrong running a worker, or serving queues with [`serve_queues`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Connecting to NATS failed.
    #[error("connecting to NATS failed: {0}")]
    Connect(#[from] async_nats::ConnectError),
    /// Subscribing failed.
    #[error("subscribing failed: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    /// An app or handler name is not valid.
    #[error(transparent)]
    Name(#[from] NameError),
    /// A subject prefix is not valid.
    #[error("{0}")]
    Prefix(String),
    /// The server did not confirm the subscriptions.
    #[error("waiting for the server to confirm the subscriptions failed: {0}")]
    Sync(String),
}

/// What a handler function returns: a reply, or an error that is answered as `retry`.
pub type HandlerResult = Result<Reply, Box<dyn std::error::Error + Send + Sync>>;

/// One delivery, as your handler receives it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The delivery id: stable across attempts, the key to deduplicate on.
    pub id: Uuid,
    /// This attempt's number, from 1.
    pub attempt: u32,
    /// The event's depth; events you write with [`Delivery::token`] get depth + 1.
    pub depth: u32,
    /// The delivery token: acts as the trigger's registering principal on the app until the
    /// deadline (absent for emails).
    pub token: Option<String>,
    /// Unix milliseconds by which the answer must arrive.
    pub deadline_ms: i64,
    /// The whole CloudEvents envelope.
    pub event: Envelope,
    /// Where its `working` replies go: the request's reply subject, on the worker's connection.
    reply: Option<(Client, async_nats::Subject)>,
    /// Fired when the delivery is cancelled.
    cancellation: CancellationToken,
    /// Where its renewed token comes (the reply subject of its `working` replies), and where it
    /// is kept.
    renewal: Option<(async_nats::Subject, Renewed)>,
}

impl Delivery {
    /// Parses a delivery body (the CloudEvents envelope).
    pub fn from_json(body: &[u8]) -> Result<Delivery, serde_json::Error> {
        let event: Envelope = serde_json::from_slice(body)?;
        Ok(Delivery {
            id: event.id,
            attempt: event.picloudattempt,
            depth: event.piclouddepth,
            token: event.picloudtoken.clone(),
            deadline_ms: event.piclouddeadline,
            event,
            reply: None,
            cancellation: CancellationToken::new(),
            renewal: None,
        })
    }

    /// Tells the relay that this attempt goes on (DESIGN §14, `Picloud-Status: working`, with
    /// `Picloud-Progress` when `progress` is given, 0–100): its deadline moves to the handler
    /// timeout from now, up to `PICLOUD_MAX_WORKING_MS` after the attempt started. Say it well
    /// before the deadline, as often as you like; [`Delivery::long_running`] does it for you.
    ///
    /// Once the relay moved the deadline, it sends back a delivery token for the new one:
    /// [`Delivery::current_token`] and [`Delivery::current_deadline_ms`] then give it
    /// ([`Delivery::token`] expires at the first deadline).
    ///
    /// A sync call (`picloudkind` `http`) keeps its deadline (the handler timeout: its caller
    /// waits), and a delivery read with [`Delivery::from_json`] has no reply subject: for those it
    /// sends nothing.
    pub async fn working(&self, progress: Option<u8>) -> Result<(), async_nats::PublishError> {
        let Some((client, subject)) =
            self.reply.as_ref().filter(|_| self.event.picloudkind != EventKind::Http.as_str())
        else {
            return Ok(());
        };
        let mut headers = HeaderMap::new();
        Working { progress }.write_headers(|name, value| headers.insert(name, value));
        match &self.renewal {
            Some((renew_to, _)) => {
                client
                    .publish_with_reply_and_headers(subject.clone(), renew_to.clone(), headers, Bytes::new())
                    .await
            }
            None => client.publish_with_headers(subject.clone(), headers, Bytes::new()).await,
        }
    }

    /// The delivery token valid now: the one the relay sent for the deadline a
    /// [`Delivery::working`] moved, or else [`Delivery::token`].
    pub fn current_token(&self) -> Option<String> {
        self.renewed().map(|r| r.picloudtoken).or_else(|| self.token.clone())
    }

    /// The attempt's deadline now, in Unix milliseconds: the one a [`Delivery::working`] moved
    /// it to, once the relay confirmed it, or else [`Delivery::deadline_ms`].
    pub fn current_deadline_ms(&self) -> i64 {
        self.renewed().map_or(self.deadline_ms, |r| r.piclouddeadline)
    }

    /// The renewal kept for this delivery, if it is later than this attempt's own deadline (one
    /// of an earlier attempt still running here is not).
    fn renewed(&self) -> Option<picloud_core::protocol::Renewal> {
        let (_, renewed) = self.renewal.as_ref()?;
        renewed.lock().expect("renewal lock").clone().filter(|r| r.piclouddeadline > self.deadline_ms)
    }

    /// Runs `work`, telling the relay the attempt goes on ([`Delivery::working`]) every third of
    /// the time its deadline left when `work` began (at least every 100 ms), until `work` ends.
    pub async fn long_running<F: Future>(&self, work: F) -> F::Output {
        let left = u64::try_from(self.deadline_ms - record::now_ms()).unwrap_or(0);
        let every = Duration::from_millis(left / 3).max(Duration::from_millis(100));
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tokio::pin!(work);
        loop {
            tokio::select! {
                done = &mut work => return done,
                _ = ticks.tick() => {
                    if let Err(e) = self.working(None).await {
                        tracing::warn!(delivery_id = %self.id, error = %e, "could not say the delivery is working");
                    }
                }
            }
        }
    }

    /// Fires when the delivery is cancelled (DESIGN §14, `POST …/deliveries/{id}/cancel`): the
    /// worker then drops the handler's future and answers `fail`, which retries nothing. Hand it
    /// to work the handler spawned, which dropping the future does not stop. A delivery read with
    /// [`Delivery::from_json`] is never cancelled.
    pub fn cancellation(&self) -> CancellationToken {
        self.cancellation.clone()
    }

    /// The event data, deserialized.
    pub fn data<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.event.data.get())
    }

    /// The event data as raw JSON.
    pub fn raw_data(&self) -> &RawValue {
        &self.event.data
    }

    /// The event's ordering key (DESIGN §13): a KV entry's `<collection>/<key>`, a job's
    /// `ordering_key`, a message's `Picloud-Ordering-Key`; `None` when it has none.
    pub fn ordering_key(&self) -> Option<&str> {
        self.event.picloudorderingkey.as_deref()
    }
}

/// A handler's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Done; the body goes to a sync caller.
    Ok(Bytes),
    /// Try again later: after `after` if given, else with the trigger's backoff.
    Retry {
        /// The delay asked for.
        after: Option<Duration>,
        /// Why.
        error: String,
    },
    /// A permanent failure: the delivery becomes a dead letter at once.
    Fail(String),
}

impl Reply {
    /// `ok` with a JSON body.
    pub fn ok(body: impl serde::Serialize) -> Reply {
        Reply::Ok(serde_json::to_vec(&body).map(Bytes::from).unwrap_or_default())
    }

    /// `retry` with the trigger's backoff.
    pub fn retry(error: impl Into<String>) -> Reply {
        Reply::Retry { after: None, error: error.into() }
    }

    /// `retry` after a delay of your choosing (capped by the trigger's maximum backoff).
    pub fn retry_after(after: Duration, error: impl Into<String>) -> Reply {
        Reply::Retry { after: Some(after), error: error.into() }
    }

    /// `fail`: do not try again.
    pub fn fail(error: impl Into<String>) -> Reply {
        Reply::Fail(error.into())
    }

    /// The headers and body of this answer on the wire.
    pub fn into_message(self) -> (HeaderMap, Bytes) {
        let (head, body) = match self {
            Reply::Ok(body) => (AnswerHead::Ok, body),
            Reply::Retry { after, error } => (AnswerHead::Retry { after, error: Some(error) }, Bytes::new()),
            Reply::Fail(error) => (AnswerHead::Fail { error: Some(error) }, Bytes::new()),
        };
        let mut headers = HeaderMap::new();
        head.write_headers(|name, value| headers.insert(name, value));
        (headers, body)
    }
}

type HandlerFn = Arc<dyn Fn(Delivery) -> BoxFuture<'static, HandlerResult> + Send + Sync>;

/// Handlers of one app, served over one NATS connection.
pub struct Worker {
    client: Client,
    app: Result<AppSlug, NameError>,
    subjects: Result<Subjects, String>,
    handlers: Vec<(Result<HandlerName, NameError>, HandlerFn)>,
    concurrency: usize,
    record: Option<Record>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("app", &self.app).field("handlers", &self.handlers.len()).finish()
    }
}

impl Worker {
    /// Connects to NATS (`url` may list several servers, comma-separated) for `app`, with the
    /// app's inbox prefix `_INBOX_<app>`.
    pub async fn connect(url: &str, app: &str) -> Result<Worker, Error> {
        let client = async_nats::ConnectOptions::new()
            .custom_inbox_prefix(format!("_INBOX_{app}"))
            .connect(url)
            .await?;
        Ok(Worker::new(client, app))
    }

    /// A worker over an existing connection. Connect it with the app's inbox prefix
    /// (`ConnectOptions::custom_inbox_prefix("_INBOX_<app>")`, as [`Worker::connect`] does): the
    /// shipped NATS permissions require it, and a working delivery gets the token of its moved
    /// deadline only there.
    pub fn new(client: Client, app: &str) -> Worker {
        Worker {
            client,
            app: AppSlug::parse(app),
            subjects: Ok(Subjects::default()),
            handlers: Vec::new(),
            concurrency: 256,
            record: None,
        }
    }

    /// Uses another subject prefix than `picloud`.
    pub fn prefix(mut self, prefix: &str) -> Worker {
        self.subjects = Subjects::new(prefix);
        self
    }

    /// How many deliveries each handler processes at once (default 256).
    pub fn concurrency(mut self, n: usize) -> Worker {
        self.concurrency = n.max(1);
        self
    }

    /// Keeps every delivery handed to a handler in `record`: when it started and ended, for
    /// its handler's in-flight counts and its key's order.
    pub fn record(mut self, record: &Record) -> Worker {
        self.record = Some(record.clone());
        self
    }

    /// Serves handler `name` with `f`. An `Err` from `f` is answered as `retry`.
    pub fn handle<F, Fut>(mut self, name: &str, f: F) -> Worker
    where
        F: Fn(Delivery) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let f: HandlerFn = Arc::new(move |d| Box::pin(f(d)));
        self.handlers.push((HandlerName::parse(name), f));
        self
    }

    /// Serves until `shutdown` resolves, then stops taking deliveries, finishes those in hand,
    /// flushes their replies and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        let running = self.start().await?;
        shutdown.await;
        running.shutdown().await;
        Ok(())
    }

    /// Subscribes every handler and starts serving; returns once the server has the
    /// subscriptions. Stop with [`Running::shutdown`].
    pub async fn start(self) -> Result<Running, Error> {
        let app = self.app?;
        let subjects = self.subjects.map_err(Error::Prefix)?;
        let mut queues = Vec::with_capacity(self.handlers.len());
        let mut cancel_subjects = Vec::with_capacity(self.handlers.len());
        let in_hand = InHand::new(&self.client, app.as_str());
        for (name, f) in self.handlers {
            let name = name?;
            cancel_subjects.push(subjects.cancel(app.as_str(), name.as_str()));
            let f = match &self.record {
                Some(record) => recorded(record.clone(), name.as_str().to_owned(), f),
                None => f,
            };
            let (client, in_hand) = (self.client.clone(), in_hand.clone());
            queues.push(Queue::new(
                subjects.handle(app.as_str(), name.as_str()),
                subjects.handle_queue_group(app.as_str(), name.as_str()),
                move |msg| {
                    let (client, in_hand, f) = (client.clone(), in_hand.clone(), f.clone());
                    async move { answer(&client, &in_hand, msg, &f).await }
                },
            ));
        }
        // Confirmed by the queues' round trip.
        let listening = in_hand.listen(&self.client, cancel_subjects).await?;
        let (stop, shutdown) = Shutdown::new();
        let serving = serve_queues(&self.client, queues, self.concurrency, shutdown).await?;
        Ok(Running { stop, serving, listening })
    }
}

/// A started worker.
#[derive(Debug)]
pub struct Running {
    /// Tells every handler's loop to drain.
    stop: ShutdownSender,
    serving: Serving,
    /// Reads the cancel notices and renewals until the deliveries in hand are finished.
    listening: tokio::task::JoinSet<()>,
}

impl Running {
    /// Stops taking deliveries, finishes those in hand and flushes their replies.
    pub async fn shutdown(self) {
        let Running { stop, serving, mut listening } = self;
        stop.send();
        serving.finished().await;
        listening.shutdown().await;
    }
}

/// `f`, noting in `record` when each delivery of `handler` starts and ends: answered, or
/// cancelled (its future dropped).
fn recorded(record: Record, handler: String, f: HandlerFn) -> HandlerFn {
    Arc::new(move |d: Delivery| {
        let ending = record::Ending::new(&record, record.started(&handler, &d));
        let answering = f(d);
        Box::pin(async move {
            let answered = answering.await;
            drop(ending);
            answered
        })
    })
}

async fn answer(client: &Client, in_hand: &InHand, msg: Message, f: &HandlerFn) {
    let Some(reply_to) = msg.reply.clone() else { return };
    let reply = match Delivery::from_json(&msg.payload) {
        Ok(mut delivery) => {
            delivery.reply = Some((client.clone(), reply_to.clone()));
            let id = delivery.id;
            let taken = in_hand.take(id, delivery.attempt);
            delivery.cancellation = taken.cancellation.clone();
            delivery.renewal = taken.renewal.clone();
            if taken.cancellation.is_cancelled() {
                // Its notice came first: the handler never sees it.
                Reply::fail("cancelled")
            } else {
                tokio::select! {
                    () = taken.cancellation.cancelled() => Reply::fail("cancelled"),
                    answered = f(delivery) => match answered {
                        Ok(reply) => reply,
                        Err(e) => {
                            tracing::warn!(delivery_id = %id, error = %e, "handler error; answering retry");
                            Reply::retry(e.to_string())
                        }
                    },
                }
            }
        }
        Err(e) => Reply::fail(format!("malformed delivery: {e}")),
    };
    let (headers, body) = reply.into_message();
    if let Err(e) = client.publish_with_headers(reply_to, headers, body).await {
        tracing::warn!(error = %e, "could not send a reply");
    }
}
