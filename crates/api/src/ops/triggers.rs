//! Registering, reading, changing and removing triggers.

use base64::Engine as _;
use picloud_core::cron::DEFAULT_TIMEZONE;
use picloud_core::net::AllowNets;
use picloud_core::protocol::{EventKind, TriggerKind};
use picloud_core::{
    Batch, Capability, CollectionPattern, CronSchedule, Flow, HandlerName, QueueName, RetryOverrides,
    TriggerConfig, TriggerId, TriggerName,
};
use picloud_store::{Handler, KvOp, NewTrigger, Store, TriggerPatch, TriggerSpec};

use super::Ops;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorCode};
use crate::extract::{Page, PageQuery};
use crate::views::{HandlerBody, PatchTrigger, RegisterTrigger, TriggerView};

/// The handler of a registration or a change. A webhook URL whose host is a refused address (or
/// a `localhost` name) is refused here; other names are judged when a delivery resolves them.
fn handler(allow_nets: &AllowNets, body: HandlerBody) -> Result<Handler, ApiError> {
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
            if let Err(refusal) = allow_nets.check_host(url.host_str().unwrap_or_default()) {
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

fn retry(config: &TriggerConfig, retry: RetryOverrides) -> Result<RetryOverrides, ApiError> {
    config.retry.with_overrides(&retry).map_err(|e| ApiError::invalid("retry", e))?;
    Ok(retry)
}

/// A `flow` as given (`null`: none), checked for a trigger of `kind`. `http` triggers take none:
/// their calls are made at once, to a caller who waits.
fn flow(kind: TriggerKind, given: &serde_json::Value) -> Result<Option<Flow>, ApiError> {
    let flow = Flow::from_json(given).map_err(|e| ApiError::new(ErrorCode::InvalidField, e.to_string()))?;
    if flow.is_some() && kind == TriggerKind::Http {
        return Err(ApiError::invalid(
            "flow",
            "http triggers are called synchronously; their calls do not flow",
        ));
    }
    Ok(flow)
}

/// A `batch` as given (`null`: none), checked for a trigger of `kind`. `http` triggers take none:
/// each call has a caller waiting for its own answer.
fn batch(kind: TriggerKind, given: &serde_json::Value) -> Result<Option<Batch>, ApiError> {
    let batch = Batch::from_json(given).map_err(|e| ApiError::new(ErrorCode::InvalidField, e.to_string()))?;
    if batch.is_some() && kind == TriggerKind::Http {
        return Err(ApiError::invalid(
            "batch",
            "http triggers are called synchronously; their calls cannot batch",
        ));
    }
    Ok(batch)
}

/// Refuses a trigger that would batch into a webhook: a webhook request carries one delivery
/// (DESIGN §11), and the batch is only ever sent to a function handler.
fn batch_fits(batch: Option<&Batch>, handler: &Handler) -> Result<(), ApiError> {
    if batch.is_some() && matches!(handler, Handler::Webhook { .. }) {
        return Err(ApiError::invalid(
            "batch",
            "webhook handlers take one delivery per request; batch needs a function handler",
        ));
    }
    Ok(())
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
            TriggerSpec::Cron {
                schedule: CronSchedule::parse(&schedule, &timezone)
                    .map_err(|e| ApiError::invalid(e.field(), e))?,
            }
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

/// The refusal of a trigger `name` the app does not have.
pub(super) fn not_found(name: &str) -> ApiError {
    picloud_store::Error::TriggerNotFound(name.to_owned()).into()
}

impl<S: Store> Ops<S> {
    /// Registers a trigger in the caller's app; it runs as the caller's principal.
    pub async fn register_trigger(
        &self,
        caller: &Caller,
        body: RegisterTrigger,
    ) -> Result<TriggerView, ApiError> {
        let app = caller.require_app(Capability::AppManageTriggers)?;
        let name = TriggerName::parse(body.name.clone()).map_err(|e| ApiError::invalid("name", e))?;
        let spec = spec(&body)?;
        let flow = flow(spec.kind(), body.flow.as_ref().unwrap_or(&serde_json::Value::Null))?;
        let batch = batch(spec.kind(), body.batch.as_ref().unwrap_or(&serde_json::Value::Null))?;
        let handler = handler(&self.webhook_allow_nets, body.handler)?;
        batch_fits(batch.as_ref(), &handler)?;
        let new = NewTrigger {
            id: TriggerId::new(),
            app_id: app.id,
            name,
            spec,
            handler,
            retry: retry(&self.triggers, body.retry.unwrap_or_default())?,
            flow,
            batch,
            enabled: body.enabled.unwrap_or(true),
            registered_by: caller.principal.id,
        };
        let trigger = self.store.create_trigger(&new).await?;
        Ok(TriggerView::shown_to(trigger, sees_webhook_urls(caller)))
    }

    /// A page of the app's triggers, by name.
    pub async fn list_triggers(
        &self,
        caller: &Caller,
        page: &PageQuery,
    ) -> Result<Page<TriggerView>, ApiError> {
        let app = caller.require_app(Capability::AppRead)?;
        let after = page.after()?;
        let found = self.store.list_triggers(app.id, after.as_deref(), page.limit()).await?;
        let whole_urls = sees_webhook_urls(caller);
        Ok(Page::from_store(found, |t| t.name.to_string(), |t| TriggerView::shown_to(t, whole_urls)))
    }

    /// One trigger, by name.
    pub async fn trigger(&self, caller: &Caller, name: &str) -> Result<TriggerView, ApiError> {
        let app = caller.require_app(Capability::AppRead)?;
        let trigger = self.store.trigger(app.id, name).await?.ok_or_else(|| not_found(name))?;
        Ok(TriggerView::shown_to(trigger, sees_webhook_urls(caller)))
    }

    /// Enables or disables a trigger, or changes its handler, retry overrides, flow or batch. A
    /// new flow applies to deliveries written after it: those written before keep the lane they
    /// were written in, and dead letters that hold a lane hold it until they are resolved.
    pub async fn patch_trigger(
        &self,
        caller: &Caller,
        name: &str,
        body: PatchTrigger,
    ) -> Result<TriggerView, ApiError> {
        let app = caller.require_app(Capability::AppManageTriggers)?;
        let handler = body.handler.map(|h| handler(&self.webhook_allow_nets, h)).transpose()?;
        // A new flow or batch is checked against the trigger's kind, and a batch against the
        // handler it will have: the new one, or the one it keeps (so does a new webhook handler,
        // against the batch the trigger keeps).
        let webhook = matches!(handler, Some(Handler::Webhook { .. }));
        let (flow, batch) = if body.flow.is_some() || body.batch.is_some() || webhook {
            let trigger = self.store.trigger(app.id, name).await?.ok_or_else(|| not_found(name))?;
            let kind = trigger.spec.kind();
            let new_flow = body.flow.as_ref().map(|given| flow(kind, given)).transpose()?;
            let new_batch = body.batch.as_ref().map(|given| batch(kind, given)).transpose()?;
            let batch_after = new_batch.unwrap_or(trigger.batch);
            batch_fits(batch_after.as_ref(), handler.as_ref().unwrap_or(&trigger.handler))?;
            (new_flow, new_batch)
        } else {
            (None, None)
        };
        let patch = TriggerPatch {
            enabled: body.enabled,
            handler,
            retry: body.retry.map(|r| retry(&self.triggers, r)).transpose()?,
            flow,
            batch,
        };
        let trigger = self.store.update_trigger(app.id, name, &patch).await?;
        Ok(TriggerView::shown_to(trigger, sees_webhook_urls(caller)))
    }

    /// Removes a trigger; its dead letters stay.
    pub async fn delete_trigger(&self, caller: &Caller, name: &str) -> Result<(), ApiError> {
        let app = caller.require_app(Capability::AppManageTriggers)?;
        if self.store.delete_trigger(app.id, name).await? { Ok(()) } else { Err(not_found(name)) }
    }
}
