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
//! A trigger with `batch` (DESIGN §14) sends its deliveries many to a request: a handler served
//! with [`Worker::handle_batch`] gets them together and answers them with one [`BatchReply`]; a
//! handler served with [`Worker::handle`] gets each of them by itself all the same.
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

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, HeaderMap, Message};
use bytes::Bytes;
use futures::future::BoxFuture;
use in_hand::{InHand, Renewed};
use picloud_core::protocol::{
    AnswerHead, BatchResults, CLOUDEVENTS_BATCH_CONTENT_TYPE, CONTENT_TYPE_HEADER, Envelope, EventKind,
    Subjects, Working,
};
use picloud_core::{AppSlug, HandlerName, NameError};
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use uuid::Uuid;

pub use picloud_core::protocol::ReplyStatus;
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

/// What a batch handler returns: a reply for the batch, or an error that is answered as `retry`
/// for every delivery in it.
pub type BatchResult = Result<BatchReply, Box<dyn std::error::Error + Send + Sync>>;

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
        serde_json::from_slice(body).map(Delivery::from_envelope)
    }

    /// Parses a batch's body (a JSON array of envelopes, DESIGN §14).
    pub fn batch_from_json(body: &[u8]) -> Result<Vec<Delivery>, serde_json::Error> {
        serde_json::from_slice::<Vec<Envelope>>(body)
            .map(|events| events.into_iter().map(Delivery::from_envelope).collect())
    }

    fn from_envelope(event: Envelope) -> Delivery {
        Delivery {
            id: event.id,
            attempt: event.picloudattempt,
            depth: event.piclouddepth,
            token: event.picloudtoken.clone(),
            deadline_ms: event.piclouddeadline,
            event,
            reply: None,
            cancellation: CancellationToken::new(),
            renewal: None,
        }
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
    /// The deliveries of a batch share one request: `working` on any of them moves the deadline
    /// of all, and the token of the moved deadline comes to the one that said it.
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

    /// Its status.
    pub fn status(&self) -> ReplyStatus {
        match self {
            Reply::Ok(_) => ReplyStatus::Ok,
            Reply::Retry { .. } => ReplyStatus::Retry,
            Reply::Fail(_) => ReplyStatus::Fail,
        }
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

/// A batch handler's answer (DESIGN §14): one reply for every delivery of the batch, but those
/// given a status of their own.
///
/// ```
/// use picloud_worker::{BatchReply, Reply, ReplyStatus};
/// # let (stored, rejected) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
/// let mut reply = BatchReply::ok();
/// reply.set(rejected, ReplyStatus::Fail);
/// let all_busy = BatchReply::all(Reply::retry("the database is busy"));
/// # let _ = (stored, all_busy);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct BatchReply {
    all: Reply,
    results: BTreeMap<Uuid, ReplyStatus>,
}

impl BatchReply {
    /// `ok` for every delivery.
    pub fn ok() -> BatchReply {
        BatchReply::all(Reply::Ok(Bytes::new()))
    }

    /// `reply` for every delivery: its status, error text and delay.
    pub fn all(reply: Reply) -> BatchReply {
        BatchReply { all: reply, results: BTreeMap::new() }
    }

    /// `status` for delivery `id`, whatever the others get (without the error text or delay of
    /// the reply for all: a batch's results carry statuses only).
    pub fn set(&mut self, id: Uuid, status: ReplyStatus) -> &mut BatchReply {
        self.results.insert(id, status);
        self
    }

    /// The reply delivery `id` gets.
    fn of(&self, id: Uuid) -> Reply {
        match self.results.get(&id) {
            None => self.all.clone(),
            Some(&status) if status == self.all.status() => self.all.clone(),
            Some(ReplyStatus::Ok) => Reply::Ok(Bytes::new()),
            Some(ReplyStatus::Retry) => {
                Reply::Retry { after: None, error: "the batch's results ask to retry".into() }
            }
            Some(ReplyStatus::Fail) => Reply::Fail("the batch's results fail it".into()),
        }
    }

    /// The headers and body of this answer on the wire: the reply for all in the headers, and
    /// the statuses of their own in a `{"results": …}` body.
    pub fn into_message(self) -> (HeaderMap, Bytes) {
        let (headers, body) = self.all.into_message();
        if self.results.is_empty() {
            return (headers, body);
        }
        let results =
            serde_json::to_vec(&BatchResults { results: self.results }).expect("batch results serialize");
        (headers, Bytes::from(results))
    }
}

type HandlerFn = Arc<dyn Fn(Delivery) -> BoxFuture<'static, HandlerResult> + Send + Sync>;
type BatchFn = Arc<dyn Fn(Vec<Delivery>) -> BoxFuture<'static, BatchResult> + Send + Sync>;

/// How a handler takes its deliveries.
#[derive(Clone)]
enum Serve {
    /// One at a time.
    One(HandlerFn),
    /// A batch at a time.
    Batch(BatchFn),
}

/// Handlers of one app, served over one NATS connection.
pub struct Worker {
    client: Client,
    app: Result<AppSlug, NameError>,
    subjects: Result<Subjects, String>,
    handlers: Vec<(Result<HandlerName, NameError>, Serve)>,
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
        self.handlers.push((HandlerName::parse(name), Serve::One(f)));
        self
    }

    /// Serves handler `name` with `f`, which takes the deliveries of a batch together (DESIGN
    /// §14: a trigger with `batch`), in their order; a delivery that comes alone is a batch of
    /// one. An `Err` from `f` is answered as `retry` for the whole batch. A delivery cancelled
    /// while its batch runs fires its [`Delivery::cancellation`]; the batch goes on.
    pub fn handle_batch<F, Fut>(mut self, name: &str, f: F) -> Worker
    where
        F: Fn(Vec<Delivery>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = BatchResult> + Send + 'static,
    {
        let f: BatchFn = Arc::new(move |d| Box::pin(f(d)));
        self.handlers.push((HandlerName::parse(name), Serve::Batch(f)));
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
fn recorded(record: Record, handler: String, f: Serve) -> Serve {
    match f {
        Serve::One(f) => Serve::One(Arc::new(move |d: Delivery| {
            let ending = record::Ending::new(&record, record.started(&handler, &d));
            let answering = f(d);
            Box::pin(async move {
                let answered = answering.await;
                drop(ending);
                answered
            })
        })),
        Serve::Batch(f) => Serve::Batch(Arc::new(move |batch: Vec<Delivery>| {
            let endings: Vec<_> =
                batch.iter().map(|d| record::Ending::new(&record, record.started(&handler, d))).collect();
            let answering = f(batch);
            Box::pin(async move {
                let answered = answering.await;
                drop(endings);
                answered
            })
        })),
    }
}

async fn answer(client: &Client, in_hand: &InHand, msg: Message, f: &Serve) {
    let Some(reply_to) = msg.reply.clone() else { return };
    let batch = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(CONTENT_TYPE_HEADER))
        .is_some_and(|v| v.as_str() == CLOUDEVENTS_BATCH_CONTENT_TYPE);
    let (headers, body) = if batch {
        match Delivery::batch_from_json(&msg.payload) {
            Ok(deliveries) => answer_batch(client, in_hand, &reply_to, deliveries, f).await.into_message(),
            Err(e) => Reply::fail(format!("malformed batch: {e}")).into_message(),
        }
    } else {
        match Delivery::from_json(&msg.payload) {
            Ok(delivery) => {
                tracing::trace!(delivery_id = %delivery.id, "delivery received");
                answer_one(client, in_hand, &reply_to, delivery, f).await.into_message()
            }
            Err(e) => Reply::fail(format!("malformed delivery: {e}")).into_message(),
        }
    };
    if let Err(e) = client.publish_with_headers(reply_to, headers, body).await {
        tracing::warn!(error = %e, "could not send a reply");
    }
}

/// Takes `delivery` in hand until the guard returned drops: its `working` replies go to
/// `reply_to`, and its cancellation and renewals are its own.
fn in_hand_for(
    client: &Client,
    in_hand: &InHand,
    reply_to: &async_nats::Subject,
    delivery: &mut Delivery,
) -> in_hand::Taken {
    delivery.reply = Some((client.clone(), reply_to.clone()));
    let taken = in_hand.take(delivery.id, delivery.attempt);
    delivery.cancellation = taken.cancellation.clone();
    delivery.renewal = taken.renewal.clone();
    taken
}

/// A delivery that came alone: its handler's reply, or `fail` once it is cancelled.
async fn answer_one(
    client: &Client,
    in_hand: &InHand,
    reply_to: &async_nats::Subject,
    mut delivery: Delivery,
    f: &Serve,
) -> Reply {
    let id = delivery.id;
    let taken = in_hand_for(client, in_hand, reply_to, &mut delivery);
    if taken.cancellation.is_cancelled() {
        // Its notice came first: the handler never sees it.
        return Reply::fail("cancelled");
    }
    let answering = async {
        match f {
            Serve::One(f) => f(delivery).await,
            Serve::Batch(f) => f(vec![delivery]).await.map(|batch| batch.of(id)),
        }
    };
    tokio::select! {
        () = taken.cancellation.cancelled() => Reply::fail("cancelled"),
        answered = answering => answered.unwrap_or_else(|e| {
            tracing::warn!(delivery_id = %id, error = %e, "handler error; answering retry");
            Reply::retry(e.to_string())
        }),
    }
}

/// The deliveries of a batch: a batch handler's reply (those cancelled before it began are
/// failed and not handed to it), or, for a handler of one delivery at a time, each one's reply
/// as its status.
async fn answer_batch(
    client: &Client,
    in_hand: &InHand,
    reply_to: &async_nats::Subject,
    deliveries: Vec<Delivery>,
    f: &Serve,
) -> BatchReply {
    let f = match f {
        Serve::Batch(f) => f,
        Serve::One(_) => {
            let replies = futures::future::join_all(
                deliveries
                    .into_iter()
                    .map(|d| async move { (d.id, answer_one(client, in_hand, reply_to, d, f).await) }),
            )
            .await;
            let mut reply = BatchReply::ok();
            for (id, answered) in replies {
                reply.set(id, answered.status());
            }
            return reply;
        }
    };
    let mut taken = Vec::with_capacity(deliveries.len());
    let mut handed = Vec::with_capacity(deliveries.len());
    let mut cancelled = Vec::new();
    for mut delivery in deliveries {
        let held = in_hand_for(client, in_hand, reply_to, &mut delivery);
        if held.cancellation.is_cancelled() {
            cancelled.push(delivery.id);
        } else {
            handed.push(delivery);
        }
        taken.push(held);
    }
    // One request, one deadline: the token a `working` of any of them brings back is every one's.
    if let Some(renewal) = handed.first().and_then(|d| d.renewal.clone()) {
        for delivery in &mut handed {
            delivery.renewal = Some(renewal.clone());
        }
    }
    let mut reply = if handed.is_empty() {
        BatchReply::all(Reply::fail("cancelled"))
    } else {
        f(handed).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "batch handler error; answering retry");
            BatchReply::all(Reply::retry(e.to_string()))
        })
    };
    for id in cancelled {
        reply.set(id, ReplyStatus::Fail);
    }
    drop(taken);
    reply
}
