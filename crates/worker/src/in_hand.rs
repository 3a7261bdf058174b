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
use picloud_core::protocol::{CancelNotice, Renewal};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Error;

/// The token of a delivery's moved deadline, when the relay sent one.
pub(crate) type Renewed = Arc<Mutex<Option<Renewal>>>;

/// What a worker keeps of one delivery in hand.
#[derive(Debug)]
struct Held {
    cancellation: CancellationToken,
    renewed: Renewed,
    /// How many attempts of it are in hand (a delivery timed out and retried may run twice here
    /// at once: a notice stops both, and both see a renewal).
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
    /// `<a fresh inbox of the worker>.renew`: a delivery's renewals come to `<this>.<id>`.
    renewals: String,
}

impl InHand {
    /// Nothing in hand yet; renewals come to a fresh inbox of `client`.
    pub(crate) fn new(client: &Client) -> InHand {
        InHand {
            held: Arc::default(),
            early: Arc::default(),
            renewals: format!("{}.renew", client.new_inbox()),
        }
    }

    /// Takes delivery `id` in hand until the returned guard drops; cancelled already when its
    /// cancel notice came first.
    pub(crate) fn take(&self, id: Uuid) -> Taken {
        let mut held = self.held.lock().expect("in-hand lock");
        let entry = held.entry(id).or_insert_with(|| {
            let cancellation = CancellationToken::new();
            if self.early.lock().expect("early notices lock").has(id, Instant::now()) {
                cancellation.cancel();
            }
            Held { cancellation, renewed: Renewed::default(), holders: 0 }
        });
        entry.holders += 1;
        Taken {
            in_hand: self.clone(),
            id,
            cancellation: entry.cancellation.clone(),
            renewed: entry.renewed.clone(),
            renew_to: format!("{}.{id}", self.renewals).into(),
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
        let mut renewals = client.subscribe(format!("{}.*", self.renewals)).await?;
        let in_hand = self.clone();
        listening.spawn(async move {
            while let Some(msg) = renewals.next().await {
                let id = msg.subject.rsplit('.').next().and_then(|id| id.parse::<Uuid>().ok());
                match (id, serde_json::from_slice::<Renewal>(&msg.payload)) {
                    (Some(id), Ok(renewal)) => in_hand.with(id, |held| {
                        let mut renewed = held.renewed.lock().expect("renewal lock");
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
    /// The token of its moved deadline.
    pub(crate) renewed: Renewed,
    /// The reply subject of its `working` replies: where the relay sends that token.
    pub(crate) renew_to: async_nats::Subject,
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
