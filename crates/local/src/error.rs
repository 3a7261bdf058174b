//! The crate's error type: what can go wrong finding, starting and talking to the servers.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while providing a throwaway server or database.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A server binary is not installed where we look for it.
    #[error("{binary} not found (looked in {searched}); install it with: {install}")]
    MissingBinary {
        /// The binary's file name, e.g. `initdb`.
        binary: String,
        /// Where we looked, in order, e.g. `/usr/lib/postgresql/15/bin and PATH`.
        searched: String,
        /// The Debian command that installs it, e.g. `apt-get install postgresql`.
        install: String,
    },

    /// Several server binaries are missing: each is named, with one command for all of them.
    #[error("server binaries not found:\n  {}\ninstall them with: {install}", missing.join("\n  "))]
    MissingBinaries {
        /// Each missing binary and where we looked, e.g. `initdb (looked in PATH)`.
        missing: Vec<String>,
        /// The Debian command that installs them all.
        install: String,
    },

    /// Running as root, PostgreSQL must run as a system user that does not exist.
    #[error(
        "running as root, but there is no `{user}` system user to run PostgreSQL as; install it with: apt-get install postgresql"
    )]
    MissingUser {
        /// The user we looked up.
        user: String,
    },

    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A server (or `initdb`) exited early, failed, or did not become ready in time.
    #[error("{server} failed: {reason}\n--- last lines of {} ---\n{log_tail}", log.display())]
    Startup {
        /// Which program, e.g. `postgres on port 40123`.
        server: String,
        /// What happened, e.g. `exited during startup (exit status: 1)` or
        /// `no accepted connection after 30s`.
        reason: String,
        /// The program's log file.
        log: PathBuf,
        /// The last lines of that log file.
        log_tail: String,
    },

    /// A statement against a test server failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),

    /// The caller asked for something that cannot be provided (e.g. a zero-node cluster).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// Adds a human-readable context to an `io::Result`.
pub trait IoContext<T> {
    /// Turns an I/O error into [`Error::Io`] with the context `f()`.
    fn context<C: Into<String>>(self, f: impl FnOnce() -> C) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context<C: Into<String>>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|source| Error::Io { context: f().into(), source })
    }
}
