//! Every route of DESIGN §5 is served, documented, and guarded by its capability.

use std::sync::atomic::{AtomicUsize, Ordering};

use axum::http::{Method, StatusCode};
use picloud_core::{Access, Capability, Role, Scope};
use picloud_store::{AuthRepo as _, KvRepo as _};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::*;

/// What a route needs.
#[derive(Debug, Clone, Copy)]
enum Needs {
    /// Nothing: not even a token.
    Nothing,
    /// Any valid token.
    Anyone,
    /// Any valid API token (delivery tokens may not mint tokens).
    ApiToken,
    /// A capability on app `shop` (or a platform one).
    Cap(Capability),
}

static NAMES: AtomicUsize = AtomicUsize::new(0);

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", NAMES.fetch_add(1, Ordering::Relaxed))
}

/// DESIGN §5, route by route: method, path template, a concrete path, what it needs, and a body
/// that is valid where a body is needed.
type Route = (Method, &'static str, String, Needs, Option<Value>);

fn routes(api: &Api) -> Vec<Route> {
    use Capability::*;
    let some_id = Uuid::now_v7();
    let member = api.admin_principal.id;
    vec![
        (
            Method::POST,
            "/v1/apps",
            "/v1/apps".into(),
            Needs::Cap(ManageApps),
            Some(json!({"slug": unique("app")})),
        ),
        (Method::GET, "/v1/apps", "/v1/apps".into(), Needs::Anyone, None),
        (
            Method::POST,
            "/v1/principals",
            "/v1/principals".into(),
            Needs::Cap(ManagePrincipals),
            Some(json!({"name": "p"})),
        ),
        (
            Method::PUT,
            "/v1/apps/{app}/members/{principal_id}",
            format!("/v1/apps/shop/members/{member}"),
            Needs::Cap(AppManageMembers),
            Some(json!({"role": "admin"})),
        ),
        (
            Method::DELETE,
            "/v1/apps/{app}/members/{principal_id}",
            format!("/v1/apps/shop/members/{some_id}"),
            Needs::Cap(AppManageMembers),
            None,
        ),
        (Method::POST, "/v1/tokens", "/v1/tokens".into(), Needs::ApiToken, Some(json!({}))),
        (Method::DELETE, "/v1/tokens/{id}", format!("/v1/tokens/{some_id}"), Needs::Anyone, None),
        (
            Method::PUT,
            "/v1/apps/{app}/kv/{collection}/{key}",
            "/v1/apps/shop/kv/c/k".into(),
            Needs::Cap(AppWriteKv),
            Some(json!({"a": 1})),
        ),
        (
            Method::GET,
            "/v1/apps/{app}/kv/{collection}/{key}",
            "/v1/apps/shop/kv/c/k".into(),
            Needs::Cap(AppReadKv),
            None,
        ),
        (
            Method::DELETE,
            "/v1/apps/{app}/kv/{collection}/{key}",
            "/v1/apps/shop/kv/c/absent".into(),
            Needs::Cap(AppWriteKv),
            None,
        ),
        (
            Method::GET,
            "/v1/apps/{app}/kv/{collection}",
            "/v1/apps/shop/kv/c".into(),
            Needs::Cap(AppReadKv),
            None,
        ),
        (
            Method::POST,
            "/v1/apps/{app}/topics/{topic}/messages",
            "/v1/apps/shop/topics/t/messages".into(),
            Needs::Cap(AppPublish),
            Some(json!({"m": 1})),
        ),
        (
            Method::POST,
            "/v1/apps/{app}/queues/{queue}/jobs",
            "/v1/apps/shop/queues/q/jobs".into(),
            Needs::Cap(AppEnqueue),
            Some(json!({"payload": {}})),
        ),
        (
            Method::POST,
            "/v1/apps/{app}/emails",
            "/v1/apps/shop/emails".into(),
            Needs::Cap(AppSendEmail),
            Some(json!({"to": "a@b.co", "subject": "s", "text": "t"})),
        ),
        (
            Method::POST,
            "/v1/apps/{app}/invoke/{trigger}",
            "/v1/apps/shop/invoke/absent".into(),
            Needs::Cap(AppInvoke),
            Some(json!({})),
        ),
        (
            Method::POST,
            "/v1/apps/{app}/triggers",
            "/v1/apps/shop/triggers".into(),
            Needs::Cap(AppManageTriggers),
            Some(json!({"name": unique("t"), "kind": "http", "handler": {"function": "h"}})),
        ),
        (Method::GET, "/v1/apps/{app}/triggers", "/v1/apps/shop/triggers".into(), Needs::Cap(AppRead), None),
        (
            Method::GET,
            "/v1/apps/{app}/triggers/{name}",
            "/v1/apps/shop/triggers/absent".into(),
            Needs::Cap(AppRead),
            None,
        ),
        (
            Method::PATCH,
            "/v1/apps/{app}/triggers/{name}",
            "/v1/apps/shop/triggers/absent".into(),
            Needs::Cap(AppManageTriggers),
            Some(json!({"enabled": false})),
        ),
        (
            Method::DELETE,
            "/v1/apps/{app}/triggers/{name}",
            "/v1/apps/shop/triggers/absent".into(),
            Needs::Cap(AppManageTriggers),
            None,
        ),
        (
            Method::GET,
            "/v1/apps/{app}/dead-letters",
            "/v1/apps/shop/dead-letters".into(),
            Needs::Cap(AppRead),
            None,
        ),
        (
            Method::GET,
            "/v1/apps/{app}/dead-letters/count",
            "/v1/apps/shop/dead-letters/count".into(),
            Needs::Cap(AppRead),
            None,
        ),
        (
            Method::GET,
            "/v1/apps/{app}/dead-letters/{id}",
            format!("/v1/apps/shop/dead-letters/{some_id}"),
            Needs::Cap(AppRead),
            None,
        ),
        (
            Method::POST,
            "/v1/apps/{app}/dead-letters/{id}/replay",
            format!("/v1/apps/shop/dead-letters/{some_id}/replay"),
            Needs::Cap(AppDeadLetterManage),
            None,
        ),
        (
            Method::POST,
            "/v1/apps/{app}/dead-letters/{id}/ignore",
            format!("/v1/apps/shop/dead-letters/{some_id}/ignore"),
            Needs::Cap(AppDeadLetterManage),
            None,
        ),
        (
            Method::GET,
            "/v1/apps/{app}/deliveries",
            "/v1/apps/shop/deliveries".into(),
            Needs::Cap(AppRead),
            None,
        ),
        (
            Method::GET,
            "/v1/apps/{app}/deliveries/{id}",
            format!("/v1/apps/shop/deliveries/{some_id}"),
            Needs::Cap(AppRead),
            None,
        ),
        (
            Method::POST,
            "/v1/apps/{app}/deliveries/{id}/cancel",
            format!("/v1/apps/shop/deliveries/{some_id}/cancel"),
            Needs::Cap(AppDeadLetterManage),
            None,
        ),
        (
            Method::GET,
            "/v1/apps/{app}/abandoned-executions",
            "/v1/apps/shop/abandoned-executions".into(),
            Needs::Cap(AppRead),
            None,
        ),
        (Method::GET, "/v1/openapi.json", "/v1/openapi.json".into(), Needs::Nothing, None),
        (Method::GET, "/healthz", "/healthz".into(), Needs::Nothing, None),
        (Method::GET, "/readyz", "/readyz".into(), Needs::Nothing, None),
    ]
}

/// The callers of the matrix: name, token, and what they hold on `shop`.
fn callers(api: &Api) -> Vec<(&'static str, Option<String>, Access, bool)> {
    let member = |role| Access { platform_admin: false, role: Some(role), token_scopes: None };
    vec![
        ("no token", None, Access { platform_admin: false, role: None, token_scopes: None }, false),
        ("viewer", Some(api.viewer.clone()), member(Role::Viewer), false),
        ("developer", Some(api.developer.clone()), member(Role::Developer), false),
        ("admin", Some(api.admin.clone()), member(Role::Admin), false),
        (
            "another app's admin",
            Some(api.other_admin.clone()),
            Access { platform_admin: false, role: None, token_scopes: None },
            false,
        ),
        (
            "platform admin",
            Some(api.root.clone()),
            Access { platform_admin: true, role: None, token_scopes: None },
            false,
        ),
        (
            "delivery token",
            Some(api.delivery_token(1)),
            Access {
                platform_admin: false,
                role: Some(Role::Admin),
                // Signed with every scope of an admin, as tokens were before DESIGN §9 took
                // app_admin out of them: the API reads them without it all the same.
                token_scopes: Some(
                    [Scope::AppWrite, Scope::AppPublish, Scope::AppSend, Scope::AppInvoke, Scope::AppRead]
                        .into_iter()
                        .collect(),
                ),
            },
            true,
        ),
    ]
}

#[tokio::test]
async fn every_route_answers_each_caller_as_its_capability_says() {
    let api = Api::start().await;
    let mut failures = Vec::new();
    for (caller, token, access, delivery) in callers(&api) {
        for (method, _, path, needs, body) in routes(&api) {
            let reply = api.call(method.clone(), &path, token.as_deref(), body).await;
            let expected = match (needs, &token) {
                (Needs::Nothing, _) => "allowed",
                (_, None) => "401",
                (Needs::Anyone, _) => "allowed",
                (Needs::ApiToken, _) => {
                    if delivery {
                        "403"
                    } else {
                        "allowed"
                    }
                }
                (Needs::Cap(cap), _) => {
                    let sees_app = access.platform_admin || access.role.is_some();
                    if access.allows(cap) {
                        "allowed"
                    } else if cap.scope() != Scope::PlatformAdmin && !sees_app {
                        // An app the caller has no role on answers as if it did not exist.
                        "404 app_not_found"
                    } else {
                        "403"
                    }
                }
            };
            let got = match (reply.status, reply.code()) {
                (StatusCode::UNAUTHORIZED, _) => "401",
                (StatusCode::FORBIDDEN, _) => "403",
                (StatusCode::NOT_FOUND, "app_not_found") => "404 app_not_found",
                _ => "allowed",
            };
            if expected != got
                || reply.status == StatusCode::METHOD_NOT_ALLOWED
                || reply.code() == "not_found"
            {
                failures.push(format!(
                    "{caller}: {method} {path} -> {} {:?} (expected {expected})",
                    reply.status, reply.body
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

#[tokio::test]
async fn the_openapi_document_lists_every_route() {
    let api = Api::start().await;
    let reply = api.call(Method::GET, "/v1/openapi.json", Some(&api.viewer), None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.body["openapi"].as_str().unwrap().starts_with("3."));
    let paths = reply.body["paths"].as_object().expect("paths");
    for (method, template, _, _, _) in routes(&api) {
        let operation = paths.get(template).and_then(|p| p.get(method.as_str().to_lowercase()));
        assert!(
            operation.is_some(),
            "{method} {template} is not in the OpenAPI document; it has {:?}",
            paths.keys()
        );
    }
}

#[tokio::test]
async fn a_handlers_delivery_token_cannot_make_anyone_an_app_admin_nor_manage_the_app() {
    let api = Api::start().await;
    api.trigger(json!({"name": "leak", "kind": "http", "handler": {"function": "leak"}})).await;
    let client = async_nats::connect(api.nats.url()).await.unwrap();
    let worker = picloud_worker::Worker::new(client, "shop")
        .handle("leak", |d: picloud_worker::Delivery| async move {
            Ok(picloud_worker::Reply::ok(json!({"token": d.token})))
        })
        .start()
        .await
        .unwrap();
    let leaked =
        api.call(Method::POST, "/v1/apps/shop/invoke/leak", Some(&api.developer), Some(json!({}))).await;
    assert_eq!(leaked.status, StatusCode::OK, "{:?}", leaked.body);
    let token = leaked.body["token"].as_str().expect("the handler's delivery token").to_owned();
    let outsider = api.store().create_principal("outsider", false).await.unwrap().id;

    let refused = [
        (Method::PUT, format!("/v1/apps/shop/members/{outsider}"), Some(json!({"role": "admin"}))),
        (
            Method::POST,
            "/v1/apps/shop/triggers".into(),
            Some(json!({"name": "x", "kind": "http", "handler": {"function": "x"}})),
        ),
        (Method::DELETE, "/v1/apps/shop/triggers/leak".into(), None),
    ];
    for (method, path, body) in refused {
        let reply = api.call(method.clone(), &path, Some(&token), body).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{method} {path}: {:?}", reply.body);
    }
    let write = api.call(Method::PUT, "/v1/apps/shop/kv/notes/n", Some(&token), Some(json!(1))).await;
    assert_eq!(write.status, StatusCode::OK, "a handler still writes its app's data: {:?}", write.body);
    worker.shutdown().await;
}

#[tokio::test]
async fn an_app_the_caller_has_no_role_on_answers_exactly_like_an_app_that_does_not_exist() {
    let api = Api::start().await;
    for path in ["/v1/apps/shop/triggers", "/v1/apps/shop/kv/c/k", "/v1/apps/shop/dead-letters/count"] {
        let hidden = api.call(Method::GET, path, Some(&api.other_admin), None).await;
        let missing =
            api.call(Method::GET, &path.replace("shop", "nope"), Some(&api.other_admin), None).await;
        assert_eq!((hidden.status, hidden.body.clone()), (missing.status, missing.body.clone()), "{path}");
        assert_eq!(hidden.code(), "app_not_found");
    }
    let hidden =
        api.call(Method::POST, "/v1/tokens", Some(&api.developer), Some(json!({"app": "other"}))).await;
    let missing =
        api.call(Method::POST, "/v1/tokens", Some(&api.developer), Some(json!({"app": "nope"}))).await;
    assert_eq!((hidden.status, hidden.code()), (StatusCode::NOT_FOUND, "app_not_found"), "minting");
    assert_eq!((missing.status, missing.code()), (StatusCode::NOT_FOUND, "app_not_found"));
    // A member sees the app, and is told what it lacks.
    let viewer = api.call(Method::PUT, "/v1/apps/shop/kv/c/k", Some(&api.viewer), Some(json!(1))).await;
    assert_eq!(viewer.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_kv_writer_whose_authorization_was_kept_is_refused_once_its_token_is_revoked_expired_or_its_role_lowered()
 {
    let clock = picloud_store::Clock::manual(time::OffsetDateTime::now_utc());
    let api = Api::start_on(clock.clone(), |_| {}).await;
    let put_if = |token: String, body: &'static [u8], if_match: Option<i64>| {
        let api = &api;
        async move {
            let (path, version) = ("/v1/apps/shop/kv/notes/k", if_match.map(|v| v.to_string()));
            let headers: Vec<(&str, &str)> = version.iter().map(|v| ("If-Match", v.as_str())).collect();
            api.call_with(Method::PUT, path, Some(&token), Some(body.to_vec()), &headers).await
        }
    };
    let put = |token: String, body: &'static [u8]| put_if(token, body, None);
    let mint = |expires_at: Option<time::OffsetDateTime>| {
        let api = &api;
        async move {
            let token = picloud_core::token::generate_api_token();
            api.store()
                .create_token(&picloud_store::NewApiToken {
                    id: Uuid::now_v7(),
                    principal_id: api.admin_principal.id,
                    token_hash: picloud_core::token::hash_api_token(&token),
                    app_id: None,
                    scopes: None,
                    expires_at,
                })
                .await
                .unwrap();
            token
        }
    };
    let revoke = |token: String| {
        let api = &api;
        async move {
            let hash = picloud_core::token::hash_api_token(&token);
            let (token, _) = api.store().token_by_hash(&hash).await.unwrap().unwrap();
            assert!(api.store().revoke_token(token.id).await.unwrap());
        }
    };
    let short_lived = mint(Some(clock.now() + std::time::Duration::from_secs(3))).await;
    let conditional = mint(None).await;
    let mut written = 0;
    for _ in 0..2 {
        for token in [&api.developer, &api.admin, &short_lived, &conditional] {
            assert_eq!(put(token.clone(), b"1").await.status, StatusCode::OK);
            written += 1;
        }
    }

    // Each token is revoked while its authorization is kept, then refused whatever it asks: a put
    // (the one statement), an If-Match put at the entry's current version (the separate
    // statements, which would write), a malformed body (told only once the authorization holds).
    let cases: [(&String, &'static [u8], bool); 3] =
        [(&api.developer, b"1", false), (&conditional, b"1", true), (&api.admin, b"{", false)];
    for (token, body, conditional) in cases {
        assert_eq!(put(token.clone(), b"1").await.status, StatusCode::OK);
        written += 1;
        revoke(token.clone()).await;
        let refused = put_if(token.clone(), body, conditional.then_some(written)).await;
        assert_eq!((refused.status, refused.code()), (StatusCode::UNAUTHORIZED, "token_revoked"), "{body:?}");
    }

    // Kept again at the epoch the revocations moved to, then refused once the role is lowered.
    assert_eq!(put(short_lived.clone(), b"1").await.status, StatusCode::OK);
    written += 1;
    api.store().set_role(api.app.id, api.admin_principal.id, Role::Viewer).await.unwrap();
    let lowered = put(short_lived.clone(), b"1").await;
    assert_eq!(lowered.status, StatusCode::FORBIDDEN, "{:?}", lowered.body);
    api.store().set_role(api.app.id, api.admin_principal.id, Role::Admin).await.unwrap();

    // Nothing moves the epoch when a token expires: the kept token's own expiry is checked.
    assert_eq!(put(short_lived.clone(), b"1").await.status, StatusCode::OK);
    written += 1;
    clock.advance(std::time::Duration::from_secs(3));
    let expired = put(short_lived.clone(), b"1").await;
    assert_eq!((expired.status, expired.code()), (StatusCode::UNAUTHORIZED, "token_expired"));
    let entry = api.store().kv_get(api.app.id, "notes", "k").await.unwrap().unwrap();
    assert_eq!(entry.version, written, "every refused put wrote nothing");
}
