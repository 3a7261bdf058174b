//! One suite, two stores: every test here runs against `PgStore` and `MemStore`.

use std::collections::HashSet;
use std::time::Duration;

use picloud_core::protocol::EventKind;
use picloud_core::{
    AppId, AppSlug, Batch, CollectionPattern, HandlerName, PrincipalId, QueueName, RetryOverrides, Role,
    Scope, ScopeSet, TriggerId, TriggerName,
};
use picloud_store::*;
use serde_json::json as j;
use uuid::Uuid;

use crate::support::*;

conformance!(
    an_app_slug_is_unique,
    apps_are_listed_by_slug_in_pages_and_filtered_by_membership,
    a_role_can_be_set_changed_and_removed,
    standing_tells_platform_admins_members_and_missing_principals_apart,
    memberships_need_an_existing_app_and_principal,
    a_token_is_found_by_its_hash_with_its_principal_and_is_revoked_once,
    authentication_resolves_the_principal_the_named_app_and_the_role_in_one_look_up,
    bootstrap_writes_a_platform_admin_and_its_token_together_and_refuses_a_second_unless_forced,
    deleting_an_app_removes_everything_of_it,
    a_trigger_of_each_kind_reads_back_as_registered,
    a_trigger_name_is_unique_within_an_app_only,
    a_trigger_is_read_by_id_in_a_transaction_only_within_its_app,
    a_queue_has_at_most_one_trigger,
    a_trigger_needs_an_existing_principal_and_app,
    triggers_are_listed_by_name_in_keyset_pages,
    a_patch_changes_only_the_fields_given,
    a_batch_reads_back_also_to_the_relay_and_a_patch_changes_keeps_or_removes_it,
    kv_matching_follows_patterns_ops_and_the_enabled_flag,
    pubsub_matching_follows_patterns_and_the_enabled_flag,
    the_queue_trigger_is_found_by_queue_name,
    dead_letter_matching_filters_by_source_trigger_and_kind,
    delivery_targets_carry_the_app_slug_and_the_current_standing,
    deleting_a_trigger_keeps_its_dead_letters_and_their_trigger_name,
    a_delivery_is_claimed_once_with_its_attempt_counted_and_its_event_intact,
    a_delayed_delivery_is_not_claimed_before_it_is_due,
    claims_take_the_oldest_due_first_up_to_the_batch,
    a_claimed_row_is_claimable_again_after_its_lease_and_not_before,
    a_lease_extended_for_a_working_handler_keeps_the_row_until_the_new_end,
    a_sync_call_is_written_claimed_by_its_node_and_leased_like_any_claim,
    a_sync_call_to_a_missing_disabled_or_non_http_trigger_writes_nothing,
    a_sync_call_authorized_at_an_older_epoch_writes_nothing,
    a_rescheduled_row_comes_back_after_its_delay_with_its_error,
    a_refunded_attempt_is_not_counted_when_the_row_comes_back,
    completions_for_a_stale_attempt_change_nothing,
    deleted_deliveries_are_gone,
    a_dropped_transaction_writes_nothing,
    a_repeated_idempotency_key_returns_the_first_id,
    pending_for_dead_letter_counts_the_other_reporting_deliveries,
    a_wake_up_reaches_every_listener,
    a_claim_of_written_rows_takes_those_of_them_claimable_now,
    a_configuration_change_moves_the_epoch_claims_and_targets_report,
    a_put_that_fires_writes_the_entry_and_one_delivery_per_matching_trigger,
    a_put_whose_event_would_be_too_large_writes_nothing_unless_nothing_fires,
    next_due_in_tells_how_long_until_the_earliest_delayed_delivery,
    burying_moves_a_delivery_into_the_dead_letters_with_its_event,
    dead_letters_written_directly_read_back,
    dead_letters_are_listed_newest_first_with_filters_in_keyset_pages,
    only_unresolved_dead_letters_count_and_resolve_respects_its_guard,
    every_field_of_a_dead_letter_filter_narrows_lists_counts_and_locks_alike,
    dead_letters_are_locked_oldest_first_after_the_cursor_up_to_the_limit_and_only_of_the_app,
    gc_deletes_only_resolved_dead_letters_past_retention_in_batches,
    abandoned_executions_are_recorded_listed_newest_first_and_collected,
    every_abandon_reason_and_handler_status_is_stored_and_read_back,
    lists_of_payloads_end_a_page_where_its_payloads_reach_the_byte_cap,
    a_put_creates_version_one_and_each_put_increments_and_returns_the_previous_value,
    a_put_with_a_stale_or_impossible_version_fails_and_changes_nothing,
    a_delete_returns_the_entry_and_honours_the_expected_version,
    keys_are_listed_by_prefix_in_key_order_and_pages,
);

async fn an_app_slug_is_unique<S: Store>(s: S) {
    let slug = AppSlug::parse("shop").unwrap();
    let app = s.create_app(&slug).await.unwrap();
    assert!(matches!(s.create_app(&slug).await, Err(Error::DuplicateApp(_))));
    assert_eq!(s.app_by_slug("shop").await.unwrap(), Some(app.clone()));
    assert_eq!(s.app_by_id(app.id).await.unwrap(), Some(app));
    assert_eq!(s.app_by_slug("nope").await.unwrap(), None);
}

async fn apps_are_listed_by_slug_in_pages_and_filtered_by_membership<S: Store>(s: S) {
    for slug in ["c-app", "a-app", "b-app", "ab"] {
        s.create_app(&AppSlug::parse(slug).unwrap()).await.unwrap();
    }
    let first = s.list_apps(None, None, 2).await.unwrap();
    let slugs: Vec<_> = first.items.iter().map(|a| a.slug.to_string()).collect();
    assert_eq!(slugs, ["a-app", "ab"]);
    assert!(first.has_more);
    let rest = s.list_apps(None, Some("ab"), 10).await.unwrap();
    let slugs: Vec<_> = rest.items.iter().map(|a| a.slug.to_string()).collect();
    assert_eq!(slugs, ["b-app", "c-app"]);
    assert!(!rest.has_more);

    let p = s.create_principal("p", false).await.unwrap();
    let b = s.app_by_slug("b-app").await.unwrap().unwrap();
    s.set_role(b.id, p.id, Role::Viewer).await.unwrap();
    let mine = s.list_apps(Some(p.id), None, 10).await.unwrap();
    assert_eq!(mine.items, vec![b]);
}

async fn a_role_can_be_set_changed_and_removed<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let p = s.create_principal("dev", false).await.unwrap();
    s.set_role(t.app.id, p.id, Role::Viewer).await.unwrap();
    assert_eq!(s.standing(t.app.id, p.id).await.unwrap().unwrap().role, Some(Role::Viewer));
    s.set_role(t.app.id, p.id, Role::Developer).await.unwrap();
    assert_eq!(s.standing(t.app.id, p.id).await.unwrap().unwrap().role, Some(Role::Developer));
    assert!(s.remove_member(t.app.id, p.id).await.unwrap());
    assert!(!s.remove_member(t.app.id, p.id).await.unwrap());
    assert_eq!(s.standing(t.app.id, p.id).await.unwrap().unwrap().role, None);
}

async fn standing_tells_platform_admins_members_and_missing_principals_apart<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let root = s.create_principal("root", true).await.unwrap();
    assert_eq!(
        s.standing(t.app.id, root.id).await.unwrap(),
        Some(Standing { platform_admin: true, role: None })
    );
    assert_eq!(
        s.standing(t.app.id, t.admin.id).await.unwrap(),
        Some(Standing { platform_admin: false, role: Some(Role::Admin) })
    );
    assert_eq!(s.standing(t.app.id, PrincipalId::new()).await.unwrap(), None);
    assert_eq!(s.principal(root.id).await.unwrap(), Some(root));
}

async fn memberships_need_an_existing_app_and_principal<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let ghost = PrincipalId::new();
    assert!(
        matches!(s.set_role(t.app.id, ghost, Role::Viewer).await, Err(Error::PrincipalNotFound(id)) if id == ghost)
    );
    assert!(matches!(s.set_role(AppId::new(), t.admin.id, Role::Viewer).await, Err(Error::AppNotFound(_))));
}

async fn a_token_is_found_by_its_hash_with_its_principal_and_is_revoked_once<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let scopes: ScopeSet = [Scope::AppRead].into_iter().collect();
    let new = NewApiToken {
        id: Uuid::now_v7(),
        principal_id: t.admin.id,
        token_hash: [7; 32],
        app_id: Some(t.app.id),
        scopes: Some(scopes),
        expires_at: Some(START + Duration::from_secs(3600)),
    };
    let stored = s.create_token(&new).await.unwrap();
    assert_eq!((stored.app_id, stored.scopes, stored.expires_at), (new.app_id, new.scopes, new.expires_at));
    let (found, principal) = s.token_by_hash(&[7; 32]).await.unwrap().unwrap();
    assert_eq!(found, stored);
    assert_eq!(principal, t.admin);
    assert!(s.token_by_hash(&[8; 32]).await.unwrap().is_none());

    assert!(s.revoke_token(new.id).await.unwrap());
    assert!(!s.revoke_token(new.id).await.unwrap());
    assert_eq!(s.token(new.id).await.unwrap().unwrap().revoked_at, Some(START));
    let unknown =
        NewApiToken { id: Uuid::now_v7(), principal_id: PrincipalId::new(), token_hash: [9; 32], ..new };
    assert!(matches!(s.create_token(&unknown).await, Err(Error::PrincipalNotFound(_))));
}

async fn authentication_resolves_the_principal_the_named_app_and_the_role_in_one_look_up<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let other = tenant(&s, "other").await;
    let new = NewApiToken {
        id: Uuid::now_v7(),
        principal_id: t.admin.id,
        token_hash: [3; 32],
        app_id: None,
        scopes: None,
        expires_at: None,
    };
    s.create_token(&new).await.unwrap();
    let found = s.authenticate_token(&[3; 32], Some("shop")).await.unwrap().unwrap();
    assert_eq!((found.principal.id, found.token.map(|t| t.id)), (t.admin.id, Some(new.id)));
    assert_eq!((found.app.map(|a| a.id), found.role), (Some(t.app.id), Some(Role::Admin)));
    let elsewhere = s.authenticate_token(&[3; 32], Some("other")).await.unwrap().unwrap();
    assert_eq!((elsewhere.app.map(|a| a.id), elsewhere.role), (Some(other.app.id), None));
    let unknown_app = s.authenticate_token(&[3; 32], Some("nope")).await.unwrap().unwrap();
    assert!(unknown_app.app.is_none());
    assert!(s.authenticate_token(&[4; 32], None).await.unwrap().is_none());

    let by_principal = s.authenticate_principal(t.admin.id, Some("shop")).await.unwrap().unwrap();
    assert_eq!((by_principal.token.is_none(), by_principal.role), (true, Some(Role::Admin)));
    assert!(s.authenticate_principal(PrincipalId::new(), None).await.unwrap().is_none());
}

async fn bootstrap_writes_a_platform_admin_and_its_token_together_and_refuses_a_second_unless_forced<
    S: Store,
>(
    s: S,
) {
    let admin = |name: &str, hash: u8| NewPlatformAdmin {
        name: name.to_owned(),
        token_id: Uuid::now_v7(),
        token_hash: [hash; 32],
        expires_at: Some(START + Duration::from_secs(3600)),
    };
    // Nothing is written until the caller commits.
    let mut tx = s.begin().await.unwrap();
    s.bootstrap_platform_admin(&mut tx, &admin("dropped", 1), false).await.unwrap();
    drop(tx);
    assert!(s.token_by_hash(&[1; 32]).await.unwrap().is_none(), "a dropped bootstrap wrote nothing");

    let first = admin("ops", 2);
    let mut tx = s.begin().await.unwrap();
    let (principal, token) = s.bootstrap_platform_admin(&mut tx, &first, false).await.unwrap();
    s.commit(tx).await.unwrap();
    assert_eq!((principal.name.as_str(), principal.platform_admin), ("ops", true));
    assert_eq!(
        (token.id, token.principal_id, token.app_id, token.scopes, token.expires_at),
        (first.token_id, principal.id, None, None, first.expires_at)
    );
    assert_eq!(s.token_by_hash(&[2; 32]).await.unwrap(), Some((token, principal.clone())));

    let mut tx = s.begin().await.unwrap();
    assert!(matches!(
        s.bootstrap_platform_admin(&mut tx, &admin("again", 3), false).await,
        Err(Error::PlatformAdminExists)
    ));
    drop(tx);
    assert!(s.token_by_hash(&[3; 32]).await.unwrap().is_none(), "the refusal wrote nothing");

    let mut tx = s.begin().await.unwrap();
    let (forced, _) = s.bootstrap_platform_admin(&mut tx, &admin("forced", 4), true).await.unwrap();
    s.commit(tx).await.unwrap();
    assert_ne!(forced.id, principal.id);
    assert_eq!(s.token_by_hash(&[4; 32]).await.unwrap().map(|(_, p)| p.platform_admin), Some(true));
}

async fn deleting_an_app_removes_everything_of_it<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "doomed").await;
    let (other, other_trigger) = tenant_with_trigger(&s, "kept").await;
    s.create_token(&NewApiToken {
        id: Uuid::now_v7(),
        principal_id: t.admin.id,
        token_hash: [1; 32],
        app_id: Some(t.app.id),
        scopes: None,
        expires_at: None,
    })
    .await
    .unwrap();
    let mut tx = s.begin().await.unwrap();
    s.kv_put(&mut tx, t.app.id, "orders", "k", &j!(1), None).await.unwrap();
    s.kv_put(&mut tx, other.app.id, "orders", "k", &j!(1), None).await.unwrap();
    s.insert_deliveries(
        &mut tx,
        &[delivery(&t, &trigger, Duration::ZERO), delivery(&other, &other_trigger, Duration::ZERO)],
    )
    .await
    .unwrap();
    s.commit(tx).await.unwrap();

    assert!(s.delete_app(t.app.id).await.unwrap());
    assert!(!s.delete_app(t.app.id).await.unwrap());
    assert!(s.app_by_id(t.app.id).await.unwrap().is_none());
    assert!(s.token_by_hash(&[1; 32]).await.unwrap().is_none());
    assert!(s.kv_get(t.app.id, "orders", "k").await.unwrap().is_none());
    assert!(s.trigger(t.app.id, "on-order").await.unwrap().is_none());
    let claimed = s.claim_due(10, LEASE, "n").await.unwrap().rows;
    assert_eq!(claimed.iter().map(|c| c.app_id).collect::<Vec<_>>(), [other.app.id]);
    assert!(s.kv_get(other.app.id, "orders", "k").await.unwrap().is_some());
}

async fn a_trigger_of_each_kind_reads_back_as_registered<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let specs = [
        ("kv", kv_spec("orders:*", &[KvOp::Put, KvOp::Delete])),
        ("pubsub", TriggerSpec::Pubsub { topic: CollectionPattern::parse("news").unwrap() }),
        ("queue", TriggerSpec::Queue { queue: QueueName::parse("mail").unwrap() }),
        (
            "cron",
            TriggerSpec::Cron {
                schedule: picloud_core::CronSchedule::parse("*/5 * * * *", "Europe/Paris").unwrap(),
            },
        ),
        (
            "dl",
            TriggerSpec::DeadLetter {
                source_trigger: Some(TriggerName::parse("kv").unwrap()),
                source_kinds: Some(vec![EventKind::Kv, EventKind::Email]),
            },
        ),
        ("dl-any", TriggerSpec::DeadLetter { source_trigger: None, source_kinds: None }),
        ("http", TriggerSpec::Http),
    ];
    for (name, spec) in specs {
        let mut new = new_trigger(&t, name, spec);
        new.retry =
            RetryOverrides { max_attempts: Some(4), backoff_base_ms: None, backoff_max_ms: Some(9000) };
        if name == "http" {
            new.handler =
                Handler::Webhook { url: "https://example.test/hook".into(), secret: "whsec_abc".into() };
            new.enabled = false;
        }
        let created = s.create_trigger(&new).await.unwrap();
        let read = s.trigger(t.app.id, name).await.unwrap().unwrap();
        assert_eq!(created, read);
        assert_eq!(
            (
                read.id,
                read.app_id,
                &read.name,
                &read.spec,
                &read.handler,
                read.retry,
                read.enabled,
                read.registered_by
            ),
            (
                new.id,
                new.app_id,
                &new.name,
                &new.spec,
                &new.handler,
                new.retry,
                new.enabled,
                new.registered_by
            ),
            "{name}"
        );
        assert_eq!(read.created_at, START);
    }
}

async fn a_trigger_name_is_unique_within_an_app_only<S: Store>(s: S) {
    let a = tenant(&s, "a").await;
    let b = tenant(&s, "b").await;
    s.create_trigger(&new_trigger(&a, "t", TriggerSpec::Http)).await.unwrap();
    let again = s.create_trigger(&new_trigger(&a, "t", TriggerSpec::Http)).await;
    assert!(matches!(again, Err(Error::DuplicateTrigger(n)) if n == "t"));
    s.create_trigger(&new_trigger(&b, "t", TriggerSpec::Http)).await.unwrap();
}

async fn a_trigger_is_read_by_id_in_a_transaction_only_within_its_app<S: Store>(s: S) {
    let a = tenant(&s, "a").await;
    let b = tenant(&s, "b").await;
    let t = s.create_trigger(&new_trigger(&a, "t", TriggerSpec::Http)).await.unwrap();
    let mut tx = s.begin().await.unwrap();
    assert_eq!(s.trigger_by_id(&mut tx, a.app.id, t.id).await.unwrap().map(|f| f.name), Some(t.name));
    assert!(s.trigger_by_id(&mut tx, b.app.id, t.id).await.unwrap().is_none(), "another app's trigger");
    assert!(s.trigger_by_id(&mut tx, a.app.id, TriggerId::new()).await.unwrap().is_none());
    s.commit(tx).await.unwrap();
}

async fn a_queue_has_at_most_one_trigger<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let other = tenant(&s, "other").await;
    let queue = || TriggerSpec::Queue { queue: QueueName::parse("mail").unwrap() };
    s.create_trigger(&new_trigger(&t, "first", queue())).await.unwrap();
    let second = s.create_trigger(&new_trigger(&t, "second", queue())).await;
    assert!(matches!(second, Err(Error::QueueTaken(q)) if q == "mail"));
    assert!(s.trigger(t.app.id, "second").await.unwrap().is_none(), "nothing of the refused trigger stays");
    s.create_trigger(&new_trigger(&other, "first", queue())).await.unwrap();
}

async fn a_trigger_needs_an_existing_principal_and_app<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let mut new = new_trigger(&t, "t", TriggerSpec::Http);
    new.registered_by = PrincipalId::new();
    assert!(matches!(s.create_trigger(&new).await, Err(Error::UnknownPrincipal(_))));
    let mut new = new_trigger(&t, "t", TriggerSpec::Http);
    new.app_id = AppId::new();
    assert!(matches!(s.create_trigger(&new).await, Err(Error::AppNotFound(_))));
}

async fn triggers_are_listed_by_name_in_keyset_pages<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    for name in ["b", "a-1", "c", "a1"] {
        s.create_trigger(&new_trigger(&t, name, TriggerSpec::Http)).await.unwrap();
    }
    let first = s.list_triggers(t.app.id, None, 3).await.unwrap();
    let names: Vec<_> = first.items.iter().map(|t| t.name.to_string()).collect();
    assert_eq!(names, ["a-1", "a1", "b"]);
    assert!(first.has_more);
    let rest = s.list_triggers(t.app.id, Some("b"), 3).await.unwrap();
    assert_eq!(rest.items.iter().map(|t| t.name.to_string()).collect::<Vec<_>>(), ["c"]);
    assert!(!rest.has_more);
}

async fn a_patch_changes_only_the_fields_given<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    s.clock().advance(Duration::from_secs(5));
    let disabled = s
        .update_trigger(t.app.id, "on-order", &TriggerPatch { enabled: Some(false), ..Default::default() })
        .await
        .unwrap();
    assert!(!disabled.enabled);
    assert_eq!((disabled.handler.clone(), disabled.retry), (trigger.handler.clone(), trigger.retry));
    assert_eq!(disabled.updated_at, START + Duration::from_secs(5));

    let retry = RetryOverrides { max_attempts: Some(2), ..Default::default() };
    let hook = Handler::Webhook { url: "https://h.test/x".into(), secret: "whsec_x".into() };
    let changed = s
        .update_trigger(
            t.app.id,
            "on-order",
            &TriggerPatch {
                enabled: None,
                handler: Some(hook.clone()),
                retry: Some(retry),
                flow: None,
                batch: None,
            },
        )
        .await
        .unwrap();
    assert_eq!((changed.enabled, changed.handler, changed.retry), (false, hook, retry));
    assert_eq!(changed.spec, trigger.spec);
    let back = Handler::Function(HandlerName::parse("other").unwrap());
    let back_again = s
        .update_trigger(
            t.app.id,
            "on-order",
            &TriggerPatch { handler: Some(back.clone()), ..Default::default() },
        )
        .await
        .unwrap();
    assert_eq!(back_again.handler, back);
    let missing = s.update_trigger(t.app.id, "nope", &TriggerPatch::default()).await;
    assert!(matches!(missing, Err(Error::TriggerNotFound(_))));
}

async fn a_batch_reads_back_also_to_the_relay_and_a_patch_changes_keeps_or_removes_it<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let batch = Batch { max_size: 100, max_wait_ms: 1_000 };
    let new =
        NewTrigger { batch: Some(batch), ..new_trigger(&t, "batched", kv_spec("orders", &[KvOp::Put])) };
    let created = s.create_trigger(&new).await.unwrap();
    assert_eq!(created.batch, Some(batch));
    assert_eq!(s.trigger(t.app.id, "batched").await.unwrap().unwrap().batch, Some(batch));
    let targets = s.delivery_targets(&[created.id]).await.unwrap();
    assert_eq!(targets.targets[0].trigger.batch, Some(batch), "the relay reads it with the trigger");

    // The relay keeps what it read for as long as the epoch stays: a new batch must move it.
    let bigger = Batch { max_size: 1_000, max_wait_ms: 0 };
    let patch = TriggerPatch { batch: Some(Some(bigger)), ..TriggerPatch::default() };
    assert_eq!(s.update_trigger(t.app.id, "batched", &patch).await.unwrap().batch, Some(bigger));
    let changed = s.delivery_targets(&[created.id]).await.unwrap();
    assert_eq!(changed.targets[0].trigger.batch, Some(bigger));
    assert_ne!(changed.config_epoch, targets.config_epoch, "a new batch moves the epoch");

    let unrelated = TriggerPatch { enabled: Some(false), ..TriggerPatch::default() };
    let kept = s.update_trigger(t.app.id, "batched", &unrelated).await.unwrap();
    assert_eq!(kept.batch, Some(bigger), "a patch without a batch keeps it");
    let removed = TriggerPatch { batch: Some(None), ..TriggerPatch::default() };
    assert_eq!(s.update_trigger(t.app.id, "batched", &removed).await.unwrap().batch, None);
    assert_eq!(s.trigger(t.app.id, "batched").await.unwrap().unwrap().batch, None);
    assert_eq!(s.delivery_targets(&[created.id]).await.unwrap().targets[0].trigger.batch, None);
}

async fn names_of<S: Store>(triggers: Vec<Trigger>, _s: &S) -> Vec<String> {
    triggers.into_iter().map(|t| t.name.to_string()).collect()
}

async fn kv_matching_follows_patterns_ops_and_the_enabled_flag<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let other = tenant(&s, "other").await;
    for (name, pattern, ops) in [
        ("all", "*", &[KvOp::Put, KvOp::Delete][..]),
        ("orders-prefix", "orders:*", &[KvOp::Put][..]),
        ("orders-exact", "orders", &[KvOp::Delete][..]),
        ("tmp", "tmp_*", &[KvOp::Put][..]),
    ] {
        s.create_trigger(&new_trigger(&t, name, kv_spec(pattern, ops))).await.unwrap();
    }
    let mut off = new_trigger(&t, "off", kv_spec("*", &[KvOp::Put]));
    off.enabled = false;
    s.create_trigger(&off).await.unwrap();
    s.create_trigger(&new_trigger(&other, "elsewhere", kv_spec("*", &[KvOp::Put]))).await.unwrap();
    s.create_trigger(&new_trigger(
        &t,
        "topic",
        TriggerSpec::Pubsub { topic: CollectionPattern::parse("*").unwrap() },
    ))
    .await
    .unwrap();

    let mut tx = s.begin().await.unwrap();
    let cases = [
        ("orders:eu", KvOp::Put, vec!["all", "orders-prefix"]),
        ("orders:eu", KvOp::Delete, vec!["all"]),
        ("orders", KvOp::Put, vec!["all"]),
        ("orders", KvOp::Delete, vec!["all", "orders-exact"]),
        ("tmp_1", KvOp::Put, vec!["all", "tmp"]),
        ("tmp", KvOp::Put, vec!["all"]),
    ];
    for (collection, op, expected) in cases {
        let found = s.list_matching_kv(&mut tx, t.app.id, collection, op).await.unwrap();
        assert_eq!(names_of(found, &s).await, expected, "{collection} {op:?}");
    }
}

async fn pubsub_matching_follows_patterns_and_the_enabled_flag<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    for (name, pattern, enabled) in
        [("news-all", "news*", true), ("exact", "news", true), ("off", "*", false)]
    {
        let mut new =
            new_trigger(&t, name, TriggerSpec::Pubsub { topic: CollectionPattern::parse(pattern).unwrap() });
        new.enabled = enabled;
        s.create_trigger(&new).await.unwrap();
    }
    let mut tx = s.begin().await.unwrap();
    assert_eq!(
        names_of(s.list_matching_pubsub(&mut tx, t.app.id, "news").await.unwrap(), &s).await,
        ["exact", "news-all"]
    );
    assert_eq!(
        names_of(s.list_matching_pubsub(&mut tx, t.app.id, "newsletter").await.unwrap(), &s).await,
        ["news-all"]
    );
    assert!(s.list_matching_pubsub(&mut tx, t.app.id, "sport").await.unwrap().is_empty());
}

async fn the_queue_trigger_is_found_by_queue_name<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let mut new = new_trigger(&t, "mailer", TriggerSpec::Queue { queue: QueueName::parse("mail").unwrap() });
    new.enabled = false;
    s.create_trigger(&new).await.unwrap();
    let mut tx = s.begin().await.unwrap();
    assert_eq!(s.queue_trigger(&mut tx, t.app.id, "mail").await.unwrap().map(|t| t.id), Some(new.id));
    assert!(s.queue_trigger(&mut tx, t.app.id, "other").await.unwrap().is_none());
}

async fn dead_letter_matching_filters_by_source_trigger_and_kind<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let dl = |source: Option<&str>, kinds: Option<Vec<EventKind>>| TriggerSpec::DeadLetter {
        source_trigger: source.map(|n| TriggerName::parse(n).unwrap()),
        source_kinds: kinds,
    };
    s.create_trigger(&new_trigger(&t, "any", dl(None, None))).await.unwrap();
    s.create_trigger(&new_trigger(&t, "of-orders", dl(Some("orders"), None))).await.unwrap();
    s.create_trigger(&new_trigger(&t, "of-email", dl(None, Some(vec![EventKind::Email])))).await.unwrap();
    let mut tx = s.begin().await.unwrap();
    let m = |found: Vec<Trigger>| found.into_iter().map(|t| t.name.to_string()).collect::<Vec<_>>();
    assert_eq!(
        m(s.list_matching_dead_letter(&mut tx, t.app.id, Some("orders"), EventKind::Kv).await.unwrap()),
        ["any", "of-orders"]
    );
    assert_eq!(
        m(s.list_matching_dead_letter(&mut tx, t.app.id, None, EventKind::Email).await.unwrap()),
        ["any", "of-email"]
    );
    assert_eq!(
        m(s.list_matching_dead_letter(&mut tx, t.app.id, Some("x"), EventKind::Queue).await.unwrap()),
        ["any"]
    );
}

async fn delivery_targets_carry_the_app_slug_and_the_current_standing<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    let targets = s.delivery_targets(&[trigger.id, TriggerId::new()]).await.unwrap().targets;
    assert_eq!(targets.len(), 1);
    assert_eq!(targets[0].trigger, trigger);
    assert_eq!(targets[0].app_slug.as_str(), "shop");
    assert_eq!(targets[0].standing, Some(Standing { platform_admin: false, role: Some(Role::Admin) }));
    s.remove_member(t.app.id, t.admin.id).await.unwrap();
    let targets = s.delivery_targets(&[trigger.id]).await.unwrap().targets;
    assert_eq!(targets[0].standing, Some(Standing { platform_admin: false, role: None }));
}

async fn deleting_a_trigger_keeps_its_dead_letters_and_their_trigger_name<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    insert(&s, &[delivery(&t, &trigger, Duration::ZERO)]).await;
    let claimed = s.claim_due(1, LEASE, "n").await.unwrap().rows;
    let mut tx = s.begin().await.unwrap();
    let dead = s
        .bury(
            &mut tx,
            &[Bury { id: claimed[0].id, attempt: 1, reason: DeadLetterReason::Rejected, error: None }],
        )
        .await
        .unwrap();
    s.commit(tx).await.unwrap();
    assert!(s.delete_trigger(t.app.id, "on-order").await.unwrap());
    assert!(!s.delete_trigger(t.app.id, "on-order").await.unwrap());
    let kept = s.dead_letter(t.app.id, dead[0].id).await.unwrap().unwrap();
    assert_eq!(kept.trigger_id, None);
    assert_eq!(kept.trigger_name.as_deref(), Some("on-order"));
}

async fn a_delivery_is_claimed_once_with_its_attempt_counted_and_its_event_intact<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    let mut row = delivery(&t, &trigger, Duration::ZERO);
    row.depth = 2;
    row.reply_to = Some("_INBOX.x".into());
    row.event_time = Some(START - Duration::from_secs(60));
    insert(&s, std::slice::from_ref(&row)).await;

    let claimed = s.claim_due(10, LEASE, "node-a").await.unwrap().rows;
    assert_eq!(claimed.len(), 1);
    let c = &claimed[0];
    assert_eq!((c.id, c.app_id, c.trigger_id, c.kind), (row.id, row.app_id, row.trigger_id, row.kind));
    assert_eq!((&c.event_type, &c.source, &c.subject), (&row.event_type, &row.source, &row.subject));
    assert_eq!(serde_json::from_str::<serde_json::Value>(c.payload.get()).unwrap()["value"], j!({"n": 1}));
    assert_eq!((c.depth, c.attempt, c.max_attempts), (2, 1, 3));
    assert_eq!((c.reply_to.as_deref(), c.created_at), (Some("_INBOX.x"), START - Duration::from_secs(60)));
    assert!(
        s.claim_due(10, LEASE, "node-b").await.unwrap().rows.is_empty(),
        "a leased row is not claimed twice"
    );
}

async fn a_delayed_delivery_is_not_claimed_before_it_is_due<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    insert(&s, &[delivery(&t, &trigger, Duration::from_secs(10))]).await;
    assert!(s.claim_due(10, LEASE, "n").await.unwrap().rows.is_empty());
    s.clock().advance(Duration::from_millis(9_999));
    assert!(s.claim_due(10, LEASE, "n").await.unwrap().rows.is_empty());
    s.clock().advance(Duration::from_millis(1));
    assert_eq!(s.claim_due(10, LEASE, "n").await.unwrap().rows.len(), 1);
}

async fn claims_take_the_oldest_due_first_up_to_the_batch<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    let rows: Vec<NewDelivery> =
        [3u64, 1, 2, 0].iter().map(|d| delivery(&t, &trigger, Duration::from_secs(*d))).collect();
    insert(&s, &rows).await;
    s.clock().advance(Duration::from_secs(3));
    // A batch holds the oldest due rows; within a batch no order is promised.
    let ids = |claimed: Vec<ClaimedDelivery>| claimed.into_iter().map(|c| c.id).collect::<HashSet<_>>();
    let first = ids(s.claim_due(2, LEASE, "n").await.unwrap().rows);
    assert_eq!(first, HashSet::from([rows[3].id, rows[1].id]));
    let second = ids(s.claim_due(5, LEASE, "n").await.unwrap().rows);
    assert_eq!(second, HashSet::from([rows[2].id, rows[0].id]));
}

async fn a_claimed_row_is_claimable_again_after_its_lease_and_not_before<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    insert(&s, &[delivery(&t, &trigger, Duration::ZERO)]).await;
    assert_eq!(s.claim_due(10, LEASE, "dead-node").await.unwrap().rows[0].attempt, 1);
    s.clock().advance(LEASE - Duration::from_millis(1));
    assert!(s.claim_due(10, LEASE, "n").await.unwrap().rows.is_empty(), "not before the lease ends");
    s.clock().advance(Duration::from_millis(1));
    let again = s.claim_due(10, LEASE, "n").await.unwrap().rows;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempt, 2, "the new claim counts another attempt");
}

async fn a_lease_extended_for_a_working_handler_keeps_the_row_until_the_new_end<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    insert(&s, &[delivery(&t, &trigger, Duration::ZERO)]).await;
    let row = s.claim_due(10, LEASE, "n").await.unwrap().rows.remove(0);
    s.clock().advance(LEASE / 2);
    let extend = |attempt, lease| LeaseExtension { id: row.id, attempt, lease, progress: None };
    assert!(s.extend_leases("n", &[extend(2, LEASE * 2)]).await.unwrap().is_empty(), "another attempt's");
    assert!(s.extend_leases("m", &[extend(1, LEASE * 2)]).await.unwrap().is_empty(), "another node's");
    assert_eq!(s.extend_leases("n", &[extend(1, LEASE)]).await.unwrap(), [row.id]);
    assert_eq!(
        s.extend_leases("n", &[extend(1, Duration::ZERO)]).await.unwrap(),
        [row.id],
        "never shortened"
    );
    s.clock().advance(LEASE - Duration::from_millis(1));
    assert!(s.claim_due(10, LEASE, "m").await.unwrap().rows.is_empty(), "not before the new end");
    s.clock().advance(Duration::from_millis(1));
    assert_eq!(s.claim_due(10, LEASE, "m").await.unwrap().rows[0].attempt, 2);
}

fn sync_call(t: &Tenant, trigger_name: &str) -> NewSyncCall {
    NewSyncCall {
        id: Uuid::now_v7(),
        app_id: t.app.id,
        trigger_name: trigger_name.into(),
        source: format!("/apps/{}/triggers/{trigger_name}", t.app.slug),
        payload: serde_json::value::RawValue::from_string(r#"{"q":1}"#.into()).unwrap(),
        depth: 0,
        reply_to: "_INBOX_shop.caller".into(),
        authorized_at: None,
    }
}

fn written(write: SyncCallWrite) -> (ClaimedDelivery, DeliveryTarget) {
    match write {
        SyncCallWrite::Written { row, target } => (row, *target),
        other => panic!("expected the call to be written, found {other:?}"),
    }
}

async fn a_sync_call_is_written_claimed_by_its_node_and_leased_like_any_claim<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let trigger = s.create_trigger(&new_trigger(&t, "call", TriggerSpec::Http)).await.unwrap();
    let call = sync_call(&t, "call");
    let (mine, target) = written(s.insert_sync_call(&call, LEASE, "api-node").await.unwrap());
    assert_eq!(
        (mine.id, mine.trigger_id, mine.kind, mine.attempt, mine.max_attempts, mine.reply_to.as_deref()),
        (call.id, Some(trigger.id), EventKind::Http, 1, 1, Some("_INBOX_shop.caller"))
    );
    assert_eq!((mine.payload.get(), mine.source.as_str()), (r#"{"q":1}"#, "/apps/shop/triggers/call"));
    assert_eq!(
        (target.trigger, target.app_slug.as_str(), target.standing),
        (trigger, "shop", Some(Standing { platform_admin: false, role: Some(Role::Admin) })),
        "the target is read with the write"
    );
    assert!(s.claim_due(10, LEASE, "relay").await.unwrap().rows.is_empty(), "a relay skips the leased row");
    s.clock().advance(LEASE);
    let after = s.claim_due(10, LEASE, "relay").await.unwrap().rows;
    assert_eq!(
        after.iter().map(|c| (c.id, c.attempt)).collect::<Vec<_>>(),
        [(call.id, 2)],
        "a relay delivers it once the node's lease ran out"
    );
}

async fn a_sync_call_authorized_at_an_older_epoch_writes_nothing<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    s.create_trigger(&new_trigger(&t, "call", TriggerSpec::Http)).await.unwrap();
    let read = s.authenticate_principal(t.admin.id, Some("shop")).await.unwrap().unwrap();
    let guarded = |epoch| NewSyncCall { authorized_at: Some(epoch), ..sync_call(&t, "call") };
    let token = s
        .create_token(&NewApiToken {
            id: Uuid::now_v7(),
            principal_id: t.admin.id,
            token_hash: [7; 32],
            app_id: None,
            scopes: None,
            expires_at: None,
        })
        .await
        .unwrap();
    let (row, _) = written(s.insert_sync_call(&guarded(read.config_epoch), LEASE, "n").await.unwrap());
    assert_eq!(row.attempt, 1, "creating a token changes no one's authorization");
    assert!(s.revoke_token(token.id).await.unwrap());
    let stale = s.insert_sync_call(&guarded(read.config_epoch), LEASE, "n").await.unwrap();
    assert!(matches!(stale, SyncCallWrite::Stale), "a revocation moves the epoch: {stale:?}");
    let missing = NewSyncCall { trigger_name: "missing".into(), ..guarded(read.config_epoch) };
    let stale = s.insert_sync_call(&missing, LEASE, "n").await.unwrap();
    assert!(matches!(stale, SyncCallWrite::Stale), "staleness is told before the trigger: {stale:?}");
    let again = s.authenticate_principal(t.admin.id, Some("shop")).await.unwrap().unwrap();
    assert!(again.config_epoch > read.config_epoch);
    written(s.insert_sync_call(&guarded(again.config_epoch), LEASE, "n").await.unwrap());
    s.clock().advance(LEASE);
    assert_eq!(s.claim_due(10, LEASE, "n").await.unwrap().rows.len(), 2, "only the two current calls");
}

async fn a_sync_call_to_a_missing_disabled_or_non_http_trigger_writes_nothing<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let queue = TriggerSpec::Queue { queue: QueueName::parse("jobs").unwrap() };
    s.create_trigger(&new_trigger(&t, "job", queue)).await.unwrap();
    s.create_trigger(&new_trigger(&t, "call", TriggerSpec::Http)).await.unwrap();
    let off = TriggerPatch { enabled: Some(false), ..Default::default() };
    s.update_trigger(t.app.id, "call", &off).await.unwrap();
    let other = tenant(&s, "other").await;
    s.create_trigger(&new_trigger(&other, "elsewhere", TriggerSpec::Http)).await.unwrap();

    let outcome = |write: SyncCallWrite| match write {
        SyncCallWrite::NoTrigger => "no trigger".to_owned(),
        SyncCallWrite::Refused(trigger) => format!("refused {}", trigger.name),
        SyncCallWrite::Stale => "stale".to_owned(),
        SyncCallWrite::Written { row, .. } => format!("written {}", row.id),
    };
    for (name, expected) in [
        ("missing", "no trigger"),
        ("elsewhere", "no trigger"),
        ("job", "refused job"),
        ("call", "refused call"),
    ] {
        let write = s.insert_sync_call(&sync_call(&t, name), LEASE, "n").await.unwrap();
        assert_eq!(outcome(write), expected, "calling {name}");
    }
    s.clock().advance(LEASE);
    assert!(s.claim_due(10, LEASE, "n").await.unwrap().rows.is_empty(), "no row was written");
}

async fn a_refunded_attempt_is_not_counted_when_the_row_comes_back<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    insert(&s, &[delivery(&t, &trigger, Duration::ZERO)]).await;
    for _ in 0..3 {
        let c = s.claim_due(1, LEASE, "n").await.unwrap().rows.remove(0);
        assert_eq!(c.attempt, 1, "every claim is the first attempt again");
        let mut tx = s.begin().await.unwrap();
        let waiting = Reschedule {
            id: c.id,
            attempt: 1,
            delay: Duration::ZERO,
            error: "waits".into(),
            refund_attempt: true,
            record: None,
        };
        assert_eq!(s.reschedule(&mut tx, &[waiting]).await.unwrap(), 1);
        s.commit(tx).await.unwrap();
    }
}

async fn a_rescheduled_row_comes_back_after_its_delay_with_its_error<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    insert(&s, &[delivery(&t, &trigger, Duration::ZERO)]).await;
    let c = s.claim_due(1, LEASE, "n").await.unwrap().rows.remove(0);
    let mut tx = s.begin().await.unwrap();
    let moved = s
        .reschedule(
            &mut tx,
            &[Reschedule {
                id: c.id,
                attempt: 1,
                delay: Duration::from_secs(2),
                error: "boom".into(),
                refund_attempt: false,
                record: None,
            }],
        )
        .await
        .unwrap();
    s.commit(tx).await.unwrap();
    assert_eq!(moved, 1);
    s.clock().advance(Duration::from_millis(1_999));
    assert!(s.claim_due(1, LEASE, "n").await.unwrap().rows.is_empty());
    s.clock().advance(Duration::from_millis(1));
    let again = s.claim_due(1, LEASE, "n").await.unwrap().rows.remove(0);
    assert_eq!((again.id, again.attempt, again.last_error.as_deref()), (c.id, 2, Some("boom")));
}

async fn completions_for_a_stale_attempt_change_nothing<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    insert(&s, &[delivery(&t, &trigger, Duration::ZERO)]).await;
    let first = s.claim_due(1, LEASE, "slow").await.unwrap().rows.remove(0);
    s.clock().advance(LEASE);
    let second = s.claim_due(1, LEASE, "fast").await.unwrap().rows.remove(0);
    assert_eq!(second.attempt, 2);
    let mut tx = s.begin().await.unwrap();
    let stale = Reschedule {
        id: first.id,
        attempt: 1,
        delay: Duration::ZERO,
        error: "late".into(),
        refund_attempt: false,
        record: None,
    };
    assert_eq!(s.reschedule(&mut tx, &[stale]).await.unwrap(), 0);
    let buried = s
        .bury(&mut tx, &[Bury { id: first.id, attempt: 1, reason: DeadLetterReason::Exhausted, error: None }])
        .await
        .unwrap();
    assert!(buried.is_empty());
    s.commit(tx).await.unwrap();
    assert!(
        s.claim_due(1, LEASE, "n").await.unwrap().rows.is_empty(),
        "the second claim's lease still holds"
    );
}

async fn deleted_deliveries_are_gone<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    let rows = [delivery(&t, &trigger, Duration::ZERO), delivery(&t, &trigger, Duration::ZERO)];
    insert(&s, &rows).await;
    let claimed = s.claim_due(10, LEASE, "n").await.unwrap().rows;
    let mut tx = s.begin().await.unwrap();
    assert_eq!(
        s.delete_deliveries(&mut tx, &[claimed[0].id, claimed[1].id, Uuid::now_v7()]).await.unwrap(),
        2
    );
    s.commit(tx).await.unwrap();
    s.clock().advance(LEASE * 2);
    assert!(s.claim_due(10, LEASE, "n").await.unwrap().rows.is_empty());
}

async fn a_dropped_transaction_writes_nothing<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    {
        let mut tx = s.begin().await.unwrap();
        s.kv_put(&mut tx, t.app.id, "orders", "k", &j!({"a": 1}), None).await.unwrap();
        s.insert_deliveries(&mut tx, &[delivery(&t, &trigger, Duration::ZERO)]).await.unwrap();
    }
    assert!(s.kv_get(t.app.id, "orders", "k").await.unwrap().is_none());
    assert!(s.claim_due(10, LEASE, "n").await.unwrap().rows.is_empty());
}

async fn a_repeated_idempotency_key_returns_the_first_id<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    let mut first = delivery(&t, &trigger, Duration::ZERO);
    first.idempotency_key = Some("job-1".into());
    let mut second = delivery(&t, &trigger, Duration::ZERO);
    second.idempotency_key = Some("job-1".into());
    let mut tx = s.begin().await.unwrap();
    assert_eq!(s.insert_idempotent(&mut tx, &first).await.unwrap(), (first.id, true));
    assert_eq!(s.insert_idempotent(&mut tx, &second).await.unwrap(), (first.id, false));
    s.commit(tx).await.unwrap();
    let mut tx = s.begin().await.unwrap();
    assert!(matches!(
        s.insert_deliveries(&mut tx, &[second.clone()]).await,
        Err(Error::DuplicateIdempotencyKey(k)) if k == "job-1"
    ));
    drop(tx);
    assert_eq!(s.claim_due(10, LEASE, "n").await.unwrap().rows.len(), 1);
}

async fn pending_for_dead_letter_counts_the_other_reporting_deliveries<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    let dl = Uuid::now_v7();
    let mut rows = vec![delivery(&t, &trigger, Duration::ZERO), delivery(&t, &trigger, Duration::ZERO)];
    for r in &mut rows {
        r.kind = EventKind::DeadLetter;
        r.dead_letter_id = Some(dl);
    }
    insert(&s, &rows).await;
    let mut tx = s.begin().await.unwrap();
    assert_eq!(s.pending_for_dead_letter(&mut tx, dl, rows[0].id).await.unwrap(), 1);
    assert_eq!(s.pending_for_dead_letter(&mut tx, dl, Uuid::now_v7()).await.unwrap(), 2);
    assert_eq!(s.pending_for_dead_letter(&mut tx, Uuid::now_v7(), rows[0].id).await.unwrap(), 0);
}

async fn a_configuration_change_moves_the_epoch_claims_and_targets_report<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    assert_eq!(s.claim_due(10, LEASE, "n").await.unwrap().config_epoch, None, "nothing claimed, no epoch");
    insert(&s, &[delivery(&t, &trigger, Duration::ZERO)]).await;
    let first = s.claim_due(10, LEASE, "n").await.unwrap().config_epoch.expect("an epoch");
    assert_eq!(s.delivery_targets(&[trigger.id]).await.unwrap().config_epoch, Some(first), "nothing changed");
    let mut seen = vec![first];
    for change in 0..3 {
        match change {
            0 => s.set_role(t.app.id, t.admin.id, Role::Developer).await.unwrap(),
            1 => {
                let patch = TriggerPatch { enabled: Some(true), ..Default::default() };
                s.update_trigger(t.app.id, "on-order", &patch).await.unwrap();
            }
            _ => assert!(s.remove_member(t.app.id, t.admin.id).await.unwrap()),
        }
        insert(&s, &[delivery(&t, &trigger, Duration::ZERO)]).await;
        let epoch = s.claim_due(10, LEASE, "n").await.unwrap().config_epoch.expect("an epoch");
        assert!(!seen.contains(&epoch), "change {change} moved the epoch: {seen:?} then {epoch}");
        seen.push(epoch);
    }
}

async fn a_put_whose_event_would_be_too_large_writes_nothing_unless_nothing_fires<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    s.create_trigger(&new_trigger(&t, "a", kv_spec("orders", &[KvOp::Put]))).await.unwrap();
    let big = j!({"pad": "x".repeat(600)});
    let put = |collection: &'static str, value: &serde_json::Value| {
        let value: &'static serde_json::Value = Box::leak(Box::new(value.clone()));
        FiringPut { collection, max_data_bytes: 1000, ..orders_put(&t, value) }
    };
    s.kv_put_firing(None, &put("orders", &big)).await.unwrap();
    // Each value alone fits; with the previous value beside it the event does not.
    let refused = s.kv_put_firing(None, &put("orders", &j!({"other": big}))).await;
    assert!(matches!(refused, Err(Error::TooLarge { max: 1000 })), "{refused:?}");
    assert_eq!(s.kv_get(t.app.id, "orders", "o-1").await.unwrap().unwrap().value, big);
    assert_eq!(s.claim_due(10, LEASE, "n").await.unwrap().rows.len(), 1, "only the first put fired");
    // No trigger, no event: the entry is written whatever its size.
    s.kv_put_firing(None, &put("users", &big)).await.unwrap();
    s.kv_put_firing(None, &put("users", &big)).await.unwrap();
}

async fn a_put_that_fires_writes_the_entry_and_one_delivery_per_matching_trigger<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let matching = s.create_trigger(&new_trigger(&t, "a", kv_spec("orders*", &[KvOp::Put]))).await.unwrap();
    let mut retrying = new_trigger(&t, "b", kv_spec("*", &[KvOp::Put, KvOp::Delete]));
    retrying.retry.max_attempts = Some(2);
    let retrying = s.create_trigger(&retrying).await.unwrap();
    s.create_trigger(&new_trigger(&t, "deletes-only", kv_spec("*", &[KvOp::Delete]))).await.unwrap();
    s.create_trigger(&new_trigger(&t, "elsewhere", kv_spec("users", &[KvOp::Put]))).await.unwrap();
    let put = |value: &'static serde_json::Value| FiringPut { depth: 2, ..orders_put(&t, value) };
    let (first_value, second_value) = (Box::leak(Box::new(j!({"n": 1}))), Box::leak(Box::new(j!({"n": 2}))));
    let (result, first) = s.kv_put_firing(None, &put(first_value)).await.unwrap().unwrap();
    assert_eq!((result, first.len()), (KvPutResult { version: 1, previous: None }, 2));
    let mut tx = s.begin().await.unwrap();
    let (result, second) = s.kv_put_firing(Some(&mut tx), &put(second_value)).await.unwrap().unwrap();
    s.commit(tx).await.unwrap();
    assert_eq!((result, second.len()), (KvPutResult { version: 2, previous: Some(j!({"n": 1})) }, 2));
    assert_eq!(s.kv_get(t.app.id, "orders", "o-1").await.unwrap().unwrap().value, j!({"n": 2}));

    // The ids it returns are the rows it wrote.
    let written: Vec<Uuid> = first.into_iter().chain(second).collect();
    let claimed = s.claim_written(&written, LEASE, "n").await.unwrap().rows;
    assert_eq!(claimed.len(), 4);
    assert!(s.claim_due(10, LEASE, "n").await.unwrap().rows.is_empty(), "the put wrote no other row");
    for c in &claimed {
        assert_eq!(
            (c.kind, c.event_type.as_str(), c.source.as_str()),
            (EventKind::Kv, "picloud.kv.put", "/apps/shop/kv/orders")
        );
        assert_eq!((c.subject.as_deref(), c.depth), (Some("o-1"), 2));
        let expected_attempts = if c.trigger_id == Some(retrying.id) { 2 } else { 7 };
        assert_eq!(c.max_attempts, expected_attempts);
        assert!(c.trigger_id == Some(matching.id) || c.trigger_id == Some(retrying.id));
    }
    let data: Vec<serde_json::Value> =
        claimed.iter().map(|c| serde_json::from_str(c.payload.get()).unwrap()).collect();
    assert!(data.contains(&j!({"collection": "orders", "key": "o-1", "op": "put", "value": {"n": 2}, "previous": {"n": 1}, "version": 2})));
    assert!(data.contains(&j!({"collection": "orders", "key": "o-1", "op": "put", "value": {"n": 1}, "previous": null, "version": 1})));
}

async fn a_wake_up_reaches_every_listener<S: Store>(s: S) {
    use futures::StreamExt as _;
    let mut first = s.listen().await.unwrap();
    let mut second = s.listen().await.unwrap();
    s.wake_relays().await.unwrap();
    for listener in [&mut first, &mut second] {
        let woke =
            tokio::time::timeout(Duration::from_secs(10), listener.next()).await.expect("woken in time");
        assert!(matches!(woke, Some(Ok(_))));
    }
}

async fn a_claim_of_written_rows_takes_those_of_them_claimable_now<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    let now = || delivery(&t, &trigger, Duration::ZERO);
    let in_lane = || NewDelivery { lane: Some("k".into()), ..now() };
    let mut tx = s.begin().await.unwrap();
    let leased = s.insert_deliveries(&mut tx, &[now()]).await.unwrap();
    s.commit(tx).await.unwrap();
    assert_eq!(s.claim_due(10, LEASE, "other").await.unwrap().rows.len(), 1);
    let mut tx = s.begin().await.unwrap();
    let [due, later, gated, head, behind] = s
        .insert_deliveries(
            &mut tx,
            &[
                now(),
                delivery(&t, &trigger, Duration::from_secs(5)),
                NewDelivery { gated: true, ..now() },
                in_lane(),
                in_lane(),
            ],
        )
        .await
        .unwrap()[..]
    else {
        panic!("five rows")
    };
    s.commit(tx).await.unwrap();
    let named = [leased[0], due, later, gated, head, behind, Uuid::now_v7()];

    let claim = s.claim_written(&named, LEASE, "n").await.unwrap();
    let mut claimed: Vec<(Uuid, u32)> = claim.rows.iter().map(|r| (r.id, r.attempt)).collect();
    claimed.sort();
    let mut expected = vec![(due, 1), (head, 1)];
    expected.sort();
    assert_eq!(claimed, expected, "due, unleased, neither gated nor waiting in a lane");
    assert!(claim.config_epoch.is_some(), "a claim that took rows reports the epoch");
    assert!(s.claim_written(&named, LEASE, "n").await.unwrap().rows.is_empty(), "claimed rows are leased");
    s.clock().advance(Duration::from_secs(5));
    let later_claim = s.claim_written(&named, LEASE, "n").await.unwrap().rows;
    assert_eq!(later_claim.iter().map(|r| r.id).collect::<Vec<_>>(), [later], "once due");
}

async fn next_due_in_tells_how_long_until_the_earliest_delayed_delivery<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    assert_eq!(s.next_due_in().await.unwrap(), None);
    insert(&s, &[delivery(&t, &trigger, Duration::ZERO), delivery(&t, &trigger, Duration::from_secs(7))])
        .await;
    insert(&s, &[delivery(&t, &trigger, Duration::from_secs(3))]).await;
    assert_eq!(s.next_due_in().await.unwrap(), Some(Duration::from_secs(3)), "due rows do not count");
    s.clock().advance(Duration::from_millis(2500));
    assert_eq!(s.next_due_in().await.unwrap(), Some(Duration::from_millis(500)));
}

async fn burying_moves_a_delivery_into_the_dead_letters_with_its_event<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    let mut row = delivery(&t, &trigger, Duration::ZERO);
    row.depth = 3;
    insert(&s, std::slice::from_ref(&row)).await;
    let c = s.claim_due(1, LEASE, "n").await.unwrap().rows.remove(0);
    let mut tx = s.begin().await.unwrap();
    s.reschedule(
        &mut tx,
        &[Reschedule {
            id: c.id,
            attempt: 1,
            delay: Duration::ZERO,
            error: "first".into(),
            refund_attempt: false,
            record: None,
        }],
    )
    .await
    .unwrap();
    s.commit(tx).await.unwrap();
    let c = s.claim_due(1, LEASE, "n").await.unwrap().rows.remove(0);
    s.clock().advance(Duration::from_secs(1));
    let mut tx = s.begin().await.unwrap();
    let dead = s
        .bury(&mut tx, &[Bury { id: c.id, attempt: 2, reason: DeadLetterReason::Exhausted, error: None }])
        .await
        .unwrap();
    s.commit(tx).await.unwrap();
    assert_eq!(dead.len(), 1);
    let d = s.dead_letter(t.app.id, dead[0].id).await.unwrap().unwrap();
    assert_eq!(
        (d.app_id, d.trigger_id, d.trigger_name.as_deref()),
        (t.app.id, Some(trigger.id), Some("on-order"))
    );
    assert_eq!(
        (d.kind, d.delivery_id, d.attempts, d.reason),
        (EventKind::Kv, row.id, 2, DeadLetterReason::Exhausted)
    );
    assert_eq!(d.last_error.as_deref(), Some("first"), "the last recorded error is kept");
    assert_eq!(d.payload.get(), row.payload.get());
    assert_eq!(
        d.headers,
        EventHeaders {
            event_type: row.event_type,
            source: row.source,
            subject: row.subject,
            time: START,
            depth: 3,
            ordering_key: None,
        }
    );
    assert_eq!((d.created_at, d.resolution, d.resolved_at), (START + Duration::from_secs(1), None, None));
    s.clock().advance(LEASE * 2);
    assert!(s.claim_due(1, LEASE, "n").await.unwrap().rows.is_empty(), "the outbox row is gone");
}

fn new_dead_letter(t: &Tenant, trigger_name: &str, reason: DeadLetterReason) -> NewDeadLetter {
    NewDeadLetter {
        id: Uuid::now_v7(),
        app_id: t.app.id,
        trigger_id: None,
        trigger_name: Some(trigger_name.to_owned()),
        kind: EventKind::Pubsub,
        delivery_id: Uuid::now_v7(),
        payload: json(r#"{"hello":"world"}"#),
        headers: EventHeaders {
            event_type: "picloud.pubsub.message".into(),
            source: "/apps/shop/topics/news".into(),
            subject: None,
            time: START,
            depth: 16,
            ordering_key: None,
        },
        attempts: 0,
        reason,
        last_error: Some("too deep".into()),
    }
}

async fn dead_letters_written_directly_read_back<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let new = new_dead_letter(&t, "on-news", DeadLetterReason::MaxDepth);
    let mut tx = s.begin().await.unwrap();
    let written = s.insert_dead_letters(&mut tx, std::slice::from_ref(&new)).await.unwrap();
    s.commit(tx).await.unwrap();
    let d = s.dead_letter(t.app.id, new.id).await.unwrap().unwrap();
    assert_eq!(written[0].id, d.id);
    assert_eq!(
        (d.reason, d.headers.clone(), d.last_error.as_deref()),
        (new.reason, new.headers, Some("too deep"))
    );
    assert_eq!(d.payload.get(), r#"{"hello":"world"}"#);
    let other = tenant(&s, "other").await;
    assert!(s.dead_letter(other.app.id, new.id).await.unwrap().is_none(), "another app cannot see it");
    let mut tx = s.begin().await.unwrap();
    let locked = s.lock_dead_letter(&mut tx, t.app.id, new.id).await.unwrap().map(|d| d.id);
    assert_eq!(locked, Some(new.id), "locked for a transaction, it reads the same");
    assert!(s.lock_dead_letter(&mut tx, other.app.id, new.id).await.unwrap().is_none());
    drop(tx);
}

async fn dead_letters_are_listed_newest_first_with_filters_in_keyset_pages<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let rows: Vec<NewDeadLetter> = (0..5)
        .map(|i| new_dead_letter(&t, if i % 2 == 0 { "even" } else { "odd" }, DeadLetterReason::Rejected))
        .collect();
    let mut tx = s.begin().await.unwrap();
    s.insert_dead_letters(&mut tx, &rows).await.unwrap();
    s.resolve(&mut tx, t.app.id, rows[1].id, Resolution::Ignored, true).await.unwrap();
    s.commit(tx).await.unwrap();
    let ids = |p: Page<DeadLetter>| p.items.into_iter().map(|d| d.id).collect::<Vec<_>>();

    let all = DeadLetterFilter::default();
    let first = s.list_dead_letters(t.app.id, &all, None, 2).await.unwrap();
    assert!(first.has_more);
    let first_ids = ids(first);
    assert_eq!(first_ids, [rows[4].id, rows[3].id]);
    let next = s.list_dead_letters(t.app.id, &all, Some(rows[3].id), 10).await.unwrap();
    assert!(!next.has_more);
    assert_eq!(ids(next), [rows[2].id, rows[1].id, rows[0].id]);

    let even = DeadLetterFilter { trigger_name: Some("even".into()), ..Default::default() };
    assert_eq!(
        ids(s.list_dead_letters(t.app.id, &even, None, 10).await.unwrap()),
        [rows[4].id, rows[2].id, rows[0].id]
    );
    let unresolved = DeadLetterFilter { resolution: Some(None), ..Default::default() };
    assert_eq!(
        ids(s.list_dead_letters(t.app.id, &unresolved, None, 10).await.unwrap()),
        [rows[4].id, rows[3].id, rows[2].id, rows[0].id]
    );
    let ignored = DeadLetterFilter { resolution: Some(Some(Resolution::Ignored)), ..Default::default() };
    assert_eq!(ids(s.list_dead_letters(t.app.id, &ignored, None, 10).await.unwrap()), [rows[1].id]);
}

async fn only_unresolved_dead_letters_count_and_resolve_respects_its_guard<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let other = tenant(&s, "other").await;
    let rows = [
        new_dead_letter(&t, "x", DeadLetterReason::Exhausted),
        new_dead_letter(&t, "x", DeadLetterReason::Unauthorized),
        new_dead_letter(&other, "x", DeadLetterReason::Exhausted),
    ];
    let mut tx = s.begin().await.unwrap();
    s.insert_dead_letters(&mut tx, &rows).await.unwrap();
    s.commit(tx).await.unwrap();
    assert_eq!(s.unresolved_count(t.app.id).await.unwrap(), 2);

    let mut tx = s.begin().await.unwrap();
    let done =
        s.resolve(&mut tx, t.app.id, rows[0].id, Resolution::HandledByScript, true).await.unwrap().unwrap();
    assert_eq!((done.resolution, done.resolved_at), (Some(Resolution::HandledByScript), Some(START)));
    assert!(
        s.resolve(&mut tx, t.app.id, rows[0].id, Resolution::HandlerFailed, true).await.unwrap().is_none()
    );
    let forced =
        s.resolve(&mut tx, t.app.id, rows[0].id, Resolution::Replayed, false).await.unwrap().unwrap();
    assert_eq!(forced.resolution, Some(Resolution::Replayed));
    assert!(
        s.resolve(&mut tx, t.app.id, rows[2].id, Resolution::Ignored, false).await.unwrap().is_none(),
        "wrong app"
    );
    s.commit(tx).await.unwrap();
    assert_eq!(s.unresolved_count(t.app.id).await.unwrap(), 1);
    assert_eq!(s.unresolved_count(other.app.id).await.unwrap(), 1);
}

/// Writes dead letters in a transaction of their own.
async fn write_dead_letters<S: Store>(s: &S, rows: &[NewDeadLetter]) {
    let mut tx = s.begin().await.unwrap();
    s.insert_dead_letters(&mut tx, rows).await.unwrap();
    s.commit(tx).await.unwrap();
}

async fn every_field_of_a_dead_letter_filter_narrows_lists_counts_and_locks_alike<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    let minute = Duration::from_secs(60);
    // Ids in this order, written a minute apart: r0; r1 and r2 (of a trigger); r3 (an email,
    // which has none) and r4 (then ignored). Only r2 and r3 can be replayed.
    let rows = [
        new_dead_letter(&t, "a", DeadLetterReason::Exhausted),
        new_dead_letter(&t, "a", DeadLetterReason::Rejected),
        NewDeadLetter {
            trigger_id: Some(trigger.id),
            ..new_dead_letter(&t, "on-order", DeadLetterReason::Exhausted)
        },
        NewDeadLetter {
            kind: EventKind::Email,
            trigger_name: None,
            ..new_dead_letter(&t, "x", DeadLetterReason::Exhausted)
        },
        new_dead_letter(&t, "a", DeadLetterReason::Exhausted),
    ];
    for written in [&rows[..1], &rows[1..3], &rows[3..]] {
        write_dead_letters(&s, written).await;
        s.clock().advance(minute);
    }
    let mut tx = s.begin().await.unwrap();
    s.resolve(&mut tx, t.app.id, rows[4].id, Resolution::Ignored, true).await.unwrap();
    s.commit(tx).await.unwrap();

    let unresolved = DeadLetterFilter { resolution: Some(None), ..Default::default() };
    let filters = [
        (unresolved.clone(), vec![0, 1, 2, 3]),
        (DeadLetterFilter { resolution: Some(Some(Resolution::Ignored)), ..Default::default() }, vec![4]),
        (DeadLetterFilter { trigger_name: Some("a".into()), ..Default::default() }, vec![0, 1, 4]),
        (DeadLetterFilter { reason: Some(DeadLetterReason::Rejected), ..Default::default() }, vec![1]),
        (DeadLetterFilter { created_after: Some(START), ..Default::default() }, vec![1, 2, 3, 4]),
        (DeadLetterFilter { created_before: Some(START + minute * 2), ..Default::default() }, vec![0, 1, 2]),
        (
            DeadLetterFilter {
                created_after: Some(START),
                created_before: Some(START + minute * 2),
                ..Default::default()
            },
            vec![1, 2],
        ),
        (DeadLetterFilter { replayable: true, ..Default::default() }, vec![2, 3]),
        (
            DeadLetterFilter { reason: Some(DeadLetterReason::Exhausted), replayable: true, ..unresolved },
            vec![2, 3],
        ),
    ];
    for (filter, expected) in filters {
        let oldest_first: Vec<Uuid> = expected.iter().map(|&i| rows[i].id).collect();
        let count = s.count_dead_letters(t.app.id, &filter).await.unwrap();
        assert_eq!(count, oldest_first.len() as u64, "{filter:?}");
        let mut tx = s.begin().await.unwrap();
        let locked = s.lock_dead_letters(&mut tx, t.app.id, &filter, None, 10).await.unwrap();
        drop(tx);
        assert_eq!(locked, oldest_first, "{filter:?}");
        let listed = s.list_dead_letters(t.app.id, &filter, None, 10).await.unwrap().items;
        let newest_first: Vec<Uuid> = oldest_first.into_iter().rev().collect();
        assert_eq!(listed.iter().map(|d| d.id).collect::<Vec<_>>(), newest_first, "{filter:?}");
    }
}

async fn dead_letters_are_locked_oldest_first_after_the_cursor_up_to_the_limit_and_only_of_the_app<
    S: Store,
>(
    s: S,
) {
    let t = tenant(&s, "shop").await;
    let other = tenant(&s, "other").await;
    let rows: Vec<NewDeadLetter> =
        (0..5).map(|_| new_dead_letter(&t, "x", DeadLetterReason::Exhausted)).collect();
    write_dead_letters(&s, &rows).await;
    write_dead_letters(&s, &[new_dead_letter(&other, "x", DeadLetterReason::Exhausted)]).await;
    let all = DeadLetterFilter::default();

    let mut tx = s.begin().await.unwrap();
    let mut batches = Vec::new();
    let mut after = None;
    loop {
        let batch = s.lock_dead_letters(&mut tx, t.app.id, &all, after, 2).await.unwrap();
        let Some(&last) = batch.last() else { break };
        after = Some(last);
        batches.push(batch);
    }
    drop(tx);
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    assert_eq!(batches, [&ids[0..2], &ids[2..4], &ids[4..]]);
    assert_eq!(s.count_dead_letters(t.app.id, &all).await.unwrap(), 5);
    assert_eq!(s.count_dead_letters(other.app.id, &all).await.unwrap(), 1);
}

async fn gc_deletes_only_resolved_dead_letters_past_retention_in_batches<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let rows: Vec<NewDeadLetter> =
        (0..4).map(|_| new_dead_letter(&t, "x", DeadLetterReason::Exhausted)).collect();
    let mut tx = s.begin().await.unwrap();
    s.insert_dead_letters(&mut tx, &rows).await.unwrap();
    for r in &rows[..3] {
        s.resolve(&mut tx, t.app.id, r.id, Resolution::Ignored, true).await.unwrap();
    }
    s.commit(tx).await.unwrap();
    let retention = Duration::from_secs(30 * 86_400);
    assert_eq!(s.gc_dead_letters(retention, 10).await.unwrap(), 0, "nothing is old enough yet");
    s.clock().advance(retention + Duration::from_secs(1));
    assert_eq!(s.gc_dead_letters(retention, 2).await.unwrap(), 2);
    assert_eq!(s.gc_dead_letters(retention, 2).await.unwrap(), 1);
    assert_eq!(s.gc_dead_letters(retention, 2).await.unwrap(), 0);
    let left = s.list_dead_letters(t.app.id, &DeadLetterFilter::default(), None, 10).await.unwrap();
    assert_eq!(left.items.iter().map(|d| d.id).collect::<Vec<_>>(), [rows[3].id], "the unresolved one stays");
}

async fn lists_of_payloads_end_a_page_where_its_payloads_reach_the_byte_cap<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    // Four payloads of 1.5 MiB: the first page stops after the third, which passes 4 MiB.
    let big = json(&format!("\"{}\"", "x".repeat(PAGE_PAYLOAD_BYTES * 3 / 8)));
    let rows: Vec<NewDelivery> = (0..4)
        .map(|_| NewDelivery { payload: big.clone(), ..delivery(&t, &trigger, Duration::ZERO) })
        .collect();
    insert(&s, &rows).await;
    let claimed = s.claim_due(4, LEASE, "n").await.unwrap().rows;
    let mut tx = s.begin().await.unwrap();
    let buries: Vec<Bury> = claimed
        .iter()
        .map(|c| Bury { id: c.id, attempt: 1, reason: DeadLetterReason::Rejected, error: None })
        .collect();
    s.bury(&mut tx, &buries).await.unwrap();
    s.commit(tx).await.unwrap();
    for row in &rows {
        s.insert_abandoned(&AbandonedExecution {
            id: Uuid::now_v7(),
            app_id: t.app.id,
            trigger_id: Some(trigger.id),
            trigger_name: "on-order".into(),
            outbox_id: row.id,
            reply_to: "_INBOX.gone".into(),
            reason: AbandonReason::NoResponders,
            handler_status: HandlerStatus::Ok,
            result: Some(big.clone()),
            error: None,
            created_at: START,
        })
        .await
        .unwrap();
    }

    let all = DeadLetterFilter::default();
    let first = s.list_dead_letters(t.app.id, &all, None, 500).await.unwrap();
    assert_eq!((first.items.len(), first.has_more), (3, true));
    let rest = s.list_dead_letters(t.app.id, &all, first.items.last().map(|d| d.id), 500).await.unwrap();
    assert_eq!((rest.items.len(), rest.has_more), (1, false));
    let small_pages = s.list_dead_letters(t.app.id, &all, None, 2).await.unwrap();
    assert_eq!((small_pages.items.len(), small_pages.has_more), (2, true), "the item limit still holds");

    let first = s.list_abandoned(t.app.id, None, 500).await.unwrap();
    assert_eq!((first.items.len(), first.has_more), (3, true));
    let rest = s.list_abandoned(t.app.id, first.items.last().map(|a| a.id), 500).await.unwrap();
    assert_eq!((rest.items.len(), rest.has_more), (1, false));
}

async fn every_abandon_reason_and_handler_status_is_stored_and_read_back<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    let reasons = [
        AbandonReason::NoResponders,
        AbandonReason::AckTimeout,
        AbandonReason::CallerGone,
        AbandonReason::LeaseExpired,
    ];
    let statuses = [
        HandlerStatus::Ok,
        HandlerStatus::Retry,
        HandlerStatus::Fail,
        HandlerStatus::Error,
        HandlerStatus::Timeout,
        HandlerStatus::NoHandler,
        HandlerStatus::Unknown,
    ];
    for (reason, handler_status) in reasons.into_iter().flat_map(|r| statuses.map(|h| (r, h))) {
        let stored = s
            .insert_abandoned(&AbandonedExecution {
                id: Uuid::now_v7(),
                app_id: t.app.id,
                trigger_id: Some(trigger.id),
                trigger_name: "on-order".into(),
                outbox_id: Uuid::now_v7(),
                reply_to: "_INBOX.gone".into(),
                reason,
                handler_status,
                result: None,
                error: None,
                created_at: START,
            })
            .await
            .unwrap();
        assert_eq!((stored.reason, stored.handler_status), (reason, handler_status));
    }
}

async fn abandoned_executions_are_recorded_listed_newest_first_and_collected<S: Store>(s: S) {
    let (t, trigger) = tenant_with_trigger(&s, "shop").await;
    let record = |status| AbandonedExecution {
        id: Uuid::now_v7(),
        app_id: t.app.id,
        trigger_id: Some(trigger.id),
        trigger_name: "on-order".into(),
        outbox_id: Uuid::now_v7(),
        reply_to: "_INBOX.gone".into(),
        reason: AbandonReason::NoResponders,
        handler_status: status,
        result: Some(json(r#"{"ok":true}"#)),
        error: None,
        created_at: START,
    };
    let a = s.insert_abandoned(&record(HandlerStatus::Ok)).await.unwrap();
    s.clock().advance(Duration::from_secs(3600));
    let b = s.insert_abandoned(&record(HandlerStatus::Fail)).await.unwrap();
    assert_eq!(a.result.as_ref().unwrap().get(), r#"{"ok":true}"#);
    assert_eq!((b.handler_status, b.created_at), (HandlerStatus::Fail, START + Duration::from_secs(3600)));
    let page = s.list_abandoned(t.app.id, None, 1).await.unwrap();
    assert!(page.has_more);
    assert_eq!(page.items[0].id, b.id);
    assert_eq!(s.list_abandoned(t.app.id, Some(b.id), 10).await.unwrap().items[0].id, a.id);

    s.delete_trigger(t.app.id, "on-order").await.unwrap();
    assert_eq!(s.list_abandoned(t.app.id, None, 10).await.unwrap().items[0].trigger_id, None);
    let week = Duration::from_secs(7 * 86_400);
    s.clock().advance(week - Duration::from_secs(1800));
    assert_eq!(s.gc_abandoned(week, 10).await.unwrap(), 1, "only the older one is past retention");
    assert_eq!(s.list_abandoned(t.app.id, None, 10).await.unwrap().items.len(), 1);
}

async fn a_put_creates_version_one_and_each_put_increments_and_returns_the_previous_value<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let mut tx = s.begin().await.unwrap();
    let first = s.kv_put(&mut tx, t.app.id, "orders", "o-1", &j!({"n": 1}), None).await.unwrap();
    assert_eq!(first, KvPutResult { version: 1, previous: None });
    let second = s.kv_put(&mut tx, t.app.id, "orders", "o-1", &j!({"n": 2}), Some(1)).await.unwrap();
    assert_eq!(second, KvPutResult { version: 2, previous: Some(j!({"n": 1})) });
    s.commit(tx).await.unwrap();
    let got = s.kv_get(t.app.id, "orders", "o-1").await.unwrap().unwrap();
    assert_eq!((got.value, got.version, got.key.as_str()), (j!({"n": 2}), 2, "o-1"));
}

async fn a_put_with_a_stale_or_impossible_version_fails_and_changes_nothing<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let mut tx = s.begin().await.unwrap();
    s.kv_put(&mut tx, t.app.id, "c", "k", &j!("v1"), None).await.unwrap();
    let stale = s.kv_put(&mut tx, t.app.id, "c", "k", &j!("v2"), Some(7)).await;
    assert!(matches!(stale, Err(Error::VersionMismatch { expected: 7, current: Some(1) })));
    let missing = s.kv_put(&mut tx, t.app.id, "c", "absent", &j!("v"), Some(1)).await;
    assert!(matches!(missing, Err(Error::VersionMismatch { expected: 1, current: None })));
    s.commit(tx).await.unwrap();
    assert_eq!(s.kv_get(t.app.id, "c", "k").await.unwrap().unwrap().value, j!("v1"));
    assert!(s.kv_get(t.app.id, "c", "absent").await.unwrap().is_none());
}

async fn a_delete_returns_the_entry_and_honours_the_expected_version<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let mut tx = s.begin().await.unwrap();
    s.kv_put(&mut tx, t.app.id, "c", "k", &j!(1), None).await.unwrap();
    let wrong = s.kv_delete(&mut tx, t.app.id, "c", "k", Some(2)).await;
    assert!(matches!(wrong, Err(Error::VersionMismatch { expected: 2, current: Some(1) })));
    let gone = s.kv_delete(&mut tx, t.app.id, "c", "k", Some(1)).await.unwrap().unwrap();
    assert_eq!((gone.value, gone.version), (j!(1), 1));
    assert!(s.kv_delete(&mut tx, t.app.id, "c", "k", None).await.unwrap().is_none());
    assert!(s.kv_delete(&mut tx, t.app.id, "c", "k", Some(1)).await.unwrap().is_none());
    s.commit(tx).await.unwrap();
    assert!(s.kv_get(t.app.id, "c", "k").await.unwrap().is_none());
}

async fn keys_are_listed_by_prefix_in_key_order_and_pages<S: Store>(s: S) {
    let t = tenant(&s, "shop").await;
    let mut tx = s.begin().await.unwrap();
    for key in ["user:2", "user:10", "order:1", "user:1", "User:0", "user_x"] {
        s.kv_put(&mut tx, t.app.id, "c", key, &j!(key), None).await.unwrap();
    }
    s.kv_put(&mut tx, t.app.id, "other", "user:9", &j!(0), None).await.unwrap();
    s.commit(tx).await.unwrap();
    let keys = |p: Page<KvKeyInfo>| p.items.into_iter().map(|e| e.key.to_string()).collect::<Vec<_>>();
    let first = s.kv_list(t.app.id, "c", "user:", None, 2).await.unwrap();
    assert!(first.has_more);
    assert_eq!(keys(first), ["user:1", "user:10"]);
    let rest = s.kv_list(t.app.id, "c", "user:", Some("user:10"), 10).await.unwrap();
    assert!(!rest.has_more);
    assert_eq!(keys(rest), ["user:2"]);
    assert_eq!(
        keys(s.kv_list(t.app.id, "c", "", None, 10).await.unwrap()),
        ["User:0", "order:1", "user:1", "user:10", "user:2", "user_x"]
    );
}

/// The event-writing functions, on both stores.
mod events_on_both {
    use std::time::Duration;

    use picloud_core::{CollectionName, CollectionPattern, KvKey, QueueName, TopicName, TriggerConfig};
    use picloud_store::events::{self, EventContext, Job};
    use picloud_store::*;
    use serde_json::json as j;

    use crate::support::*;

    conformance!(
        a_message_fans_out_to_every_matching_pubsub_trigger,
        a_job_needs_a_queue_with_an_enabled_trigger,
        a_delayed_job_waits_and_a_repeated_key_returns_the_first_id,
        an_event_at_the_depth_limit_becomes_max_depth_dead_letters_that_fan_out_below_it_only,
        a_sync_invocation_at_the_depth_limit_is_refused,
        a_kv_delete_fires_with_the_deleted_value,
        a_kv_put_authorized_at_an_older_epoch_writes_nothing_on_either_path,
        a_replayed_dead_letter_is_delivered_again_to_its_trigger,
        what_fired_names_the_rows_a_relay_may_claim_as_soon_as_they_are_committed,
    );

    fn cx<'a>(t: &'a Tenant, depth: u32, config: &'a TriggerConfig) -> EventContext<'a> {
        EventContext { app_id: t.app.id, app_slug: &t.app.slug, depth, config }
    }

    async fn what_fired_names_the_rows_a_relay_may_claim_as_soon_as_they_are_committed<S: Store>(s: S) {
        use picloud_core::flow::{Flow, Ordering};
        let t = tenant(&s, "shop").await;
        let flows = [
            ("plain", None),
            ("ordered", Some(Flow { ordering: Ordering::Key, ..Flow::default() })),
            ("limited", Some(Flow { concurrency: Some(2), ..Flow::default() })),
        ];
        let mut plain = None;
        for (name, flow) in flows {
            let mut new =
                new_trigger(&t, name, TriggerSpec::Pubsub { topic: CollectionPattern::parse("t").unwrap() });
            new.flow = flow;
            let trigger = s.create_trigger(&new).await.unwrap();
            plain = plain.or(Some(trigger.id));
        }
        let config = TriggerConfig::default();
        let mut tx = s.begin().await.unwrap();
        let topic = TopicName::parse("t").unwrap();
        let (_, fired) =
            events::publish(&s, &mut tx, &cx(&t, 0, &config), &topic, &json("{}"), Some("k")).await.unwrap();
        s.commit(tx).await.unwrap();
        assert_eq!(fired.deliveries, 3);
        let claimed = s.claim_written(&fired.claimable, LEASE, "n").await.unwrap().rows;
        assert_eq!(fired.claimable.len(), 1, "a row in a lane or gated is not named");
        assert_eq!(claimed.iter().map(|c| c.trigger_id).collect::<Vec<_>>(), [plain]);
    }

    async fn a_message_fans_out_to_every_matching_pubsub_trigger<S: Store>(s: S) {
        let t = tenant(&s, "shop").await;
        for (name, pattern) in [("all-news", "news*"), ("eu", "news.eu"), ("sport", "sport")] {
            let spec = TriggerSpec::Pubsub { topic: CollectionPattern::parse(pattern).unwrap() };
            s.create_trigger(&new_trigger(&t, name, spec)).await.unwrap();
        }
        let config = TriggerConfig::default();
        let mut tx = s.begin().await.unwrap();
        let message = json(r#"{"headline":"hi"}"#);
        let topic = TopicName::parse("news.eu").unwrap();
        let (_, fired) =
            events::publish(&s, &mut tx, &cx(&t, 0, &config), &topic, &message, None).await.unwrap();
        events::commit_and_wake(&s, tx).await.unwrap();
        assert_eq!((fired.deliveries, fired.too_deep, fired.claimable.len()), (2, 0, 2));
        let claimed = s.claim_due(10, LEASE, "n").await.unwrap().rows;
        assert_eq!(claimed.len(), 2);
        assert!(claimed.iter().all(|c| c.payload.get() == r#"{"headline":"hi"}"#
            && c.event_type == "picloud.pubsub.message"
            && c.source == "/apps/shop/topics/news.eu"));
    }

    async fn a_job_needs_a_queue_with_an_enabled_trigger<S: Store>(s: S) {
        let t = tenant(&s, "shop").await;
        let config = TriggerConfig::default();
        let queue = QueueName::parse("mail").unwrap();
        let job =
            Job { payload: &json("{}"), delay: Duration::ZERO, idempotency_key: None, ordering_key: None };
        let mut tx = s.begin().await.unwrap();
        let missing = events::enqueue(&s, &mut tx, &cx(&t, 0, &config), &queue, job).await;
        assert!(matches!(missing, Err(Error::NoSuchQueue(q)) if q == "mail"));
        drop(tx);
        let mut trigger = new_trigger(&t, "mailer", TriggerSpec::Queue { queue: queue.clone() });
        trigger.enabled = false;
        s.create_trigger(&trigger).await.unwrap();
        let mut tx = s.begin().await.unwrap();
        let disabled = events::enqueue(&s, &mut tx, &cx(&t, 0, &config), &queue, job).await;
        assert!(matches!(disabled, Err(Error::QueueDisabled(_))));
    }

    async fn a_delayed_job_waits_and_a_repeated_key_returns_the_first_id<S: Store>(s: S) {
        let t = tenant(&s, "shop").await;
        let queue = QueueName::parse("mail").unwrap();
        s.create_trigger(&new_trigger(&t, "mailer", TriggerSpec::Queue { queue: queue.clone() }))
            .await
            .unwrap();
        let config = TriggerConfig::default();
        let payload = json(r#"{"to":"a@b.c"}"#);
        let job = Job {
            payload: &payload,
            delay: Duration::from_secs(5),
            idempotency_key: Some("welcome-1"),
            ordering_key: None,
        };
        let mut tx = s.begin().await.unwrap();
        let first = events::enqueue(&s, &mut tx, &cx(&t, 0, &config), &queue, job).await.unwrap();
        let again = events::enqueue(&s, &mut tx, &cx(&t, 0, &config), &queue, job).await.unwrap();
        s.commit(tx).await.unwrap();
        let events::Enqueued::Created(id) = first else { panic!("{first:?}") };
        assert_eq!(again, events::Enqueued::Existing(id));
        assert!(s.claim_due(10, LEASE, "n").await.unwrap().rows.is_empty(), "not before its delay");
        s.clock().advance(Duration::from_secs(5));
        let claimed = s.claim_due(10, LEASE, "n").await.unwrap().rows;
        assert_eq!(claimed.iter().map(|c| c.id).collect::<Vec<_>>(), [id]);
        assert_eq!(claimed[0].event_type, "picloud.queue.job");
    }

    async fn an_event_at_the_depth_limit_becomes_max_depth_dead_letters_that_fan_out_below_it_only<
        S: Store,
    >(
        s: S,
    ) {
        let t = tenant(&s, "shop").await;
        let on_order =
            s.create_trigger(&new_trigger(&t, "on-order", kv_spec("orders", &[KvOp::Put]))).await.unwrap();
        let spec = TriggerSpec::DeadLetter { source_trigger: None, source_kinds: None };
        s.create_trigger(&new_trigger(&t, "report", spec)).await.unwrap();
        let config = TriggerConfig { max_depth: 3, ..TriggerConfig::default() };
        let (collection, key) = (CollectionName::parse("orders").unwrap(), KvKey::parse("o-1").unwrap());
        let mut tx = s.begin().await.unwrap();
        let (_, fired) =
            events::kv_put(&s, &mut tx, &cx(&t, 3, &config), &collection, &key, &j!(1), None).await.unwrap();
        s.commit(tx).await.unwrap();
        assert_eq!((fired.deliveries, fired.too_deep), (0, 1));
        let dead = s.list_dead_letters(t.app.id, &DeadLetterFilter::default(), None, 10).await.unwrap().items;
        assert_eq!(dead.len(), 1);
        assert_eq!(
            (dead[0].reason, dead[0].trigger_id, dead[0].headers.depth),
            (DeadLetterReason::MaxDepth, Some(on_order.id), 3)
        );
        assert!(
            s.claim_due(10, LEASE, "n").await.unwrap().rows.is_empty(),
            "a dead letter at the limit fires nothing"
        );
    }

    async fn a_sync_invocation_at_the_depth_limit_is_refused<S: Store>(s: S) {
        let t = tenant(&s, "shop").await;
        let trigger = s.create_trigger(&new_trigger(&t, "call", TriggerSpec::Http)).await.unwrap();
        let config = TriggerConfig { max_depth: 2, ..TriggerConfig::default() };
        let waiter =
            events::SyncWaiter { reply_to: "_INBOX.x", authorized_at: None, node: "n", lease: LEASE };
        let refused = events::invoke(&s, &cx(&t, 2, &config), "call", &json("{}"), waiter).await;
        assert!(matches!(refused, Err(Error::TooDeep { depth: 2, max: 2 })));
        let write = events::invoke(&s, &cx(&t, 1, &config), "call", &json("{}"), waiter).await;
        let SyncCallWrite::Written { row: call, target } = write.unwrap() else {
            panic!("the call is written")
        };
        assert_eq!(target.trigger, trigger);
        assert_eq!((call.max_attempts, call.attempt, call.reply_to.as_deref()), (1, 1, Some("_INBOX.x")));
        s.clock().advance(LEASE);
        let claimed = s.claim_due(10, LEASE, "n").await.unwrap().rows;
        assert_eq!(
            claimed.iter().map(|c| c.id).collect::<Vec<_>>(),
            [call.id],
            "only the call under the limit"
        );
    }

    async fn a_kv_delete_fires_with_the_deleted_value<S: Store>(s: S) {
        let t = tenant(&s, "shop").await;
        s.create_trigger(&new_trigger(&t, "gone", kv_spec("orders", &[KvOp::Delete]))).await.unwrap();
        let config = TriggerConfig::default();
        let (collection, key) = (CollectionName::parse("orders").unwrap(), KvKey::parse("o-1").unwrap());
        let mut tx = s.begin().await.unwrap();
        events::kv_put(&s, &mut tx, &cx(&t, 0, &config), &collection, &key, &j!({"n": 1}), None)
            .await
            .unwrap();
        let (deleted, fired) = events::kv_delete(&s, &mut tx, &cx(&t, 0, &config), &collection, &key, None)
            .await
            .unwrap()
            .unwrap();
        assert!(
            events::kv_delete(&s, &mut tx, &cx(&t, 0, &config), &collection, &key, None)
                .await
                .unwrap()
                .is_none()
        );
        s.commit(tx).await.unwrap();
        assert_eq!((deleted.version, fired.deliveries), (1, 1));
        let claimed = s.claim_due(10, LEASE, "n").await.unwrap().rows;
        assert_eq!(claimed[0].event_type, "picloud.kv.delete");
        let data: serde_json::Value = serde_json::from_str(claimed[0].payload.get()).unwrap();
        assert_eq!(
            data,
            j!({"collection": "orders", "key": "o-1", "op": "delete", "value": null, "previous": {"n": 1}, "version": 1})
        );
    }

    async fn a_kv_put_authorized_at_an_older_epoch_writes_nothing_on_either_path<S: Store>(s: S) {
        let t = tenant(&s, "shop").await;
        s.create_trigger(&new_trigger(&t, "orders", kv_spec("orders", &[KvOp::Put]))).await.unwrap();
        let config = TriggerConfig::default();
        let (collection, key) = (CollectionName::parse("orders").unwrap(), KvKey::parse("o-1").unwrap());
        let put = |value: serde_json::Value, expected: Option<i64>, epoch: i64| {
            let (s, t, config, collection, key) = (&s, &t, &config, &collection, &key);
            async move {
                events::kv_put_now(s, &cx(t, 0, config), collection, key, &value, expected, Some(epoch)).await
            }
        };
        let read = s.authenticate_principal(t.admin.id, Some("shop")).await.unwrap().unwrap().config_epoch;
        let (written, fired) = put(j!(1), None, read).await.unwrap();
        assert_eq!((written.version, fired.deliveries), (1, 1), "written while the epoch holds");

        s.create_trigger(&new_trigger(&t, "later", kv_spec("users", &[KvOp::Put]))).await.unwrap();
        // The one statement, and the separate statements an If-Match takes.
        let stale = put(j!(2), None, read).await;
        assert!(matches!(stale, Err(Error::Stale)), "{stale:?}");
        let stale = put(j!(2), Some(1), read).await;
        assert!(matches!(stale, Err(Error::Stale)), "{stale:?}");
        assert_eq!(s.kv_get(t.app.id, "orders", "o-1").await.unwrap().unwrap().value, j!(1));
        assert_eq!(s.claim_due(10, LEASE, "n").await.unwrap().rows.len(), 1, "no delivery of a stale put");

        let again = s.authenticate_principal(t.admin.id, Some("shop")).await.unwrap().unwrap().config_epoch;
        assert_eq!(put(j!(2), Some(1), again).await.unwrap().0.version, 2);
        assert_eq!(put(j!(3), None, again).await.unwrap().0.version, 3);
    }

    async fn a_replayed_dead_letter_is_delivered_again_to_its_trigger<S: Store>(s: S) {
        let (t, trigger) = tenant_with_trigger(&s, "shop").await;
        insert(&s, &[delivery(&t, &trigger, Duration::ZERO)]).await;
        let c = s.claim_due(1, LEASE, "n").await.unwrap().rows.remove(0);
        let mut tx = s.begin().await.unwrap();
        let dead = s
            .bury(&mut tx, &[Bury { id: c.id, attempt: 1, reason: DeadLetterReason::Rejected, error: None }])
            .await
            .unwrap()
            .remove(0);
        s.commit(tx).await.unwrap();
        let config = TriggerConfig::default();
        let mut tx = s.begin().await.unwrap();
        let (id, replayed) = events::replay(&s, &mut tx, &dead, &config).await.unwrap();
        s.commit(tx).await.unwrap();
        assert_eq!((replayed.id, replayed.resolution), (dead.id, Some(Resolution::Replayed)));
        let again = s.claim_due(1, LEASE, "n").await.unwrap().rows.remove(0);
        assert_eq!((again.id, again.attempt, again.trigger_id), (id, 1, Some(trigger.id)));
        assert_eq!(
            (again.payload.get(), again.event_type.as_str()),
            (c.payload.get(), c.event_type.as_str())
        );
        assert_eq!(
            s.dead_letter(t.app.id, dead.id).await.unwrap().unwrap().resolution,
            Some(Resolution::Replayed)
        );

        s.delete_trigger(t.app.id, "on-order").await.unwrap();
        let orphan = s.dead_letter(t.app.id, dead.id).await.unwrap().unwrap();
        let mut tx = s.begin().await.unwrap();
        assert!(
            matches!(events::replay(&s, &mut tx, &orphan, &config).await, Err(Error::TriggerGone(n)) if n == "on-order")
        );
    }
}
