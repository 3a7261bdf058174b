//! The relay of picloud-router, run on every node: it claims due outbox rows in batches, delivers
//! each as a NATS request whose body is the CloudEvents envelope, reads the handlers' answers on
//! a relay-owned inbox, and completes the rows in batches (delete, reschedule, dead-letter with
//! fan-out to dead-letter triggers). Results of sync rows are forwarded to their caller's inbox.

mod answer;
mod complete;
mod config;
mod envelope;
pub mod executors;
mod forward;
mod relay;
mod sync;

pub use answer::Answer;
pub use complete::{Completed, Done, complete};
pub use config::{NatsConfig, RelayConfig};
pub use executors::{ExecutorConfig, ExecutorError, SmtpConfig, run_executors};
pub use relay::{Relay, RelayError};
pub use sync::{deliver_sync, round_trip};
