//! The OpenAPI document as the router serves it at `GET /v1/openapi.json`: every operation named
//! once, the document valid OpenAPI 3.1 with valid JSON Schemas and resolving references, and
//! the error answers the routes share declared on every operation that can give them.

use std::collections::BTreeMap;

use axum::http::{Method, StatusCode};
use serde_json::Value;

use crate::support::Api;

/// The JSON Schema of OpenAPI 3.1 documents (`$id` https://spec.openapis.org/oas/3.1/schema/2022-10-07),
/// by the OpenAPI Initiative under the Apache License 2.0, as the `openapi-spec-validator` 0.9.0
/// package on PyPI ships it (`openapi_spec_validator/resources/schemas/v3.1/schema.json`).
const OPENAPI_3_1_SCHEMA: &str = include_str!("openapi-3.1-schema.json");

const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// The document the router serves.
async fn document(api: &Api) -> Value {
    let reply = api.call(Method::GET, "/v1/openapi.json", Some(&api.viewer), None).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    reply.body
}

/// Every operation: `(METHOD path, operation)`.
fn operations(document: &Value) -> Vec<(String, &Value)> {
    let paths = document["paths"].as_object().expect("the document has paths");
    paths
        .iter()
        .flat_map(|(path, item)| {
            METHODS.iter().filter_map(move |method| {
                item.get(*method).map(|op| (format!("{} {path}", method.to_uppercase()), op))
            })
        })
        .collect()
}

/// Every value of `key` anywhere in `value`, with its JSON pointer.
fn find<'a>(value: &'a Value, key: &str, at: &str, found: &mut Vec<(String, &'a Value)>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let here = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                if k == key {
                    found.push((here.clone(), v));
                }
                find(v, key, &here, found);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                find(v, key, &format!("{at}/{i}"), found);
            }
        }
        _ => {}
    }
}

#[tokio::test]
async fn every_operation_has_an_operation_id_of_its_own_naming_verb_and_resource() {
    let api = Api::start().await;
    let document = document(&api).await;
    let mut seen: BTreeMap<&str, String> = BTreeMap::new();
    let mut failures = Vec::new();
    for (operation, op) in operations(&document) {
        let Some(id) = op["operationId"].as_str() else {
            failures.push(format!("{operation} has no operationId"));
            continue;
        };
        let snake = id.split('_').all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase()));
        if !snake || !id.contains('_') {
            failures.push(format!("{operation}: operationId {id:?} is not <verb>_<resource>"));
        }
        if let Some(other) = seen.insert(id, operation.clone()) {
            failures.push(format!("{operation} and {other} share the operationId {id:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(seen.len() >= 29, "every route has an operation: {seen:?}");
}

#[tokio::test]
async fn the_document_is_valid_openapi_3_1_with_valid_json_schemas_and_resolving_references() {
    let api = Api::start().await;
    let document = document(&api).await;

    let schema: Value = serde_json::from_str(OPENAPI_3_1_SCHEMA).unwrap();
    let validator = jsonschema::options().should_validate_formats(true).build(&schema).unwrap();
    let errors: Vec<String> =
        validator.iter_errors(&document).map(|e| format!("{}: {e}", e.instance_path())).collect();
    assert!(errors.is_empty(), "not valid OpenAPI 3.1:\n{}", errors.join("\n"));
    let mut without_info = document.clone();
    without_info.as_object_mut().unwrap().remove("info");
    assert!(!validator.is_valid(&without_info), "the schema refuses a document without its info");

    let mut schemas = Vec::new();
    find(&document, "schema", "", &mut schemas);
    let components = document["components"]["schemas"].as_object().expect("component schemas");
    schemas.extend(components.iter().map(|(name, s)| (format!("/components/schemas/{name}"), s)));
    assert!(jsonschema::meta::validate(&serde_json::json!({"type": "text"})).is_err());
    for (at, schema) in &schemas {
        if let Err(e) = jsonschema::meta::validate(schema) {
            panic!("{at} is not a valid JSON Schema: {e}\n{schema:#}");
        }
    }

    let mut refs = Vec::new();
    find(&document, "$ref", "", &mut refs);
    assert!(!refs.is_empty(), "the document uses references");
    for (at, reference) in refs {
        let target = reference.as_str().and_then(|r| r.strip_prefix('#'));
        assert!(
            target.is_some_and(|pointer| document.pointer(pointer).is_some()),
            "{at}: {reference} does not resolve"
        );
    }
}

#[tokio::test]
async fn every_operation_declares_the_error_answers_its_route_can_give_in_the_error_shape() {
    let api = Api::start().await;
    let document = document(&api).await;
    let error_body = Value::String("#/components/schemas/ErrorBody".into());
    let mut failures = Vec::new();
    for (operation, op) in operations(&document) {
        let path = operation.split_once(' ').unwrap().1;
        // An empty list, or an empty requirement in it, makes the token optional.
        let takes_token = op.get("security").and_then(Value::as_array).is_none_or(|requirements| {
            !requirements.is_empty() && !requirements.iter().any(|r| r == &serde_json::json!({}))
        });
        let params =
            |place: &str| op["parameters"].as_array().into_iter().flatten().any(|p| p["in"] == place);
        let mut expected = Vec::new();
        if takes_token {
            expected.extend(["401", "503"]);
        }
        if path.starts_with("/v1/apps/{app}/") {
            expected.extend(["403", "404"]);
        }
        if op.get("requestBody").is_some() {
            expected.extend(["400", "413"]);
        }
        if params("path") || params("query") {
            expected.push("400");
        }
        for status in expected {
            if op["responses"].get(status).is_none() {
                failures.push(format!("{operation} does not declare {status}"));
            }
        }
        for (status, response) in op["responses"].as_object().unwrap() {
            let schema = &response["content"]["application/json"]["schema"]["$ref"];
            if status.starts_with(['4', '5']) && operation != "GET /readyz" && *schema != error_body {
                failures.push(format!("{operation} answers {status} without the error shape: {response}"));
            }
        }
        if takes_token && op["responses"]["503"]["headers"].get("Retry-After").is_none() {
            failures.push(format!("{operation}: its 503 does not declare Retry-After"));
        }
    }
    let invoke = &document["paths"]["/v1/apps/{app}/invoke/{trigger}"]["post"]["responses"];
    for status in ["200", "400", "404", "409", "429", "502", "503", "504"] {
        if invoke.get(status).is_none() {
            failures.push(format!("invoke_trigger does not declare {status}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn bodies_that_take_any_json_value_are_typed_as_any_value() {
    let api = Api::start().await;
    let document = document(&api).await;
    for (path, method) in [
        ("/v1/apps/{app}/invoke/{trigger}", "post"),
        ("/v1/apps/{app}/topics/{topic}/messages", "post"),
        ("/v1/apps/{app}/kv/{collection}/{key}", "put"),
    ] {
        let schema = &document["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"];
        assert_eq!(schema, &serde_json::json!({}), "{method} {path} takes any JSON value");
    }
}

#[tokio::test]
async fn a_webhooks_secret_is_in_the_document_as_write_only() {
    let api = Api::start().await;
    let document = document(&api).await;
    let secret = &document["components"]["schemas"]["WebhookBody"]["properties"]["secret"];
    assert_eq!(secret["writeOnly"], true, "registration sends it, so the document must allow it: {secret}");
}

#[tokio::test]
async fn the_documented_token_lifetime_is_the_one_the_api_enforces() {
    let api = Api::start().await;
    let document = document(&api).await;
    let expires = &document["components"]["schemas"]["CreateToken"]["properties"]["expires_in_s"];
    assert_eq!(
        expires["maximum"].as_f64(),
        Some(picloud_core::token::MAX_TOKEN_LIFETIME_S as f64),
        "{expires}"
    );
}
