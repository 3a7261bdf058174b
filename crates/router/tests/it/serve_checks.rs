//! What `picloud-router serve` refuses to start with: a NATS server whose `max_payload` cannot
//! carry the largest envelope it may send, and the development secrets published with it.

use picloud_core::protocol::largest_envelope_bytes;
use picloud_store::{PgStore, pg};
use picloud_testkit::{NatsServer, TestDatabase};

use crate::support::{Serving, nats_for_serve};

#[tokio::test]
async fn serve_refuses_a_nats_server_whose_max_payload_cannot_carry_its_largest_envelope() {
    let db = TestDatabase::create().await.unwrap();
    let store = PgStore::connect(db.url(), 2).await.unwrap();
    pg::migrate(store.pool()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let small = NatsServer::start().await.unwrap();

    let mut refused =
        Serving::start(dir.path(), &[("PICLOUD_DATABASE_URL", db.url()), ("PICLOUD_NATS_URL", &small.url())])
            .await;
    let status = refused.exit_status().await;
    let log = refused.log();
    assert!(!status.success(), "{log}");
    let largest = largest_envelope_bytes(1_048_576);
    for needle in [
        "PICLOUD_MAX_PAYLOAD_BYTES=1048576".to_owned(),
        format!("reach {largest} bytes"),
        "at most 1048576 bytes (its max_payload)".to_owned(),
    ] {
        assert!(log.contains(&needle), "the refusal says {needle:?}:\n{log}");
    }
    assert!(!log.contains("serving"), "{log}");

    let fitting = nats_for_serve(dir.path()).await;
    let mut serving = Serving::start(
        dir.path(),
        &[("PICLOUD_DATABASE_URL", db.url()), ("PICLOUD_NATS_URL", &fitting.url())],
    )
    .await;
    serving.logged("serving").await;
}

/// Runs `serve` with `env` until it exits; its status and log. A refusal comes before it
/// connects to anything.
async fn refusal(env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let env = [&[("PICLOUD_DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")], env].concat();
    let mut serving = Serving::start(dir.path(), &env).await;
    (serving.exit_status().await, serving.log())
}

#[tokio::test]
async fn serve_refuses_the_development_token_secret_and_nats_passwords_and_says_what_to_set() {
    let (status, log) =
        refusal(&[("PICLOUD_TOKEN_SECRET", "dev-only-token-secret-change-me-0123456789")]).await;
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("PICLOUD_TOKEN_SECRET is a development value")
            && log.contains("openssl rand -base64 32"),
        "names the variable and what to set:\n{log}"
    );

    for (variable, password) in picloud_testkit::nats_dev_env() {
        let (status, log) =
            refusal(&[("PICLOUD_NATS_USER", "router"), ("PICLOUD_NATS_PASSWORD", &password)]).await;
        assert!(!status.success(), "{variable}'s value: {log}");
        assert!(
            log.contains("PICLOUD_NATS_PASSWORD is a development password of nats/dev.env")
                && log.contains("a password of your own"),
            "{variable}'s value: names the variable and what to set:\n{log}"
        );
    }
}
