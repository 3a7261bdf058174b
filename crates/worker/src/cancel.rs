//! Cancel notices (DESIGN §14): every worker of a handler hears
//! `picloud.v1.cancel.<app>.<handler>`, and the one running the delivery named in a notice fires
//! that delivery's cancellation token, which ends its handler's future.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_nats::Client;
use futures::StreamExt as _;
use picloud_core::protocol::CancelNotice;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Error;

/// The deliveries this worker runs, by id, with the token a notice fires and how many attempts
/// of it hold the token (a delivery timed out and retried may run twice here at once: a notice
/// stops both).
#[derive(Debug, Clone, Default)]
pub(crate) struct Cancels {
    running: Arc<Mutex<HashMap<Uuid, (CancellationToken, usize)>>>,
}

impl Cancels {
    /// The token of delivery `id`, fired by a notice for it while the returned guard lives.
    pub(crate) fn register(&self, id: Uuid) -> Registered {
        let mut running = self.running.lock().expect("cancels lock");
        let (token, holders) = running.entry(id).or_insert_with(|| (CancellationToken::new(), 0));
        *holders += 1;
        Registered { cancels: self.clone(), id, token: token.clone() }
    }

    fn cancel(&self, id: Uuid) {
        if let Some((token, _)) = self.running.lock().expect("cancels lock").get(&id) {
            token.cancel();
        }
    }

    /// Subscribes to `subjects` (the handlers' cancel subjects); the notices are read by tasks
    /// in the set returned, until it is dropped. The caller confirms the subscriptions with a
    /// round trip.
    pub(crate) async fn listen(&self, client: &Client, subjects: Vec<String>) -> Result<JoinSet<()>, Error> {
        let mut listening = JoinSet::new();
        for subject in subjects {
            let mut notices = client.subscribe(subject).await?;
            let cancels = self.clone();
            listening.spawn(async move {
                while let Some(msg) = notices.next().await {
                    match serde_json::from_slice::<CancelNotice>(&msg.payload) {
                        Ok(notice) => cancels.cancel(notice.id),
                        Err(e) => {
                            tracing::warn!(subject = %msg.subject, error = %e, "malformed cancel notice");
                        }
                    }
                }
            });
        }
        Ok(listening)
    }
}

/// One attempt's hold on its delivery's token; dropping it lets the token go with the last
/// attempt.
#[derive(Debug)]
pub(crate) struct Registered {
    cancels: Cancels,
    id: Uuid,
    /// Fired when a notice names the delivery.
    pub(crate) token: CancellationToken,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut running = self.cancels.running.lock().expect("cancels lock");
        if let Some((_, holders)) = running.get_mut(&self.id) {
            *holders -= 1;
            if *holders == 0 {
                running.remove(&self.id);
            }
        }
    }
}
