//! What the crate's unit tests set up: a memory store with apps, triggers and due rows.

use picloud_core::flow::Flow;
use picloud_core::{
    AppSlug, CollectionPattern, HandlerName, Role, TopicName, TriggerConfig, TriggerId, TriggerName,
};
use picloud_store::events::{self, EventContext};
use picloud_store::{
    AuthRepo as _, Handler, MemStore, NewTrigger, Transactional as _, TriggerRepo as _, TriggerSpec,
};

/// An app for each of `rows`, with a pubsub trigger (with `flow`) and that many due messages for
/// it: the store and the triggers.
pub(crate) async fn apps_with_rows(rows: &[usize], flow: Option<Flow>) -> (MemStore, Vec<TriggerId>) {
    let store = MemStore::new();
    let config = TriggerConfig::default();
    let mut triggers = Vec::with_capacity(rows.len());
    for (n, &rows) in rows.iter().enumerate() {
        let app = store.create_app(&AppSlug::parse(format!("app-{n}")).unwrap()).await.unwrap();
        let admin = store.create_principal(&format!("admin-{n}"), false).await.unwrap();
        store.set_role(app.id, admin.id, Role::Admin).await.unwrap();
        let trigger = NewTrigger {
            flow,
            ..NewTrigger::new(
                app.id,
                TriggerName::parse("t").unwrap(),
                TriggerSpec::Pubsub { topic: CollectionPattern::parse("t").unwrap() },
                Handler::Function(HandlerName::parse("h").unwrap()),
                admin.id,
            )
        };
        triggers.push(store.create_trigger(&trigger).await.unwrap().id);
        let cx = EventContext { app_id: app.id, app_slug: &app.slug, depth: 0, config: &config };
        let mut tx = store.begin().await.unwrap();
        for _ in 0..rows {
            let message = serde_json::value::to_raw_value(&serde_json::json!({})).unwrap();
            events::publish(&store, &mut tx, &cx, &TopicName::parse("t").unwrap(), &message, None)
                .await
                .unwrap();
        }
        store.commit(tx).await.unwrap();
    }
    (store, triggers)
}
