//! Who may tail an app's delivery outcomes, and which of them a tail shows (DESIGN §15).

use picloud_core::protocol::{EventKind, TailOutcome};
use picloud_core::{AppId, AppSlug, Capability, TriggerName};
use picloud_store::Store;

use super::Ops;
use super::triggers::not_found;
use crate::auth::Caller;
use crate::error::ApiError;

/// What a tail of one app shows.
#[derive(Debug, Clone)]
pub struct TailFilter {
    /// The app tailed.
    pub app_id: AppId,
    /// Its slug (the subject its outcomes come on).
    pub app: AppSlug,
    /// Only this trigger's outcomes.
    pub trigger: Option<TriggerName>,
    /// Only outcomes of deliveries of this event kind.
    pub kind: Option<EventKind>,
}

impl TailFilter {
    /// Whether the tail shows `outcome`.
    pub fn admits(&self, outcome: &TailOutcome) -> bool {
        self.trigger.as_ref().is_none_or(|t| outcome.trigger.as_deref() == Some(t.as_str()))
            && self.kind.is_none_or(|k| outcome.kind == k)
    }
}

impl<S: Store> Ops<S> {
    /// What a tail of the caller's app shows: of `trigger` (by name, which must exist) and of
    /// event `kind`, when given. Only API tokens may tail (a delivery token's caller ends with
    /// its delivery).
    pub async fn tail_filter(
        &self,
        caller: &Caller,
        trigger: Option<String>,
        kind: Option<&str>,
    ) -> Result<TailFilter, ApiError> {
        let app = caller.require_app(Capability::AppRead)?;
        if caller.is_delivery() {
            return Err(ApiError::forbidden(
                "a delivery token cannot open a live tail: the tail would outlive the delivery",
            ));
        }
        let kind = kind
            .map(|k| {
                EventKind::parse(k).ok_or_else(|| {
                    ApiError::invalid("kind", "expected kv, pubsub, queue, cron, dead_letter, http or email")
                })
            })
            .transpose()?;
        let trigger = match trigger {
            None => None,
            Some(name) => {
                let name = TriggerName::parse(name).map_err(|e| ApiError::invalid("trigger", e))?;
                self.store.trigger(app.id, name.as_str()).await?.ok_or_else(|| not_found(name.as_str()))?;
                Some(name)
            }
        };
        Ok(TailFilter { app_id: app.id, app: app.slug.clone(), trigger, kind })
    }
}
