//! The relay of picloud-router, run on every node: it claims due outbox rows in batches, delivers
//! each as a NATS request whose body is the CloudEvents envelope, reads the handlers' answers on
//! a relay-owned inbox, and completes the rows in batches (delete, reschedule, dead-letter with
//! fan-out to dead-letter triggers). Results of sync rows are forwarded to their caller's inbox.
//! Beside it: the cron scheduler (due ticks into the outbox), the janitor (retention of dead
//! letters and abandoned executions) and the node's metrics.
//!
//! It depends on `core`, `store` and `worker` (the queue-group loop the executors run on, and the
//! stop signal every part takes), never on the API: the API calls it (one sync delivery), not
//! the other way round.
#![warn(missing_docs)]

mod abandoned;
mod answer;
mod complete;
mod config;
mod connection;
mod envelope;
pub mod executors;
mod janitor;
mod limits;
pub mod metrics;
mod relay;
mod report;
mod scheduler;
mod shares;
mod sync;
#[cfg(test)]
mod testing;

pub use answer::Answer;
pub use complete::{Completed, Done, complete};
pub use config::{MAX_HANDLER_TIMEOUT_MS, NatsConfig, NodeConfig, RelayConfig};
pub use connection::ConnectionWatch;
pub use executors::{ExecutorConfig, ExecutorError, SmtpConfig, run_executors};
pub use janitor::{Janitor, JanitorConfig, SweepLock, Swept};
pub use metrics::{Metrics, MetricsError};
pub use relay::{Relay, RelayError};
pub use report::Reporter;
pub use scheduler::{Scheduler, SchedulerConfig};
pub use sync::{NoAnswer, SyncAnswers, SyncCaller, SyncReply, deliver_sync, sync_call};
