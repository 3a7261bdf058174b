//! What the router's tests set up alike.

use picloud_core::{AppSlug, HandlerName, RetryOverrides, Role, TriggerName};
use picloud_store::*;
use uuid::Uuid;

/// App `shop`, its admin, and one enabled trigger of it.
pub struct Shop {
    pub app: App,
    pub admin: Principal,
    pub trigger: Trigger,
}

/// Creates app `shop` with an admin principal and a trigger `name` of `spec`, served by handler
/// function `handler` and registered by that admin.
pub async fn shop_with_trigger(store: &PgStore, name: &str, spec: TriggerSpec, handler: &str) -> Shop {
    let app = store.create_app(&AppSlug::parse("shop").unwrap()).await.unwrap();
    let admin = store.create_principal("shop-admin", false).await.unwrap();
    store.set_role(app.id, admin.id, Role::Admin).await.unwrap();
    let trigger = store
        .create_trigger(&NewTrigger {
            id: Uuid::now_v7(),
            app_id: app.id,
            name: TriggerName::parse(name).unwrap(),
            spec,
            handler: Handler::Function(HandlerName::parse(handler).unwrap()),
            retry: RetryOverrides::default(),
            enabled: true,
            registered_by: admin.id,
        })
        .await
        .unwrap();
    Shop { app, admin, trigger }
}
