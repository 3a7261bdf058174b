//! Writing events: the functions the API, the NATS ingest and a Rust app sharing the database
//! call inside their own transaction. Each records the change, looks up the enabled triggers it
//! fires and inserts one outbox row per trigger. Commit with [`commit_and_wake`] (or commit, then
//! call `wake_relays`) so relays `NOTIFY`-wake at once instead of at their next poll;
//! [`commit_and_wake_for`] names the rows a write fired when a relay may claim them all at once.
//! An event at depth ≥ the configured maximum fires nothing: each trigger it would have fired
//! gets a `max_depth` dead letter instead.
//!
//! Dead letters fan out here too ([`fan_out_dead_letters`]), in the transaction that creates them.

use std::time::Duration;

use picloud_core::flow::kv_ordering_key;
use picloud_core::names::{CollectionName, KvKey, QueueName, TopicName};
use picloud_core::protocol::{EventKind, event_type, rfc3339_millis, source};
use picloud_core::{AppId, AppSlug, TriggerConfig, TriggerId};
use serde_json::json;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::model::*;
use crate::{Error, Result, Store, SyncCallWrite};

/// Commits a transaction that wrote events and wakes the relays. The wake-up is best effort
/// (relays poll too): its failure is logged, not returned, because the events are committed.
pub async fn commit_and_wake<S: Store>(s: &S, tx: S::Tx) -> Result<()> {
    s.commit(tx).await?;
    logged(s.wake_relays().await);
    Ok(())
}

/// [`commit_and_wake`] for a transaction whose only writes are what `fired` says: the wake-up
/// names its deliveries when every one of them is claimable at once, and there is none when it
/// wrote nothing. Rows of another write in the transaction, left out of `fired`, would wait
/// for a relay's walk (its poll at the latest): use [`commit_and_wake`] for such a transaction.
pub async fn commit_and_wake_for<S: Store>(s: &S, tx: S::Tx, fired: &Fired) -> Result<()> {
    s.commit(tx).await?;
    wake_for(s, fired).await;
    Ok(())
}

/// Wakes the relays for what `fired` wrote, once it is committed.
async fn wake_for<S: Store>(s: &S, fired: &Fired) {
    if fired.too_deep > 0 || fired.claimable.len() < fired.deliveries {
        logged(s.wake_relays().await);
    } else if fired.deliveries > 0 {
        logged(s.wake_relays_for(fired.claimable.clone()).await);
    }
}

fn logged(woken: Result<()>) {
    if let Err(e) = woken {
        tracing::warn!(error = %e, "committed, but waking the relays failed; they will poll");
    }
}

/// Where and how deep an event is written.
#[derive(Debug, Clone, Copy)]
pub struct EventContext<'a> {
    /// The app's id.
    pub app_id: AppId,
    /// The app's slug (for CloudEvents sources).
    pub app_slug: &'a AppSlug,
    /// 0 for outside clients; a delivery token's depth for handlers.
    pub depth: u32,
    /// The depth limit and default retry policy.
    pub config: &'a TriggerConfig,
}

/// What an event fired.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fired {
    /// Outbox rows written.
    pub deliveries: usize,
    /// `max_depth` dead letters written instead of deliveries.
    pub too_deep: usize,
    /// The ids of the rows written that a relay may claim as soon as they are committed
    /// ([`NewDelivery::claimable_at_once`]).
    pub claimable: Vec<Uuid>,
}

impl Fired {
    /// What a write fired whose rows `written` are all claimable at once (the KV put's single
    /// statement writes no other).
    fn claimable_at_once(written: Vec<Uuid>) -> Self {
        Fired { deliveries: written.len(), too_deep: 0, claimable: written }
    }
}

/// An event as its deliveries carry it: the CloudEvents attributes, the data and the depth.
#[derive(Debug, Clone)]
pub struct Event<'a> {
    /// The event kind.
    pub kind: EventKind,
    /// The CloudEvents type.
    pub event_type: &'a str,
    /// The CloudEvents source.
    pub source: String,
    /// The CloudEvents subject (the KV key), if any.
    pub subject: Option<&'a str>,
    /// The event data.
    pub payload: &'a RawValue,
    /// The event's depth.
    pub depth: u32,
    /// The event's ordering key (DESIGN §13), if it has one.
    pub ordering_key: Option<&'a str>,
}

impl Event<'_> {
    /// A new delivery of this event to `trigger_id` of `app_id` (`None` for an email), due now,
    /// with `max_attempts` attempts; what else a delivery may have (a delay, an idempotency key,
    /// a sync caller's inbox, a dead letter it reports, an earlier event time) starts unset.
    pub fn delivery(&self, app_id: AppId, trigger_id: Option<TriggerId>, max_attempts: u32) -> NewDelivery {
        NewDelivery {
            id: Uuid::now_v7(),
            app_id,
            trigger_id,
            kind: self.kind,
            event_type: self.event_type.to_owned(),
            source: self.source.clone(),
            subject: self.subject.map(str::to_owned),
            payload: self.payload.to_owned(),
            depth: self.depth,
            max_attempts,
            delay: Duration::ZERO,
            reply_to: None,
            idempotency_key: None,
            dead_letter_id: None,
            event_time: None,
            ordering_key: self.ordering_key.map(str::to_owned),
            lane: None,
            front_of_lane: false,
            gated: false,
            debounced: false,
        }
    }

    /// A new delivery of this event to `trigger`, with the trigger's attempts and, when the
    /// trigger orders its deliveries, in the lane its flow puts it in.
    pub fn delivery_to(&self, app_id: AppId, trigger: &Trigger, config: &TriggerConfig) -> NewDelivery {
        self.delivery(app_id, Some(trigger.id), max_attempts(trigger, config)).flowing(trigger.flow.as_ref())
    }
}

fn raw(value: &serde_json::Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).expect("a JSON value serializes")
}

/// Writes one delivery per trigger, or `max_depth` dead letters when the event is too deep.
async fn fire<S: Store>(
    s: &S,
    tx: &mut S::Tx,
    cx: &EventContext<'_>,
    triggers: &[Trigger],
    event: Event<'_>,
) -> Result<Fired> {
    if triggers.is_empty() {
        return Ok(Fired::default());
    }
    let bytes = event.payload.get().len();
    if bytes > cx.config.max_event_data_bytes {
        return Err(Error::TooLarge { max: cx.config.max_event_data_bytes });
    }
    if cx.depth >= cx.config.max_depth {
        let written = too_deep(s, tx, cx, triggers, &event).await?;
        return Ok(Fired { too_deep: written.len(), ..Fired::default() });
    }
    let rows: Vec<NewDelivery> =
        triggers.iter().map(|t| event.delivery_to(cx.app_id, t, cx.config)).collect();
    let ids = s.insert_deliveries(tx, &rows).await?;
    let claimable =
        rows.iter().zip(ids).filter(|(row, _)| row.claimable_at_once()).map(|(_, id)| id).collect();
    Ok(Fired { deliveries: rows.len(), too_deep: 0, claimable })
}

/// Writes a `max_depth` dead letter for each trigger an event too deep would have fired, and
/// fans them out.
async fn too_deep<S: Store>(
    s: &S,
    tx: &mut S::Tx,
    cx: &EventContext<'_>,
    triggers: &[Trigger],
    event: &Event<'_>,
) -> Result<Vec<DeadLetter>> {
    let time = s.clock().now();
    let dead: Vec<NewDeadLetter> = triggers
        .iter()
        .map(|t| NewDeadLetter {
            id: Uuid::now_v7(),
            app_id: cx.app_id,
            trigger_id: Some(t.id),
            trigger_name: Some(t.name.to_string()),
            kind: event.kind,
            delivery_id: Uuid::now_v7(),
            payload: event.payload.to_owned(),
            headers: EventHeaders {
                event_type: event.event_type.to_owned(),
                source: event.source.clone(),
                subject: event.subject.map(str::to_owned),
                time,
                depth: cx.depth,
                ordering_key: event.ordering_key.map(str::to_owned),
            },
            attempts: 0,
            reason: DeadLetterReason::MaxDepth,
            last_error: Some(format!(
                "event depth {} reached PICLOUD_MAX_TRIGGER_DEPTH ({})",
                cx.depth, cx.config.max_depth
            )),
        })
        .collect();
    let written = s.insert_dead_letters(tx, &dead).await?;
    fan_out_dead_letters(s, tx, cx.app_slug, &written, cx.config).await?;
    Ok(written)
}

/// A trigger's attempts: its override, else the configured default.
pub fn max_attempts(trigger: &Trigger, config: &TriggerConfig) -> u32 {
    trigger.retry.max_attempts.unwrap_or(config.retry.max_attempts)
}

/// Upserts a KV entry and fires the matching `kv` triggers with
/// `{collection, key, op: "put", value, previous, version}`, in the caller's transaction.
pub async fn kv_put<S: Store>(
    s: &S,
    tx: &mut S::Tx,
    cx: &EventContext<'_>,
    collection: &CollectionName,
    key: &KvKey,
    value: &serde_json::Value,
    expected: Option<i64>,
) -> Result<(KvPutResult, Fired)> {
    let source = source::kv(cx.app_slug.as_str(), collection.as_str());
    let ordering_key = kv_ordering_key(collection.as_str(), key.as_str());
    let put = firing_put(cx, &source, &ordering_key, collection, key, value);
    if expected.is_none()
        && cx.depth < cx.config.max_depth
        && let Some((result, written)) = s.kv_put_firing(Some(tx), &put).await?
    {
        return Ok((result, Fired::claimable_at_once(written)));
    }
    kv_put_matching(s, tx, cx, &put, expected).await
}

/// [`kv_put`] as separate statements: the epoch's check (for a put `authorized_at` one), the
/// upsert, the trigger match, the deliveries.
async fn kv_put_matching<S: Store>(
    s: &S,
    tx: &mut S::Tx,
    cx: &EventContext<'_>,
    put: &FiringPut<'_>,
    expected: Option<i64>,
) -> Result<(KvPutResult, Fired)> {
    if let Some(epoch) = put.authorized_at
        && s.config_epoch(tx).await? != epoch
    {
        return Err(Error::Stale);
    }
    let result = s.kv_put(tx, put.app_id, put.collection, put.key, put.value, expected).await?;
    let triggers = s.list_matching_kv(tx, put.app_id, put.collection, KvOp::Put).await?;
    let data = kv_event_data(
        put.collection,
        put.key,
        KvOp::Put,
        Some(put.value),
        result.previous.as_ref(),
        result.version,
    );
    let event = Event {
        kind: EventKind::Kv,
        event_type: event_type::KV_PUT,
        source: put.source.to_owned(),
        subject: Some(put.key),
        payload: &data,
        depth: cx.depth,
        ordering_key: Some(put.ordering_key),
    };
    let fired = fire(s, tx, cx, &triggers, event).await?;
    Ok((result, fired))
}

/// [`kv_put`] committed on its own, and the relays woken: the write path of one KV put. Without
/// an expected version, below the depth limit and when no trigger it fires orders its
/// deliveries, it is a single statement (one round trip); Postgres skips trying that statement
/// for a second after it refused the collection for a flow ([`crate::KvRepo::kv_put_firing`]). A put
/// `authorized_at` a configuration epoch (its caller's authorization was kept from an earlier
/// request) writes nothing and fails with [`Error::Stale`] once the epoch has moved.
pub async fn kv_put_now<S: Store>(
    s: &S,
    cx: &EventContext<'_>,
    collection: &CollectionName,
    key: &KvKey,
    value: &serde_json::Value,
    expected: Option<i64>,
    authorized_at: Option<i64>,
) -> Result<(KvPutResult, Fired)> {
    let source = source::kv(cx.app_slug.as_str(), collection.as_str());
    let ordering_key = kv_ordering_key(collection.as_str(), key.as_str());
    let put = FiringPut { authorized_at, ..firing_put(cx, &source, &ordering_key, collection, key, value) };
    let mut tries = 0;
    loop {
        let fast = if expected.is_none() && cx.depth < cx.config.max_depth {
            s.kv_put_firing(None, &put).await
        } else {
            Ok(None)
        };
        let written = match fast {
            Ok(Some((result, rows))) => Ok((result, Fired::claimable_at_once(rows))),
            Ok(None) => {
                let mut tx = s.begin().await?;
                match kv_put_matching(s, &mut tx, cx, &put, expected).await {
                    Ok(written) => s.commit(tx).await.map(|()| written),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        match written {
            Err(Error::Conflict(_)) if tries < 5 => tries += 1,
            Err(e) => return Err(e),
            Ok((result, fired)) => {
                tracing::trace!(key = key.as_str(), deliveries = fired.deliveries, "kv put committed");
                wake_for(s, &fired).await;
                return Ok((result, fired));
            }
        }
    }
}

fn firing_put<'a>(
    cx: &EventContext<'_>,
    source: &'a str,
    ordering_key: &'a str,
    collection: &'a CollectionName,
    key: &'a KvKey,
    value: &'a serde_json::Value,
) -> FiringPut<'a> {
    FiringPut {
        app_id: cx.app_id,
        source,
        collection: collection.as_str(),
        key: key.as_str(),
        ordering_key,
        value,
        depth: cx.depth,
        default_max_attempts: cx.config.retry.max_attempts,
        max_data_bytes: cx.config.max_event_data_bytes,
        authorized_at: None,
    }
}

/// Deletes a KV entry and fires the matching `kv` triggers with
/// `{collection, key, op: "delete", value: null, previous, version}` (the deleted version).
/// `None` when the key did not exist (nothing fires).
pub async fn kv_delete<S: Store>(
    s: &S,
    tx: &mut S::Tx,
    cx: &EventContext<'_>,
    collection: &CollectionName,
    key: &KvKey,
    expected: Option<i64>,
) -> Result<Option<(KvEntry, Fired)>> {
    let Some(deleted) = s.kv_delete(tx, cx.app_id, collection.as_str(), key.as_str(), expected).await? else {
        return Ok(None);
    };
    let triggers = s.list_matching_kv(tx, cx.app_id, collection.as_str(), KvOp::Delete).await?;
    let ordering_key = kv_ordering_key(collection.as_str(), key.as_str());
    let data = kv_event_data(
        collection.as_str(),
        key.as_str(),
        KvOp::Delete,
        None,
        Some(&deleted.value),
        deleted.version,
    );
    let event = Event {
        kind: EventKind::Kv,
        event_type: event_type::KV_DELETE,
        source: source::kv(cx.app_slug.as_str(), collection.as_str()),
        subject: Some(key.as_str()),
        payload: &data,
        depth: cx.depth,
        ordering_key: Some(&ordering_key),
    };
    let fired = fire(s, tx, cx, &triggers, event).await?;
    Ok(Some((deleted, fired)))
}

/// Publishes a message to a topic: every matching `pubsub` trigger gets its own delivery, in the
/// lane of `ordering_key` when the trigger orders by key. Returns the message's id.
pub async fn publish<S: Store>(
    s: &S,
    tx: &mut S::Tx,
    cx: &EventContext<'_>,
    topic: &TopicName,
    message: &RawValue,
    ordering_key: Option<&str>,
) -> Result<(Uuid, Fired)> {
    let triggers = s.list_matching_pubsub(tx, cx.app_id, topic.as_str()).await?;
    let event = Event {
        kind: EventKind::Pubsub,
        event_type: event_type::PUBSUB_MESSAGE,
        source: source::topic(cx.app_slug.as_str(), topic.as_str()),
        subject: None,
        payload: message,
        depth: cx.depth,
        ordering_key,
    };
    let fired = fire(s, tx, cx, &triggers, event).await?;
    Ok((Uuid::now_v7(), fired))
}

/// A job for a queue.
#[derive(Debug, Clone, Copy)]
pub struct Job<'a> {
    /// The job's data.
    pub payload: &'a RawValue,
    /// How long to wait before the first attempt.
    pub delay: Duration,
    /// A key that makes enqueueing the same job twice a no-op while it is pending.
    pub idempotency_key: Option<&'a str>,
    /// The job's ordering key (DESIGN §13), checked by the caller.
    pub ordering_key: Option<&'a str>,
}

/// What enqueueing did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// A new delivery with this id.
    Created(Uuid),
    /// A pending job held the idempotency key already: its id.
    Existing(Uuid),
    /// The event was too deep: a `max_depth` dead letter was written instead, for the delivery
    /// with this id.
    TooDeep(Uuid),
}

/// Enqueues a job on a queue's trigger. Fails with [`Error::NoSuchQueue`] when the queue has no
/// trigger, and [`Error::QueueDisabled`] when its trigger is disabled (the job would never run).
pub async fn enqueue<S: Store>(
    s: &S,
    tx: &mut S::Tx,
    cx: &EventContext<'_>,
    queue: &QueueName,
    job: Job<'_>,
) -> Result<Enqueued> {
    let trigger = s
        .queue_trigger(tx, cx.app_id, queue.as_str())
        .await?
        .ok_or_else(|| Error::NoSuchQueue(queue.to_string()))?;
    if !trigger.enabled {
        return Err(Error::QueueDisabled(queue.to_string()));
    }
    let event = Event {
        kind: EventKind::Queue,
        event_type: event_type::QUEUE_JOB,
        source: source::queue(cx.app_slug.as_str(), queue.as_str()),
        subject: None,
        payload: job.payload,
        depth: cx.depth,
        ordering_key: job.ordering_key,
    };
    if cx.depth >= cx.config.max_depth {
        let dead = too_deep(s, tx, cx, std::slice::from_ref(&trigger), &event).await?;
        return Ok(Enqueued::TooDeep(dead[0].delivery_id));
    }
    let row = event.delivery_to(cx.app_id, &trigger, cx.config);
    let row = NewDelivery {
        delay: row.delay.max(job.delay),
        idempotency_key: job.idempotency_key.map(str::to_owned),
        // A job with an idempotency key is a delivery of its own: its key names it.
        debounced: row.debounced && job.idempotency_key.is_none(),
        ..row
    };
    if row.idempotency_key.is_some() {
        let (id, created) = s.insert_idempotent(tx, &row).await?;
        return Ok(if created { Enqueued::Created(id) } else { Enqueued::Existing(id) });
    }
    let landed = s.insert_deliveries(tx, std::slice::from_ref(&row)).await?;
    Ok(Enqueued::Created(landed[0]))
}

/// Where a sync call's caller waits, and the API node that waits with it and delivers the call.
#[derive(Debug, Clone, Copy)]
pub struct SyncWaiter<'a> {
    /// The inbox named as the row's `reply_to`.
    pub reply_to: &'a str,
    /// The configuration epoch the caller's authorization was read at, when it was not read
    /// just now: the call is written only while the epoch is still that one.
    pub authorized_at: Option<i64>,
    /// The node: the row is written claimed by it.
    pub node: &'a str,
    /// The node's lease on the row.
    pub lease: Duration,
}

/// Writes a sync invocation of the `http` trigger `trigger_name`, already claimed by the node
/// that waits with its caller (see [`crate::OutboxRepo::insert_sync_call`]): never retried,
/// never dead-lettered.
pub async fn invoke<S: Store>(
    s: &S,
    cx: &EventContext<'_>,
    trigger_name: &str,
    body: &RawValue,
    waiter: SyncWaiter<'_>,
) -> Result<SyncCallWrite> {
    if cx.depth >= cx.config.max_depth {
        return Err(Error::TooDeep { depth: cx.depth, max: cx.config.max_depth });
    }
    let call = NewSyncCall {
        id: Uuid::now_v7(),
        app_id: cx.app_id,
        trigger_name: trigger_name.to_owned(),
        source: source::trigger(cx.app_slug.as_str(), trigger_name),
        payload: body.to_owned(),
        depth: cx.depth,
        reply_to: waiter.reply_to.to_owned(),
        authorized_at: waiter.authorized_at,
    };
    s.insert_sync_call(&call, waiter.lease, waiter.node).await
}

/// Queues an email for the built-in executor (`{to, subject, text, html?}`), with the default
/// retry policy.
pub async fn send_email<S: Store>(
    s: &S,
    tx: &mut S::Tx,
    cx: &EventContext<'_>,
    email: &RawValue,
) -> Result<Uuid> {
    let event = Event {
        kind: EventKind::Email,
        event_type: event_type::EMAIL_SEND,
        source: source::emails(cx.app_slug.as_str()),
        subject: None,
        payload: email,
        depth: cx.depth,
        ordering_key: None,
    };
    let row = event.delivery(cx.app_id, None, cx.config.retry.max_attempts);
    s.insert_deliveries(tx, std::slice::from_ref(&row)).await?;
    Ok(row.id)
}

/// The event data of a dead letter, as `dead_letter` triggers receive it.
pub fn dead_letter_data(d: &DeadLetter) -> serde_json::Value {
    let payload: &RawValue = &d.payload;
    json!({
        "id": d.id,
        "trigger": d.trigger_name,
        "trigger_id": d.trigger_id.map(TriggerId::as_uuid),
        "kind": d.kind.as_str(),
        "delivery_id": d.delivery_id,
        "reason": d.reason.as_str(),
        "attempts": d.attempts,
        "last_error": d.last_error,
        "created_at": rfc3339_millis(d.created_at),
        "event": {
            "type": d.headers.event_type,
            "source": d.headers.source,
            "subject": d.headers.subject,
            "time": rfc3339_millis(d.headers.time),
            "depth": d.headers.depth,
            "data": payload,
        },
    })
}

/// Fans new dead letters out to the app's matching `dead_letter` triggers, in the caller's
/// transaction. Dead letters of `dead_letter` deliveries never exist (such deliveries never
/// dead-letter), and a dead letter whose event is at or past the depth limit fires nothing, so
/// dead-letter handling cannot loop.
pub async fn fan_out_dead_letters<S: Store>(
    s: &S,
    tx: &mut S::Tx,
    app_slug: &AppSlug,
    dead: &[DeadLetter],
    config: &TriggerConfig,
) -> Result<usize> {
    let mut rows = Vec::new();
    for d in dead.iter().filter(|d| d.kind != EventKind::DeadLetter && d.headers.depth < config.max_depth) {
        let triggers = s.list_matching_dead_letter(tx, d.app_id, d.trigger_name.as_deref(), d.kind).await?;
        if triggers.is_empty() {
            continue;
        }
        let data = raw(&dead_letter_data(d));
        let event = Event {
            kind: EventKind::DeadLetter,
            event_type: event_type::DEAD_LETTER_CREATED,
            source: source::dead_letters(app_slug.as_str()),
            subject: None,
            payload: &data,
            depth: d.headers.depth,
            ordering_key: None,
        };
        rows.extend(triggers.iter().map(|t| NewDelivery {
            dead_letter_id: Some(d.id),
            event_time: Some(d.created_at),
            ..event.delivery_to(d.app_id, t, config)
        }));
    }
    s.insert_deliveries(tx, &rows).await?;
    Ok(rows.len())
}

/// Replays a dead letter: a fresh delivery of the same event to the same trigger (attempts reset)
/// and the resolution `replayed`. When the dead letter held its lane, the replay is the lane's
/// next delivery; otherwise it joins the back of its lane like a new event. Fails with [`Error::TriggerGone`] when its trigger was deleted.
pub async fn replay<S: Store>(
    s: &S,
    tx: &mut S::Tx,
    dead: &DeadLetter,
    config: &TriggerConfig,
) -> Result<(Uuid, DeadLetter)> {
    let trigger = match dead.trigger_id {
        Some(id) if dead.kind != EventKind::Email => s.trigger_by_id(tx, dead.app_id, id).await?,
        _ => None,
    };
    let trigger = match (dead.kind, trigger) {
        (EventKind::Email, _) => None,
        (_, Some(t)) => Some(t),
        _ => return Err(Error::TriggerGone(dead.trigger_name.clone().unwrap_or_default())),
    };
    let event = Event {
        kind: dead.kind,
        event_type: &dead.headers.event_type,
        source: dead.headers.source.clone(),
        subject: dead.headers.subject.as_deref(),
        payload: &dead.payload,
        depth: dead.headers.depth,
        ordering_key: dead.headers.ordering_key.as_deref(),
    };
    let row = match &trigger {
        Some(t) => event.delivery_to(dead.app_id, t, config),
        None => event.delivery(dead.app_id, None, config.retry.max_attempts),
    };
    // The replay of a dead letter that held its lane goes first, before the deliveries it held
    // back; the resolution below then releases the lane to it.
    let front_of_lane = dead.held_lane.is_some() && dead.held_lane == row.lane;
    // A replay is a delivery of its own, never debounced into a newer event's.
    let row = NewDelivery { event_time: Some(dead.headers.time), front_of_lane, debounced: false, ..row };
    s.insert_deliveries(tx, std::slice::from_ref(&row)).await?;
    let replayed = s
        .resolve(tx, dead.app_id, dead.id, Resolution::Replayed, false)
        .await?
        .ok_or(Error::DeadLetterNotFound(dead.id))?;
    Ok((row.id, replayed))
}

/// What [`cancel`] did.
#[derive(Debug, Clone)]
pub enum Cancel {
    /// The app has no such delivery in the outbox: it finished, or never was.
    NotFound,
    /// A sync call (its caller waits on it) or a delivery of a `dead_letter` trigger (which
    /// never becomes a dead letter): it is left as it is.
    NotCancellable(Delivery),
    /// It became `dead_letter`, resolved `ignored`; `in_flight` is the function handler whose
    /// attempt was running, to be told to stop.
    Cancelled {
        /// The dead letter it became.
        dead_letter: DeadLetter,
        /// The handler running it, when an attempt was in flight and its handler is a function.
        in_flight: Option<picloud_core::HandlerName>,
    },
}

/// Cancels a delivery of the app that has not finished (DESIGN §14), in `tx`: it leaves the
/// outbox for a dead letter with reason `cancelled`, resolved `ignored`, so nothing delivers it
/// again and whatever its running attempt answers finds no row to retry. Its lane, if it headed
/// one, goes to the next delivery.
pub async fn cancel<S: Store>(s: &S, tx: &mut S::Tx, app_id: AppId, id: Uuid) -> Result<Cancel> {
    let Some(delivery) = s.lock_delivery(tx, app_id, id).await? else { return Ok(Cancel::NotFound) };
    if delivery.sync || delivery.kind == EventKind::DeadLetter {
        return Ok(Cancel::NotCancellable(delivery));
    }
    let in_flight = delivery.state(s.clock().now()) == DeliveryState::InFlight;
    let handler = match delivery.trigger_id {
        Some(trigger) if in_flight => match s.trigger_by_id(tx, app_id, trigger).await? {
            Some(Trigger { handler: Handler::Function(name), .. }) => Some(name),
            _ => None,
        },
        _ => None,
    };
    let bury = Bury { id, attempt: delivery.attempts, reason: DeadLetterReason::Cancelled, error: None };
    // The row is locked with this attempt count: it moves, and its new dead letter resolves.
    let changed = || Error::Conflict(format!("delivery {id}"));
    let buried = s.bury(tx, std::slice::from_ref(&bury)).await?;
    let dead = buried.first().ok_or_else(changed)?;
    let dead_letter = s.resolve(tx, app_id, dead.id, Resolution::Ignored, true).await?.ok_or_else(changed)?;
    Ok(Cancel::Cancelled { dead_letter, in_flight: handler })
}
