//! Local servers from the binaries on this machine, for `picloud-router dev`, the tests and the
//! benchmarks:
//!
//! - [`PgServer`]: a PostgreSQL server on a loopback port, in a temp dir, or in a persistent dir
//!   (`dev` keeps its data between runs).
//! - [`NatsServer`] and [`NatsCluster`]: one nats-server, or n of them routed together (from
//!   this crate's own arguments or from the caller's config files).
//! - [`MailCatcher`]: an SMTP server on loopback that accepts every email (and keeps the last
//!   ones as files for `dev`).
//! - [`spawn_tied`]: any other child process forked the same way, so it too dies with the process
//!   that started it.
//! - [`require_server_binaries`]: every missing binary named at once, with the command that
//!   installs them.
//!
//! Every server is forked by one long-lived spawner thread with a parent-death signal, so it
//! dies with the process that started it even if that process is killed; a temp dir lives
//! under `temp_dir()/picloud-local/` and is named after the owning pid, so dirs of killed
//! processes are removed by the next process that starts a server.
//!
//! It must never depend on another picloud crate: the production binary links it for `dev`, and
//! the test kit builds on it.
#![warn(missing_docs)]
// `pre_exec` (to set the parent-death signal), signals and `getpwnam_r` need libc calls; all of
// them are in `sys`, each with its `SAFETY` comment.
#![allow(unsafe_code)]

mod binaries;
mod error;
mod nats;
mod pg;
mod process;
mod smtp;
mod sys;

pub use binaries::require_server_binaries;
pub use error::{Error, IoContext, Result};
pub use nats::{NatsCluster, NatsNodePorts, NatsServer};
pub use pg::{PgOptions, PgServer, PgShutdown};
pub use smtp::{CaughtMail, MailCatcher, MailDir, MailOptions, RcptRefusal};

/// `KEY=value` lines of an env file, trimmed; blank lines, `#` comments and lines without `=`
/// are skipped.
pub fn parse_env_file(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The development values of the shipped NATS configs (`nats/dev.env`): the passwords
/// `nats/tenants.conf` reads, as `compose.yaml` gives them by default.
pub fn nats_dev_env() -> std::collections::BTreeMap<String, String> {
    parse_env_file(include_str!("../../../nats/dev.env"))
}

/// Spawns `cmd` from the spawner thread with SIGKILL as its parent-death signal: the child is
/// killed when this process dies, however it dies (a test killed by a timeout leaves no
/// process behind). Stopping and reaping it otherwise is the caller's job.
pub async fn spawn_tied(cmd: std::process::Command) -> std::io::Result<std::process::Child> {
    process::spawn(cmd, libc::SIGKILL).await
}
