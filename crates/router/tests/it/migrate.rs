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
