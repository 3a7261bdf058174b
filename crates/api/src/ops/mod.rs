//! The operations of the platform (DESIGN §5, §9): what a caller may do, checked and done the
//! same whatever door it came in by — the HTTP routes, the NATS ingest, `picloud-router admin`
//! and `dev`, the benchmarks. Each takes a [`Caller`] and typed input, checks the caller's
//! capability, validates the input (a 422-class error names the field) and returns the view the
//! caller is shown, or an [`ApiError`]: a code and a message, with no HTTP in it. The doors only
//! translate: the routes to status and JSON, the ingest to its reply, `admin` to its output.
//!
//! The sync call is the exception that stays at its door: only an API node waits on a reply
//! inbox, so `routes::invoke` keeps the wait and uses [`invoke`] for the write and the answer.

use std::sync::Arc;

use picloud_core::TriggerConfig;
use picloud_core::net::AllowNets;
use picloud_store::events::EventContext;
use picloud_store::{App, PgStore, Store};

use crate::auth::Caller;

pub mod apps;
pub mod dead_letters;
pub mod deliveries;
pub mod events;
pub mod invoke;
pub mod kv;
pub mod stats;
pub mod tail;
pub mod tokens;
pub mod triggers;

/// The operations over one store, with the node's rules for what they write.
#[derive(Debug, Clone)]
pub struct Ops<S = PgStore> {
    store: S,
    /// The depth limit, default retries and largest event of what is written.
    triggers: TriggerConfig,
    /// The networks webhooks may reach although they are refused by default.
    webhook_allow_nets: Arc<AllowNets>,
}

impl<S: Store> Ops<S> {
    /// Operations on `store`, writing events within `triggers`, registering webhooks that
    /// `webhook_allow_nets` lets through.
    pub fn new(store: S, triggers: TriggerConfig, webhook_allow_nets: AllowNets) -> Self {
        Ops { store, triggers, webhook_allow_nets: Arc::new(webhook_allow_nets) }
    }

    /// The store the operations read and write.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The trigger limits events are written within.
    pub fn triggers(&self) -> &TriggerConfig {
        &self.triggers
    }

    /// Where events written on behalf of `caller` in `app` start: its depth, the app and the
    /// node's trigger limits.
    pub fn event_context<'a>(&'a self, app: &'a App, caller: &Caller) -> EventContext<'a> {
        EventContext { app_id: app.id, app_slug: &app.slug, depth: caller.depth(), config: &self.triggers }
    }
}

#[cfg(test)]
mod tests;
