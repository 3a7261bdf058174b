//! `PgServer` and `TestDatabase`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use picloud_testkit::{PgOptions, PgServer, PgShutdown, TestDatabase};
use sqlx::{Connection, PgConnection};

use crate::effective_uid;

#[tokio::test]
async fn a_test_database_accepts_connections_and_is_dropped_afterwards() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let (name, server_url) = (db.name().to_owned(), db.server_url().to_owned());
    assert!(name.starts_with("picloud_t_"), "{name}");

    let mut conn = PgConnection::connect(db.url()).await?;
    let one: i32 = sqlx::query_scalar("select 1").fetch_one(&mut conn).await?;
    let current: String = sqlx::query_scalar("select current_database()").fetch_one(&mut conn).await?;
    conn.close().await?;
    drop(db);

    assert_eq!(one, 1);
    assert_eq!(current, name);
    let mut admin = PgConnection::connect(&server_url).await?;
    let listed: i64 = sqlx::query_scalar("select count(*) from pg_database where datname = $1")
        .bind(&name)
        .fetch_one(&mut admin)
        .await?;
    assert_eq!(listed, 0, "{name} is still listed in pg_database");
    Ok(())
}

#[tokio::test]
async fn two_test_databases_are_distinct() -> anyhow::Result<()> {
    let a = TestDatabase::create().await?;
    let b = TestDatabase::create().await?;

    let mut conn_a = PgConnection::connect(a.url()).await?;
    sqlx::raw_sql("create table only_in_a (x int)").execute(&mut conn_a).await?;
    let mut conn_b = PgConnection::connect(b.url()).await?;
    let in_b: Option<String> =
        sqlx::query_scalar("select to_regclass('only_in_a')::text").fetch_one(&mut conn_b).await?;

    assert_ne!(a.name(), b.name());
    assert_ne!(a.url(), b.url());
    assert_eq!(in_b, None);
    Ok(())
}

#[tokio::test]
async fn a_throwaway_postgres_runs_as_a_non_root_user_when_started_as_root() -> anyhow::Result<()> {
    let server = PgServer::start(PgOptions::default()).await?;

    let mut conn = PgConnection::connect(&server.url("postgres")).await?;
    let data_dir: String =
        sqlx::query_scalar("select current_setting('data_directory')").fetch_one(&mut conn).await?;
    let owner = effective_uid(server.pid())?;
    let we = effective_uid(std::process::id())?;

    let base_dir = std::env::temp_dir().join("picloud-local");
    assert!(Path::new(&data_dir).starts_with(&base_dir), "{data_dir} is not under {}", base_dir.display());
    assert_eq!(Path::new(&data_dir), server.data_dir());
    if we == 0 {
        assert_ne!(owner, 0, "the postmaster runs as root");
    } else {
        assert_eq!(owner, we);
    }
    Ok(())
}

#[tokio::test]
async fn dropping_a_pg_server_removes_its_data_dir() -> anyhow::Result<()> {
    let server = PgServer::start(PgOptions::default()).await?;
    let data_dir = server.data_dir().to_owned();
    let server_dir = data_dir.parent().expect("the data dir has a parent").to_owned();
    let pid = server.pid();
    assert!(data_dir.join("PG_VERSION").exists());

    drop(server);

    assert!(!server_dir.exists(), "{} still exists", server_dir.display());
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "postmaster {pid} still runs");
    Ok(())
}

#[tokio::test]
async fn a_persistent_pg_server_keeps_its_data_between_starts() -> anyhow::Result<()> {
    // Under the local servers' dir and named after our pid, so a killed run's leftovers are removed
    // by the next run like the servers' own dirs.
    let base = std::env::temp_dir().join("picloud-local");
    std::fs::create_dir_all(&base)?;
    let parent =
        tempfile::Builder::new().prefix(&format!("persistent-{}-", std::process::id())).tempdir_in(&base)?;
    // As root the server runs as `postgres`, which must be able to reach the dir.
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755))?;
    let dir = parent.path().join("pg");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();

    let server = PgServer::start_persistent(&dir, port, PgOptions::default()).await?;
    let mut conn = PgConnection::connect(&server.url("postgres")).await?;
    sqlx::raw_sql("create table kept (x int); insert into kept values (42)").execute(&mut conn).await?;
    conn.close().await?;
    server.stop().await?;
    assert!(dir.join("data").join("PG_VERSION").exists());

    let server = PgServer::start_persistent(&dir, port, PgOptions::default()).await?;
    let mut conn = PgConnection::connect(&server.url("postgres")).await?;
    let kept: i32 = sqlx::query_scalar("select x from kept").fetch_one(&mut conn).await?;
    conn.close().await?;
    server.stop().await?;

    assert_eq!(kept, 42);
    assert!(dir.join("data").join("PG_VERSION").exists(), "stopping a persistent server removed its data");
    Ok(())
}

#[tokio::test]
async fn a_postgres_that_cannot_start_reports_the_tail_of_its_log() -> anyhow::Result<()> {
    let base = std::env::temp_dir().join("picloud-local");
    std::fs::create_dir_all(&base)?;
    let parent =
        tempfile::Builder::new().prefix(&format!("persistent-{}-", std::process::id())).tempdir_in(&base)?;
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755))?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port();

    let result = PgServer::start_persistent(&parent.path().join("pg"), port, PgOptions::default()).await;

    let error = result.expect_err("postgres started on a port that is taken");
    assert!(matches!(error, picloud_testkit::Error::Startup { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("Address already in use"), "{message}");
    Ok(())
}

/// What a restart left.
struct Restarted {
    /// The rows of the table, sorted.
    rows: Vec<String>,
    /// Whether the session open across the restart still works.
    session_survived: bool,
    /// Whether the server's log says it recovered from a crash.
    crash_recovery: bool,
    /// Port and postmaster pid, before and after.
    ports: (u16, u16),
    pids: (u32, u32),
}

/// Restarts a server in `mode` with one transaction committed (waiting for the WAL flush) and
/// one open, and reports what is left.
async fn restart_with_a_committed_and_an_open_transaction(mode: PgShutdown) -> anyhow::Result<Restarted> {
    let mut server = PgServer::start(PgOptions::default()).await?;
    let (port, pid) = (server.port(), server.pid());
    let mut conn = PgConnection::connect(&server.url("postgres")).await?;
    sqlx::raw_sql("create table t (x text); set synchronous_commit = on; insert into t values ('committed')")
        .execute(&mut conn)
        .await?;
    let mut open = PgConnection::connect(&server.url("postgres")).await?;
    sqlx::raw_sql("begin; insert into t values ('open')").execute(&mut open).await?;

    server.restart(mode).await?;

    let survived = sqlx::query_scalar::<_, i32>("select 1").fetch_one(&mut conn).await.is_ok();
    let mut fresh = PgConnection::connect(&server.url("postgres")).await?;
    let rows: Vec<String> = sqlx::query_scalar("select x from t order by x").fetch_all(&mut fresh).await?;
    let log = std::fs::read_to_string(server.log_path())?;
    Ok(Restarted {
        rows,
        session_survived: survived,
        crash_recovery: log.contains("automatic recovery in progress"),
        ports: (port, server.port()),
        pids: (pid, server.pid()),
    })
}

#[tokio::test]
async fn a_postgres_restarted_fast_comes_back_on_its_port_with_what_was_committed() -> anyhow::Result<()> {
    let restarted = restart_with_a_committed_and_an_open_transaction(PgShutdown::Fast).await?;

    assert_eq!(restarted.rows, ["committed"], "the open transaction was rolled back");
    assert!(!restarted.session_survived, "a session survived the restart");
    assert!(!restarted.crash_recovery, "a fast shutdown is clean: no crash recovery");
    assert_eq!(restarted.ports.1, restarted.ports.0);
    assert_ne!(restarted.pids.1, restarted.pids.0, "the postmaster was not restarted");
    Ok(())
}

#[tokio::test]
async fn a_postgres_restarted_immediately_recovers_what_was_committed_from_its_wal() -> anyhow::Result<()> {
    let restarted = restart_with_a_committed_and_an_open_transaction(PgShutdown::Immediate).await?;

    assert_eq!(restarted.rows, ["committed"], "the open transaction was rolled back");
    assert!(!restarted.session_survived, "a session survived the restart");
    assert!(restarted.crash_recovery, "an immediate shutdown leaves a crash to recover from");
    assert_eq!(restarted.ports.1, restarted.ports.0);
    assert_ne!(restarted.pids.1, restarted.pids.0, "the postmaster was not restarted");
    Ok(())
}
