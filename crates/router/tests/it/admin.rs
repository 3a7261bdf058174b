//! `picloud-router admin`: the operator's commands against a migrated database.

use std::process::Command;

use std::time::Duration;

use picloud_core::{HandlerName, QueueName, TriggerConfig, TriggerName};
use picloud_store::events::{self, EventContext};
use picloud_store::{AuthRepo, Handler, NewTrigger, PgStore, Transactional, TriggerRepo, TriggerSpec};
use picloud_testkit::TestDatabase;
use serde_json::Value;

/// Runs `picloud-router <args>`; the JSON documents it printed, or its error text.
fn router(url: &str, args: &[&str]) -> Result<Vec<Value>, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_picloud-router"))
        .args(args)
        .env_remove("DATABASE_URL")
        .env("PICLOUD_DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run picloud-router");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect())
}

#[tokio::test]
async fn admin_bootstraps_a_platform_admin_manages_apps_members_and_tokens_and_lists_what_an_app_holds() {
    let db = TestDatabase::create().await.unwrap();
    let url = db.url();
    router(url, &["migrate"]).unwrap();
    let store = PgStore::connect(url, 2).await.unwrap();

    let boot = router(url, &["admin", "bootstrap", "--name", "ops"]).unwrap().remove(0);
    let token = boot["token"].as_str().unwrap();
    assert!(token.starts_with("pcr_"), "the token is printed once: {boot}");
    let (_, principal) = store
        .token_by_hash(&picloud_core::token::hash_api_token(token))
        .await
        .unwrap()
        .expect("the printed token is stored (as its hash)");
    assert!(principal.platform_admin, "bootstrap makes a platform admin");

    let shop = router(url, &["admin", "apps", "create", "shop"]).unwrap().remove(0);
    assert_eq!(shop["slug"], "shop");
    let dev = router(url, &["admin", "principals", "create", "dev"]).unwrap().remove(0);
    let dev_id = dev["id"].as_str().unwrap();
    let set = router(url, &["admin", "members", "set", "shop", dev_id, "developer"]).unwrap().remove(0);
    assert_eq!(set["role"], "developer");
    let minted = router(url, &["admin", "tokens", "create", dev_id, "--app", "shop"]).unwrap().remove(0);
    assert_eq!(minted["app"], "shop");
    let revoked = router(url, &["admin", "tokens", "revoke", minted["id"].as_str().unwrap()]).unwrap();
    assert_eq!(revoked[0]["revoked"], true);
    let listed = router(url, &["admin", "apps", "list"]).unwrap();
    assert_eq!(listed.iter().map(|a| a["slug"].clone()).collect::<Vec<_>>(), ["shop"]);
    assert!(router(url, &["admin", "dead-letters", "list", "shop", "--unresolved"]).unwrap().is_empty());
    assert!(router(url, &["admin", "triggers", "list", "shop"]).unwrap().is_empty());
    assert!(router(url, &["admin", "deliveries", "list", "shop"]).unwrap().is_empty());

    // A job on a queue trigger: listed by state and trigger, and shown with its event.
    let app = store.app_by_slug("shop").await.unwrap().unwrap();
    let queue = QueueName::parse("jobs").unwrap();
    let new = NewTrigger::new(
        app.id,
        TriggerName::parse("jobs").unwrap(),
        TriggerSpec::Queue { queue: queue.clone() },
        Handler::Function(HandlerName::parse("h").unwrap()),
        principal.id,
    );
    store.create_trigger(&new).await.unwrap();
    let config = TriggerConfig::default();
    let cx = EventContext { app_id: app.id, app_slug: &app.slug, depth: 0, config: &config };
    let payload = serde_json::value::to_raw_value(&serde_json::json!({"n": 1})).unwrap();
    let job =
        events::Job { payload: &payload, delay: Duration::ZERO, idempotency_key: None, ordering_key: None };
    let mut tx = store.begin().await.unwrap();
    let events::Enqueued::Created(id) = events::enqueue(&store, &mut tx, &cx, &queue, job).await.unwrap()
    else {
        panic!("the job was not enqueued")
    };
    store.commit(tx).await.unwrap();
    let pending =
        router(url, &["admin", "deliveries", "list", "shop", "--state", "pending", "--trigger", "jobs"])
            .unwrap();
    assert_eq!(
        pending.iter().map(|d| (d["id"].clone(), d["trigger"].clone())).collect::<Vec<_>>(),
        [(serde_json::json!(id), serde_json::json!("jobs"))]
    );
    assert!(
        router(url, &["admin", "deliveries", "list", "shop", "--state", "scheduled"]).unwrap().is_empty()
    );
    let shown = router(url, &["admin", "deliveries", "show", "shop", &id.to_string()]).unwrap().remove(0);
    assert_eq!(
        (shown["state"].clone(), shown["event"]["data"].clone()),
        (serde_json::json!("pending"), serde_json::json!({"n": 1}))
    );
}

#[tokio::test]
async fn admin_refuses_bad_input_with_a_clear_message_and_changes_nothing() {
    let db = TestDatabase::create().await.unwrap();
    let url = db.url();
    router(url, &["migrate"]).unwrap();
    let bad_slug = router(url, &["admin", "apps", "create", "Not A Slug"]).unwrap_err();
    assert!(bad_slug.contains("slug"), "{bad_slug}");
    let no_app = router(url, &["admin", "triggers", "list", "nowhere"]).unwrap_err();
    assert!(no_app.contains("no app nowhere"), "{no_app}");
    router(url, &["admin", "apps", "create", "shop"]).unwrap();
    let principal = router(url, &["admin", "principals", "create", "p"]).unwrap().remove(0);
    let bad_role =
        router(url, &["admin", "members", "set", "shop", principal["id"].as_str().unwrap(), "owner"])
            .unwrap_err();
    assert!(bad_role.contains("viewer, developer or admin"), "{bad_role}");
    let unknown =
        router(url, &["admin", "dead-letters", "replay", "shop", &uuid::Uuid::now_v7().to_string()])
            .unwrap_err();
    assert!(unknown.contains("dead_letter_not_found") || unknown.contains("not found"), "{unknown}");
    let bad_state = router(url, &["admin", "deliveries", "list", "shop", "--state", "done"]).unwrap_err();
    assert!(bad_state.contains("pending, scheduled, in_flight or waiting"), "{bad_state}");
    let no_delivery =
        router(url, &["admin", "deliveries", "show", "shop", &uuid::Uuid::now_v7().to_string()]).unwrap_err();
    assert!(no_delivery.contains("no delivery"), "{no_delivery}");
    assert_eq!(
        router(url, &["admin", "apps", "list"]).unwrap().len(),
        1,
        "nothing was written by the refusals"
    );
}

async fn platform_admins(store: &PgStore) -> Vec<String> {
    sqlx::query_scalar("SELECT name FROM principals WHERE platform_admin ORDER BY created_at")
        .fetch_all(store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn bootstrap_refuses_a_second_platform_admin_unless_forced_and_can_make_its_token_expire() {
    let db = TestDatabase::create().await.unwrap();
    let url = db.url();
    router(url, &["migrate"]).unwrap();
    let store = PgStore::connect(url, 2).await.unwrap();

    let before = time::OffsetDateTime::now_utc();
    let boot =
        router(url, &["admin", "bootstrap", "--name", "ops", "--expires-in", "30d"]).unwrap().remove(0);
    let after = time::OffsetDateTime::now_utc();
    let (token, _) = store
        .token_by_hash(&picloud_core::token::hash_api_token(boot["token"].as_str().unwrap()))
        .await
        .unwrap()
        .expect("the token is stored");
    let expires_at = token.expires_at.expect("--expires-in sets an expiry");
    let thirty_days = time::Duration::days(30);
    assert!(
        before + thirty_days <= expires_at && expires_at <= after + thirty_days,
        "expires 30 days after the bootstrap: {expires_at}"
    );
    assert!(boot["expires_at"].is_string(), "the expiry is printed: {boot}");

    let refused = router(url, &["admin", "bootstrap", "--name", "second"]).unwrap_err();
    assert!(refused.contains("a platform admin exists already") && refused.contains("--force"), "{refused}");
    assert_eq!(platform_admins(&store).await, ["ops"], "the refusal wrote nothing");

    let forced = router(url, &["admin", "bootstrap", "--name", "second", "--force"]).unwrap().remove(0);
    assert!(forced["token"].as_str().unwrap().starts_with("pcr_"));
    assert_eq!(forced["expires_at"], Value::Null, "without --expires-in the token does not expire");
    assert_eq!(platform_admins(&store).await, ["ops", "second"]);

    for bad in ["0", "30y", "1.5h", "4000d"] {
        let refused = router(url, &["admin", "bootstrap", "--force", "--expires-in", bad]).unwrap_err();
        assert!(refused.contains("--expires-in") && refused.contains("e.g. 30d"), "{bad}: {refused}");
    }
    assert_eq!(platform_admins(&store).await.len(), 2, "bad input wrote nothing");
}
