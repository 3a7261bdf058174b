//! Webhook targets (DESIGN §11): literal addresses that are not public are refused at
//! registration and on change unless `PICLOUD_WEBHOOK_ALLOW_NETS` allows them, and a webhook's
//! URL is shown whole only to callers who may manage the app's triggers.

use axum::http::{Method, StatusCode};
use picloud_api::ApiState;
use picloud_store::TriggerRepo;
use serde_json::{Value, json};

use crate::support::*;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn hook(name: &str, url: &str) -> Value {
    json!({"name": name, "kind": "http", "handler": {"webhook": {"url": url, "secret": SECRET}}})
}

/// The API again, with `PICLOUD_WEBHOOK_ALLOW_NETS` set to `nets`.
fn allowing(api: &mut Api, nets: &str) {
    let mut config = (*api.state.config).clone();
    config.webhook_allow_nets = nets.parse().unwrap();
    api.state = ApiState::new(api.store().clone(), api.state.nats.clone(), config);
    api.router = picloud_api::router(api.state.clone());
}

async fn register(api: &Api, body: Value) -> Reply {
    api.call(Method::POST, "/v1/apps/shop/triggers", Some(&api.admin), Some(body)).await
}

async fn trigger_count(api: &Api) -> usize {
    api.store().list_triggers(api.app.id, None, 500).await.unwrap().items.len()
}

/// Not public, written literally: loopback, private, link-local, metadata, unspecified,
/// multicast, an IPv4-mapped loopback, other spellings of 127.0.0.1, and `localhost` names.
const REFUSED: [&str; 16] = [
    "http://127.0.0.1:8080/hook",
    "http://[::1]/hook",
    "http://10.0.0.5/hook",
    "https://172.16.3.4/hook",
    "http://192.168.1.10/hook",
    "http://[fd12::1]/hook",
    "http://169.254.10.1/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fe80::1]/hook",
    "http://0.0.0.0:8080/hook",
    "http://[::]/hook",
    "http://224.0.0.1/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://2130706433/hook",
    "http://localhost:8080/hook",
    "http://api.localhost/hook",
];

#[tokio::test]
async fn webhooks_to_addresses_that_are_not_public_are_refused_at_registration_and_nothing_is_written() {
    let api = Api::start().await;
    for url in REFUSED {
        let reply = register(&api, hook("t", url)).await;
        assert_eq!(
            (reply.status, reply.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, "webhook_target_refused"),
            "{url}"
        );
        assert!(reply.message().starts_with("handler.webhook.url: "), "{url}: {}", reply.message());
        assert!(reply.message().contains("PICLOUD_WEBHOOK_ALLOW_NETS"), "{}", reply.message());
    }
    assert_eq!(trigger_count(&api).await, 0);
    let reply = register(&api, hook("t", "http://127.0.0.1:8080/hook")).await;
    assert_eq!(
        reply.message(),
        "handler.webhook.url: 127.0.0.1 is a loopback address; webhooks must reach public addresses \
         unless PICLOUD_WEBHOOK_ALLOW_NETS allows it"
    );
    let reply = register(&api, hook("t", "http://169.254.169.254/latest/meta-data/")).await;
    assert!(reply.message().contains("169.254.169.254 is a cloud metadata address"), "{}", reply.message());
}

#[tokio::test]
async fn webhooks_to_addresses_that_are_not_public_are_refused_on_change_and_nothing_changes() {
    let api = Api::start().await;
    api.trigger(hook("t", "https://example.com/hook")).await;
    for url in REFUSED {
        let reply = api
            .call(
                Method::PATCH,
                "/v1/apps/shop/triggers/t",
                Some(&api.admin),
                Some(json!({"enabled": false, "handler": {"webhook": {"url": url, "secret": SECRET}}})),
            )
            .await;
        assert_eq!(
            (reply.status, reply.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, "webhook_target_refused"),
            "{url}"
        );
    }
    let read = api.call(Method::GET, "/v1/apps/shop/triggers/t", Some(&api.admin), None).await;
    assert_eq!(read.body["handler"]["webhook"]["url"], "https://example.com/hook");
    assert_eq!(read.body["enabled"], true);
}

#[tokio::test]
async fn webhooks_to_names_and_public_addresses_are_registered() {
    let api = Api::start().await;
    for (name, url) in [
        ("name", "https://example.com/hook?x=1"),
        ("v4", "http://93.184.215.14/hook"),
        ("v6", "http://[2606:4700:4700::1111]/hook"),
        ("near-localhost", "https://localhost.example.com/hook"),
    ] {
        let reply = register(&api, hook(name, url)).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{url}: {:?}", reply.body);
    }
}

#[tokio::test]
async fn an_allowed_net_lets_its_addresses_be_registered_and_only_those() {
    let mut api = Api::start().await;
    allowing(&mut api, "10.0.0.0/8,127.0.0.0/8");
    for (name, url) in [
        ("private", "http://10.0.0.5/hook"),
        ("loopback", "http://127.0.0.1:8080/hook"),
        ("mapped", "http://[::ffff:127.0.0.1]/hook"),
        ("localhost", "http://localhost:8080/hook"),
    ] {
        let reply = register(&api, hook(name, url)).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{url}: {:?}", reply.body);
    }
    let reply = register(&api, hook("other", "http://192.168.1.10/hook")).await;
    assert_eq!(reply.code(), "webhook_target_refused");
    let reply = api
        .call(
            Method::PATCH,
            "/v1/apps/shop/triggers/private",
            Some(&api.admin),
            Some(json!({"handler": {"webhook": {"url": "http://10.9.9.9/other", "secret": SECRET}}})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
}

#[tokio::test]
async fn a_webhook_url_is_shown_whole_only_to_callers_who_manage_the_apps_triggers() {
    let api = Api::start().await;
    let url = "https://hook-user:hunter2@hooks.example.com:8443/secret-path?token=x";
    let created = api.trigger(hook("t", url)).await;
    assert_eq!(created["handler"]["webhook"]["url"], url, "the admin's 201 shows it whole");
    api.trigger(hook("plain", "https://example.com/secret-path")).await;

    let delivery = api.delivery_token(0);
    for (who, token, expected, plain) in [
        ("root", &api.root, url, "https://example.com/secret-path"),
        ("admin", &api.admin, url, "https://example.com/secret-path"),
        ("viewer", &api.viewer, "https://hooks.example.com:8443", "https://example.com"),
        ("developer", &api.developer, "https://hooks.example.com:8443", "https://example.com"),
        ("delivery token", &delivery, "https://hooks.example.com:8443", "https://example.com"),
    ] {
        let one = api.call(Method::GET, "/v1/apps/shop/triggers/t", Some(token), None).await;
        assert_eq!(one.status, StatusCode::OK, "{who}");
        assert_eq!(one.body["handler"]["webhook"]["url"], expected, "{who}: GET one");
        let list = api.call(Method::GET, "/v1/apps/shop/triggers", Some(token), None).await;
        let urls: Vec<&Value> =
            list.body["items"].as_array().unwrap().iter().map(|t| &t["handler"]["webhook"]["url"]).collect();
        assert_eq!(urls, [&json!(plain), &json!(expected)], "{who}: list");
    }

    let patched = api
        .call(Method::PATCH, "/v1/apps/shop/triggers/t", Some(&api.admin), Some(json!({"enabled": false})))
        .await;
    assert_eq!(patched.body["handler"]["webhook"]["url"], url, "the admin's PATCH answer shows it whole");
    let patched = api
        .call(Method::PATCH, "/v1/apps/shop/triggers/t", Some(&delivery), Some(json!({"enabled": true})))
        .await;
    assert_eq!(patched.status, StatusCode::FORBIDDEN, "a delivery token never manages triggers");
}
