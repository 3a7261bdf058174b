//! `picloud-router migrate` against a fresh database.

use std::process::Command;

use picloud_testkit::TestDatabase;

fn migrate(url: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_picloud-router"))
        .arg("migrate")
        .env_remove("DATABASE_URL")
        .env("PICLOUD_DATABASE_URL", url)
        .output()
        .expect("run picloud-router")
}

#[tokio::test]
async fn migrate_brings_an_empty_database_to_the_schema_twice_without_error() {
    let db = TestDatabase::create().await.unwrap();
    for run in 1..=2 {
        let out = migrate(db.url());
        assert!(out.status.success(), "run {run} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for table in [
        "abandoned_executions",
        "api_tokens",
        "app_members",
        "apps",
        "cron_trigger_details",
        "dead_letter_trigger_details",
        "dead_letters",
        "kv_entries",
        "kv_trigger_details",
        "outbox",
        "principals",
        "pubsub_trigger_details",
        "queue_trigger_details",
        "triggers",
    ] {
        assert!(tables.iter().any(|t| t == table), "missing table {table}; have {tables:?}");
    }
    let applied: i64 =
        sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations").fetch_one(&pool).await.unwrap();
    assert_eq!(applied as usize, picloud_store::pg::MIGRATOR.iter().count());
}

#[test]
fn migrate_without_a_database_url_says_which_variable_to_set() {
    let out = Command::new(env!("CARGO_BIN_EXE_picloud-router"))
        .arg("migrate")
        .env_remove("DATABASE_URL")
        .env_remove("PICLOUD_DATABASE_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PICLOUD_DATABASE_URL"));
}

/// `serve` without `--migrate`, expected to refuse before it connects to NATS.
fn serve_unmigrated(url: &str) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_picloud-router"));
    cmd.arg("serve");
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("PICLOUD_")) {
        cmd.env_remove(k);
    }
    cmd.env_remove("DATABASE_URL")
        .env("PICLOUD_DATABASE_URL", url)
        .env("PICLOUD_NATS_URL", "nats://127.0.0.1:1")
        .env("PICLOUD_TOKEN_SECRET", "migrate-test-secret-0123456789")
        .env("PICLOUD_HTTP_ADDR", "127.0.0.1:0")
        .output()
        .expect("run picloud-router")
}

#[tokio::test]
async fn serve_refuses_a_database_that_lacks_migrations_and_says_how_to_apply_them() {
    let db = TestDatabase::create().await.unwrap();
    let empty = serve_unmigrated(db.url());
    let stderr = String::from_utf8_lossy(&empty.stderr);
    assert!(!empty.status.success());
    assert!(stderr.contains("picloud-router migrate"), "{stderr}");

    assert!(migrate(db.url()).status.success());
    let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
    let newest = picloud_store::pg::MIGRATOR.iter().map(|m| m.version).max().unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1").bind(newest).execute(&pool).await.unwrap();
    let older = serve_unmigrated(db.url());
    let stderr = String::from_utf8_lossy(&older.stderr);
    assert!(!older.status.success());
    assert!(stderr.contains(&format!("[{newest}]")), "names the missing migration: {stderr}");
}
