//! The operations against the in-memory store: who may do what (the capability matrix of
//! DESIGN §9, the same rule the HTTP matrix holds the routes to), and bad input refused with the
//! field named and nothing written. What only Postgres does (the one-statement writes, the sync
//! call's statement, the HTTP translation) is tested through the routes in `tests/it`.

use std::time::Duration;

use picloud_core::net::AllowNets;
use picloud_core::token::{DeliveryToken, TokenKey};
use picloud_core::{Access, Capability, PrincipalId, Role, Scope, ScopeSet, TriggerConfig};
use picloud_store::events::SyncWaiter;
use picloud_store::{
    AuthRepo as _, Bury, DeadLetterReason, DeadLetterRepo as _, MemStore, OutboxRepo as _, Transactional as _,
};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use uuid::Uuid;

use super::Ops;
use crate::auth::{Caller, resolve};
use crate::error::{ApiError, ErrorCode};
use crate::extract::PageQuery;
use crate::ops::dead_letters::{BulkAction, DeadLetterQuery};
use crate::views::{CreateToken, EnqueueJob, PatchTrigger, RegisterTrigger, SendEmail};

const KEY: &[u8] = b"the ops tests' delivery-token key";

/// A store with apps `shop` and `other`, and a token for each kind of caller of the matrix.
struct World {
    ops: Ops<MemStore>,
    key: TokenKey,
    /// (name, credentials, what they hold on `shop`, whether it is a delivery token)
    callers: Vec<(&'static str, String, Access, bool)>,
}

fn body<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("a body of the right shape")
}

fn raw(value: &Value) -> Box<RawValue> {
    RawValue::from_string(value.to_string()).expect("JSON")
}

impl World {
    async fn new() -> World {
        let ops = Ops::new(MemStore::new(), TriggerConfig::default(), AllowNets::default());
        let operator = Caller::operator(None);
        for slug in ["shop", "other"] {
            ops.create_app(&operator, slug.to_owned()).await.unwrap();
        }
        let app = |slug: &'static str| {
            let ops = ops.clone();
            async move { ops.store().app_by_slug(slug).await.unwrap().unwrap() }
        };
        let (shop, other) = (app("shop").await, app("other").await);
        let mint = async |name: &str,
                          platform_admin: bool,
                          member: Option<(&picloud_store::App, Role)>,
                          scopes: Option<Vec<String>>| {
            let principal = ops.create_principal(&operator, name, platform_admin).await.unwrap();
            if let Some((app, role)) = member {
                let on_app = Caller::operator(Some(app.clone()));
                ops.set_member(&on_app, &principal.id.to_string(), role.as_str()).await.unwrap();
            }
            let body =
                CreateToken { principal_id: Some(principal.id), app: None, scopes, expires_in_s: None };
            (principal.id, ops.mint_token(&operator, &body).await.unwrap().token)
        };
        let member = |role| Access { platform_admin: false, role: Some(role), token_scopes: None };
        let nothing = Access { platform_admin: false, role: None, token_scopes: None };
        let (_, viewer) = mint("viewer", false, Some((&shop, Role::Viewer)), None).await;
        let (_, developer) = mint("developer", false, Some((&shop, Role::Developer)), None).await;
        let (admin_id, admin) = mint("admin", false, Some((&shop, Role::Admin)), None).await;
        let (_, reader) =
            mint("reader", false, Some((&shop, Role::Admin)), Some(vec!["app_read".into()])).await;
        let (_, other_admin) = mint("other admin", false, Some((&other, Role::Admin)), None).await;
        let (_, root) = mint("root", true, None, None).await;
        let key = TokenKey::new(KEY);
        let delivery = key.sign(&DeliveryToken {
            principal: PrincipalId::from_uuid(admin_id),
            app: shop.id,
            depth: 1,
            deadline_ms: (time::OffsetDateTime::now_utc().unix_timestamp() + 600) * 1000,
            scopes: ScopeSet::for_role(Role::Admin),
        });
        let callers = vec![
            ("viewer", viewer, member(Role::Viewer), false),
            ("developer", developer, member(Role::Developer), false),
            ("admin", admin, member(Role::Admin), false),
            (
                "admin narrowed to app_read",
                reader,
                Access {
                    platform_admin: false,
                    role: Some(Role::Admin),
                    token_scopes: Some(ScopeSet::EMPTY.with(Scope::AppRead)),
                },
                false,
            ),
            ("another app's admin", other_admin, nothing, false),
            ("platform admin", root, Access { platform_admin: true, role: None, token_scopes: None }, false),
            (
                "delivery token",
                delivery,
                Access {
                    platform_admin: false,
                    role: Some(Role::Admin),
                    token_scopes: Some(ScopeSet::for_role(Role::Admin).for_delivery()),
                },
                true,
            ),
        ];
        World { ops, key, callers }
    }

    async fn caller(&self, credentials: &str) -> Caller {
        resolve(self.ops.store(), &self.key, credentials, Some("shop"))
            .await
            .expect("credentials that resolve")
    }
}

/// What an operation needs.
#[derive(Debug, Clone, Copy)]
enum Needs {
    /// Any caller.
    Anyone,
    /// Any API token (a delivery token may not mint).
    ApiToken,
    /// A capability on `shop`, or a platform one.
    Cap(Capability),
    /// A capability on `shop`, held by an API token (a delivery token may not tail).
    ApiTokenWith(Capability),
}

/// What a caller with `access` gets from an operation that needs `cap`.
fn needs_cap(cap: Capability, access: &Access) -> &'static str {
    if access.allows(cap) {
        "allowed"
    } else if cap.scope() != Scope::PlatformAdmin && !(access.platform_admin || access.role.is_some()) {
        "404 app_not_found"
    } else {
        "403"
    }
}

/// Every operation a caller may attempt on `shop`.
#[derive(Debug, Clone, Copy)]
enum Op {
    CreateApp,
    ListApps,
    CreatePrincipal,
    SetMember,
    RemoveMember,
    MintToken,
    RevokeToken,
    Put,
    Get,
    Delete,
    ListKeys,
    Publish,
    Enqueue,
    SendEmail,
    RegisterTrigger,
    ListTriggers,
    GetTrigger,
    PatchTrigger,
    DeleteTrigger,
    ListDeadLetters,
    CountDeadLetters,
    GetDeadLetter,
    Replay,
    Ignore,
    BulkReplay,
    BulkIgnore,
    ListAbandoned,
    Invoke,
    TriggerStats,
    AppBacklog,
    Tail,
}

impl Op {
    const ALL: [Op; 31] = [
        Op::CreateApp,
        Op::ListApps,
        Op::CreatePrincipal,
        Op::SetMember,
        Op::RemoveMember,
        Op::MintToken,
        Op::RevokeToken,
        Op::Put,
        Op::Get,
        Op::Delete,
        Op::ListKeys,
        Op::Publish,
        Op::Enqueue,
        Op::SendEmail,
        Op::RegisterTrigger,
        Op::ListTriggers,
        Op::GetTrigger,
        Op::PatchTrigger,
        Op::DeleteTrigger,
        Op::ListDeadLetters,
        Op::CountDeadLetters,
        Op::GetDeadLetter,
        Op::Replay,
        Op::Ignore,
        Op::BulkReplay,
        Op::BulkIgnore,
        Op::ListAbandoned,
        Op::Invoke,
        Op::TriggerStats,
        Op::AppBacklog,
        Op::Tail,
    ];

    fn needs(self) -> Needs {
        use Capability::*;
        Needs::Cap(match self {
            Op::ListApps | Op::RevokeToken => return Needs::Anyone,
            Op::Tail => return Needs::ApiTokenWith(AppRead),
            Op::MintToken => return Needs::ApiToken,
            Op::CreateApp => ManageApps,
            Op::CreatePrincipal => ManagePrincipals,
            Op::SetMember | Op::RemoveMember => AppManageMembers,
            Op::Put | Op::Delete => AppWriteKv,
            Op::Get | Op::ListKeys => AppReadKv,
            Op::Publish => AppPublish,
            Op::Enqueue => AppEnqueue,
            Op::SendEmail => AppSendEmail,
            Op::RegisterTrigger | Op::PatchTrigger | Op::DeleteTrigger => AppManageTriggers,
            Op::ListTriggers | Op::GetTrigger | Op::TriggerStats | Op::AppBacklog => AppRead,
            Op::ListDeadLetters | Op::CountDeadLetters | Op::GetDeadLetter | Op::ListAbandoned => AppRead,
            Op::Replay | Op::Ignore | Op::BulkReplay | Op::BulkIgnore => AppDeadLetterManage,
            Op::Invoke => AppInvoke,
        })
    }

    /// Attempts the operation as `c`, with input that is valid for it.
    async fn attempt(self, o: &Ops<MemStore>, c: &Caller) -> Result<(), ApiError> {
        let page = PageQuery { after: None, limit: None };
        let fresh = || Uuid::now_v7().simple().to_string();
        match self {
            Op::CreateApp => o.create_app(c, format!("a{}", &fresh()[..20])).await.map(drop),
            Op::ListApps => o.list_apps(c, &page).await.map(drop),
            Op::CreatePrincipal => o.create_principal(c, "p", false).await.map(drop),
            Op::SetMember => o.set_member(c, &c.principal.id.to_string(), "admin").await.map(drop),
            Op::RemoveMember => o.remove_member(c, &Uuid::now_v7().to_string()).await.map(drop),
            Op::MintToken => o.mint_token(c, &body(json!({"scopes": ["app_read"]}))).await.map(drop),
            Op::RevokeToken => o.revoke_token(c, &Uuid::now_v7().to_string()).await.map(drop),
            Op::Put => o.kv_put(c, "notes", "k", &json!(1), None, None).await.map(drop),
            Op::Get => o.kv_get(c, "notes", "k").await.map(drop),
            Op::Delete => o.kv_delete(c, "notes".into(), "k".into(), None).await.map(drop),
            Op::ListKeys => o.kv_list(c, "notes", "", &page).await.map(drop),
            Op::Publish => o.publish(c, "news".into(), &raw(&json!({})), None).await.map(drop),
            Op::Enqueue => {
                o.enqueue(c, "jobs".into(), &body::<EnqueueJob>(json!({"payload": 1}))).await.map(drop)
            }
            Op::SendEmail => {
                let email = json!({"to": "a@b.co", "subject": "s", "text": "t"});
                o.send_email(c, &body::<SendEmail>(email)).await.map(drop)
            }
            Op::RegisterTrigger => {
                let trigger =
                    json!({"name": format!("t{}", fresh()), "kind": "http", "handler": {"function": "h"}});
                o.register_trigger(c, body::<RegisterTrigger>(trigger)).await.map(drop)
            }
            Op::ListTriggers => o.list_triggers(c, &page).await.map(drop),
            Op::GetTrigger => o.trigger(c, "call").await.map(drop),
            Op::PatchTrigger => {
                o.patch_trigger(c, "call", body::<PatchTrigger>(json!({"enabled": true}))).await.map(drop)
            }
            Op::DeleteTrigger => o.delete_trigger(c, "nothing").await.map(drop),
            Op::ListDeadLetters => o.list_dead_letters(c, DeadLetterQuery::default(), &page).await.map(drop),
            Op::CountDeadLetters => o.count_dead_letters(c, None).await.map(drop),
            Op::GetDeadLetter => o.dead_letter(c, &Uuid::now_v7().to_string()).await.map(drop),
            Op::Replay => o.replay_dead_letter(c, &Uuid::now_v7().to_string()).await.map(drop),
            Op::Ignore => o.ignore_dead_letter(c, &Uuid::now_v7().to_string()).await.map(drop),
            Op::BulkReplay => o.bulk_dead_letters(c, BulkAction::Replay, &body(json!({}))).await.map(drop),
            Op::BulkIgnore => o.bulk_dead_letters(c, BulkAction::Ignore, &body(json!({}))).await.map(drop),
            Op::ListAbandoned => o.list_abandoned(c, &page).await.map(drop),
            Op::TriggerStats => o.trigger_stats(c, "call", Some("24h")).await.map(drop),
            Op::AppBacklog => o.app_backlog(c).await.map(drop),
            Op::Tail => o.tail_filter(c, Some("call".into()), Some("http")).await.map(drop),
            Op::Invoke => {
                let lease = Duration::from_secs(30);
                let waiter = SyncWaiter { reply_to: "_INBOX.test", authorized_at: None, node: "test", lease };
                o.write_sync_call(c, "call", &raw(&json!({})), waiter).await.map(drop)
            }
        }
    }
}

#[tokio::test]
async fn every_operation_answers_each_caller_as_its_capability_says() {
    let world = World::new().await;
    let admin = world.caller(&world.callers[2].1).await;
    world
        .ops
        .register_trigger(&admin, body(json!({"name": "call", "kind": "http", "handler": {"function": "h"}})))
        .await
        .unwrap();
    let mut failures = Vec::new();
    for (who, credentials, access, delivery) in &world.callers {
        let caller = world.caller(credentials).await;
        for op in Op::ALL {
            let expected = match op.needs() {
                Needs::Anyone => "allowed",
                Needs::ApiToken if *delivery => "403",
                Needs::ApiToken => "allowed",
                Needs::ApiTokenWith(cap) if *delivery && access.allows(cap) => "403",
                Needs::ApiTokenWith(cap) | Needs::Cap(cap) => needs_cap(cap, access),
            };
            let got = match op.attempt(&world.ops, &caller).await {
                Err(e) if e.code() == ErrorCode::Forbidden.as_str() => "403",
                Err(e) if e.code() == ErrorCode::AppNotFound.as_str() => "404 app_not_found",
                _ => "allowed",
            };
            if expected != got {
                failures.push(format!("{who}: {op:?} -> {got} (expected {expected})"));
            }
        }
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

#[tokio::test]
async fn bad_input_is_refused_with_the_field_named_and_nothing_written() {
    let world = World::new().await;
    let admin = world.caller(&world.callers[2].1).await;
    let ops = &world.ops;
    let page = PageQuery { after: None, limit: None };
    let trigger = |fields: Value| {
        let mut trigger = json!({"name": "t", "kind": "http", "handler": {"function": "h"}});
        trigger.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
        body::<RegisterTrigger>(trigger)
    };
    let hook = json!({"webhook": {"url": "ftp://x", "secret": "whsec_AAAAAAAAAAAAAAAAAAAAAA=="}});
    let lost = DeadLetterQuery { resolution: Some("lost".into()), ..DeadLetterQuery::default() };
    // An unresolved dead letter (an email: its replay needs no trigger) that a bulk action would
    // replay or ignore, were it not refused.
    ops.send_email(&admin, &body(json!({"to": "a@b.co", "subject": "s", "text": "t"}))).await.unwrap();
    let email = ops.store().claim_due(1, Duration::from_secs(30), "test").await.unwrap().rows.remove(0);
    let mut tx = ops.store().begin().await.unwrap();
    let bury =
        Bury { id: email.id, attempt: email.attempt, reason: DeadLetterReason::Exhausted, error: None };
    ops.store().bury(&mut tx, &[bury]).await.unwrap();
    ops.store().commit(tx).await.unwrap();
    let bulk =
        async |action, fields: Value| ops.bulk_dead_letters(&admin, action, &body(fields)).await.map(drop);
    let refusals: Vec<(&str, Result<(), ApiError>)> = vec![
        ("collection", ops.kv_put(&admin, "a/b", "k", &json!(1), None, None).await.map(drop)),
        ("key", ops.kv_put(&admin, "notes", "", &json!(1), None, None).await.map(drop)),
        ("topic", ops.publish(&admin, "a/b".into(), &raw(&json!(1)), None).await.map(drop)),
        (
            "Picloud-Ordering-Key",
            ops.publish(&admin, "news".into(), &raw(&json!(1)), Some("")).await.map(drop),
        ),
        (
            "ordering_key",
            ops.enqueue(&admin, "jobs".into(), &body(json!({"payload": 1, "ordering_key": "x".repeat(201)})))
                .await
                .map(drop),
        ),
        ("queue", ops.enqueue(&admin, "a/b".into(), &body(json!({"payload": 1}))).await.map(drop)),
        (
            "delay_ms",
            ops.enqueue(&admin, "jobs".into(), &body(json!({"payload": 1, "delay_ms": 366u64 * 86_400_000})))
                .await
                .map(drop),
        ),
        (
            "idempotency_key",
            ops.enqueue(&admin, "jobs".into(), &body(json!({"payload": 1, "idempotency_key": ""})))
                .await
                .map(drop),
        ),
        (
            "to[1]",
            ops.send_email(&admin, &body(json!({"to": ["a@b.co", "nobody"], "subject": "s", "text": "t"})))
                .await
                .map(drop),
        ),
        (
            "subject",
            ops.send_email(&admin, &body(json!({"to": "a@b.co", "subject": "a\r\nBcc: x@y.z", "text": "t"})))
                .await
                .map(drop),
        ),
        ("name", ops.register_trigger(&admin, trigger(json!({"name": "Bad Name"}))).await.map(drop)),
        ("kind", ops.register_trigger(&admin, trigger(json!({"kind": "sometimes"}))).await.map(drop)),
        ("topic", ops.register_trigger(&admin, trigger(json!({"kind": "kv", "topic": "x"}))).await.map(drop)),
        (
            "schedule",
            ops.register_trigger(&admin, trigger(json!({"kind": "cron", "schedule": "61 * * * *"})))
                .await
                .map(drop),
        ),
        (
            "handler.webhook.url",
            ops.register_trigger(&admin, trigger(json!({"handler": hook}))).await.map(drop),
        ),
        ("role", ops.set_member(&admin, &Uuid::now_v7().to_string(), "owner").await.map(drop)),
        ("scopes[0]", ops.mint_token(&admin, &body(json!({"scopes": ["everything"]}))).await.map(drop)),
        ("expires_in_s", ops.mint_token(&admin, &body(json!({"expires_in_s": 0}))).await.map(drop)),
        ("resolution", ops.list_dead_letters(&admin, lost, &page).await.map(drop)),
        ("resolution", bulk(BulkAction::Replay, json!({"resolution": "replayed"})).await),
        ("resolution", bulk(BulkAction::Ignore, json!({"resolution": "ignored"})).await),
        ("resolution", bulk(BulkAction::Replay, json!({"resolution": "lost"})).await),
        ("trigger", bulk(BulkAction::Replay, json!({"trigger": "Bad Name"})).await),
        ("reason", bulk(BulkAction::Ignore, json!({"reason": "bored"})).await),
        ("created_after", bulk(BulkAction::Replay, json!({"created_after": "yesterday"})).await),
        (
            "created_before",
            bulk(
                BulkAction::Ignore,
                json!({"created_after": "2026-01-02T00:00:00Z", "created_before": "2026-01-01T00:00:00Z"}),
            )
            .await,
        ),
    ];
    for (field, refused) in refusals {
        let e = refused.expect_err(field);
        assert_eq!(e.code(), ErrorCode::InvalidField.as_str(), "{field}: {e}");
        assert!(e.message().starts_with(&format!("{field}: ")), "{field}: the message names it: {e}");
    }
    let written = ops.store().claim_due(100, Duration::from_secs(30), "test").await.unwrap();
    assert!(written.rows.is_empty(), "a refused write wrote a delivery: {:?}", written.rows);
    let triggers = ops.list_triggers(&admin, &page).await.unwrap();
    assert!(triggers.items.is_empty(), "a refused registration registered a trigger");
    let unresolved = ops.count_dead_letters(&admin, None).await.unwrap().count;
    assert_eq!(unresolved, 1, "a refused bulk action resolved a dead letter");
}

#[tokio::test]
async fn minting_answers_the_first_limit_asked_beyond_before_reading_the_next() {
    let world = World::new().await;
    let (admin, reader) = (world.caller(&world.callers[2].1).await, world.caller(&world.callers[3].1).await);
    let limited = world.ops.mint_token(&admin, &body(json!({"app": "shop"}))).await.unwrap().token;
    let limited = world.caller(&limited).await;
    let refusals = [
        (&limited, json!({"scopes": ["everything"]}), ErrorCode::Forbidden, "limited to one app"),
        (&reader, json!({"scopes": ["app_write"], "expires_in_s": 0}), ErrorCode::Forbidden, "within them"),
        (
            &reader,
            json!({"scopes": ["app_read"], "expires_in_s": 0}),
            ErrorCode::InvalidField,
            "expires_in_s",
        ),
    ];
    for (caller, asked, code, says) in refusals {
        let refused = world.ops.mint_token(caller, &body(asked.clone())).await.expect_err("refused");
        assert_eq!(refused.code(), code.as_str(), "{asked}: {refused}");
        assert!(refused.message().contains(says), "{asked}: {refused}");
    }
}

#[tokio::test]
async fn the_operator_mints_a_token_limited_to_an_app_its_principal_holds_no_role_on() {
    let world = World::new().await;
    let outsider = world.ops.create_principal(&Caller::operator(None), "outsider", false).await.unwrap();
    let asked = json!({"principal_id": outsider.id, "app": "shop"});
    let minted = world.ops.mint_token(&Caller::operator(None), &body(asked.clone())).await.unwrap();
    assert_eq!(minted.app.as_deref(), Some("shop"));
    let root = world.caller(&world.callers[5].1).await;
    let refused = world.ops.mint_token(&root, &body(asked)).await.expect_err("a slug probe");
    assert_eq!(refused.code(), ErrorCode::AppNotFound.as_str(), "a request is told nothing of the app");
}
