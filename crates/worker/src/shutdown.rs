//! The stop signal: one [`ShutdownSender`] whose [`Shutdown`] is cloned into every part that must
//! stop with it (a node's relay, API, ingest, executors…; a worker's queue consumers), each of
//! which finishes what it holds and returns.

use tokio::sync::watch;

/// Tells every [`Shutdown`] cloned from its pair to stop. Dropping it stops them too: a part is
/// never left waiting for a signal nobody can send any more.
#[derive(Debug)]
pub struct ShutdownSender {
    /// `true` once stopping; a watch, so a part that looks late still sees it.
    signal: watch::Sender<bool>,
}

impl ShutdownSender {
    /// Asks every part holding a [`Shutdown`] of this pair to stop. Sending again changes nothing.
    pub fn send(&self) {
        self.signal.send_replace(true);
    }
}

/// A part's end of the stop signal: cheap to clone, one per task that must notice it.
#[derive(Debug, Clone)]
pub struct Shutdown {
    /// The sender's `true`, or its absence once the sender is gone: both mean stop.
    signal: watch::Receiver<bool>,
}

impl Shutdown {
    /// A new signal: send on the [`ShutdownSender`], hand clones of the [`Shutdown`] out.
    pub fn new() -> (ShutdownSender, Shutdown) {
        let (signal, receiver) = watch::channel(false);
        (ShutdownSender { signal }, Shutdown { signal: receiver })
    }

    /// Whether stopping was asked for: for loops that check between steps rather than wait.
    pub fn is_shutdown(&self) -> bool {
        *self.signal.borrow() || self.signal.has_changed().is_err()
    }

    /// Waits until stopping is asked for (at once if it already was). Cancel-safe, so it may be
    /// one branch of a `select!` in a loop.
    pub async fn recv(&mut self) {
        let _ = self.signal.wait_for(|stop| *stop).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_clone_sees_the_signal_sent_before_or_after_it_looks() {
        let (sender, mut first) = Shutdown::new();
        let mut late = first.clone();
        assert!(!first.is_shutdown());
        let waiting = tokio::spawn(async move { first.recv().await });
        sender.send();
        waiting.await.unwrap();
        assert!(late.is_shutdown());
        late.recv().await;
    }

    #[tokio::test]
    async fn a_dropped_sender_means_stop() {
        let (sender, mut shutdown) = Shutdown::new();
        drop(sender);
        assert!(shutdown.is_shutdown());
        shutdown.recv().await;
    }
}
