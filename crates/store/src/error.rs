//! The store's error type.

use picloud_core::PrincipalId;
use uuid::Uuid;

/// What a repository call can fail with. Domain failures are named; driver failures are wrapped
/// and never shown to API callers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No app with this slug or id.
    #[error("app {0} not found")]
    AppNotFound(String),
    /// An app with this slug exists already.
    #[error("an app with slug {0} exists already")]
    DuplicateApp(String),
    /// No principal with this id.
    #[error("principal {0} not found")]
    PrincipalNotFound(PrincipalId),
    /// A platform admin exists already, and bootstrapping another was not forced.
    #[error("a platform admin exists already")]
    PlatformAdminExists,
    /// No token with this id.
    #[error("token {0} not found")]
    TokenNotFound(Uuid),
    /// No trigger with this name in the app.
    #[error("trigger {0} not found")]
    TriggerNotFound(String),
    /// The app has a trigger with this name already.
    #[error("a trigger named {0} exists already in this app")]
    DuplicateTrigger(String),
    /// The queue has a trigger already.
    #[error("queue {0} has a trigger already")]
    QueueTaken(String),
    /// A trigger refers to a principal that does not exist.
    #[error("principal {0} does not exist")]
    UnknownPrincipal(PrincipalId),
    /// No dead letter with this id in the app.
    #[error("dead letter {0} not found")]
    DeadLetterNotFound(Uuid),
    /// An `If-Match` version did not match.
    #[error("version mismatch: expected {expected}, current {current:?}")]
    VersionMismatch {
        /// The version the caller expected.
        expected: i64,
        /// The version there is (None: the key does not exist).
        current: Option<i64>,
    },
    /// A delivery with this idempotency key exists already (for a plain insert).
    #[error("a delivery with idempotency key {0:?} exists already")]
    DuplicateIdempotencyKey(String),
    /// A job for a queue that has no trigger.
    #[error("queue {0} has no trigger")]
    NoSuchQueue(String),
    /// A job for a queue whose trigger is disabled.
    #[error("the trigger of queue {0} is disabled")]
    QueueDisabled(String),
    /// A sync invocation at the depth limit.
    #[error("event depth {depth} reached the limit of {max}")]
    TooDeep {
        /// The event's depth.
        depth: u32,
        /// The configured limit.
        max: u32,
    },
    /// The event a write would produce is larger than events may be (DESIGN §10): nothing is
    /// written.
    #[error("the event's data would be larger than the {max} bytes that fit the NATS server's max_payload")]
    TooLarge {
        /// The limit.
        max: usize,
    },
    /// A dead letter cannot be replayed because its trigger was deleted.
    #[error("trigger {0:?} of this dead letter no longer exists")]
    TriggerGone(String),
    /// The write was made on an authorization read at a configuration epoch that has moved
    /// since: it wrote nothing, and is made again once the caller is authorized afresh.
    #[error("the configuration changed since the caller was authorized")]
    Stale,
    /// A concurrent writer changed what this write depended on; trying again succeeds.
    #[error("{0} changed concurrently; try again")]
    Conflict(String),
    /// A stored value could not be read back (a bug or a hand-edited row).
    #[error("corrupt row in {table}: {detail}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Applying migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl Error {
    /// Whether the database refused a text it was given: Postgres stores no NUL character, in
    /// text (`invalid byte sequence`) or in jsonb (`\u0000`).
    pub fn is_invalid_text(&self) -> bool {
        match self {
            Error::Database(sqlx::Error::Database(db)) => {
                matches!(db.code().as_deref(), Some("22021" | "22P05"))
            }
            _ => false,
        }
    }

    /// Whether Postgres could not be reached or is not serving: the connection failed or was
    /// lost, the pool had none to give in time, or the server is shutting down, starting up or
    /// full (SQLSTATE classes 08 and 57P, and 53300).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Database(e) => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                sqlx::Error::Database(db) => {
                    db.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "53300")
                }
                _ => false,
            },
            _ => false,
        }
    }

    /// Whether trying again may succeed: Postgres was unavailable ([`Error::is_unavailable`]) or
    /// the statement lost a race (serialization failures, deadlocks).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Conflict(_) => true,
            Error::Database(sqlx::Error::Database(db))
                if matches!(db.code().as_deref(), Some("40001" | "40P01")) =>
            {
                true
            }
            e => e.is_unavailable(),
        }
    }
}

/// The store's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
