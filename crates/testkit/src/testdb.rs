//! Per-test databases: created on a server shared by the test process (or on the server named
//! by `PICLOUD_TEST_DATABASE_URL`) and dropped when the test is done.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use sqlx::Connection as _;
use tokio::sync::OnceCell;

use picloud_local::{PgOptions, PgServer, Result};

use crate::exit;

/// The environment variable naming an existing server to create test databases on.
pub const TEST_DATABASE_URL_ENV: &str = "PICLOUD_TEST_DATABASE_URL";

/// How long dropping a test database may take before we give up on it.
const DROP_TIMEOUT: Duration = Duration::from_secs(30);

/// The throwaway server shared by every test of this process.
#[derive(Debug)]
struct SharedServer {
    /// URL of its `postgres` database.
    admin_url: String,
    /// The server itself. Statics are never dropped, so the `atexit` hook takes it out of here
    /// and drops it, which stops it and removes its dir; if the process is killed instead,
    /// the parent-death signal stops it and the next test process removes the dir.
    server: Mutex<Option<PgServer>>,
}

/// Started lazily by the first [`TestDatabase::create`]; initialisation is retried if it fails.
static SHARED: OnceCell<SharedServer> = OnceCell::const_new();

async fn start_shared() -> Result<SharedServer> {
    let server = PgServer::start(PgOptions::default()).await?;
    let shared = SharedServer { admin_url: server.url("postgres"), server: Mutex::new(Some(server)) };
    if let Err(error) = exit::at_exit(stop_shared_server) {
        tracing::warn!(%error, "cannot register the shared postgres's shutdown at exit");
    }
    Ok(shared)
}

extern "C" fn stop_shared_server() {
    if let Some(shared) = SHARED.get() {
        let server = shared.server.lock().unwrap_or_else(PoisonError::into_inner).take();
        drop(server);
    }
}

/// A fresh, empty database for one test.
///
/// Dropping it drops the database (best effort, `DROP DATABASE … WITH (FORCE)`), synchronously
/// on a helper thread with its own small runtime, so it works inside and outside a tokio
/// runtime.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    url: String,
    server_url: String,
}

impl TestDatabase {
    /// Creates `picloud_t_<uuid>`: on the server of `PICLOUD_TEST_DATABASE_URL` if it is set
    /// (a URL whose role may `CREATE DATABASE`), otherwise on one throwaway [`PgServer`]
    /// shared by the whole test process and started on first use.
    pub async fn create() -> Result<TestDatabase> {
        let server_url = match std::env::var(TEST_DATABASE_URL_ENV) {
            Ok(url) if !url.trim().is_empty() => url,
            _ => SHARED.get_or_try_init(start_shared).await?.admin_url.clone(),
        };
        let name = format!("picloud_t_{}", uuid::Uuid::now_v7().simple());
        let mut conn = sqlx::PgConnection::connect(&server_url).await?;
        sqlx::raw_sql(&format!("CREATE DATABASE \"{name}\"")).execute(&mut conn).await?;
        let _ = conn.close().await;
        let url = with_database(&server_url, &name);
        tracing::debug!(database = %name, "created test database");
        Ok(TestDatabase { name, url, server_url })
    }

    /// The URL of this database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name (`picloud_t_<uuid>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URL of the database it was created from (and will be dropped from) on the same
    /// server: the shared server's `postgres` database, or `PICLOUD_TEST_DATABASE_URL`.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let server_url = self.server_url.clone();
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        let dropper = std::thread::Builder::new().name("picloud-testkit-dropdb".into()).spawn(
            move || -> std::result::Result<(), String> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                runtime.block_on(async {
                    let drop_it = async {
                        let mut conn = sqlx::PgConnection::connect(&server_url).await?;
                        sqlx::raw_sql(&sql).execute(&mut conn).await?;
                        conn.close().await
                    };
                    match tokio::time::timeout(DROP_TIMEOUT, drop_it).await {
                        Ok(result) => result.map_err(|e| e.to_string()),
                        Err(_) => Err(format!("timed out after {}s", DROP_TIMEOUT.as_secs())),
                    }
                })
            },
        );
        let outcome = match dropper {
            Ok(handle) => handle.join().unwrap_or_else(|_| Err("the helper thread panicked".into())),
            Err(error) => Err(error.to_string()),
        };
        if let Err(error) = outcome {
            tracing::warn!(database = %self.name, %error, "cannot drop test database");
        }
    }
}

/// `url` with its database (the path) replaced by `database`, keeping any query string.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.find('?') {
        Some(i) => url.split_at(i),
        None => (url, ""),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..].find('/').map_or(base.len(), |i| authority_start + i);
    format!("{}/{database}{query}", &base[..path_start])
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn the_database_of_a_url_is_replaced_and_its_query_kept() {
        assert_eq!(with_database("postgres://u:p@h:5432/postgres", "x"), "postgres://u:p@h:5432/x");
        assert_eq!(with_database("postgres://u@h", "x"), "postgres://u@h/x");
        assert_eq!(
            with_database("postgres://u@h/db?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
        assert_eq!(
            with_database("postgresql://h:1/?sslmode=disable", "x"),
            "postgresql://h:1/x?sslmode=disable"
        );
    }
}
