//! Knowing when a NATS connection is lost: an answer to a request published on a connection that
//! was lost can no longer arrive, so whoever waits for one stops waiting at once.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::Client;
use async_nats::connection::State;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How often the connection's state is looked at. async-nats reports state changes only to the
/// connect options' callback, which the parts handed a `Client` do not own.
const LOOK_EVERY: Duration = Duration::from_millis(20);

/// Counts the losses of one client's connection: a disconnect seen, or a reconnect that happened
/// between two looks. Cheap to clone; the watching stops with the last clone.
#[derive(Debug, Clone)]
pub struct ConnectionWatch {
    losses: watch::Receiver<u64>,
    _watcher: Arc<Watcher>,
}

#[derive(Debug)]
struct Watcher(JoinHandle<()>);

impl Drop for Watcher {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl ConnectionWatch {
    /// Starts watching `client`'s connection.
    pub fn spawn(client: &Client) -> ConnectionWatch {
        let (tx, losses) = watch::channel(0);
        let client = client.clone();
        let task = tokio::spawn(async move {
            let connects = || client.statistics().connects.load(Ordering::Relaxed);
            let mut was_connected = client.connection_state() == State::Connected;
            let mut last_connects = connects();
            loop {
                tokio::time::sleep(LOOK_EVERY).await;
                let connected = client.connection_state() == State::Connected;
                let now_connects = connects();
                let reconnected = now_connects != last_connects;
                // A disconnect seen, or one that came and went between two looks. A reconnect
                // after a disconnect already counted is not a second loss: what was published
                // while disconnected goes out on the new connection.
                if was_connected && (!connected || reconnected) {
                    tx.send_modify(|n| *n += 1);
                }
                was_connected = connected;
                last_connects = now_connects;
            }
        });
        ConnectionWatch { losses, _watcher: Arc::new(Watcher(task)) }
    }

    /// The losses so far: a request published now is lost when this count moves.
    pub fn losses(&self) -> u64 {
        *self.losses.borrow()
    }

    /// Resolves once the count of losses is past `seen`, and returns it.
    pub async fn lost_since(&self, seen: u64) -> u64 {
        let mut losses = self.losses.clone();
        let lost = losses.wait_for(|n| *n > seen).await.map(|n| *n);
        match lost {
            Ok(n) => n,
            // The watcher lives as long as this handle: its sender is never dropped first.
            Err(_) => std::future::pending().await,
        }
    }
}
