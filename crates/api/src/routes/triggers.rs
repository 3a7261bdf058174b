//! Registering, reading, changing and removing triggers.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use base64::Engine as _;
use picloud_core::cron::DEFAULT_TIMEZONE;
use picloud_core::protocol::{EventKind, TriggerKind};
use picloud_core::{
    Capability, CollectionPattern, CronSchedule, HandlerName, QueueName, RetryOverrides, TriggerName,
};
use picloud_store::{Handler, KvOp, NewTrigger, TriggerPatch, TriggerRepo, TriggerSpec};
use uuid::Uuid;

use crate::ApiState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::extract::{JsonBody, Page, PageQuery, PathParams, QueryParams};
use crate::views::*;

/// The handler of a registration or a change. A webhook URL whose host is a refused address (or
/// a `localhost` name) is refused here; other names are judged when a delivery resolves them.
fn handler(state: &ApiState, body: HandlerBody) -> Result<Handler, ApiError> {
    match body {
        HandlerBody::Function(name) => HandlerName::parse(name)
            .map(Handler::Function)
            .map_err(|e| ApiError::invalid("handler.function", e)),
        HandlerBody::Webhook(hook) => {
            let url = url::Url::parse(&hook.url).map_err(|e| ApiError::invalid("handler.webhook.url", e))?;
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                return Err(ApiError::invalid(
                    "handler.webhook.url",
                    "expected an http:// or https:// URL with a host",
                ));
            }
            if let Err(refusal) =
                state.config.webhook_allow_nets.check_host(url.host_str().unwrap_or_default())
            {
                return Err(ApiError::new(
                    ErrorCode::WebhookTargetRefused,
                    format!("handler.webhook.url: {refusal}"),
                ));
            }
            let key_bytes = hook
                .secret
                .strip_prefix("whsec_")
                .and_then(|k| base64::engine::general_purpose::STANDARD.decode(k).ok())
                .map_or(0, |k| k.len());
            if key_bytes < 16 {
                return Err(ApiError::invalid(
                    "handler.webhook.secret",
                    "expected whsec_ followed by at least 16 base64-encoded bytes",
                ));
            }
            Ok(Handler::Webhook { url: hook.url, secret: hook.secret })
        }
    }
}

/// Whether `caller` sees webhook URLs whole: only with AppManageTriggers on the app (never
/// through a delivery token, which does not carry it). Others see `scheme://host[:port]`: a URL's
/// path, query and userinfo often carry credentials.
fn sees_webhook_urls(caller: &Caller) -> bool {
    caller.access().allows(Capability::AppManageTriggers)
}

fn retry(state: &ApiState, retry: RetryOverrides) -> Result<RetryOverrides, ApiError> {
    state.config.node.triggers.retry.with_overrides(&retry).map_err(|e| ApiError::invalid("retry", e))?;
    Ok(retry)
}

/// The kind-specific fields, checked against the kind.
fn spec(body: &RegisterTrigger) -> Result<TriggerSpec, ApiError> {
    let kind = TriggerKind::parse(&body.kind)
        .ok_or_else(|| ApiError::invalid("kind", "expected kv, pubsub, queue, cron, dead_letter or http"))?;
    let given: [(&str, bool, &[TriggerKind]); 8] = [
        ("collection", body.collection.is_some(), &[TriggerKind::Kv]),
        ("ops", body.ops.is_some(), &[TriggerKind::Kv]),
        ("topic", body.topic.is_some(), &[TriggerKind::Pubsub]),
        ("queue", body.queue.is_some(), &[TriggerKind::Queue]),
        ("schedule", body.schedule.is_some(), &[TriggerKind::Cron]),
        ("timezone", body.timezone.is_some(), &[TriggerKind::Cron]),
        ("source_trigger", body.source_trigger.is_some(), &[TriggerKind::DeadLetter]),
        ("source_kinds", body.source_kinds.is_some(), &[TriggerKind::DeadLetter]),
    ];
    if let Some((field, _, _)) = given.iter().find(|(_, set, kinds)| *set && !kinds.contains(&kind)) {
        return Err(ApiError::invalid(field, format!("not a field of {kind} triggers")));
    }
    let required = |field: &str, value: &Option<String>| {
        value.clone().ok_or_else(|| ApiError::invalid(field, format!("required for {kind} triggers")))
    };
    Ok(match kind {
        TriggerKind::Kv => {
            let collection = CollectionPattern::parse(required("collection", &body.collection)?)
                .map_err(|e| ApiError::invalid("collection", e))?;
            let ops = match &body.ops {
                None => vec![KvOp::Put, KvOp::Delete],
                Some(ops) if ops.is_empty() => {
                    return Err(ApiError::invalid("ops", "expected put and/or delete"));
                }
                Some(ops) => ops
                    .iter()
                    .enumerate()
                    .map(|(i, op)| {
                        KvOp::parse(op)
                            .ok_or_else(|| ApiError::invalid(&format!("ops[{i}]"), "expected put or delete"))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            };
            TriggerSpec::Kv { collection, ops }
        }
        TriggerKind::Pubsub => TriggerSpec::Pubsub {
            topic: CollectionPattern::parse(required("topic", &body.topic)?)
                .map_err(|e| ApiError::invalid("topic", e))?,
        },
        TriggerKind::Queue => TriggerSpec::Queue {
            queue: QueueName::parse(required("queue", &body.queue)?)
                .map_err(|e| ApiError::invalid("queue", e))?,
        },
        TriggerKind::Cron => {
            let schedule = required("schedule", &body.schedule)?;
            let timezone = body.timezone.clone().unwrap_or_else(|| DEFAULT_TIMEZONE.into());
            CronSchedule::parse(&schedule, &timezone).map_err(|e| ApiError::invalid(e.field(), e))?;
            TriggerSpec::Cron { schedule, timezone }
        }
        TriggerKind::DeadLetter => TriggerSpec::DeadLetter {
            source_trigger: body
                .source_trigger
                .clone()
                .map(|n| TriggerName::parse(n).map_err(|e| ApiError::invalid("source_trigger", e)))
                .transpose()?,
            source_kinds: body
                .source_kinds
                .as_ref()
                .map(|kinds| {
                    kinds
                        .iter()
                        .enumerate()
                        .map(|(i, k)| {
                            EventKind::parse(k).ok_or_else(|| {
                                ApiError::invalid(
                                    &format!("source_kinds[{i}]"),
                                    "expected kv, pubsub, queue, cron, dead_letter, http or email",
                                )
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()?,
        },
        TriggerKind::Http => TriggerSpec::Http,
    })
}

/// Register a trigger; it runs as the caller's principal.
#[utoipa::path(post, path = "/v1/apps/{app}/triggers", tag = "triggers", operation_id = "register_trigger",
    params(("app" = String, Path)), request_body = RegisterTrigger,
    responses(
        (status = 201, body = TriggerView, description = "the trigger, registered"),
        (status = 409, body = ErrorBody, description = "`trigger_exists`, `queue_taken`: the name is taken, or the queue has a trigger"),
        (status = 422, body = ErrorBody, description = "`invalid_field`: a field breaks its rule, or does not fit the kind; `webhook_target_refused`: the webhook's host is an address webhooks may not reach (DESIGN §11)")))]
pub async fn register(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams(_app): PathParams<String>,
    JsonBody(body): JsonBody<RegisterTrigger>,
) -> Result<(StatusCode, Json<TriggerView>), ApiError> {
    let app = caller.require_app(Capability::AppManageTriggers)?;
    let name = TriggerName::parse(body.name.clone()).map_err(|e| ApiError::invalid("name", e))?;
    let spec = spec(&body)?;
    let new = NewTrigger {
        id: Uuid::now_v7(),
        app_id: app.id,
        name,
        spec,
        handler: handler(&state, body.handler)?,
        retry: retry(&state, body.retry.unwrap_or_default())?,
        enabled: body.enabled.unwrap_or(true),
        registered_by: caller.principal.id,
    };
    let trigger = state.store.create_trigger(&new).await?;
    Ok((StatusCode::CREATED, Json(TriggerView::shown_to(trigger, sees_webhook_urls(&caller)))))
}

/// The app's triggers, by name.
#[utoipa::path(get, path = "/v1/apps/{app}/triggers", tag = "triggers", operation_id = "list_triggers",
    params(("app" = String, Path), PageQuery),
    responses((status = 200, body = Page<TriggerView>, description = "a page of triggers, by name")))]
pub async fn list(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams(_app): PathParams<String>,
    QueryParams(page): QueryParams<PageQuery>,
) -> Result<Json<Page<TriggerView>>, ApiError> {
    let app = caller.require_app(Capability::AppRead)?;
    let after = page.after()?;
    let found = state.store.list_triggers(app.id, after.as_deref(), page.limit()).await?;
    let whole_urls = sees_webhook_urls(&caller);
    Ok(Json(Page::from_store(found, |t| t.name.to_string(), |t| TriggerView::shown_to(t, whole_urls))))
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(ErrorCode::TriggerNotFound, format!("no trigger {name}"))
}

/// One trigger.
#[utoipa::path(get, path = "/v1/apps/{app}/triggers/{name}", tag = "triggers", operation_id = "get_trigger",
    params(("app" = String, Path), ("name" = String, Path)),
    responses(
        (status = 200, body = TriggerView, description = "the trigger"),
        (status = 404, body = ErrorBody, description = "`trigger_not_found`: no such trigger")))]
pub async fn get(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams((_, name)): PathParams<(String, String)>,
) -> Result<Json<TriggerView>, ApiError> {
    let app = caller.require_app(Capability::AppRead)?;
    let trigger = state.store.trigger(app.id, &name).await?.ok_or_else(|| not_found(&name))?;
    Ok(Json(TriggerView::shown_to(trigger, sees_webhook_urls(&caller))))
}

/// Enable or disable a trigger, or change its handler or retry overrides.
#[utoipa::path(patch, path = "/v1/apps/{app}/triggers/{name}", tag = "triggers", operation_id = "update_trigger",
    params(("app" = String, Path), ("name" = String, Path)), request_body = PatchTrigger,
    responses(
        (status = 200, body = TriggerView, description = "the trigger as it is now"),
        (status = 404, body = ErrorBody, description = "`trigger_not_found`: no such trigger"),
        (status = 422, body = ErrorBody, description = "`invalid_field`: the handler or retry overrides break their rules; `webhook_target_refused`: the webhook's host is an address webhooks may not reach (DESIGN §11)")))]
pub async fn patch(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams((_, name)): PathParams<(String, String)>,
    JsonBody(body): JsonBody<PatchTrigger>,
) -> Result<Json<TriggerView>, ApiError> {
    let app = caller.require_app(Capability::AppManageTriggers)?;
    let patch = TriggerPatch {
        enabled: body.enabled,
        handler: body.handler.map(|h| handler(&state, h)).transpose()?,
        retry: body.retry.map(|r| retry(&state, r)).transpose()?,
    };
    let trigger = state.store.update_trigger(app.id, &name, &patch).await?;
    Ok(Json(TriggerView::shown_to(trigger, sees_webhook_urls(&caller))))
}

/// Remove a trigger; its dead letters stay.
#[utoipa::path(delete, path = "/v1/apps/{app}/triggers/{name}", tag = "triggers", operation_id = "delete_trigger",
    params(("app" = String, Path), ("name" = String, Path)),
    responses(
        (status = 204, description = "the trigger is removed"),
        (status = 404, body = ErrorBody, description = "`trigger_not_found`: no such trigger")))]
pub async fn delete(
    State(state): State<ApiState>,
    caller: Caller,
    PathParams((_, name)): PathParams<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let app = caller.require_app(Capability::AppManageTriggers)?;
    if state.store.delete_trigger(app.id, &name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found(&name))
    }
}
