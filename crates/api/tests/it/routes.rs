//! What each route does, end to end.

use std::time::Duration;

use axum::http::{Method, StatusCode};
use picloud_store::*;
use picloud_worker::{Delivery, Reply as WorkerReply, Shutdown, Worker};
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn kv_entries_are_put_read_listed_and_deleted_with_versions() {
    let api = Api::start().await;
    let put = |key: &'static str, value: serde_json::Value| {
        let api = &api;
        async move {
            api.call(
                Method::PUT,
                &format!("/v1/apps/shop/kv/orders/{key}"),
                Some(&api.developer),
                Some(value),
            )
            .await
        }
    };
    let first = put("o-1", json!({"n": 1})).await;
    assert_eq!((first.status, first.body.clone()), (StatusCode::OK, json!({"version": 1})));
    assert_eq!(put("o-1", json!({"n": 2})).await.body, json!({"version": 2}));
    for key in ["o-2", "o-3", "x-1"] {
        put(key, json!(key)).await;
    }
    let got = api.call(Method::GET, "/v1/apps/shop/kv/orders/o-1", Some(&api.viewer), None).await;
    assert_eq!(got.body, json!({"value": {"n": 2}, "version": 2}));

    let page =
        api.call(Method::GET, "/v1/apps/shop/kv/orders?prefix=o-&limit=2", Some(&api.viewer), None).await;
    let keys: Vec<_> = page.body["items"].as_array().unwrap().iter().map(|i| i["key"].clone()).collect();
    assert_eq!(keys, [json!("o-1"), json!("o-2")]);
    let next = page.body["next"].as_str().expect("a next cursor");
    let rest = api
        .call(
            Method::GET,
            &format!("/v1/apps/shop/kv/orders?prefix=o-&after={next}"),
            Some(&api.viewer),
            None,
        )
        .await;
    assert_eq!(rest.body["items"].as_array().unwrap().len(), 1);
    assert_eq!(rest.body["next"], json!(null));

    let stale = api
        .call_with(
            Method::PUT,
            "/v1/apps/shop/kv/orders/o-1",
            Some(&api.developer),
            Some(b"3".to_vec()),
            &[("If-Match", "1")],
        )
        .await;
    assert_eq!((stale.status, stale.code()), (StatusCode::PRECONDITION_FAILED, "version_mismatch"));
    let fresh = api
        .call_with(
            Method::PUT,
            "/v1/apps/shop/kv/orders/o-1",
            Some(&api.developer),
            Some(b"3".to_vec()),
            &[("If-Match", "2")],
        )
        .await;
    assert_eq!(fresh.body, json!({"version": 3}));

    let deleted = api.call(Method::DELETE, "/v1/apps/shop/kv/orders/o-1", Some(&api.developer), None).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let again = api.call(Method::DELETE, "/v1/apps/shop/kv/orders/o-1", Some(&api.developer), None).await;
    assert_eq!((again.status, again.code()), (StatusCode::NOT_FOUND, "key_not_found"));
    let gone = api.call(Method::GET, "/v1/apps/shop/kv/orders/o-1", Some(&api.viewer), None).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn values_at_the_edges_of_json_numbers_read_back_and_can_be_overwritten() {
    let api = Api::start().await;
    for (i, value) in
        [json!(f64::MAX), json!(f64::MIN), json!(f64::MIN_POSITIVE), json!(5e-324), json!([1e308])]
            .into_iter()
            .enumerate()
    {
        let path = format!("/v1/apps/shop/kv/numbers/{i}");
        let put = api.call(Method::PUT, &path, Some(&api.developer), Some(value.clone())).await;
        assert_eq!(put.status, StatusCode::OK, "{value}: {:?}", put.body);
        let read = api.call(Method::GET, &path, Some(&api.developer), None).await;
        assert_eq!((read.status, &read.body["value"]), (StatusCode::OK, &value), "{:?}", read.body);
        let again = api.call(Method::PUT, &path, Some(&api.developer), Some(json!(1))).await;
        assert_eq!(again.body, json!({"version": 2}), "{value}: the entry can be overwritten");
    }
}

#[tokio::test]
async fn a_kv_put_writes_one_delivery_per_matching_trigger_in_the_same_transaction() {
    let api = Api::start().await;
    api.trigger(json!({"name": "a", "kind": "kv", "collection": "orders*", "ops": ["put"], "handler": {"function": "h"}})).await;
    api.trigger(json!({"name": "b", "kind": "kv", "collection": "*", "handler": {"function": "h"}})).await;
    api.trigger(json!({"name": "c", "kind": "kv", "collection": "users", "handler": {"function": "h"}}))
        .await;
    api.call(Method::PUT, "/v1/apps/shop/kv/orders:eu/o-1", Some(&api.developer), Some(json!(1))).await;
    assert_eq!(api.outbox_len().await, 2);
}

#[tokio::test]
async fn publishing_fans_out_and_jobs_honour_queues_delays_and_idempotency_keys() {
    let api = Api::start().await;
    api.trigger(json!({"name": "all", "kind": "pubsub", "topic": "news*", "handler": {"function": "h"}}))
        .await;
    api.trigger(json!({"name": "eu", "kind": "pubsub", "topic": "news.eu", "handler": {"function": "h"}}))
        .await;
    let published = api
        .call(
            Method::POST,
            "/v1/apps/shop/topics/news.eu/messages",
            Some(&api.developer),
            Some(json!({"h": 1})),
        )
        .await;
    assert_eq!(published.status, StatusCode::ACCEPTED);
    assert_eq!(published.body["deliveries"], 2);
    assert!(published.body["id"].as_str().unwrap().parse::<uuid::Uuid>().is_ok());

    let missing = api
        .call(
            Method::POST,
            "/v1/apps/shop/queues/mail/jobs",
            Some(&api.developer),
            Some(json!({"payload": 1})),
        )
        .await;
    assert_eq!((missing.status, missing.code()), (StatusCode::NOT_FOUND, "no_such_queue"));
    api.trigger(json!({"name": "mailer", "kind": "queue", "queue": "mail", "handler": {"function": "h"}}))
        .await;
    let second = api
        .call(
            Method::POST,
            "/v1/apps/shop/triggers",
            Some(&api.admin),
            Some(json!({"name": "mailer2", "kind": "queue", "queue": "mail", "handler": {"function": "h"}})),
        )
        .await;
    assert_eq!((second.status, second.code()), (StatusCode::CONFLICT, "queue_taken"));
    let job = json!({"payload": {"to": "x"}, "delay_ms": 60_000, "idempotency_key": "welcome-7"});
    let first = api
        .call(Method::POST, "/v1/apps/shop/queues/mail/jobs", Some(&api.developer), Some(job.clone()))
        .await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    let repeat =
        api.call(Method::POST, "/v1/apps/shop/queues/mail/jobs", Some(&api.developer), Some(job)).await;
    assert_eq!((repeat.status, repeat.body["id"].clone()), (StatusCode::OK, first.body["id"].clone()));
    let due_in = api.store().next_due_in().await.unwrap().expect("a delayed job");
    assert!(due_in > Duration::from_secs(50), "{due_in:?}");

    let email = json!({"to": ["a@example.com", "b@example.com"], "subject": "Hi", "text": "Hello", "html": "<p>Hello</p>"});
    let queued = api.call(Method::POST, "/v1/apps/shop/emails", Some(&api.developer), Some(email)).await;
    assert_eq!(queued.status, StatusCode::ACCEPTED);
    assert_eq!(api.outbox_len().await, 4);
}

#[tokio::test]
async fn triggers_are_registered_read_listed_patched_and_deleted_without_showing_secrets() {
    let api = Api::start().await;
    let created = api
        .trigger(json!({
            "name": "hook", "kind": "kv", "collection": "orders:*", "ops": ["put", "delete"],
            "handler": {"webhook": {"url": "https://example.com/hook", "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}},
            "retry": {"max_attempts": 5, "backoff_base_ms": 500, "backoff_max_ms": 60000}
        }))
        .await;
    assert_eq!(
        created["handler"],
        json!({"webhook": {"url": "https://example.com/hook"}}),
        "the secret is not echoed"
    );
    assert_eq!(created["retry"], json!({"max_attempts": 5, "backoff_base_ms": 500, "backoff_max_ms": 60000}));
    assert_eq!(
        (created["enabled"].clone(), created["registered_by"].clone()),
        (json!(true), json!(api.admin_principal.id))
    );
    let dup = api
        .call(
            Method::POST,
            "/v1/apps/shop/triggers",
            Some(&api.admin),
            Some(json!({"name": "hook", "kind": "http", "handler": {"function": "h"}})),
        )
        .await;
    assert_eq!((dup.status, dup.code()), (StatusCode::CONFLICT, "trigger_exists"));
    api.trigger(json!({"name": "call", "kind": "http", "handler": {"function": "h"}})).await;

    let listed = api.call(Method::GET, "/v1/apps/shop/triggers?limit=1", Some(&api.viewer), None).await;
    assert_eq!(listed.body["items"][0]["name"], "call");
    let next = listed.body["next"].as_str().unwrap().to_owned();
    let rest =
        api.call(Method::GET, &format!("/v1/apps/shop/triggers?after={next}"), Some(&api.viewer), None).await;
    assert_eq!(rest.body["items"][0]["name"], "hook");

    let patched = api
        .call(
            Method::PATCH,
            "/v1/apps/shop/triggers/hook",
            Some(&api.admin),
            Some(json!({"enabled": false, "handler": {"function": "process"}})),
        )
        .await;
    assert_eq!(
        (patched.body["enabled"].clone(), patched.body["handler"].clone()),
        (json!(false), json!({"function": "process"}))
    );
    assert_eq!(patched.body["collection"], "orders:*", "fields not named stay");
    let deleted = api.call(Method::DELETE, "/v1/apps/shop/triggers/hook", Some(&api.admin), None).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let gone = api.call(Method::GET, "/v1/apps/shop/triggers/hook", Some(&api.viewer), None).await;
    assert_eq!((gone.status, gone.code()), (StatusCode::NOT_FOUND, "trigger_not_found"));
}

#[tokio::test]
async fn apps_principals_members_and_tokens_are_managed_within_their_rights() {
    let api = Api::start().await;
    let app = api.call(Method::POST, "/v1/apps", Some(&api.root), Some(json!({"slug": "blog"}))).await;
    assert_eq!((app.status, app.body["slug"].clone()), (StatusCode::CREATED, json!("blog")));
    let again = api.call(Method::POST, "/v1/apps", Some(&api.root), Some(json!({"slug": "blog"}))).await;
    assert_eq!((again.status, again.code()), (StatusCode::CONFLICT, "app_exists"));
    let all = api.call(Method::GET, "/v1/apps", Some(&api.root), None).await;
    assert_eq!(all.body["items"].as_array().unwrap().len(), 3);
    let mine = api.call(Method::GET, "/v1/apps", Some(&api.viewer), None).await;
    assert_eq!(
        mine.body["items"].as_array().unwrap().iter().map(|a| a["slug"].clone()).collect::<Vec<_>>(),
        [json!("shop")]
    );

    let dana = api.call(Method::POST, "/v1/principals", Some(&api.root), Some(json!({"name": "dana"}))).await;
    assert_eq!(dana.status, StatusCode::CREATED);
    let dana_id = dana.body["id"].as_str().unwrap().to_owned();
    let member = api
        .call(
            Method::PUT,
            &format!("/v1/apps/shop/members/{dana_id}"),
            Some(&api.admin),
            Some(json!({"role": "developer"})),
        )
        .await;
    assert_eq!(member.body, json!({"app": "shop", "principal_id": dana_id, "role": "developer"}));

    let minted = api
        .call(
            Method::POST,
            "/v1/tokens",
            Some(&api.root),
            Some(
                json!({"principal_id": dana_id, "app": "shop", "scopes": ["app_read"], "expires_in_s": 3600}),
            ),
        )
        .await;
    assert_eq!(minted.status, StatusCode::CREATED);
    let dana_token = minted.body["token"].as_str().unwrap().to_owned();
    assert!(dana_token.starts_with("pcr_"));
    let read = api.call(Method::GET, "/v1/apps/shop/kv/c/k", Some(&dana_token), None).await;
    assert_eq!(read.status, StatusCode::NOT_FOUND, "reading is within the token's scope");
    let write = api.call(Method::PUT, "/v1/apps/shop/kv/c/k", Some(&dana_token), Some(json!(1))).await;
    assert_eq!(write.status, StatusCode::FORBIDDEN, "writing is not, though dana is a developer");
    let wider = api.call(Method::POST, "/v1/tokens", Some(&dana_token), Some(json!({"app": "shop"}))).await;
    assert_eq!(wider.status, StatusCode::FORBIDDEN, "a narrowed token cannot mint a wider one");
    let narrow = json!({"app": "shop", "scopes": ["app_read"]});
    for (expires_in_s, expected) in
        [(None, StatusCode::FORBIDDEN), (Some(7200), StatusCode::FORBIDDEN), (Some(60), StatusCode::CREATED)]
    {
        let mut body = narrow.clone();
        if let Some(s) = expires_in_s {
            body["expires_in_s"] = json!(s);
        }
        let minted = api.call(Method::POST, "/v1/tokens", Some(&dana_token), Some(body)).await;
        assert_eq!(
            minted.status, expected,
            "a token expiring in an hour minting one expiring in {expires_in_s:?} s"
        );
    }
    let other_app = api.call(Method::GET, "/v1/apps/other/triggers", Some(&dana_token), None).await;
    assert_eq!((other_app.status, other_app.code()), (StatusCode::NOT_FOUND, "app_not_found"));

    let token_id = minted.body["id"].as_str().unwrap();
    let not_owner =
        api.call(Method::DELETE, &format!("/v1/tokens/{token_id}"), Some(&api.viewer), None).await;
    assert_eq!(not_owner.status, StatusCode::FORBIDDEN);
    let revoked = api.call(Method::DELETE, &format!("/v1/tokens/{token_id}"), Some(&dana_token), None).await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    let after = api.call(Method::GET, "/v1/apps/shop/kv/c/k", Some(&dana_token), None).await;
    assert_eq!((after.status, after.code()), (StatusCode::UNAUTHORIZED, "token_revoked"));

    let removed =
        api.call(Method::DELETE, &format!("/v1/apps/shop/members/{dana_id}"), Some(&api.admin), None).await;
    assert_eq!(removed.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn dead_letters_are_listed_counted_read_replayed_and_ignored_over_http() {
    let api = Api::start().await;
    api.trigger(
        json!({"name": "strict", "kind": "pubsub", "topic": "orders", "handler": {"function": "strict"}}),
    )
    .await;
    let client = async_nats::connect(api.nats.url()).await.unwrap();
    let worker = Worker::new(client, "shop")
        .handle("strict", |_| async { Ok(WorkerReply::fail("bad order")) })
        .start()
        .await
        .unwrap();
    let relay = api.relay().await;
    for i in 0..2 {
        api.call(
            Method::POST,
            "/v1/apps/shop/topics/orders/messages",
            Some(&api.developer),
            Some(json!({"i": i})),
        )
        .await;
    }
    eventually("two dead letters", || async {
        let count = api
            .call(
                Method::GET,
                "/v1/apps/shop/dead-letters/count?resolution=unresolved",
                Some(&api.viewer),
                None,
            )
            .await;
        (count.body["count"] == 2).then_some(())
    })
    .await;
    let listed = api
        .call(
            Method::GET,
            "/v1/apps/shop/dead-letters?resolution=unresolved&trigger=strict",
            Some(&api.viewer),
            None,
        )
        .await;
    let items = listed.body["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 2);
    let (newest, oldest) =
        (items[0]["id"].as_str().unwrap().to_owned(), items[1]["id"].as_str().unwrap().to_owned());
    assert_eq!(
        (items[0]["reason"].clone(), items[0]["last_error"].clone()),
        (json!("rejected"), json!("bad order"))
    );
    // Which message died first is up to the relay: each dead letter holds one of them.
    let mut data = Vec::new();
    for id in [&newest, &oldest] {
        let one =
            api.call(Method::GET, &format!("/v1/apps/shop/dead-letters/{id}"), Some(&api.viewer), None).await;
        assert_eq!(one.body["event"]["type"], "picloud.pubsub.message");
        data.push(one.body["event"]["data"]["i"].as_i64().unwrap());
    }
    let newest_data = json!({"i": data[0]});
    data.sort_unstable();
    assert_eq!(data, [0, 1]);

    let ignored = api
        .call(Method::POST, &format!("/v1/apps/shop/dead-letters/{oldest}/ignore"), Some(&api.admin), None)
        .await;
    assert_eq!(ignored.body["resolution"], "ignored");
    let twice = api
        .call(Method::POST, &format!("/v1/apps/shop/dead-letters/{oldest}/ignore"), Some(&api.admin), None)
        .await;
    assert_eq!((twice.status, twice.code()), (StatusCode::CONFLICT, "already_resolved"));

    worker.shutdown().await;
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<Delivery>();
    let client = async_nats::connect(api.nats.url()).await.unwrap();
    let worker = Worker::new(client, "shop")
        .handle("strict", move |d: Delivery| {
            let _ = seen_tx.send(d);
            async { Ok(WorkerReply::ok(json!({}))) }
        })
        .start()
        .await
        .unwrap();
    let replay_url = format!("/v1/apps/shop/dead-letters/{newest}/replay");
    let (first, second) = tokio::join!(
        api.call(Method::POST, &replay_url, Some(&api.admin), None),
        api.call(Method::POST, &replay_url, Some(&api.admin), None)
    );
    let mut statuses = [first.status.as_u16(), second.status.as_u16()];
    statuses.sort();
    assert_eq!(statuses, [200, 409], "of two replays at once, one replays and the other is refused");
    let replayed = if first.status == StatusCode::OK { first } else { second };
    assert_eq!(replayed.body["dead_letter"]["resolution"], "replayed");
    let delivered = tokio::time::timeout(Duration::from_secs(10), seen.recv()).await.unwrap().unwrap();
    assert_eq!(delivered.id.to_string(), replayed.body["delivery_id"].as_str().unwrap());
    assert_eq!((delivered.attempt, delivered.data::<serde_json::Value>().unwrap()), (1, newest_data));
    let twice = api
        .call(Method::POST, &format!("/v1/apps/shop/dead-letters/{newest}/replay"), Some(&api.admin), None)
        .await;
    assert_eq!((twice.status, twice.code()), (StatusCode::CONFLICT, "already_replayed"));
    let count = api.call(Method::GET, "/v1/apps/shop/dead-letters/count", Some(&api.viewer), None).await;
    assert_eq!(count.body["count"], 0);
    relay.stop().await;
    worker.shutdown().await;
}

#[tokio::test]
async fn a_handler_writing_with_its_delivery_token_writes_one_level_deeper_until_the_limit() {
    let api = Api::start().await;
    api.trigger(json!({"name": "echo", "kind": "kv", "collection": "loop", "handler": {"function": "echo"}}))
        .await;
    let router = api.router.clone();
    let (depths_tx, mut depths) = tokio::sync::mpsc::unbounded_channel::<u32>();
    let client = async_nats::connect(api.nats.url()).await.unwrap();
    let worker = Worker::new(client, "shop")
        .handle("echo", move |d: Delivery| {
            let (router, depths_tx) = (router.clone(), depths_tx.clone());
            async move {
                let _ = depths_tx.send(d.depth);
                let request = axum::http::Request::put(format!("/v1/apps/shop/kv/loop/k{}", d.depth + 1))
                    .header("Authorization", format!("Bearer {}", d.token.unwrap()))
                    .body(axum::body::Body::from("1"))
                    .unwrap();
                let status = tower::ServiceExt::oneshot(router, request).await.unwrap().status();
                Ok(if status.is_success() {
                    WorkerReply::ok(json!({}))
                } else {
                    WorkerReply::fail(status.to_string())
                })
            }
        })
        .start()
        .await
        .unwrap();
    let relay = api.relay().await;
    api.call(Method::PUT, "/v1/apps/shop/kv/loop/k0", Some(&api.developer), Some(json!(0))).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(tokio::time::timeout(Duration::from_secs(10), depths.recv()).await.unwrap().unwrap());
    }
    assert_eq!(seen, [0, 1, 2, 3], "each write with the token is one level deeper");
    let dead = eventually("the max_depth dead letter", || async {
        let list = api.call(Method::GET, "/v1/apps/shop/dead-letters", Some(&api.viewer), None).await;
        list.body["items"].as_array().unwrap().first().cloned()
    })
    .await;
    assert_eq!((dead["reason"].clone(), dead["event"]["depth"].clone()), (json!("max_depth"), json!(4)));
    relay.stop().await;
    worker.shutdown().await;
}

#[tokio::test]
async fn nats_ingest_writes_like_the_api_and_answers_after_the_commit() {
    let api = Api::start().await;
    let (stop, shutdown) = Shutdown::new();
    let ingest = picloud_api::Ingest::start(api.state.clone(), shutdown).await.unwrap();
    api.trigger(json!({"name": "mailer", "kind": "queue", "queue": "mail", "handler": {"function": "h"}}))
        .await;
    let client = async_nats::ConnectOptions::new()
        .custom_inbox_prefix("_INBOX_shop")
        .connect(api.nats.url())
        .await
        .unwrap();
    let request = |subject: &str, token: Option<&str>, body: serde_json::Value| {
        let (client, subject) = (client.clone(), subject.to_owned());
        let token = token.map(str::to_owned);
        async move {
            let mut headers = async_nats::HeaderMap::new();
            if let Some(token) = token {
                headers.insert("Authorization", format!("Bearer {token}"));
            }
            let reply = client.request_with_headers(subject, headers, body.to_string().into()).await.unwrap();
            let status =
                reply.headers.as_ref().and_then(|h| h.get("Picloud-Status")).map(|v| v.as_str().to_owned());
            (status.unwrap_or_default(), serde_json::from_slice::<serde_json::Value>(&reply.payload).unwrap())
        }
    };
    let put = request(
        "picloud.v1.ingest.shop.kv.put",
        Some(&api.developer),
        json!({"collection": "c", "key": "k", "value": {"v": 1}}),
    )
    .await;
    assert_eq!(put, ("ok".into(), json!({"version": 1})));
    let entry = api.store().kv_get(api.app.id, "c", "k").await.unwrap().expect("committed before the reply");
    assert_eq!(entry.value, json!({"v": 1}));
    let job =
        request("picloud.v1.ingest.shop.queue.mail", Some(&api.developer), json!({"payload": {"n": 1}}))
            .await;
    assert_eq!(job.0, "ok");
    assert!(job.1["id"].is_string());
    let published =
        request("picloud.v1.ingest.shop.pubsub.news.eu", Some(&api.developer), json!({"n": 1})).await;
    assert_eq!(published.0, "ok");
    let deleted = request(
        "picloud.v1.ingest.shop.kv.delete",
        Some(&api.developer),
        json!({"collection": "c", "key": "k"}),
    )
    .await;
    assert_eq!(deleted, ("ok".into(), json!({"version": 1})));

    let anonymous =
        request("picloud.v1.ingest.shop.kv.put", None, json!({"collection": "c", "key": "k", "value": 1}))
            .await;
    assert_eq!(
        (anonymous.0.as_str(), anonymous.1["error"]["code"].as_str()),
        ("error", Some("missing_token"))
    );
    let viewer = request(
        "picloud.v1.ingest.shop.kv.put",
        Some(&api.viewer),
        json!({"collection": "c", "key": "k", "value": 1}),
    )
    .await;
    assert_eq!(viewer.1["error"]["code"], "forbidden");
    let malformed =
        request("picloud.v1.ingest.shop.kv.put", Some(&api.developer), json!({"collection": "c"})).await;
    assert_eq!(malformed.1["error"]["code"], "invalid_json");
    assert!(
        api.store().kv_get(api.app.id, "c", "k").await.unwrap().is_none(),
        "refused requests wrote nothing"
    );

    // A request whose reply subject lies outside `_INBOX_shop.` could aim the router's answer
    // at another tenant's delivery inbox: it is neither answered nor carried out.
    let foreign_inbox = async_nats::connect(api.nats.url()).await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Authorization", format!("Bearer {}", api.developer));
    let spoofed = foreign_inbox
        .send_request(
            "picloud.v1.ingest.shop.kv.put",
            async_nats::Request::new()
                .headers(headers)
                .payload(json!({"collection": "c", "key": "spoof", "value": 1}).to_string().into())
                .timeout(Some(Duration::from_millis(500))),
        )
        .await;
    assert!(spoofed.is_err(), "no answer outside the app's inbox prefix");
    let after = request(
        "picloud.v1.ingest.shop.kv.put",
        Some(&api.developer),
        json!({"collection": "c", "key": "after", "value": 1}),
    )
    .await;
    assert_eq!(after.0, "ok", "the ingest still serves well-formed requests");
    assert!(
        api.store().kv_get(api.app.id, "c", "spoof").await.unwrap().is_none(),
        "and the spoofed one wrote nothing"
    );
    stop.send();
    ingest.finished().await;
}

#[tokio::test]
async fn health_answers_without_a_token_and_readiness_names_what_is_down() {
    let mut api = Api::start().await;
    let healthz = api.call(Method::GET, "/healthz", None, None).await;
    assert_eq!((healthz.status, healthz.body.clone()), (StatusCode::OK, json!({"status": "ok"})));
    let ready = api.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(
        (ready.status, ready.body),
        (StatusCode::OK, json!({"status": "ok", "checks": {"postgres": "ok", "nats": "ok"}}))
    );
    api.nats.stop().await.unwrap();
    let down = eventually("NATS to be reported down", || async {
        let r = api.call(Method::GET, "/readyz", None, None).await;
        (r.status == StatusCode::SERVICE_UNAVAILABLE).then_some(r)
    })
    .await;
    assert_eq!(
        down.body,
        json!({"status": "unavailable", "checks": {"postgres": "ok", "nats": "not connected"}, "down": ["nats"]})
    );
}

/// Serves `api` with its configuration changed by `change`.
fn reconfigure(api: &mut Api, change: impl FnOnce(&mut picloud_api::ApiConfig)) {
    let mut config = (*api.state.config).clone();
    change(&mut config);
    api.state.config = std::sync::Arc::new(config);
    api.router = picloud_api::router(api.state.clone());
}

fn smtp_at(url: String) -> Option<picloud_dispatch::SmtpConfig> {
    Some(picloud_dispatch::SmtpConfig { url, from: "shop@example.com".into() })
}

#[tokio::test]
async fn readiness_reports_smtp_while_email_rows_wait_but_only_postgres_and_nats_make_a_node_unready() {
    let mut api = Api::start().await;
    let unneeded = api.call(Method::GET, "/readyz", None, None).await;
    assert_eq!((unneeded.status, unneeded.body["checks"].get("smtp")), (StatusCode::OK, None));

    let email = json!({"to": "ann@example.com", "subject": "Hi", "text": "Hello"});
    let queued = api.call(Method::POST, "/v1/apps/shop/emails", Some(&api.developer), Some(email)).await;
    assert_eq!(queued.status, StatusCode::ACCEPTED);
    let missing = api.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(
        (missing.status, missing.body),
        (
            StatusCode::OK,
            json!({"status": "ok", "checks": {
                "postgres": "ok", "nats": "ok",
                "smtp": "not configured (PICLOUD_SMTP_URL) while email rows wait"
            }})
        ),
        "a node without SMTP still serves everything else: it is reported, not taken out"
    );

    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    reconfigure(&mut api, |c| c.smtp = smtp_at(format!("smtp://127.0.0.1:{closed_port}")));
    let refused = api.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(
        (refused.status, refused.body["checks"]["smtp"].clone(), refused.body.get("down")),
        (StatusCode::OK, json!("unreachable"), None)
    );

    let smtp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    reconfigure(&mut api, |c| c.smtp = smtp_at(format!("smtp://{}", smtp.local_addr().unwrap())));
    let ready = api.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(
        (ready.status, ready.body),
        (StatusCode::OK, json!({"status": "ok", "checks": {"postgres": "ok", "nats": "ok", "smtp": "ok"}}))
    );

    api.nats.stop().await.unwrap();
    let down = eventually("NATS to be reported down", || async {
        let r = api.call(Method::GET, "/readyz", None, None).await;
        (r.status == StatusCode::SERVICE_UNAVAILABLE).then_some(r)
    })
    .await;
    assert_eq!(down.body["down"], json!(["nats"]), "SMTP is never among what is down: {}", down.body);
}

/// The value of the unlabelled series `name` in a Prometheus text render.
fn series(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn metrics_are_served_without_a_token_in_the_prometheus_text_format() {
    let mut api = Api::start().await;
    let disabled = api.call(Method::GET, "/metrics", None, None).await;
    assert_eq!((disabled.status, disabled.code()), (StatusCode::NOT_FOUND, "metrics_disabled"));

    let email = json!({"to": "ann@example.com", "subject": "Hi", "text": "Hello"});
    api.call(Method::POST, "/v1/apps/shop/emails", Some(&api.developer), Some(email)).await;
    let metrics = picloud_dispatch::Metrics::install().unwrap();
    reconfigure(&mut api, |c| c.metrics = Some(metrics.clone()));
    let unread = api.call(Method::GET, "/metrics", None, None).await;
    let text = unread.body.as_str().expect("a text body");
    assert_eq!(
        series(text, "picloud_outbox_due_rows").map(f64::is_nan),
        Some(true),
        "unknown until read:\n{text}"
    );
    metrics.refresh_gauges(api.store()).await;
    let scraped = api.call(Method::GET, "/metrics", None, None).await;

    assert_eq!(scraped.status, StatusCode::OK);
    let text = scraped.body.as_str().expect("a text body");
    for line in [
        "# TYPE picloud_outbox_due_rows gauge",
        "picloud_outbox_due_rows 1",
        "picloud_dead_letters_unresolved 0",
        "picloud_abandoned_executions 0",
        "# TYPE picloud_outbox_oldest_due_age_seconds gauge",
        "# TYPE picloud_gauge_reads_total counter",
        "picloud_gauge_reads_total 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} is missing from\n{text}");
    }
}

#[tokio::test]
async fn a_scrape_loop_costs_no_database_query_the_gauges_are_read_once_per_interval() {
    let mut api = Api::start().await;
    let metrics = picloud_dispatch::Metrics::install().unwrap();
    reconfigure(&mut api, |c| c.metrics = Some(metrics.clone()));
    let (stop, shutdown) = Shutdown::new();
    let interval = Duration::from_secs(3600);
    let started = tokio::time::Instant::now();
    let refresher =
        tokio::spawn(metrics.clone().refresh_gauges_every(api.store().clone(), interval, shutdown));
    let scrape = || async {
        let reply = api.call(Method::GET, "/metrics", None, None).await;
        assert_eq!(reply.status, StatusCode::OK);
        reply.body.as_str().expect("a text body").to_owned()
    };
    let first = eventually("the first read of the gauges", || async {
        let text = scrape().await;
        (series(&text, "picloud_gauge_reads_total") == Some(1.0)).then_some(text)
    })
    .await;
    assert_eq!(series(&first, "picloud_outbox_due_rows"), Some(0.0));

    // A row written after that read, then a scrape loop.
    let email = json!({"to": "ann@example.com", "subject": "Hi", "text": "Hello"});
    let queued = api.call(Method::POST, "/v1/apps/shop/emails", Some(&api.developer), Some(email)).await;
    assert_eq!(queued.status, StatusCode::ACCEPTED);
    let mut last = String::new();
    for _ in 0..1000 {
        last = scrape().await;
    }
    let intervals = (started.elapsed().as_secs_f64() / interval.as_secs_f64()).floor();
    assert_eq!(
        series(&last, "picloud_gauge_reads_total"),
        Some(intervals + 1.0),
        "one read per interval begun, however many scrapes"
    );
    assert_eq!(series(&last, "picloud_outbox_due_rows"), Some(0.0), "the scrapes did not read the database");

    // The next read sees the row.
    metrics.refresh_gauges(api.store()).await;
    let next = scrape().await;
    assert_eq!(series(&next, "picloud_outbox_due_rows"), Some(1.0));
    assert_eq!(series(&next, "picloud_gauge_reads_total"), Some(intervals + 2.0));
    stop.send();
    refresher.await.unwrap();
}

#[tokio::test]
async fn twenty_replays_of_one_dead_letter_at_once_replay_it_once_and_never_starve_the_pool() {
    let api = Api::start().await;
    api.trigger(
        json!({"name": "strict", "kind": "pubsub", "topic": "orders", "handler": {"function": "strict"}}),
    )
    .await;
    let published = api
        .call(Method::POST, "/v1/apps/shop/topics/orders/messages", Some(&api.developer), Some(json!({})))
        .await;
    assert_eq!(published.status, StatusCode::ACCEPTED);
    let claimed = api.store().claim_due(1, Duration::from_secs(60), "n").await.unwrap().rows.remove(0);
    let mut tx = api.store().begin().await.unwrap();
    let bury = Bury { id: claimed.id, attempt: 1, reason: DeadLetterReason::Rejected, error: None };
    let dead = api.store().bury(&mut tx, &[bury]).await.unwrap().remove(0);
    api.store().commit(tx).await.unwrap();

    // More concurrent replays than the API's pool has connections (10): each waits on the dead
    // letter's row lock holding one, so the one holding the lock must need no second.
    let url = format!("/v1/apps/shop/dead-letters/{}/replay", dead.id);
    let replies =
        futures::future::join_all((0..20).map(|_| api.call(Method::POST, &url, Some(&api.admin), None)))
            .await;
    let mut statuses: Vec<u16> = replies.iter().map(|r| r.status.as_u16()).collect();
    statuses.sort_unstable();
    assert_eq!(
        statuses,
        [[200].as_slice(), &[409; 19]].concat(),
        "{:?}",
        replies.iter().map(|r| r.code()).collect::<Vec<_>>()
    );
    assert!(
        replies.iter().filter(|r| r.status == StatusCode::CONFLICT).all(|r| r.code() == "already_replayed")
    );
}

#[tokio::test]
async fn revoking_a_revoked_token_answers_404_and_moves_no_epoch() {
    let api = Api::start().await;
    let minted = api.call(Method::POST, "/v1/tokens", Some(&api.developer), Some(json!({}))).await;
    let url = format!("/v1/tokens/{}", minted.body["id"].as_str().unwrap());
    let epoch = || async {
        sqlx::query_scalar::<_, i64>("SELECT epoch FROM config_epoch")
            .fetch_one(api.store().pool())
            .await
            .unwrap()
    };
    let before = epoch().await;
    assert_eq!(
        api.call(Method::DELETE, &url, Some(&api.developer), None).await.status,
        StatusCode::NO_CONTENT
    );
    let revoked = epoch().await;
    assert!(revoked > before, "revoking moves the epoch");

    let again = api.call(Method::DELETE, &url, Some(&api.developer), None).await;
    assert_eq!((again.status, again.code()), (StatusCode::NOT_FOUND, "token_not_found"));
    assert_eq!(epoch().await, revoked, "a revoke that changes nothing moves nothing");
}
