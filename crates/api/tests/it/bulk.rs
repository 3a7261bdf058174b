//! Bulk replay and ignore of dead letters over HTTP (DESIGN §15): filters, dry runs, batches,
//! and each dead letter acted on once however many actions race for it.

use std::time::Duration;

use axum::http::{Method, StatusCode};
use picloud_api::ops::dead_letters::BULK_BATCH;
use picloud_core::TriggerId;
use picloud_core::protocol::{EventKind, event_type};
use picloud_store::*;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::macros::datetime;
use uuid::Uuid;

use crate::support::*;

/// Where the manual clock of the tests that filter by time starts.
const START: OffsetDateTime = datetime!(2026-01-01 00:00:00 UTC);

/// Registers the pubsub trigger `name` on the topic `orders`; answers its view.
async fn pubsub_trigger(api: &Api, name: &str) -> Value {
    api.trigger(json!({"name": name, "kind": "pubsub", "topic": "orders", "handler": {"function": name}}))
        .await
}

/// An unresolved dead letter of `trigger` (a trigger's view), or of an email when `None`, whose
/// event data is `{"n": n}`.
fn dead_letter(api: &Api, trigger: Option<&Value>, reason: DeadLetterReason, n: usize) -> NewDeadLetter {
    let (kind, event_type, trigger_id, trigger_name) = match trigger {
        Some(t) => (
            EventKind::Pubsub,
            event_type::PUBSUB_MESSAGE,
            Some(TriggerId::from_uuid(t["id"].as_str().unwrap().parse().unwrap())),
            Some(t["name"].as_str().unwrap().to_owned()),
        ),
        None => (EventKind::Email, event_type::EMAIL_SEND, None, None),
    };
    NewDeadLetter {
        id: Uuid::now_v7(),
        app_id: api.app.id,
        trigger_id,
        trigger_name,
        kind,
        delivery_id: Uuid::now_v7(),
        payload: RawValue::from_string(json!({"n": n}).to_string()).unwrap(),
        headers: EventHeaders {
            event_type: event_type.to_owned(),
            source: "/apps/shop/topics/orders".to_owned(),
            subject: None,
            time: START,
            depth: 0,
            ordering_key: None,
        },
        attempts: 2,
        reason,
        last_error: Some("refused".to_owned()),
    }
}

/// Writes dead letters in a transaction of their own; answers their ids.
async fn write(api: &Api, rows: &[NewDeadLetter]) -> Vec<Uuid> {
    let mut tx = api.store().begin().await.unwrap();
    api.store().insert_dead_letters(&mut tx, rows).await.unwrap();
    api.store().commit(tx).await.unwrap();
    rows.iter().map(|r| r.id).collect()
}

/// `POST /v1/apps/shop/dead-letters/{action}` with `body`, as `token`.
async fn bulk(api: &Api, action: &str, token: &str, body: Value) -> Reply {
    api.call(Method::POST, &format!("/v1/apps/shop/dead-letters/{action}"), Some(token), Some(body)).await
}

/// The `count` of a 200 answer.
fn count(reply: &Reply) -> u64 {
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    reply.body["count"].as_u64().expect("a count")
}

/// The resolution of each dead letter, in the order of `ids`.
async fn resolutions(api: &Api, ids: &[Uuid]) -> Vec<Option<Resolution>> {
    let mut found = Vec::new();
    for &id in ids {
        found.push(api.store().dead_letter(api.app.id, id).await.unwrap().unwrap().resolution);
    }
    found
}

/// The `n` of the event of each delivery in the outbox, sorted.
async fn delivered(api: &Api) -> Vec<u64> {
    let payloads: Vec<String> =
        sqlx::query_scalar("SELECT payload::text FROM outbox").fetch_all(api.store().pool()).await.unwrap();
    let mut ns: Vec<u64> =
        payloads.iter().map(|p| serde_json::from_str::<Value>(p).unwrap()["n"].as_u64().unwrap()).collect();
    ns.sort_unstable();
    ns
}

#[tokio::test]
async fn a_dry_run_counts_what_each_action_would_take_and_changes_nothing() {
    let api = Api::start().await;
    let strict = pubsub_trigger(&api, "strict").await;
    let gone = pubsub_trigger(&api, "gone").await;
    let rows = [
        dead_letter(&api, Some(&strict), DeadLetterReason::Rejected, 0),
        dead_letter(&api, Some(&strict), DeadLetterReason::Exhausted, 1),
        dead_letter(&api, None, DeadLetterReason::Exhausted, 2),
        dead_letter(&api, Some(&gone), DeadLetterReason::Exhausted, 3),
    ];
    let ids = write(&api, &rows).await;
    let deleted = api.call(Method::DELETE, "/v1/apps/shop/triggers/gone", Some(&api.admin), None).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{:?}", deleted.body);

    let dry = json!({"dry_run": true});
    assert_eq!(count(&bulk(&api, "replay", &api.admin, dry.clone()).await), 3, "all but the gone trigger's");
    assert_eq!(count(&bulk(&api, "ignore", &api.admin, dry).await), 4);
    let rejected = json!({"dry_run": true, "reason": "rejected"});
    assert_eq!(count(&bulk(&api, "replay", &api.admin, rejected).await), 1);
    assert_eq!(api.outbox_len().await, 0, "a dry run delivers nothing");
    assert_eq!(resolutions(&api, &ids).await, [None; 4], "a dry run resolves nothing");
}

#[tokio::test]
async fn a_bulk_replay_replays_exactly_what_its_filter_takes_with_one_delivery_each() {
    let api = Api::start_on(Clock::manual(START), |_| {}).await;
    let strict = pubsub_trigger(&api, "strict").await;
    let other = pubsub_trigger(&api, "other").await;
    let minute = Duration::from_secs(60);
    let mut ids = write(&api, &[dead_letter(&api, Some(&strict), DeadLetterReason::Rejected, 0)]).await;
    api.store().clock().advance(minute);
    ids.extend(
        write(
            &api,
            &[
                dead_letter(&api, Some(&strict), DeadLetterReason::Exhausted, 1),
                dead_letter(&api, Some(&other), DeadLetterReason::Rejected, 2),
            ],
        )
        .await,
    );
    api.store().clock().advance(minute);
    ids.extend(write(&api, &[dead_letter(&api, Some(&strict), DeadLetterReason::Rejected, 3)]).await);

    let by_trigger = bulk(&api, "replay", &api.admin, json!({"trigger": "other"})).await;
    assert_eq!(count(&by_trigger), 1);
    assert_eq!(delivered(&api).await, [2]);
    let by_reason = bulk(&api, "replay", &api.admin, json!({"reason": "exhausted"})).await;
    assert_eq!(count(&by_reason), 1);
    assert_eq!(delivered(&api).await, [1, 2]);
    let window = json!({"created_after": "2025-12-31T23:59:00Z", "created_before": "2026-01-01T00:01:30Z"});
    let by_time = bulk(&api, "replay", &api.admin, window).await;
    assert_eq!(count(&by_time), 1, "of the first two minutes, the only one left unresolved");
    assert_eq!(delivered(&api).await, [0, 1, 2]);

    let replayed = Some(Resolution::Replayed);
    assert_eq!(resolutions(&api, &ids).await, [replayed, replayed, replayed, None]);
    let again = bulk(&api, "replay", &api.admin, json!({"trigger": "other"})).await;
    assert_eq!(count(&again), 0, "a replayed dead letter is not taken again");
    assert_eq!(delivered(&api).await, [0, 1, 2]);
}

#[tokio::test]
async fn bulk_and_single_replays_racing_for_the_same_dead_letters_replay_each_once() {
    let api = Api::start().await;
    let strict = pubsub_trigger(&api, "strict").await;
    let total = BULK_BATCH as usize * 2 + 200;
    let rows: Vec<NewDeadLetter> =
        (0..total).map(|n| dead_letter(&api, Some(&strict), DeadLetterReason::Rejected, n)).collect();
    let ids = write(&api, &rows).await;

    let api = &api;
    let replay_all = || bulk(api, "replay", &api.admin, json!({}));
    let singles = [0, 1, BULK_BATCH as usize - 1, BULK_BATCH as usize, total / 2, total - 1].map(|i| {
        let url = format!("/v1/apps/shop/dead-letters/{}/replay", ids[i]);
        async move { api.call(Method::POST, &url, Some(&api.admin), None).await }
    });
    let (first, second, singles) =
        tokio::join!(replay_all(), replay_all(), futures::future::join_all(singles));

    let mut replayed_singly = 0;
    for single in &singles {
        match single.status {
            StatusCode::OK => replayed_singly += 1,
            _ => assert_eq!((single.status, single.code()), (StatusCode::CONFLICT, "already_replayed")),
        }
    }
    assert_eq!(
        count(&first) + count(&second) + replayed_singly,
        total as u64,
        "every dead letter is counted by exactly one replay"
    );
    assert_eq!(delivered(api).await, (0..total as u64).collect::<Vec<_>>(), "one delivery each");
    let left = resolutions(api, &ids).await.into_iter().filter(|r| *r != Some(Resolution::Replayed)).count();
    assert_eq!(left, 0, "every dead letter is replayed");
}

#[tokio::test]
async fn a_bulk_ignore_of_more_dead_letters_than_one_batch_ignores_them_all() {
    let api = Api::start().await;
    let total = BULK_BATCH as usize * 2 + 100;
    let rows: Vec<NewDeadLetter> =
        (0..total).map(|n| dead_letter(&api, None, DeadLetterReason::Exhausted, n)).collect();
    let ids = write(&api, &rows).await;

    assert_eq!(count(&bulk(&api, "ignore", &api.admin, json!({})).await), total as u64);
    let ignored =
        resolutions(&api, &ids).await.into_iter().filter(|r| *r == Some(Resolution::Ignored)).count();
    assert_eq!(ignored, total);
    assert_eq!(count(&bulk(&api, "ignore", &api.admin, json!({})).await), 0, "nothing is left to ignore");
    assert_eq!(api.outbox_len().await, 0, "ignoring delivers nothing");
}

#[tokio::test]
async fn a_bulk_replay_delivers_emails_and_leaves_the_dead_letters_of_a_deleted_trigger_to_ignore() {
    let api = Api::start().await;
    let gone = pubsub_trigger(&api, "gone").await;
    let ids = write(
        &api,
        &[
            dead_letter(&api, Some(&gone), DeadLetterReason::Rejected, 0),
            dead_letter(&api, None, DeadLetterReason::Exhausted, 1),
        ],
    )
    .await;
    let deleted = api.call(Method::DELETE, "/v1/apps/shop/triggers/gone", Some(&api.admin), None).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{:?}", deleted.body);

    assert_eq!(count(&bulk(&api, "replay", &api.admin, json!({})).await), 1, "the email only");
    assert_eq!(delivered(&api).await, [1]);
    assert_eq!(
        resolutions(&api, &ids).await,
        [None, Some(Resolution::Replayed)],
        "the other stays unresolved"
    );
    let single = api
        .call(Method::POST, &format!("/v1/apps/shop/dead-letters/{}/replay", ids[0]), Some(&api.admin), None)
        .await;
    assert_eq!(
        (single.status, single.code()),
        (StatusCode::CONFLICT, "trigger_gone"),
        "as a single replay says"
    );
    assert_eq!(count(&bulk(&api, "ignore", &api.admin, json!({"trigger": "gone"})).await), 1);
    assert_eq!(resolutions(&api, &ids).await, [Some(Resolution::Ignored), Some(Resolution::Replayed)]);
}

#[tokio::test]
async fn only_callers_who_may_manage_dead_letters_act_in_bulk_and_others_change_nothing() {
    let api = Api::start().await;
    let ids = write(&api, &[dead_letter(&api, None, DeadLetterReason::Exhausted, 0)]).await;
    for action in ["replay", "ignore"] {
        for (token, status, code) in [
            (&api.viewer, StatusCode::FORBIDDEN, "forbidden"),
            (&api.developer, StatusCode::FORBIDDEN, "forbidden"),
            (&api.other_admin, StatusCode::NOT_FOUND, "app_not_found"),
        ] {
            let refused = bulk(&api, action, token, json!({})).await;
            assert_eq!((refused.status, refused.code()), (status, code), "{action}");
        }
    }
    assert_eq!((api.outbox_len().await, resolutions(&api, &ids).await), (0, vec![None]));
    assert_eq!(
        count(&bulk(&api, "ignore", &api.root, json!({"dry_run": true})).await),
        1,
        "a platform admin may"
    );
}

#[tokio::test]
async fn a_bad_field_is_refused_with_422_naming_it_an_unknown_one_with_400_and_nothing_changes() {
    let api = Api::start().await;
    let ids = write(&api, &[dead_letter(&api, None, DeadLetterReason::Exhausted, 0)]).await;
    for (action, body, field) in [
        ("replay", json!({"resolution": "replayed"}), "resolution"),
        ("replay", json!({"resolution": "lost"}), "resolution"),
        ("ignore", json!({"resolution": "ignored"}), "resolution"),
        ("ignore", json!({"resolution": "handler_failed"}), "resolution"),
        ("replay", json!({"trigger": "Not A Name"}), "trigger"),
        ("ignore", json!({"reason": "bored"}), "reason"),
        ("replay", json!({"created_after": "yesterday"}), "created_after"),
        ("ignore", json!({"created_before": "2026-01-01"}), "created_before"),
        (
            "replay",
            json!({"created_after": "2026-01-02T00:00:00Z", "created_before": "2026-01-01T00:00:00Z"}),
            "created_before",
        ),
    ] {
        let refused = bulk(&api, action, &api.admin, body.clone()).await;
        assert_eq!(
            (refused.status, refused.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_field"),
            "{body}"
        );
        assert!(refused.message().starts_with(&format!("{field}: ")), "{body}: {}", refused.message());
    }
    for action in ["replay", "ignore"] {
        let unknown = bulk(&api, action, &api.admin, json!({"limit": 5})).await;
        assert_eq!((unknown.status, unknown.code()), (StatusCode::BAD_REQUEST, "invalid_json"), "{action}");
        assert!(unknown.message().contains("limit"), "{}", unknown.message());
        let wrong_type = bulk(&api, action, &api.admin, json!({"dry_run": "yes"})).await;
        assert_eq!((wrong_type.status, wrong_type.code()), (StatusCode::BAD_REQUEST, "invalid_json"));
    }
    assert_eq!((api.outbox_len().await, resolutions(&api, &ids).await), (0, vec![None]));
}

#[tokio::test]
async fn both_bulk_routes_are_documented_with_their_filter_body_and_their_count() {
    let api = Api::start().await;
    let document = api.call(Method::GET, "/v1/openapi.json", None, None).await.body;
    for action in ["replay", "ignore"] {
        let op = &document["paths"][format!("/v1/apps/{{app}}/dead-letters/{action}")]["post"];
        assert_eq!(op["operationId"], format!("{action}_dead_letters"));
        let body = &op["requestBody"]["content"]["application/json"]["schema"]["$ref"];
        assert_eq!(body, "#/components/schemas/BulkDeadLetters", "{action}");
        let answer = &op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"];
        assert_eq!(answer, "#/components/schemas/CountView", "{action}");
        assert!(op["responses"]["422"].is_object(), "{action} declares its refusals");
    }
    let schema = &document["components"]["schemas"]["BulkDeadLetters"];
    let mut fields: Vec<&str> =
        schema["properties"].as_object().unwrap().keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(fields, ["created_after", "created_before", "dry_run", "reason", "resolution", "trigger"]);
    assert_eq!(schema["additionalProperties"], false, "unknown fields are refused: {schema}");
}
