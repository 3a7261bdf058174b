//! The deliveries a worker has in hand, by id, and the two things the router tells it about one
//! (DESIGN §14): a cancel notice on `picloud.v1.cancel.<app>.<handler>`, which fires that
//! delivery's cancellation token and so ends its handler's future, and the token of a deadline
//! that a `working` reply moved ([`Renewal`]), which the relay sends to the worker's renewal
//! inbox under the delivery's id.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::Client;
use futures::StreamExt as _;
use picloud_core::protocol::{CancelNotice, Renewal, in_app_inbox};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Error;

/// The token of an attempt's moved deadline, when the relay sent one.
pub(crate) type Renewed = Arc<Mutex<Option<Renewal>>>;

/// What a worker keeps of one delivery in hand.
#[derive(Debug)]
struct Held {
    cancellation: CancellationToken,
    /// By attempt: each attempt's deadline moves on its own.
    renewed: HashMap<u32, Renewed>,
    /// How many attempts of it are in hand (a delivery timed out and retried may run twice here
    /// at once: a notice stops both).
    holders: usize,
}

/// How long a cancel notice for a delivery not in hand is kept, and how many such notices at
/// most: the notice may overtake its delivery (they come from different nodes), or the delivery
/// may wait for a free slot of its handler.
const NOTICE_KEPT_FOR: Duration = Duration::from_secs(600);
const NOTICES_KEPT: usize = 4096;

/// Cancel notices that came before their delivery, with when they came, oldest first.
#[derive(Debug, Default)]
struct Early {
    by_id: HashMap<Uuid, Instant>,
    order: VecDeque<Uuid>,
}

impl Early {
    fn note(&mut self, id: Uuid, now: Instant) {
        while let Some(oldest) = self.order.front().copied() {
            let stale = self.by_id.get(&oldest).is_none_or(|at| now.duration_since(*at) > NOTICE_KEPT_FOR);
            if !stale && self.order.len() < NOTICES_KEPT {
                break;
            }
            self.order.pop_front();
            self.by_id.remove(&oldest);
        }
        if self.by_id.insert(id, now).is_none() {
            self.order.push_back(id);
        }
    }

    fn has(&self, id: Uuid, now: Instant) -> bool {
        self.by_id.get(&id).is_some_and(|at| now.duration_since(*at) <= NOTICE_KEPT_FOR)
    }
}

/// The deliveries in hand, the cancel notices that came before theirs, and the inbox renewals
/// come to.
#[derive(Debug, Clone)]
pub(crate) struct InHand {
    held: Arc<Mutex<HashMap<Uuid, Held>>>,
    early: Arc<Mutex<Early>>,
    /// `<a fresh inbox of the worker>.renew`: an attempt's renewals come to
    /// `<this>.<id>.<attempt>`. `None` when the worker's inboxes are not in its app's namespace
    /// (`_INBOX_<app>`): the relay sends renewals nowhere else, so none is asked for.
    renewals: Option<String>,
}

impl InHand {
    /// Nothing in hand yet; renewals come to a fresh inbox of `client`, if it is in `app`'s
    /// inbox namespace.
    pub(crate) fn new(client: &Client, app: &str) -> InHand {
        let renewals = format!("{}.renew", client.new_inbox());
        if !in_app_inbox(app, &renewals) {
            tracing::info!(
                %app,
                "the connection's inbox prefix is not _INBOX_{app}: working deliveries get no token for their moved deadline"
            );
        }
        InHand {
            held: Arc::default(),
            early: Arc::default(),
            renewals: in_app_inbox(app, &renewals).then_some(renewals),
        }
    }

    /// Takes attempt `attempt` of delivery `id` in hand until the returned guard drops; cancelled
    /// already when its cancel notice came first.
    pub(crate) fn take(&self, id: Uuid, attempt: u32) -> Taken {
        let mut held = self.held.lock().expect("in-hand lock");
        let entry = held.entry(id).or_insert_with(|| {
            let cancellation = CancellationToken::new();
            if self.early.lock().expect("early notices lock").has(id, Instant::now()) {
                cancellation.cancel();
            }
            Held { cancellation, renewed: HashMap::new(), holders: 0 }
        });
        entry.holders += 1;
        Taken {
            in_hand: self.clone(),
            id,
            cancellation: entry.cancellation.clone(),
            renewal: self.renewals.as_ref().map(|renewals| {
                let renewed = entry.renewed.entry(attempt).or_default().clone();
                (format!("{renewals}.{id}.{attempt}").into(), renewed)
            }),
        }
    }

    /// Subscribes to `cancel_subjects` (the handlers' cancel subjects) and to the renewal
    /// inbox; what comes is read by tasks in the set returned, until it is dropped. The caller
    /// confirms the subscriptions with a round trip.
    pub(crate) async fn listen(
        &self,
        client: &Client,
        cancel_subjects: Vec<String>,
    ) -> Result<JoinSet<()>, Error> {
        let mut listening = JoinSet::new();
        for subject in cancel_subjects {
            let mut notices = client.subscribe(subject).await?;
            let in_hand = self.clone();
            listening.spawn(async move {
                while let Some(msg) = notices.next().await {
                    match serde_json::from_slice::<CancelNotice>(&msg.payload) {
                        Ok(notice) => in_hand.cancel(notice.id),
                        Err(e) => {
                            tracing::warn!(subject = %msg.subject, error = %e, "malformed cancel notice");
                        }
                    }
                }
            });
        }
        let Some(prefix) = &self.renewals else { return Ok(listening) };
        let mut renewals = client.subscribe(format!("{prefix}.*.*")).await?;
        let in_hand = self.clone();
        listening.spawn(async move {
            while let Some(msg) = renewals.next().await {
                let mut tokens = msg.subject.rsplit('.');
                let attempt = tokens.next().and_then(|a| a.parse::<u32>().ok());
                let id = tokens.next().and_then(|id| id.parse::<Uuid>().ok());
                match (id, attempt, serde_json::from_slice::<Renewal>(&msg.payload)) {
                    (Some(id), Some(attempt), Ok(renewal)) => in_hand.with(id, |held| {
                        let Some(renewed) = held.renewed.get(&attempt) else { return };
                        let mut renewed = renewed.lock().expect("renewal lock");
                        // Renewals may cross on the wire: the latest deadline wins.
                        if renewed.as_ref().is_none_or(|r| r.piclouddeadline < renewal.piclouddeadline) {
                            *renewed = Some(renewal);
                        }
                    }),
                    _ => tracing::warn!(subject = %msg.subject, "malformed token renewal"),
                }
            }
        });
        Ok(listening)
    }

    /// Cancels delivery `id` if it is in hand, or else when it comes.
    fn cancel(&self, id: Uuid) {
        let held = self.held.lock().expect("in-hand lock");
        match held.get(&id) {
            Some(entry) => entry.cancellation.cancel(),
            None => self.early.lock().expect("early notices lock").note(id, Instant::now()),
        }
    }

    fn with(&self, id: Uuid, f: impl FnOnce(&Held)) {
        if let Some(held) = self.held.lock().expect("in-hand lock").get(&id) {
            f(held);
        }
    }
}

/// One attempt's hold on its delivery in hand; dropping it lets the delivery go with the last
/// attempt.
#[derive(Debug)]
pub(crate) struct Taken {
    in_hand: InHand,
    id: Uuid,
    /// Fired when a notice names the delivery.
    pub(crate) cancellation: CancellationToken,
    /// The reply subject of its `working` replies, where the relay sends the token of its moved
    /// deadline, and where that token is kept (`None` when the worker gets no renewals).
    pub(crate) renewal: Option<(async_nats::Subject, Renewed)>,
}

impl Drop for Taken {
    fn drop(&mut self) {
        let mut held = self.in_hand.held.lock().expect("in-hand lock");
        if let Some(entry) = held.get_mut(&self.id) {
            entry.holders -= 1;
            if entry.holders == 0 {
                held.remove(&self.id);
            }
        }
    }
}
