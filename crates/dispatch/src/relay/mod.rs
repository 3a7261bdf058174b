//! The relay loop: claim, deliver, read answers, expire, complete.
//!
//! Tasks, all sharing one [`Shared`]:
//! - two **claimers** each take a batch of free slots, claims up to that many due rows, checks each
//!   row's registering principal, publishes the envelopes and records them as in flight;
//! - the **responder** reads the relay's own inbox (`<inbox>.<app>.<seq>`) and turns replies into
//!   answers, each taken only from the delivery's own app; a `working` reply asks for a longer lease;
//! - the **lease extender** writes those longer leases and then moves the deliveries' deadlines,
//!   and sends a handler that asked for it the delivery token of its moved deadline (after
//!   checking its principal again, in a task of its own);
//! - the **timer** turns in-flight deliveries past their deadline into timeouts;
//! - the **watchman** gives back the deliveries in flight on a NATS connection that was lost:
//!   their answers cannot arrive any more, so they are tried again within a second without spending an
//!   attempt (one whose handler said `working` is kept, and given back at its deadline);
//! - the **completer** counts each answer out of its app's share and its trigger's slots as it
//!   arrives (starting, in a task, the rows of limited triggers that waited ahead of a slot),
//!   batches the answers into one transaction at a time and gives the relay's slots back once it
//!   commits; it also forwards sync results to their callers;
//! - the **listener** turns `LISTEN/NOTIFY` wake-ups, and the rows this node's writers hand
//!   over, into a nudge for the claimer (with the rows they name, to claim by id);
//! - the **batcher** sends the batches (DESIGN §14) whose first row has waited long enough
//!   (`batch.rs`).

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::client::PublishErrorKind;
use async_nats::{Client, HeaderMap, Subscriber};
use futures::StreamExt as _;
use picloud_core::protocol::{
    AnswerInbox, CLOUDEVENTS_BATCH_CONTENT_TYPE, CLOUDEVENTS_CONTENT_TYPE, CONTENT_TYPE_HEADER, EventKind,
    Renewal, in_app_inbox,
};
use picloud_core::token::DeliveryToken;
use picloud_core::{Access, AppId, AppSlug, Batch, Capability, RetryPolicy, TriggerId};
use picloud_store::{
    AbandonReason, Claim, ClaimedDelivery, DeliveryTarget, Handler, LeaseExtension, Store, Wakeup, Wakeups,
    WrittenHere,
};
use picloud_worker::Shutdown;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use uuid::Uuid;

use crate::abandoned::abandon;
use crate::answer::{self, Answer, BatchAnswer};
use crate::complete::{Done, complete};
use crate::config::{NodeConfig, RelayConfig};
use crate::connection::ConnectionWatch;
use crate::envelope::{RunAs, envelope};
use crate::limits::{Finished, Limits, Started};
use crate::metrics::RelayMetrics;
use crate::report::Reporter;
use crate::shares::{Round, Shares};

mod batch;
mod claim;
use batch::{BatchKey, Gathering, Ready};
use claim::{Claimable, claim_loop};

/// Claim loops per relay: while one publishes its batch, the other claims the next.
const CLAIMERS: usize = 2;
/// Answers batched into one completion transaction, at most.
const MAX_COMPLETION_BATCH: usize = 2000;
/// Completion transactions running at once. One: while it commits, answers pile up and the next
/// transaction takes them all, so batches grow with the load.
const CONCURRENT_FLUSHES: usize = 1;
/// Tries of one completion transaction before its rows are left to their leases.
const FLUSH_TRIES: u32 = 6;
/// How often a delivery's lease moves for its handler's `working` replies, at most (or a quarter
/// of the handler timeout, if that is shorter): one write per delivery however often it says so.
const EXTEND_EVERY: Duration = Duration::from_secs(1);
/// Bytes of a batch's `max_payload` kept for its header: a batch is split before its envelopes
/// and the header together could exceed the server's limit.
const BATCH_HEADER_ROOM: usize = 1024;
/// How soon the timer looks again at a delivery whose deadline came while its longer lease was
/// being written.
const EXTENDING_RECHECK: Duration = Duration::from_millis(20);

/// Why a relay could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The relay's inbox subscription failed.
    #[error("subscribing to the relay inbox failed: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    /// `LISTEN` failed.
    #[error("listening for outbox notifications failed: {0}")]
    Listen(#[source] picloud_store::Error),
}

/// A relay over a store and a NATS connection.
#[derive(Debug)]
pub struct Relay<S> {
    store: S,
    nats: Client,
    config: RelayConfig,
    /// The rows this node's writers wrote, handed over in memory.
    written_here: Option<WrittenHere>,
}

/// The deliveries published and not answered yet.
#[derive(Debug, Default)]
struct InFlight {
    /// By sequence number (the last token of the reply subject).
    pending: HashMap<u64, Sent>,
    /// Deadlines in the order they were set; every delivery has the same timeout, so this is
    /// also deadline order. Entries of answered deliveries stay until they come due.
    deadlines: VecDeque<(Instant, u64)>,
    /// Deadlines that `working` replies moved, in deadline order: a delivery whose first deadline
    /// comes finds its later one here.
    extended: BTreeSet<(Instant, u64)>,
    /// Deliveries whose handlers asked for a longer lease that is not written yet.
    to_extend: Vec<u64>,
}

/// One delivery in flight.
#[derive(Debug)]
struct Sent {
    /// When it was published.
    at: Instant,
    /// The connection losses counted when it was published: once the count moves past this, its
    /// answer can no longer arrive.
    losses: u64,
    /// How to complete it.
    done: Done,
    /// When its answer is due: the deadline it was published with, or a later one that a
    /// `working` reply asked for, once its lease moved with it.
    deadline: Instant,
    /// When a `working` reply last asked for a longer lease.
    extended_at: Option<Instant>,
    /// Its longer lease is being written: its deadline waits for the write.
    extending: bool,
    /// The progress its handler last reported, written with its next longer lease.
    progress: Option<u8>,
    /// What its delivery token says (absent for emails): signed again for a moved deadline.
    claims: Option<DeliveryToken>,
    /// Where the handler's last `working` asked for the token of its moved deadline.
    renew_to: Option<async_nats::Subject>,
    /// When it went as a batch (DESIGN §14): the batch's other deliveries, which share its
    /// request, deadline and lease moves.
    batch: Option<Vec<Done>>,
}

impl Sent {
    /// Every delivery it carries.
    fn deliveries(&self) -> impl Iterator<Item = &Done> {
        std::iter::once(&self.done).chain(self.batch.iter().flatten())
    }

    /// Hands every delivery it carries to the completer, each with its `answer`, timed in the
    /// metrics from its publishing.
    fn answered(
        self,
        metrics: &RelayMetrics,
        answer: impl Fn(&Done) -> Answer,
        done_tx: &mpsc::UnboundedSender<Done>,
    ) {
        let after = self.at.elapsed();
        for mut done in std::iter::once(self.done).chain(self.batch.into_iter().flatten()) {
            done.answer = answer(&done);
            done.latency = Some(after);
            metrics.answered(&done.answer, after);
            let _ = done_tx.send(done);
        }
    }
}

#[derive(Debug)]
struct Shared<S> {
    store: S,
    /// Makes the reports of completed batches (statistics, tails) without holding them up.
    reporter: Reporter,
    nats: Client,
    config: RelayConfig,
    /// Reply subjects are `<inbox>.<app>.<seq>`; the responder subscribes to `<inbox>.*.*`.
    inbox: AnswerInbox,
    next_seq: AtomicU64,
    in_flight: Mutex<InFlight>,
    /// Free delivery slots (`max_in_flight` in all): the claimer takes one per claimed row, the
    /// completer gives them back once the row's completion committed. Bounds memory and the
    /// work a relay holds leases on.
    slots: Arc<Semaphore>,
    /// Nudges the claimer: rows may have been written.
    wake: Notify,
    /// Nudges the timer: a deadline was queued while none was.
    timer: Notify,
    /// Nudges the lease extender: a handler said `working`.
    extend: Notify,
    /// Set once the relay was told to stop: no deadline moves any more, so that what is in flight
    /// ends within the handler timeout.
    stopping: AtomicBool,
    /// Signalled whenever the in-flight table becomes empty (shutdown waits on it).
    drained: Notify,
    /// The one header of every delivery.
    headers: HeaderMap,
    /// The one header of every batch.
    batch_headers: HeaderMap,
    /// Rows of batch triggers waiting for their batch to fill.
    gathering: Mutex<Gathering>,
    /// Nudges the batcher: a row waits for its batch.
    gathered: Notify,
    /// Triggers and principals' standing as read at one configuration epoch; valid for every
    /// claim that reports the same epoch.
    targets: Mutex<TargetCache>,
    /// What this relay records, labelled with its node.
    metrics: RelayMetrics,
    /// Losses of the NATS connection the replies come back on.
    connection: ConnectionWatch,
    /// The slots of limited triggers this relay holds.
    limits: Limits,
    /// Its deliveries in flight per app, each app within its share.
    shares: Shares,
    /// What may be claimable that the claimer has not looked for since.
    claimable: Claimable,
}

#[derive(Debug, Default)]
struct TargetCache {
    epoch: Option<i64>,
    targets: HashMap<TriggerId, DeliveryTarget>,
}

impl<S: Store> Relay<S> {
    /// A relay; nothing runs until [`Relay::run`].
    pub fn new(store: S, nats: Client, config: RelayConfig) -> Self {
        Self { store, nats, config, written_here: None }
    }

    /// The relay takes the rows this node's writers wrote as they hand them over
    /// ([`picloud_store::PgStore::hand_written`]): at once while it has room for them (a claim
    /// by their ids, without the `NOTIFY` hop), and otherwise it wakes every relay for them.
    pub fn taking_written(self, written_here: WrittenHere) -> Self {
        Self { written_here: Some(written_here), ..self }
    }

    /// Runs until `shutdown`, then stops claiming, waits for every delivery in flight to be
    /// answered or to time out, completes them, writes the statistics it has merged, and
    /// returns.
    pub async fn run(self, mut shutdown: Shutdown) -> Result<(), RelayError> {
        let inbox = AnswerInbox::new(self.nats.new_inbox());
        let replies = self.nats.subscribe(inbox.subscription()).await?;
        let wakeups = self.store.listen().await.map_err(RelayError::Listen)?;
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE_HEADER, CLOUDEVENTS_CONTENT_TYPE);
        let mut batch_headers = HeaderMap::new();
        batch_headers.insert(CONTENT_TYPE_HEADER, CLOUDEVENTS_BATCH_CONTENT_TYPE);
        let max_in_flight = self.config.max_in_flight.max(1);
        let metrics = RelayMetrics::new(&self.config.node.node_id);
        let connection = ConnectionWatch::spawn(&self.nats);
        let shares = Shares::new(self.config.app_share());
        let lease_margin = self.config.node.lease_margin;
        let reporter = Reporter::spawn(self.store.clone(), self.nats.clone(), self.config.node.clone());
        let shared = Arc::new(Shared {
            reporter,
            store: self.store,
            nats: self.nats,
            config: self.config,
            inbox,
            next_seq: AtomicU64::new(0),
            in_flight: Mutex::default(),
            slots: Arc::new(Semaphore::new(max_in_flight)),
            wake: Notify::new(),
            timer: Notify::new(),
            extend: Notify::new(),
            stopping: AtomicBool::new(false),
            drained: Notify::new(),
            headers,
            batch_headers,
            gathering: Mutex::default(),
            gathered: Notify::new(),
            targets: Mutex::default(),
            metrics,
            connection,
            limits: Limits::new(lease_margin / 2),
            shares,
            claimable: Claimable::new(),
        });
        tracing::info!(node = %shared.config.node.node_id, "relay started");
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let listener = tokio::spawn(listen(shared.clone(), wakeups, self.written_here, shutdown.clone()));
        let responder = tokio::spawn(respond(shared.clone(), replies, done_tx.clone()));
        let timer = tokio::spawn(expire(shared.clone(), done_tx.clone()));
        let watchman = tokio::spawn(give_back_on_loss(shared.clone(), done_tx.clone()));
        let extender = tokio::spawn(extend_leases(shared.clone()));
        let batcher = tokio::spawn(send_gathered(shared.clone(), done_tx.clone()));
        let completer = tokio::spawn(complete_loop(shared.clone(), done_rx, done_tx.downgrade()));
        let claimers: Vec<_> = (0..CLAIMERS)
            .map(|_| tokio::spawn(claim_loop(shared.clone(), done_tx.clone(), shutdown.clone())))
            .collect();

        shutdown.recv().await;
        shared.stopping.store(true, Ordering::SeqCst);
        tracing::info!("relay stopping: no new claims; waiting for deliveries in flight");
        // Nothing starts from the queues ahead any more; a claim under way gives back what it
        // takes.
        for row in shared.limits.close() {
            let _ = done_tx.send(given_back(&shared.config, &row, "the relay stopped"));
        }
        for claimer in claimers {
            let _ = claimer.await;
        }
        // No claimer takes rows by id any more: those named to this relay and not claimed, and
        // those handed over since the listener stopped, go to the other relays; the writers
        // name theirs by `NOTIFY` from now on.
        let mut left = shared.claimable.forget_named();
        if let Ok(Some(mut written_here)) = listener.await {
            written_here.close();
            while written_here.try_recv().is_ok() {
                left = true;
            }
        }
        if left {
            wake_other_relays(&shared).await;
        }
        // The batches still filling go now; rows claimed from here on go at once. The batcher
        // ends first, once what it took is in flight, so that the wait below sees it.
        let last = shared.gathering.lock().expect("gathering lock").close();
        shared.gathered.notify_one();
        let _ = batcher.await;
        send_ready(&shared, last, &done_tx).await;
        drop(done_tx);
        wait_drained(&shared).await;
        shared.limits.release(&shared.store).await;
        responder.abort();
        timer.abort();
        watchman.abort();
        extender.abort();
        let _ = (responder.await, timer.await, watchman.await, extender.await);
        let _ = completer.await;
        shared.reporter.flush().await;
        tracing::info!("relay stopped");
        Ok(())
    }
}

async fn wait_drained<S>(shared: &Shared<S>) {
    loop {
        let drained = shared.drained.notified();
        tokio::pin!(drained);
        drained.as_mut().enable();
        if shared.in_flight.lock().expect("in-flight lock").pending.is_empty() && !shared.limits.starting() {
            return;
        }
        drained.await;
    }
}

/// Turns wake-ups and the rows handed over into work for the claimers, until the relay stops:
/// then it returns the rows' receiver (what is left in it goes to the other relays).
async fn listen<S: Store>(
    shared: Arc<Shared<S>>,
    mut wakeups: Wakeups,
    mut written_here: Option<WrittenHere>,
    mut shutdown: Shutdown,
) -> Option<WrittenHere> {
    let mut failures = 0u32;
    loop {
        let woken = tokio::select! {
            woken = wakeups.next() => woken,
            Some(rows) = async { written_here.as_mut()?.recv().await } => {
                take_written_here(&shared, rows).await;
                continue;
            }
            () = shutdown.recv() => return written_here,
        };
        match woken {
            Some(Ok(wakeup)) => {
                tracing::trace!("woken by a notification");
                failures = 0;
                shared.shares.written();
                match wakeup {
                    Wakeup::Written(rows) => shared.claimable.named(rows),
                    Wakeup::Any => shared.claimable.all(),
                }
                shared.wake.notify_one();
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "outbox notifications interrupted; polling meanwhile");
                shared.claimable.all();
                shared.wake.notify_one();
            }
            None => {
                failures += 1;
                tokio::select! {
                    () = tokio::time::sleep(backoff(failures)) => {}
                    () = shutdown.recv() => return written_here,
                }
                match shared.store.listen().await {
                    Ok(fresh) => wakeups = fresh,
                    Err(e) => tracing::warn!(error = %e, "LISTEN failed; polling meanwhile"),
                }
                shared.claimable.all();
                shared.wake.notify_one();
            }
        }
    }
}

/// Rows written on this node, handed over: claimed by their ids at once while the relay has room
/// for them (a claimer can start a round, and no app can pass its share); otherwise every relay
/// is woken for them (this one walks for them too).
async fn take_written_here<S: Store>(shared: &Shared<S>, rows: Vec<Uuid>) {
    tracing::trace!(ids = ?rows, "handed rows written on this node");
    shared.shares.written();
    let room = shared.slots.available_permits() >= claim::claim_batch(&shared.config) as usize
        && shared.shares.room_for_any(rows.len());
    if room {
        shared.claimable.named(rows);
    } else {
        wake_other_relays(shared).await;
        shared.claimable.plain();
    }
    shared.wake.notify_one();
}

/// Wakes every relay (this one too) for rows this relay will not claim by id; best effort, as
/// relays poll.
async fn wake_other_relays<S: Store>(shared: &Shared<S>) {
    if let Err(e) = shared.store.wake_relays().await {
        tracing::warn!(error = %e, "waking the relays failed; they will poll");
    }
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100 * 2u64.pow(failures.min(6)))
}

/// Where the rows of one trigger (or one app's emails) at one depth go, worked out once per
/// claimed batch: the subject, the principal's check and the signed token are the same for all.
pub(crate) struct Plan {
    pub(crate) subject: async_nats::Subject,
    pub(crate) app: AppSlug,
    pub(crate) trigger_name: Option<String>,
    pub(crate) policy: RetryPolicy,
    /// Who the deliveries run as (absent for emails).
    pub(crate) run_as: Option<RunAs>,
}

/// Decides where rows like `row` go, or the answer they get without being sent.
pub(crate) fn plan(
    config: &NodeConfig,
    row: &ClaimedDelivery,
    target: Option<&DeliveryTarget>,
    email_app: Option<&AppSlug>,
    deadline_ms: i64,
) -> Result<Plan, Answer> {
    let Some(trigger_id) = row.trigger_id else {
        let app = email_app.ok_or(Answer::Orphaned)?.clone();
        return Ok(Plan {
            subject: config.subjects.builtin_email().into(),
            app,
            trigger_name: None,
            policy: config.triggers.retry,
            run_as: None,
        });
    };
    let target = target.filter(|t| t.trigger.app_id == row.app_id).ok_or(Answer::Orphaned)?;
    let trigger = &target.trigger;
    let Some(access) = run_as_access(target) else {
        return Err(Answer::Unauthorized(format!(
            "principal {} no longer holds app_admin on app {}; the trigger runs as that principal",
            trigger.registered_by, target.app_slug
        )));
    };
    let app = target.app_slug.as_str();
    let subject = match &trigger.handler {
        Handler::Function(name) => config.subjects.handle(app, name.as_str()),
        Handler::Webhook { .. } => config.subjects.builtin_webhook(),
    };
    let claims = DeliveryToken {
        principal: trigger.registered_by,
        app: row.app_id,
        depth: row.depth + 1,
        deadline_ms,
        scopes: access.delivery_scopes(),
    };
    let token = config.token_key.sign(&claims);
    Ok(Plan {
        subject: subject.into(),
        app: target.app_slug.clone(),
        trigger_name: Some(trigger.name.to_string()),
        policy: config.triggers.retry.with_overrides(&trigger.retry).unwrap_or(config.triggers.retry),
        run_as: Some(RunAs { trigger: trigger.name.to_string(), trigger_id, claims, token }),
    })
}

/// How the deliveries of `target`'s trigger go in batches, if they do. Only a function takes
/// batches: the API refuses `batch` with a webhook handler, and a trigger that got both anyway
/// (two PATCHes racing) goes one delivery at a time.
fn batching(target: &DeliveryTarget) -> Option<Batch> {
    target.trigger.batch.filter(|_| matches!(target.trigger.handler, Handler::Function(_)))
}

/// What the trigger's registering principal may do on its app now, if it may still run the
/// trigger (DESIGN §4: it holds `AppManageTriggers`): the delivery token acts with that.
fn run_as_access(target: &DeliveryTarget) -> Option<Access> {
    let standing = target.standing?;
    let access = Access { platform_admin: standing.platform_admin, role: standing.role, token_scopes: None };
    access.allows(Capability::AppManageTriggers).then_some(access)
}

pub(crate) fn unix_millis_after(d: Duration) -> i64 {
    let now = time::OffsetDateTime::now_utc() + d;
    (now.unix_timestamp_nanos() / 1_000_000) as i64
}

/// The targets of a claimed batch: from the cache while the configuration epoch the claim saw is
/// the one the cache was filled at, else read (and cached) again.
async fn targets_for<S: Store>(
    shared: &Shared<S>,
    rows: &[ClaimedDelivery],
    epoch: Option<i64>,
) -> picloud_store::Result<HashMap<TriggerId, DeliveryTarget>> {
    let mut wanted: Vec<TriggerId> = rows.iter().filter_map(|r| r.trigger_id).collect();
    wanted.sort_unstable();
    wanted.dedup();
    let mut found = HashMap::with_capacity(wanted.len());
    {
        let cache = shared.targets.lock().expect("target cache lock");
        if cache.epoch.is_some() && cache.epoch == epoch {
            wanted.retain(|id| match cache.targets.get(id) {
                Some(target) => {
                    found.insert(*id, target.clone());
                    false
                }
                None => true,
            });
        }
    }
    if wanted.is_empty() {
        return Ok(found);
    }
    let read = shared.store.delivery_targets(&wanted).await?;
    let mut cache = shared.targets.lock().expect("target cache lock");
    if cache.epoch != read.config_epoch {
        cache.targets.clear();
        cache.epoch = read.config_epoch;
    }
    for target in read.targets {
        cache.targets.insert(target.trigger.id, target.clone());
        found.insert(target.trigger.id, target);
    }
    Ok(found)
}

/// Where the rows of a claimed batch go: each trigger's target, and the slug of each app with
/// email rows (`None` for an app that no longer exists). A store error is returned, never taken for a missing app or trigger: only a row
/// whose app or trigger is really gone may be dropped.
async fn read_targets<S: Store>(
    shared: &Shared<S>,
    rows: &[ClaimedDelivery],
    epoch: Option<i64>,
) -> picloud_store::Result<(HashMap<TriggerId, DeliveryTarget>, HashMap<AppId, Option<AppSlug>>)> {
    let targets = targets_for(shared, rows, epoch).await?;
    let mut email_apps = HashMap::new();
    for row in rows.iter().filter(|r| r.kind == EventKind::Email) {
        if let std::collections::hash_map::Entry::Vacant(entry) = email_apps.entry(row.app_id) {
            entry.insert(shared.store.app_by_id(row.app_id).await?.map(|a| a.slug));
        }
    }
    Ok((targets, email_apps))
}

/// One request to publish, and the deliveries it carries.
struct Request {
    seq: u64,
    subject: async_nats::Subject,
    reply: String,
    headers: HeaderMap,
    body: Vec<u8>,
    done: Done,
    batch: Option<Vec<Done>>,
    claims: Option<DeliveryToken>,
}

/// Delivers a claimed batch: works out each trigger's plan once, builds every envelope, records
/// them all as in flight under one lock, then publishes them back to back (so the connection
/// writes them in few syscalls). The rows of batch triggers join their gatherings instead.
async fn deliver<S: Store>(shared: &Shared<S>, claim: Claim, done_tx: &mpsc::UnboundedSender<Done>) {
    let config = &shared.config;
    let rows = claim.rows;
    let (targets, email_apps) = match read_targets(shared, &rows, claim.config_epoch).await {
        Ok(read) => read,
        Err(e) => {
            tracing::warn!(error = %e, rows = rows.len(), "reading where a claimed batch goes failed");
            let error = format!("reading the delivery's trigger failed: {e}");
            // A store that cannot be reached gives the attempt back; any other error is the
            // delivery's own, and spends it (so a row that can never be read ends as a dead letter).
            let answer = if e.is_transient() { Answer::Interrupted(error) } else { Answer::Failed(error) };
            for row in &rows {
                let answer = if row.reply_to.is_some() { Answer::LeaseExpired } else { answer.clone() };
                let _ = done_tx.send(done_for(row, config.node.triggers.retry, answer));
            }
            return;
        }
    };
    let sent = Instant::now();
    let deadline = sent + config.node.handler_timeout;
    let deadline_ms = unix_millis_after(config.node.handler_timeout);
    let mut plans: HashMap<(Option<TriggerId>, AppId, u32), Result<Plan, Answer>> = HashMap::new();
    let mut requests = Vec::with_capacity(rows.len());
    let mut batched: HashMap<BatchKey, (Batch, Vec<ClaimedDelivery>)> = HashMap::new();
    for row in rows {
        let key = (row.trigger_id, row.app_id, row.depth);
        if row.reply_to.is_some() {
            // Sync rows are written claimed by the node their caller waits on; one a relay can
            // claim outlived its lease there, and is never delivered twice.
            tracing::warn!(delivery_id = %row.id, "a sync call outlived its lease; recorded as abandoned, not delivered again");
            let mut done = done_for(&row, config.node.triggers.retry, Answer::LeaseExpired);
            done.trigger_name =
                row.trigger_id.and_then(|id| targets.get(&id)).map(|t| t.trigger.name.to_string());
            let _ = done_tx.send(done);
            continue;
        }
        let target =
            row.trigger_id.and_then(|id| targets.get(&id)).filter(|t| t.trigger.app_id == row.app_id);
        if let (Some(batch), Some(target)) = (target.and_then(batching), target) {
            // Planned when its batch goes (a plan that refuses it refuses it then).
            batched
                .entry((target.trigger.id, row.app_id, row.depth))
                .or_insert_with(|| (batch, Vec::new()))
                .1
                .push(row);
            continue;
        }
        let plan = plans.entry(key).or_insert_with(|| {
            plan(
                &config.node,
                &row,
                target,
                email_apps.get(&row.app_id).and_then(Option::as_ref),
                deadline_ms,
            )
        });
        let plan = match plan {
            Ok(plan) => plan,
            Err(answer) => {
                tracing::info!(delivery_id = %row.id, ?answer, "not delivered");
                let _ = done_tx.send(done_for(&row, config.node.triggers.retry, answer.clone()));
                continue;
            }
        };
        let body = envelope(&row, plan.app.as_str(), plan.run_as.as_ref(), deadline_ms);
        let seq = shared.next_seq.fetch_add(1, Ordering::Relaxed);
        let mut done = done_for(&row, plan.policy, Answer::Timeout);
        done.app_slug = Some(plan.app.clone());
        done.trigger_name = plan.trigger_name.clone();
        requests.push(Request {
            seq,
            subject: plan.subject.clone(),
            reply: shared.inbox.reply_to(plan.app.as_str(), seq),
            headers: shared.headers.clone(),
            body,
            done,
            batch: None,
            claims: plan.run_as.as_ref().map(|r| r.claims),
        });
    }
    launch(shared, requests, sent, deadline, done_tx).await;
    for (key, (batch, rows)) in batched {
        let target = targets.get(&key.0).expect("a batch row's plan was made from its target");
        gather(shared, key, target, batch, rows, done_tx).await;
    }
}

/// Records `requests` as in flight under one lock, then publishes them back to back; a request
/// that cannot be published is answered at once, for every delivery it carries.
async fn launch<S>(
    shared: &Shared<S>,
    requests: Vec<Request>,
    sent: Instant,
    deadline: Instant,
    done_tx: &mpsc::UnboundedSender<Done>,
) {
    let mut outgoing = Vec::with_capacity(requests.len());
    // Only for the trace of what went out (see docs/benchmarks.md, "The async path, timed").
    let mut ids = tracing::enabled!(tracing::Level::TRACE).then(Vec::new);
    {
        let mut table = shared.in_flight.lock().expect("in-flight lock");
        // Read under the lock the watchman takes: a loss counted before this is seen here, one
        // counted after finds these deliveries in the table.
        let losses = shared.connection.losses();
        if table.deadlines.is_empty() && !requests.is_empty() {
            shared.timer.notify_one();
        }
        for Request { seq, subject, reply, headers, body, done, batch, claims } in requests {
            if let Some(ids) = &mut ids {
                ids.push(done.id);
            }
            table.deadlines.push_back((deadline, seq));
            table.pending.insert(
                seq,
                Sent {
                    at: sent,
                    losses,
                    done,
                    deadline,
                    extended_at: None,
                    extending: false,
                    progress: None,
                    claims,
                    renew_to: None,
                    batch,
                },
            );
            outgoing.push((seq, subject, reply, headers, body));
        }
    }
    for (seq, subject, reply, headers, body) in outgoing {
        let bytes = body.len();
        let published =
            shared.nats.publish_with_reply_and_headers(subject, reply, headers, body.into()).await;
        if let Err(e) = published
            && let Some(sent) = take(shared, seq, None)
        {
            tracing::warn!(delivery_id = %sent.done.id, error = %e, "publishing a delivery failed");
            let answer = match e.kind() {
                // No attempt can ever carry it: a permanent failure, not one to retry.
                PublishErrorKind::MaxPayloadExceeded => Answer::Fail(Some(format!(
                    "the delivery's envelope is {bytes} bytes, more than the NATS server's max_payload \
                     ({} bytes): it cannot be delivered",
                    shared.nats.server_info().max_payload
                ))),
                _ => Answer::Failed(format!("publishing failed: {e}")),
            };
            sent.answered(&shared.metrics, |_| answer.clone(), done_tx);
        }
    }
    if let Some(ids) = ids {
        tracing::trace!(?ids, "published");
    }
}

/// Adds claimed rows of a batch trigger to its gathering, and sends what is ready. Rows that
/// could wait longer than their lease allows (half the lease margin; none for a limited trigger's
/// rows) have their leases moved first to cover the wait; those whose lease could not move go at
/// once.
async fn gather<S: Store>(
    shared: &Shared<S>,
    key: BatchKey,
    target: &DeliveryTarget,
    batch: Batch,
    mut rows: Vec<ClaimedDelivery>,
    done_tx: &mpsc::UnboundedSender<Done>,
) {
    let node = &shared.config.node;
    let mut ready = Vec::new();
    // A claimed row has half the lease margin to start in (the other half covers the deadline's
    // grace while a longer lease is written); a row of a limited trigger may have spent it waiting
    // ahead of a slot already.
    let limited = rows.iter().any(|row| row.gated);
    let within = if limited { Duration::ZERO } else { node.lease_margin / 2 };
    let no_more =
        target.trigger.flow.is_some_and(|flow| flow.ordering == picloud_core::flow::Ordering::Trigger);
    if !no_more && batch.max_wait() > within && !shared.stopping.load(Ordering::SeqCst) {
        let lease = node.lease_until(batch.max_wait() + node.handler_timeout);
        let limited = target.trigger.id;
        let wanted: Vec<(LeaseExtension, Option<TriggerId>)> = rows
            .iter()
            .map(|row| {
                let extension = LeaseExtension { id: row.id, attempt: row.attempt, lease, progress: None };
                (extension, row.gated.then_some(limited))
            })
            .collect();
        let kept = lengthen(shared, &wanted).await;
        let (waiting, now): (Vec<_>, Vec<_>) = rows.into_iter().partition(|row| kept.contains(&row.id));
        if !now.is_empty() {
            ready.push(Ready { target: target.clone(), rows: now });
        }
        rows = waiting;
    }
    if !rows.is_empty() {
        let (full, waits) = shared.gathering.lock().expect("gathering lock").add(
            key,
            target,
            batch,
            rows,
            Instant::now(),
            no_more,
        );
        ready.extend(full);
        if waits {
            shared.gathered.notify_one();
        }
    }
    send_ready(shared, ready, done_tx).await;
}

/// Sends batches: each as one request, or as several when their envelopes together would
/// exceed the NATS server's `max_payload`.
async fn send_ready<S>(shared: &Shared<S>, ready: Vec<Ready>, done_tx: &mpsc::UnboundedSender<Done>) {
    for Ready { target, rows } in ready {
        let node = &shared.config.node;
        let sent = Instant::now();
        let deadline = sent + node.handler_timeout;
        let deadline_ms = unix_millis_after(node.handler_timeout);
        let plan = match plan(node, &rows[0], Some(&target), None, deadline_ms) {
            Ok(plan) => plan,
            Err(answer) => {
                for row in &rows {
                    let _ = done_tx.send(done_for(row, node.triggers.retry, answer.clone()));
                }
                continue;
            }
        };
        // The server's limit covers the headers too: the batch's one header has room to spare.
        let max_payload = shared.nats.server_info().max_payload.saturating_sub(BATCH_HEADER_ROOM);
        let mut requests = Vec::new();
        let (mut body, mut carried) = (Vec::new(), Vec::new());
        for row in rows {
            let envelope = envelope(&row, plan.app.as_str(), plan.run_as.as_ref(), deadline_ms);
            if !carried.is_empty() && body.len() + envelope.len() + 1 >= max_payload {
                requests.push(batch_request(
                    shared,
                    &plan,
                    std::mem::take(&mut body),
                    std::mem::take(&mut carried),
                ));
            }
            body.push(if body.is_empty() { b'[' } else { b',' });
            body.extend_from_slice(&envelope);
            let mut done = done_for(&row, plan.policy, Answer::Timeout);
            done.app_slug = Some(plan.app.clone());
            done.trigger_name = plan.trigger_name.clone();
            carried.push(done);
        }
        if !carried.is_empty() {
            requests.push(batch_request(shared, &plan, body, carried));
        }
        launch(shared, requests, sent, deadline, done_tx).await;
    }
}

/// The request of one batch: `body` holds its envelopes, comma-separated after an opening `[`.
fn batch_request<S>(shared: &Shared<S>, plan: &Plan, mut body: Vec<u8>, carried: Vec<Done>) -> Request {
    body.push(b']');
    let seq = shared.next_seq.fetch_add(1, Ordering::Relaxed);
    let mut carried = carried.into_iter();
    let done = carried.next().expect("a batch carries a delivery");
    Request {
        seq,
        subject: plan.subject.clone(),
        reply: shared.inbox.reply_to(plan.app.as_str(), seq),
        headers: shared.batch_headers.clone(),
        body,
        done,
        batch: Some(carried.collect()),
        claims: plan.run_as.as_ref().map(|r| r.claims),
    }
}

/// Sends the batches whose first row has waited `max_wait_ms`, until the gathering closes.
async fn send_gathered<S>(shared: Arc<Shared<S>>, done_tx: mpsc::UnboundedSender<Done>) {
    loop {
        let (ready, next) = shared.gathering.lock().expect("gathering lock").due(Instant::now());
        send_ready(&shared, ready, &done_tx).await;
        let Some(next) = next else { return };
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = shared.gathered.notified() => {}
                }
            }
            None => shared.gathered.notified().await,
        }
    }
}

pub(crate) fn done_for(row: &ClaimedDelivery, policy: RetryPolicy, answer: Answer) -> Done {
    Done {
        id: row.id,
        app_id: row.app_id,
        app_slug: None,
        trigger_id: row.trigger_id,
        trigger_name: None,
        kind: row.kind,
        attempt: row.attempt,
        max_attempts: row.max_attempts,
        reply_to: row.reply_to.clone(),
        dead_letter_id: row.dead_letter_id,
        policy,
        answer,
        email_written_at: (row.kind == EventKind::Email).then_some(row.created_at),
        in_lane: row.in_lane,
        gated: row.gated,
        started_at: time::OffsetDateTime::now_utc(),
        latency: None,
    }
}

/// Whether an answer that names `app` (`None`: the relay's own) may speak for `sent`: an app
/// answers its own deliveries only.
fn answers_for(sent: &Sent, app: Option<&str>) -> bool {
    app.is_none_or(|app| sent.done.app_slug.as_ref().is_some_and(|slug| slug.as_str() == app))
}

/// Removes a delivery from the in-flight table, if `app` may answer it ([`answers_for`]),
/// signalling `drained` when the table empties.
fn take<S>(shared: &Shared<S>, seq: u64, app: Option<&str>) -> Option<Sent> {
    let mut in_flight = shared.in_flight.lock().expect("in-flight lock");
    let Entry::Occupied(sent) = in_flight.pending.entry(seq) else { return None };
    if !answers_for(sent.get(), app) {
        return None;
    }
    let done = Some(sent.remove());
    if in_flight.pending.is_empty() {
        shared.drained.notify_waiters();
    }
    done
}

async fn respond<S>(shared: Arc<Shared<S>>, mut replies: Subscriber, done_tx: mpsc::UnboundedSender<Done>) {
    while let Some(msg) = replies.next().await {
        let Some((app, seq)) = AnswerInbox::parse(&msg.subject) else { continue };
        if let Some(said) = answer::working(&msg) {
            working(&shared, seq, app, said.progress, msg.reply);
            continue;
        }
        match take(&shared, seq, Some(app)) {
            Some(sent) => {
                let answer = BatchAnswer::read(&msg, sent.batch.is_some());
                sent.answered(&shared.metrics, |done| answer.of(done.id), &done_tx);
            }
            None => tracing::debug!(
                seq,
                app,
                "reply ignored: the delivery timed out already, or is not of the app that answered"
            ),
        }
    }
}

async fn expire<S>(shared: Arc<Shared<S>>, done_tx: mpsc::UnboundedSender<Done>) {
    loop {
        let mut expired = Vec::new();
        let next = {
            let mut in_flight = shared.in_flight.lock().expect("in-flight lock");
            let InFlight { pending, deadlines, extended, .. } = &mut *in_flight;
            let now = Instant::now();
            let mut due = Vec::new();
            while let Some(&(deadline, seq)) = deadlines.front() {
                if deadline > now {
                    break;
                }
                deadlines.pop_front();
                due.push(seq);
            }
            while let Some(&(deadline, seq)) = extended.first() {
                if deadline > now {
                    break;
                }
                extended.pop_first();
                due.push(seq);
            }
            for seq in due {
                match pending.get(&seq) {
                    None => {}
                    Some(sent) if sent.deadline > now => {
                        extended.insert((sent.deadline, seq));
                    }
                    // Its longer lease is being written: it waits for the write, but no longer than
                    // half the lease margin past its deadline, well within the lease it has.
                    Some(sent)
                        if sent.extending && now < sent.deadline + shared.config.node.lease_margin / 2 =>
                    {
                        extended.insert((now + EXTENDING_RECHECK, seq));
                    }
                    Some(_) => expired.extend(pending.remove(&seq)),
                }
            }
            if deadlines.len() > 2 * pending.len() + 4096 {
                deadlines.retain(|(_, seq)| pending.contains_key(seq));
            }
            if !expired.is_empty() && pending.is_empty() {
                shared.drained.notify_waiters();
            }
            let first = |entry: Option<&(Instant, u64)>| entry.map(|&(deadline, _)| deadline);
            match (first(deadlines.front()), first(extended.first())) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        let losses = shared.connection.losses();
        for sent in expired {
            // One kept through a lost connection (its handler said `working`) may have answered
            // into the outage: the platform cut it short, so the attempt is given back.
            let answer = if sent.losses < losses {
                Answer::Interrupted("the NATS connection was lost while the delivery worked; its answer may have been lost with it".into())
            } else {
                Answer::Timeout
            };
            sent.answered(
                &shared.metrics,
                |done| {
                    tracing::info!(delivery_id = %done.id, attempt = done.attempt, "no answer before the deadline");
                    answer.clone()
                },
                &done_tx,
            );
        }
        match next {
            Some(deadline) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = shared.timer.notified() => {}
                }
            }
            None => shared.timer.notified().await,
        }
    }
}

/// A handler said `working` (DESIGN §14): its delivery asks for a longer lease (the extender
/// holds it to `PICLOUD_MAX_WORKING_MS`), unless it asked within [`EXTEND_EVERY`], its lease is
/// being written, or the relay is stopping (its deliveries in flight end within their
/// deadlines). A delivery that was answered or timed out already is left alone, and so is a
/// reply from another app than the delivery's. Its `progress`, if given, is kept either way, for
/// the next longer lease to write, and so is its reply subject, where the next moved deadline's
/// token goes ([`picloud_core::protocol::Renewal`]).
fn working<S>(
    shared: &Shared<S>,
    seq: u64,
    app: &str,
    progress: Option<u8>,
    reply: Option<async_nats::Subject>,
) {
    let node = &shared.config.node;
    let every = EXTEND_EVERY.min(node.handler_timeout / 4);
    let now = Instant::now();
    {
        let mut in_flight = shared.in_flight.lock().expect("in-flight lock");
        let InFlight { pending, to_extend, .. } = &mut *in_flight;
        let Some(sent) = pending.get_mut(&seq).filter(|sent| answers_for(sent, Some(app))) else { return };
        sent.progress = progress.or(sent.progress);
        match reply {
            Some(reply) if in_app_inbox(app, &reply) => sent.renew_to = Some(reply),
            Some(reply) => {
                tracing::debug!(%app, %reply, "a working reply asked for its token outside its app's inbox; ignored");
            }
            None => {}
        }
        let recent = sent.extended_at.is_some_and(|at| now < at + every);
        let stopping = shared.stopping.load(Ordering::SeqCst);
        if stopping || sent.extending || recent {
            return;
        }
        sent.extended_at = Some(now);
        sent.extending = true;
        to_extend.push(seq);
    }
    shared.extend.notify_one();
}

/// Writes the longer leases that `working` replies asked for, a batch at a time, and moves each
/// delivery's deadline once its lease moved: a deadline never outlives the lease under it. The new
/// deadline is the handler timeout from now, within `PICLOUD_MAX_WORKING_MS` of the attempt's
/// start; the lease ends the lease margin after it, and so does the relay's slot of a limited
/// trigger, which must not come free under a delivery that still works. A write that fails or
/// takes longer than half the margin (or of the handler timeout) moves no deadline; the handler's
/// next `working` asks again.
async fn extend_leases<S: Store>(shared: Arc<Shared<S>>) {
    let node = &shared.config.node;
    loop {
        shared.extend.notified().await;
        let now = Instant::now();
        // Each: the delivery, its new deadline, its longer lease, and its trigger if limited.
        let wanted: Vec<(u64, Instant, LeaseExtension, Option<TriggerId>)> = {
            let mut in_flight = shared.in_flight.lock().expect("in-flight lock");
            let InFlight { pending, to_extend, .. } = &mut *in_flight;
            let mut wanted = Vec::new();
            for seq in std::mem::take(to_extend) {
                let Some(sent) = pending.get_mut(&seq) else { continue };
                let deadline = (now + node.handler_timeout).min(sent.at + node.max_working);
                if deadline <= sent.deadline {
                    sent.extending = false;
                    continue;
                }
                let lease = node.lease_until(deadline - now);
                // A batch's deliveries move together.
                for done in sent.deliveries() {
                    let row =
                        LeaseExtension { id: done.id, attempt: done.attempt, lease, progress: sent.progress };
                    wanted.push((seq, deadline, row, done.trigger_id.filter(|_| done.gated)));
                }
            }
            wanted
        };
        if wanted.is_empty() {
            continue;
        }
        let rows: Vec<(LeaseExtension, Option<TriggerId>)> =
            wanted.iter().map(|(_, _, row, limited)| (row.clone(), *limited)).collect();
        let extended = lengthen(&shared, &rows).await;
        let mut renewals = Vec::new();
        {
            let mut in_flight = shared.in_flight.lock().expect("in-flight lock");
            for (seq, deadline, row, _) in wanted {
                if let Some(sent) = in_flight.pending.get_mut(&seq) {
                    sent.extending = false;
                    if extended.contains(&row.id) {
                        sent.deadline = deadline;
                        if let (Some(claims), Some(to), Some(trigger)) =
                            (sent.claims, sent.renew_to.take(), sent.done.trigger_id)
                        {
                            renewals.push((to, claims, deadline, trigger));
                        }
                    }
                }
            }
        }
        if !renewals.is_empty() {
            // In a task of its own: the next longer leases never wait for a slow read or send.
            tokio::spawn(renew(shared.clone(), renewals));
        }
    }
}

/// Moves the leases of claimed rows, each with its trigger if limited: the relay's slots of
/// those triggers first, since a lease never outlives the slot under it (a row whose slot is gone
/// keeps the lease it has). Returns the rows whose lease moved: none when the write fails or takes
/// longer than half the lease margin (or of the handler timeout), which is logged.
async fn lengthen<S: Store>(
    shared: &Shared<S>,
    wanted: &[(LeaseExtension, Option<TriggerId>)],
) -> HashSet<Uuid> {
    let node = &shared.config.node;
    let mut limited: Vec<TriggerId> = wanted.iter().filter_map(|(_, limited)| *limited).collect();
    limited.sort_unstable();
    limited.dedup();
    let longest = wanted.iter().map(|(row, _)| row.lease).max().unwrap_or_default();
    let within = (node.lease_margin / 2).min(node.handler_timeout / 2);
    let written = tokio::time::timeout(within, async {
        let kept = shared.limits.extend(&shared.store, &limited, longest).await?;
        let rows: Vec<LeaseExtension> = wanted
            .iter()
            .filter(|(_, limited)| limited.is_none_or(|trigger| kept.contains(&trigger)))
            .map(|(row, _)| row.clone())
            .collect();
        shared.store.extend_leases(&node.node_id, &rows).await
    });
    match written.await {
        Ok(Ok(ids)) => ids.into_iter().collect(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, rows = wanted.len(), "moving the leases of claimed rows failed");
            HashSet::new()
        }
        Err(_) => {
            tracing::warn!(rows = wanted.len(), "moving the leases of claimed rows took too long");
            HashSet::new()
        }
    }
}

/// Sends working deliveries the delivery token of their moved deadline: `(where, what the token
/// said, the new deadline, the trigger)` each, for a principal that may still run the trigger.
async fn renew<S: Store>(
    shared: Arc<Shared<S>>,
    renewals: Vec<(async_nats::Subject, DeliveryToken, Instant, TriggerId)>,
) {
    let node = &shared.config.node;
    // The principal is checked again, as before a delivery: one that lost the right to run the
    // trigger gets no token past the deadline it had, and one whose role changed gets its
    // scopes now.
    let mut triggers: Vec<TriggerId> = renewals.iter().map(|(_, _, _, trigger)| *trigger).collect();
    triggers.sort_unstable();
    triggers.dedup();
    let targets = match shared.store.delivery_targets(&triggers).await {
        Ok(read) => read.targets,
        Err(e) => {
            tracing::warn!(error = %e, "could not check the principals of working deliveries; no token renewed");
            Vec::new()
        }
    };
    for (to, claims, deadline, trigger) in renewals {
        let target = targets.iter().find(|t| t.trigger.id == trigger && t.trigger.app_id == claims.app);
        let Some(access) = target.and_then(run_as_access) else {
            tracing::info!(%trigger, "a working delivery's principal may no longer run its trigger; no token renewed");
            continue;
        };
        let deadline_ms = unix_millis_after(deadline.saturating_duration_since(Instant::now()));
        let claims = DeliveryToken { deadline_ms, scopes: access.delivery_scopes(), ..claims };
        let renewal = Renewal { picloudtoken: node.token_key.sign(&claims), piclouddeadline: deadline_ms };
        let body = serde_json::to_vec(&renewal).expect("a renewal serializes");
        if let Err(e) = shared.nats.publish(to, body.into()).await {
            tracing::warn!(error = %e, "could not send a working delivery the token of its moved deadline");
        }
    }
}

/// Gives back the deliveries in flight whenever the NATS connection they were published on is
/// lost: their answers cannot arrive on it, and waiting out their deadlines would only delay
/// them. Each is rescheduled within a second without spending an attempt; one still running in its
/// handler may then run twice, which at-least-once delivery allows.
///
/// A delivery whose handler said `working` is kept: long work run twice is what `working` is
/// there to prevent (DESIGN §14). Its handler says so again once reconnected; an answer lost with
/// the connection costs at most one handler timeout, and the timer then gives its attempt back
/// rather than spending it.
async fn give_back_on_loss<S>(shared: Arc<Shared<S>>, done_tx: mpsc::UnboundedSender<Done>) {
    let mut seen = shared.connection.losses();
    loop {
        seen = shared.connection.lost_since(seen).await;
        let lost: Vec<Sent> = {
            let mut in_flight = shared.in_flight.lock().expect("in-flight lock");
            let lost = in_flight
                .pending
                .extract_if(|_, sent| sent.losses < seen && sent.extended_at.is_none())
                .map(|(_, s)| s)
                .collect();
            if in_flight.pending.is_empty() {
                shared.drained.notify_waiters();
            }
            lost
        };
        tracing::warn!(
            deliveries = lost.len(),
            "the NATS connection was lost: the deliveries in flight on it are given back, without spending an attempt"
        );
        let answer = Answer::Interrupted(
            "the NATS connection was lost while the delivery was in flight; its answer cannot arrive".into(),
        );
        for sent in lost {
            sent.answered(&shared.metrics, |_| answer.clone(), &done_tx);
        }
    }
}

async fn complete_loop<S: Store>(
    shared: Arc<Shared<S>>,
    mut answers: mpsc::UnboundedReceiver<Done>,
    done_tx: mpsc::WeakUnboundedSender<Done>,
) {
    let mut running = JoinSet::new();
    let mut abandoned = JoinSet::new();
    // Answers received and not completed yet: taken in one batch by the next transaction once
    // the one under way committed.
    let mut waiting: Vec<Done> = Vec::new();
    let mut open = true;
    while open || !waiting.is_empty() || !running.is_empty() {
        tokio::select! {
            received = answers.recv(), if open => match received {
                Some(first) => {
                    let mut batch = vec![first];
                    while batch.len() < MAX_COMPLETION_BATCH {
                        match answers.try_recv() {
                            Ok(done) => batch.push(done),
                            Err(_) => break,
                        }
                    }
                    ended(&shared, &mut batch, &done_tx, &mut abandoned).await;
                    waiting.append(&mut batch);
                }
                None => open = false,
            },
            Some(_) = running.join_next(), if !running.is_empty() => {}
        }
        if running.len() < CONCURRENT_FLUSHES && !waiting.is_empty() {
            let batch: Vec<Done> = waiting.drain(..waiting.len().min(MAX_COMPLETION_BATCH)).collect();
            let shared = shared.clone();
            running.spawn(async move {
                flush(&shared, &batch).await;
                shared.slots.add_permits(batch.len());
            });
        }
        while abandoned.try_join_next().is_some() {}
    }
    while abandoned.join_next().await.is_some() {}
}

/// Accounts for attempts that ended, as soon as they are received (their completion waits for
/// the transaction under way): the slots of their apps and limited triggers are free, and the
/// rows waiting ahead of those slots start.
async fn ended<S: Store>(
    shared: &Arc<Shared<S>>,
    batch: &mut Vec<Done>,
    done_tx: &mpsc::WeakUnboundedSender<Done>,
    abandoned: &mut JoinSet<()>,
) {
    // The only sync rows a relay completes are those that outlived their lease.
    for done in batch.iter().filter(|d| d.reply_to.is_some()) {
        let (store, done, timeout) = (shared.store.clone(), done.clone(), shared.config.node.handler_timeout);
        abandoned.spawn(async move { abandon(&store, &done, AbandonReason::LeaseExpired, timeout).await });
    }
    let Finished { claim_more, idle, started } = shared.limits.finished(batch);
    if claim_more {
        shared.claimable.limited();
        shared.wake.notify_one();
    }
    if !idle.is_empty() {
        let shared = shared.clone();
        abandoned.spawn(async move { shared.limits.give_back(&shared.store, idle).await });
    }
    match done_tx.upgrade() {
        _ if started.start.is_empty() && started.expired.is_empty() => {}
        // In a task of its own: a slow publish or target read never holds up completions.
        Some(done_tx) => {
            let shared = shared.clone();
            tokio::spawn(async move { start(&shared, started, &done_tx).await });
        }
        // Only once the relay stopped, when no row starts any more: given back all the same.
        None => {
            let Started { start, expired } = started;
            shared.limits.delivered(start.iter().map(|claim| claim.rows.len()).sum());
            let rows = expired.iter().chain(start.iter().flat_map(|claim| claim.rows.iter()));
            batch.extend(rows.map(|row| given_back(&shared.config, row, "the relay stopped")));
        }
    }
    if shared.shares.finished(batch) {
        // An app that held its whole share has room again: its rows are claimable.
        shared.claimable.plain();
        shared.claimable.limited();
        shared.wake.notify_one();
    }
}

/// Delivers the rows of limited triggers that start now, and gives back those that waited
/// too long for a slot.
async fn start<S: Store>(shared: &Shared<S>, started: Started, done_tx: &mpsc::UnboundedSender<Done>) {
    let Started { start, expired } = started;
    for row in &expired {
        let reason = "it could not start within its lease, or the relay stopped";
        let _ = done_tx.send(given_back(&shared.config, row, reason));
    }
    let rows = start.iter().map(|claim| claim.rows.len()).sum();
    if rows == 0 {
        return;
    }
    for claim in start {
        deliver(shared, claim, done_tx).await;
    }
    shared.limits.delivered(rows);
    if shared.in_flight.lock().expect("in-flight lock").pending.is_empty() {
        shared.drained.notify_waiters();
    }
}

/// A row claimed ahead of a slot that goes back without having started: due again within a
/// second, without spending an attempt, holding no slot.
fn given_back(config: &RelayConfig, row: &ClaimedDelivery, why: &str) -> Done {
    let answer = Answer::Interrupted(format!("claimed ahead of a slot and given back: {why}"));
    Done { gated: false, ..done_for(row, config.node.triggers.retry, answer) }
}

/// Lanes released per statement.
const LANE_RELEASE_BATCH: u32 = 500;

/// Releases the lanes that completions noted because a writer held them (on this node or, having
/// died since, another) until none is left that can be taken now; whether it released any. A
/// failure is logged: the lanes stay noted, and the next sweep takes them.
async fn release_lanes<S: Store>(shared: &Shared<S>) -> bool {
    let mut released = false;
    loop {
        match shared.store.release_lanes(LANE_RELEASE_BATCH).await {
            Ok(n) => {
                released |= n > 0;
                if n < u64::from(LANE_RELEASE_BATCH) {
                    return released;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "releasing lanes failed; the next sweep tries again");
                return released;
            }
        }
    }
}

async fn flush<S: Store>(shared: &Shared<S>, batch: &[Done]) {
    let config = &shared.config;
    for tries in 1..=FLUSH_TRIES {
        match complete(
            &shared.store,
            &config.node.triggers,
            config.node.handler_timeout,
            &config.node.node_id,
            batch,
        )
        .await
        {
            Ok(stats) => {
                tracing::debug!(rows = batch.len(), ?stats, "completed");
                shared.metrics.completed(batch, &stats);
                shared.reporter.report(batch);
                if stats.lanes_moved > 0 {
                    // The completion released the lanes it could; a writer held the others, which
                    // are free again by now.
                    release_lanes(shared).await;
                    // The next row of each lane is due now: claim it without waiting for a poll.
                    shared.claimable.plain();
                    shared.wake.notify_one();
                }
                return;
            }
            Err(e) if tries < FLUSH_TRIES => {
                tracing::warn!(error = %e, rows = batch.len(), tries, "completing a batch failed; trying again");
                tokio::time::sleep(backoff(tries)).await;
            }
            Err(e) => tracing::error!(
                error = %e,
                rows = batch.len(),
                "completing a batch failed for good; its rows will be delivered again when their leases end"
            ),
        }
    }
}
