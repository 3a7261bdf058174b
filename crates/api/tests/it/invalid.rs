//! Bad input gets a clear error and writes nothing.

use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::support::*;

/// Asserts the reply's status and code, and that nothing was written to the outbox or KV.
async fn refused(api: &Api, reply: Reply, status: StatusCode, code: &str) {
    assert_eq!((reply.status, reply.code()), (status, code), "{:?}", reply.body);
    assert!(!reply.message().is_empty(), "an error explains itself");
    assert_eq!(api.outbox_len().await, 0, "a refused request wrote nothing");
    let entries: i64 =
        sqlx::query_scalar("SELECT count(*) FROM kv_entries").fetch_one(api.store().pool()).await.unwrap();
    assert_eq!(entries, 0, "a refused request wrote nothing");
}

#[tokio::test]
async fn malformed_json_and_wrong_types_are_400() {
    let api = Api::start().await;
    api.trigger(json!({"name": "mailer", "kind": "queue", "queue": "mail", "handler": {"function": "h"}}))
        .await;
    let broken = api
        .call_with(Method::PUT, "/v1/apps/shop/kv/c/k", Some(&api.developer), Some(b"{\"a\":".to_vec()), &[])
        .await;
    refused(&api, broken, StatusCode::BAD_REQUEST, "invalid_json").await;
    let wrong_type = api
        .call(
            Method::POST,
            "/v1/apps/shop/queues/mail/jobs",
            Some(&api.developer),
            Some(json!({"payload": 1, "delay_ms": "soon"})),
        )
        .await;
    assert!(wrong_type.message().contains("delay_ms"), "{}", wrong_type.message());
    refused(&api, wrong_type, StatusCode::BAD_REQUEST, "invalid_json").await;
    let unknown_field = api
        .call(
            Method::POST,
            "/v1/apps/shop/triggers",
            Some(&api.admin),
            Some(json!({"name": "x", "kind": "http", "handler": {"function": "h"}, "colour": "red"})),
        )
        .await;
    assert_eq!((unknown_field.status, unknown_field.code()), (StatusCode::BAD_REQUEST, "invalid_json"));
    let bad_query = api.call(Method::GET, "/v1/apps/shop/triggers?limit=many", Some(&api.viewer), None).await;
    assert_eq!((bad_query.status, bad_query.code()), (StatusCode::BAD_REQUEST, "invalid_query"));
    let bad_cursor = api.call(Method::GET, "/v1/apps/shop/triggers?after=%%%", Some(&api.viewer), None).await;
    assert_eq!(bad_cursor.status, StatusCode::BAD_REQUEST);
    let bad_if_match = api
        .call_with(
            Method::PUT,
            "/v1/apps/shop/kv/c/k",
            Some(&api.developer),
            Some(b"1".to_vec()),
            &[("If-Match", "latest")],
        )
        .await;
    refused(&api, bad_if_match, StatusCode::BAD_REQUEST, "invalid_if_match").await;
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_and_writes_nothing() {
    let api = Api::start().await;
    let big = format!("\"{}\"", "x".repeat(70 * 1024));
    let reply = api
        .call_with(Method::PUT, "/v1/apps/shop/kv/c/k", Some(&api.developer), Some(big.into_bytes()), &[])
        .await;
    refused(&api, reply, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
}

#[tokio::test]
async fn a_write_whose_event_would_not_fit_nats_is_413_and_writes_nothing() {
    let api = Api::start().await;
    api.trigger(json!({"name": "t", "kind": "kv", "collection": "c", "handler": {"function": "t"}})).await;
    // Under the 64 KiB body limit, but Postgres writes each 1e300 out in 301 digits: the event's
    // data would be megabytes, more than an envelope may carry.
    let numbers = format!("[{}]", vec!["1e300"; 9000].join(","));
    assert!(numbers.len() < 64 * 1024);
    let put = api
        .call_with(Method::PUT, "/v1/apps/shop/kv/c/k", Some(&api.developer), Some(numbers.into_bytes()), &[])
        .await;
    refused(&api, put, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    let kept =
        api.call(Method::PUT, "/v1/apps/shop/kv/elsewhere/k", Some(&api.developer), Some(json!(1))).await;
    assert_eq!(kept.status, StatusCode::OK, "a write that fires nothing is not held to the event limit");
}

#[tokio::test]
async fn invalid_names_patterns_and_fields_are_422_naming_the_field() {
    let api = Api::start().await;
    let cases = [
        (json!({"name": "Bad Name", "kind": "http", "handler": {"function": "h"}}), "name"),
        (
            json!({"name": "t", "kind": "kv", "collection": "ord*ers", "handler": {"function": "h"}}),
            "collection",
        ),
        (json!({"name": "t", "kind": "kv", "handler": {"function": "h"}}), "collection"),
        (
            json!({"name": "t", "kind": "kv", "collection": "c", "ops": ["upsert"], "handler": {"function": "h"}}),
            "ops[0]",
        ),
        (json!({"name": "t", "kind": "pubsub", "topic": "a*b*", "handler": {"function": "h"}}), "topic"),
        (json!({"name": "t", "kind": "http", "topic": "x", "handler": {"function": "h"}}), "topic"),
        (json!({"name": "t", "kind": "sometimes", "handler": {"function": "h"}}), "kind"),
        (json!({"name": "t", "kind": "http", "handler": {"function": "Not.A.Name"}}), "handler.function"),
        (
            json!({"name": "t", "kind": "http", "handler": {"webhook": {"url": "ftp://x", "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}}}),
            "handler.webhook.url",
        ),
        (
            json!({"name": "t", "kind": "http", "handler": {"webhook": {"url": "https://x.test", "secret": "hunter2"}}}),
            "handler.webhook.secret",
        ),
        (
            json!({"name": "t", "kind": "http", "handler": {"function": "h"}, "retry": {"max_attempts": 0}}),
            "retry",
        ),
        (
            json!({"name": "t", "kind": "cron", "schedule": "every minute", "handler": {"function": "h"}}),
            "schedule",
        ),
        (
            json!({"name": "t", "kind": "cron", "schedule": "0 25 * * *", "handler": {"function": "h"}}),
            "schedule",
        ),
        (
            json!({"name": "t", "kind": "cron", "schedule": "0 9 * * *", "timezone": "Europe/Atlantis", "handler": {"function": "h"}}),
            "timezone",
        ),
        (
            json!({"name": "t", "kind": "dead_letter", "source_kinds": ["kv", "mail"], "handler": {"function": "h"}}),
            "source_kinds[1]",
        ),
    ];
    for (body, field) in cases {
        let reply =
            api.call(Method::POST, "/v1/apps/shop/triggers", Some(&api.admin), Some(body.clone())).await;
        assert_eq!(
            (reply.status, reply.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_field"),
            "{body}: {:?}",
            reply.body
        );
        assert!(reply.message().starts_with(&format!("{field}:")), "{body}: {}", reply.message());
    }
    let listed = api.call(Method::GET, "/v1/apps/shop/triggers", Some(&api.viewer), None).await;
    assert_eq!(listed.body["items"], json!([]), "no refused trigger was registered");

    let other_cases = [
        (Method::PUT, "/v1/apps/shop/kv/c/%0A", Some(json!(1)), "key"),
        (Method::POST, "/v1/apps/shop/topics/%01/messages", Some(json!(1)), "topic"),
        (Method::POST, "/v1/apps", Some(json!({"slug": "Shop!"})), "slug"),
        (
            Method::POST,
            "/v1/apps/shop/emails",
            Some(json!({"to": "not-an-address", "subject": "s", "text": "t"})),
            "to[0]",
        ),
        (
            Method::POST,
            "/v1/apps/shop/emails",
            Some(json!({"to": "a@b.co", "subject": "s\r\nBcc: x@y.z", "text": "t"})),
            "subject",
        ),
        (
            Method::PUT,
            "/v1/apps/shop/members/00000000-0000-0000-0000-000000000000",
            Some(json!({"role": "owner"})),
            "role",
        ),
        (Method::POST, "/v1/tokens", Some(json!({"scopes": ["everything"]})), "scopes[0]"),
    ];
    for (method, path, body, field) in other_cases {
        let reply = api.call(method.clone(), path, Some(&api.root), body).await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{method} {path}: {:?}", reply.body);
        assert!(reply.message().starts_with(&format!("{field}:")), "{method} {path}: {}", reply.message());
    }
    assert_eq!(api.outbox_len().await, 0, "refused requests wrote nothing");
}

#[tokio::test]
async fn unknown_apps_triggers_keys_and_dead_letters_are_404() {
    let api = Api::start().await;
    let cases = [
        (Method::GET, "/v1/apps/nope/triggers", "app_not_found"),
        (Method::GET, "/v1/apps/shop/triggers/nope", "trigger_not_found"),
        (Method::GET, "/v1/apps/shop/kv/c/nope", "key_not_found"),
        (
            Method::GET,
            "/v1/apps/shop/dead-letters/0193a0c4-0000-7000-8000-000000000000",
            "dead_letter_not_found",
        ),
        (Method::GET, "/v1/apps/shop/dead-letters/not-a-uuid", "dead_letter_not_found"),
        (Method::POST, "/v1/apps/shop/invoke/nope", "trigger_not_found"),
        (Method::GET, "/v1/nothing-here", "not_found"),
    ];
    for (method, path, code) in cases {
        let body = (method == Method::POST).then(|| json!({}));
        let reply = api.call(method.clone(), path, Some(&api.root), body).await;
        assert_eq!((reply.status, reply.code()), (StatusCode::NOT_FOUND, code), "{method} {path}");
    }
    let wrong_method = api.call(Method::PATCH, "/v1/apps", Some(&api.root), None).await;
    assert_eq!(
        (wrong_method.status, wrong_method.code()),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
}

#[tokio::test]
async fn a_path_parameter_that_is_not_utf8_is_400_invalid_path_in_the_error_shape() {
    let api = Api::start().await;
    for path in ["/v1/apps/shop/kv/c/%FF", "/v1/apps/shop/triggers/%C3%28", "/v1/apps/%FF/triggers"] {
        let reply = api.call(Method::GET, path, Some(&api.root), None).await;
        assert_eq!(
            (reply.status, reply.code()),
            (StatusCode::BAD_REQUEST, "invalid_path"),
            "{path}: {:?}",
            reply.body
        );
        assert!(reply.message().contains("UTF-8"), "{path}: {}", reply.message());
    }
    let put = api.call(Method::PUT, "/v1/apps/shop/kv/c/%FF", Some(&api.developer), Some(json!(1))).await;
    refused(&api, put, StatusCode::BAD_REQUEST, "invalid_path").await;
}

#[tokio::test]
async fn text_holding_a_nul_character_is_400_invalid_text_and_writes_nothing() {
    let api = Api::start().await;
    let cases = [
        (Method::PUT, "/v1/apps/shop/kv/c/k", Some(json!({"a": "\u{0}"}))),
        (Method::PUT, "/v1/apps/shop/kv/c/k", Some(json!({"\u{0}": 1}))),
        (Method::GET, "/v1/apps/shop/kv/c/k%00", None),
        (Method::GET, "/v1/apps/shop/kv/c?prefix=%00", None),
        (Method::GET, "/v1/apps/shop/triggers/t%00", None),
        (Method::GET, "/v1/apps/shop/dead-letters?trigger=%00", None),
        (Method::GET, "/v1/apps/s%00/triggers", None),
        (Method::POST, "/v1/principals", Some(json!({"name": "a\u{0}b"}))),
    ];
    for (method, path, body) in cases {
        let reply = api.call(method.clone(), path, Some(&api.root), body).await;
        assert!(reply.message().contains("NUL"), "{method} {path}: {:?}", reply.body);
        refused(&api, reply, StatusCode::BAD_REQUEST, "invalid_text").await;
    }
}

#[tokio::test]
async fn missing_malformed_expired_and_revoked_tokens_are_401() {
    let api = Api::start().await;
    let expired =
        api.call(Method::POST, "/v1/tokens", Some(&api.developer), Some(json!({"expires_in_s": 1}))).await;
    assert_eq!(expired.status, StatusCode::CREATED, "{:?}", expired.body);
    let expired_token = expired.body["token"].as_str().unwrap().to_owned();
    sqlx::query(
        "UPDATE api_tokens SET expires_at = now() - interval '1 second' WHERE expires_at IS NOT NULL",
    )
    .execute(api.store().pool())
    .await
    .unwrap();
    let revoked = api.call(Method::POST, "/v1/tokens", Some(&api.root), Some(json!({}))).await;
    let revoked_token = revoked.body["token"].as_str().unwrap().to_owned();
    let id = revoked.body["id"].as_str().unwrap();
    api.call(Method::DELETE, &format!("/v1/tokens/{id}"), Some(&api.root), None).await;
    let stale_delivery = api.state.config.node.token_key.sign(&picloud_core::token::DeliveryToken {
        principal: api.admin_principal.id,
        app: api.app.id,
        depth: 1,
        deadline_ms: 1,
        scopes: picloud_core::ScopeSet::ALL,
    });
    let forged =
        picloud_core::token::TokenKey::new(b"someone else's key").sign(&picloud_core::token::DeliveryToken {
            principal: api.admin_principal.id,
            app: api.app.id,
            depth: 0,
            deadline_ms: i64::MAX,
            scopes: picloud_core::ScopeSet::ALL,
        });
    type Case<'a> = (Option<&'a str>, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case<'_>; 7] = [
        (None, &[], "missing_token"),
        (None, &[("Authorization", "Basic dXNlcjpwYXNz")], "invalid_token"),
        (Some("pcr_not-a-real-token"), &[], "invalid_token"),
        (Some(&expired_token), &[], "token_expired"),
        (Some(&revoked_token), &[], "token_revoked"),
        (Some(&stale_delivery), &[], "token_expired"),
        (Some(&forged), &[], "invalid_token"),
    ];
    for (token, headers, code) in cases {
        let reply =
            api.call_with(Method::PUT, "/v1/apps/shop/kv/c/k", token, Some(b"1".to_vec()), headers).await;
        refused(&api, reply, StatusCode::UNAUTHORIZED, code).await;
    }
}

#[tokio::test]
async fn an_app_out_of_reach_is_404_and_too_small_a_role_403_and_neither_writes() {
    let api = Api::start().await;
    refused(
        &api,
        api.call(Method::PUT, "/v1/apps/shop/kv/c/k", Some(&api.viewer), Some(json!(1))).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    refused(
        &api,
        api.call(Method::PUT, "/v1/apps/shop/kv/c/k", Some(&api.other_admin), Some(json!(1))).await,
        StatusCode::NOT_FOUND,
        "app_not_found",
    )
    .await;
    let limited = api.call(Method::POST, "/v1/tokens", Some(&api.root), Some(json!({"app": "other"}))).await;
    let limited = limited.body["token"].as_str().unwrap().to_owned();
    refused(
        &api,
        api.call(Method::POST, "/v1/apps", Some(&limited), Some(json!({"slug": "sneaky"}))).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    refused(
        &api,
        api.call(Method::PUT, "/v1/apps/shop/kv/c/k", Some(&limited), Some(json!(1))).await,
        StatusCode::NOT_FOUND,
        "app_not_found",
    )
    .await;
    let delivery_elsewhere =
        api.call(Method::PUT, "/v1/apps/other/kv/c/k", Some(&api.delivery_token(1)), Some(json!(1))).await;
    refused(&api, delivery_elsewhere, StatusCode::NOT_FOUND, "app_not_found").await;
}
