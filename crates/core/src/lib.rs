//! Domain types and rules of picloud-router, shared by every other crate.
//!
//! Architecture invariant: this crate does no I/O. It has no database driver, no NATS client and
//! no HTTP server in its dependency tree; everything here is a pure function of its inputs (the
//! clock and the random generator aside, for ids, jitter and token secrets).
#![warn(missing_docs)]

pub mod auth;
pub mod batch;
pub mod config;
pub mod cron;
pub mod flow;
pub mod ids;
pub mod names;
pub mod net;
pub mod pattern;
pub mod protocol;
pub mod retry;
pub mod stats;
pub mod token;
pub mod webhook;

pub use auth::{Access, Capability, Role, Scope, ScopeSet, role_satisfies};
pub use batch::Batch;
pub use config::{ConfigError, Secret, TriggerConfig};
pub use cron::{CronError, CronSchedule};
pub use flow::{FieldError, Flow};
pub use ids::{AppId, PrincipalId, TriggerId};
pub use names::{AppSlug, CollectionName, HandlerName, KvKey, NameError, QueueName, TopicName, TriggerName};
pub use net::{AllowNets, Refusal};
pub use pattern::{CollectionPattern, collection_matches};
pub use retry::{RetryOverrides, RetryPolicy};
pub use stats::{AttemptOutcome, Latencies, StatsWindow};
