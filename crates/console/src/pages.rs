//! The console's pages: what each shows, read through the API's operations as the session's
//! caller, and the actions it offers only to callers whose role allows them.

use std::convert::Infallible;

use askama::Template;
use axum::extract::Path as PathParams;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use futures::{Stream, StreamExt as _};
use picloud_api::ops::dead_letters::DeadLetterQuery;
use picloud_api::ops::deliveries::DeliveryQuery;
use picloud_api::views::{
    AbandonedView, DeadLetterView, DeliveryDetailView, DeliveryView, HandlerBody, TriggerStatsView,
    TriggerView,
};
use picloud_api::{ApiError, ApiState, Caller, PageQuery, authenticate};
use picloud_core::Capability;
use serde::Deserialize;

use crate::charts::Charts;
use crate::session::Session;

/// Renders a page, or the error page when the template fails.
pub(crate) fn render(page: &impl Template, status: StatusCode) -> Response {
    match page.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "a console page did not render");
            (StatusCode::INTERNAL_SERVER_ERROR, Html("The page could not be rendered.".to_owned()))
                .into_response()
        }
    }
}

/// A refusal or a failure, as a page.
#[derive(Template)]
#[template(path = "error.html")]
pub(crate) struct ErrorPage {
    status: u16,
    message: String,
}

impl ErrorPage {
    pub(crate) fn response(status: StatusCode, message: &str) -> Response {
        render(&ErrorPage { status: status.as_u16(), message: message.to_owned() }, status)
    }

    /// The page of an API error: its status and message (which never hold database text).
    pub(crate) fn of(e: &ApiError) -> Response {
        Self::response(e.status(), e.message())
    }
}

pub(crate) fn not_found() -> Response {
    ErrorPage::response(StatusCode::NOT_FOUND, "There is no such page.")
}

/// What every signed-in page shows around its content.
#[derive(Debug)]
pub(crate) struct Layout {
    pub title: String,
    pub principal: String,
    pub form_token: String,
    /// The app the page is of, for the app's navigation.
    pub app: Option<String>,
    /// Which of the app's pages this is: `triggers`, `dead-letters` or `abandoned`.
    pub section: &'static str,
    /// The app's unresolved dead letters (its navigation's badge).
    pub dead_letters: Option<u64>,
    /// What the last action did.
    pub notice: Option<String>,
}

impl Layout {
    pub(crate) async fn new(
        state: &ApiState,
        session: &Session,
        title: String,
        section: &'static str,
    ) -> Result<Layout, ApiError> {
        let app = session.caller.require_app(Capability::AppRead).ok().map(|a| a.slug.to_string());
        let dead_letters = match app {
            Some(_) => Some(state.ops.count_dead_letters(&session.caller, None).await?.count),
            None => None,
        };
        Ok(Layout {
            title,
            principal: session.caller.principal.name.clone(),
            form_token: session.form_token.clone(),
            app,
            section,
            dead_letters,
            notice: None,
        })
    }
}

/// The page an operation's result makes, or its error's page.
fn page<T: Template>(result: Result<T, ApiError>) -> Response {
    match result {
        Ok(page) => render(&page, StatusCode::OK),
        Err(e) => ErrorPage::of(&e),
    }
}

/// Whether the session's caller may `capability` on the page's app.
fn may(caller: &Caller, capability: Capability) -> bool {
    caller.require_app(capability).is_ok()
}

/// `?notice=` of a page an action redirected to.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Notice {
    notice: Option<String>,
}

/// One app on the apps page; its counts only where the caller may read them.
#[derive(Debug)]
pub(crate) struct AppRow {
    slug: String,
    dead_letters: Option<u64>,
    backlog: Option<u64>,
}

#[derive(Template)]
#[template(path = "apps.html")]
struct AppsPage {
    layout: Layout,
    apps: Vec<AppRow>,
}

/// The apps the caller can see, each with its unresolved dead letters and backlog.
pub(crate) async fn apps(State(state): State<ApiState>, session: Session) -> Response {
    page(
        async {
            let listed =
                state.ops.list_apps(&session.caller, &PageQuery { after: None, limit: Some(500) }).await?;
            let mut apps = Vec::new();
            for app in listed.items {
                let caller = authenticate(&state, session.token(), Some(&app.slug)).await?;
                let (dead_letters, backlog) = if may(&caller, Capability::AppRead) {
                    let backlog = state.ops.app_backlog(&caller).await?;
                    (
                        Some(state.ops.count_dead_letters(&caller, None).await?.count),
                        Some(backlog.pending + backlog.scheduled),
                    )
                } else {
                    (None, None)
                };
                apps.push(AppRow { slug: app.slug, dead_letters, backlog });
            }
            Ok(AppsPage { layout: Layout::new(&state, &session, "Apps".into(), "").await?, apps })
        }
        .await,
    )
}

/// One trigger on the app overview.
#[derive(Debug)]
pub(crate) struct TriggerRow {
    name: String,
    kind: String,
    pattern: String,
    handler: String,
    enabled: bool,
    flow: String,
    pending: u64,
    in_flight: u64,
    per_minute: String,
    errors: u64,
}

/// What a trigger fires on, in a word.
fn pattern(t: &TriggerView) -> String {
    [&t.collection, &t.topic, &t.queue, &t.schedule, &t.source_trigger]
        .into_iter()
        .find_map(|p| p.clone())
        .unwrap_or_default()
}

fn handler(t: &TriggerView) -> String {
    match &t.handler {
        HandlerBody::Function(name) => name.clone(),
        HandlerBody::Webhook(hook) => hook.url.clone(),
    }
}

fn flow(t: &TriggerView) -> String {
    let mut parts = Vec::new();
    if let Some(flow) = &t.flow {
        parts.push(serde_json::to_string(flow).unwrap_or_default());
    }
    if let Some(batch) = &t.batch {
        parts.push(format!("batch {}", serde_json::to_string(batch).unwrap_or_default()));
    }
    parts.join(" ")
}

impl TriggerRow {
    fn new(t: &TriggerView, stats: &TriggerStatsView) -> TriggerRow {
        let total = &stats.total;
        let attempts = total.ok + total.retry + total.fail + total.timeout + total.no_handler;
        TriggerRow {
            name: t.name.clone(),
            kind: t.kind.clone(),
            pattern: pattern(t),
            handler: handler(t),
            enabled: t.enabled,
            flow: flow(t),
            pending: stats.backlog.pending + stats.backlog.scheduled + stats.backlog.waiting,
            in_flight: stats.backlog.in_flight,
            per_minute: format!("{:.1}", attempts as f64 / 60.0),
            errors: total.fail + total.timeout + total.no_handler,
        }
    }
}

#[derive(Template)]
#[template(path = "app.html")]
struct AppPage {
    layout: Layout,
    triggers: Vec<TriggerRow>,
    can_manage: bool,
}

/// The app overview: every trigger with its settings, backlog and last hour.
pub(crate) async fn app(
    State(state): State<ApiState>,
    session: Session,
    Query(notice): Query<Notice>,
) -> Response {
    page(
        async {
            let page = PageQuery { after: None, limit: Some(500) };
            let overview = state.ops.triggers_overview(&session.caller, &page).await?;
            let triggers = overview.iter().map(|(t, stats)| TriggerRow::new(t, stats)).collect();
            let mut layout = Layout::new(&state, &session, "Triggers".into(), "triggers").await?;
            layout.notice = notice.notice;
            Ok(AppPage { layout, triggers, can_manage: may(&session.caller, Capability::AppManageTriggers) })
        }
        .await,
    )
}

/// `?window=&state=` of the trigger page.
#[derive(Debug, Deserialize)]
pub(crate) struct WindowQuery {
    window: Option<String>,
    state: Option<String>,
    notice: Option<String>,
}

/// `?state=` of the deliveries panel: only the deliveries in that state.
#[derive(Debug, Deserialize)]
pub(crate) struct StateQuery {
    state: Option<String>,
}

/// A trigger's deliveries in the outbox, refreshed in place.
#[derive(Template)]
#[template(path = "deliveries.html")]
pub(crate) struct DeliveriesPanel {
    app: String,
    trigger: String,
    form_token: String,
    /// The state shown (empty: all).
    state: String,
    deliveries: Vec<DeliveryView>,
    can_cancel: bool,
}

impl DeliveriesPanel {
    async fn read(
        state: &ApiState,
        session: &Session,
        app: &str,
        trigger: &str,
        in_state: Option<String>,
    ) -> Result<Self, ApiError> {
        let in_state = in_state.filter(|s| !s.is_empty());
        let query = DeliveryQuery { trigger: Some(trigger.to_owned()), state: in_state.clone() };
        let found = state
            .ops
            .list_deliveries(&session.caller, query, &PageQuery { after: None, limit: Some(100) })
            .await?;
        Ok(DeliveriesPanel {
            app: app.to_owned(),
            trigger: trigger.to_owned(),
            form_token: session.form_token.clone(),
            state: in_state.unwrap_or_default(),
            deliveries: found.items,
            can_cancel: may(&session.caller, Capability::AppDeadLetterManage),
        })
    }
}

#[derive(Template)]
#[template(path = "trigger.html")]
struct TriggerPage {
    layout: Layout,
    trigger: TriggerRow,
    window: String,
    charts: Charts,
    deliveries: DeliveriesPanel,
    failures: Vec<DeadLetterView>,
}

/// A trigger: its charts, its deliveries, its recent failures and a live tail.
pub(crate) async fn trigger(
    State(state): State<ApiState>,
    session: Session,
    PathParams((app, name)): PathParams<(String, String)>,
    Query(q): Query<WindowQuery>,
) -> Response {
    page(
        async {
            let trigger = state.ops.trigger(&session.caller, &name).await?;
            let stats = state.ops.trigger_stats(&session.caller, &name, q.window.as_deref()).await?;
            let deliveries = DeliveriesPanel::read(&state, &session, &app, &name, q.state).await?;
            let query = DeadLetterQuery { trigger: Some(name.clone()), ..DeadLetterQuery::default() };
            let failures = state
                .ops
                .list_dead_letters(&session.caller, query, &PageQuery { after: None, limit: Some(10) })
                .await?;
            let mut layout = Layout::new(&state, &session, format!("Trigger {name}"), "triggers").await?;
            layout.notice = q.notice;
            Ok(TriggerPage {
                layout,
                trigger: TriggerRow::new(&trigger, &stats),
                window: stats.window.clone(),
                charts: Charts::new(&stats),
                deliveries,
                failures: failures.items,
            })
        }
        .await,
    )
}

/// The deliveries panel alone (htmx refreshes it).
pub(crate) async fn trigger_deliveries(
    State(state): State<ApiState>,
    session: Session,
    PathParams((app, name)): PathParams<(String, String)>,
    Query(q): Query<StateQuery>,
) -> Response {
    page(DeliveriesPanel::read(&state, &session, &app, &name, q.state).await)
}

/// The trigger's live tail, for the page's script (the API's tail, with the session's caller).
pub(crate) async fn tail(
    State(state): State<ApiState>,
    session: Session,
    PathParams((_, name)): PathParams<(String, String)>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Response> {
    let opened = async {
        let filter = state.ops.tail_filter(&session.caller, Some(name), None).await?;
        state.open_tail(session.token(), filter).await
    };
    match opened.await {
        Ok(events) => Ok(Sse::new(events.map(Ok)).keep_alive(KeepAlive::default())),
        Err(e) => Err(ErrorPage::of(&e)),
    }
}

/// The dead-letter filter of the list and of its bulk actions.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Filter {
    #[serde(default)]
    pub resolution: String,
    #[serde(default)]
    pub trigger: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub created_after: String,
    #[serde(default)]
    pub created_before: String,
}

/// An empty field is no filter.
fn given(field: &str) -> Option<String> {
    Some(field.trim().to_owned()).filter(|f| !f.is_empty())
}

impl Filter {
    /// The list's query.
    pub(crate) fn query(&self) -> DeadLetterQuery {
        DeadLetterQuery {
            resolution: Some(given(&self.resolution).unwrap_or_else(|| "unresolved".to_owned())),
            trigger: given(&self.trigger),
            reason: given(&self.reason),
            created_after: given(&self.created_after),
            created_before: given(&self.created_before),
        }
    }

    /// The bulk action's body.
    pub(crate) fn bulk(&self, dry_run: bool) -> picloud_api::views::BulkDeadLetters {
        let q = self.query();
        picloud_api::views::BulkDeadLetters {
            resolution: q.resolution,
            trigger: q.trigger,
            reason: q.reason,
            created_after: q.created_after,
            created_before: q.created_before,
            dry_run,
        }
    }

    /// Its query string, to come back to the same list.
    pub(crate) fn query_string(&self) -> String {
        let pairs = [
            ("resolution", &self.resolution),
            ("trigger", &self.trigger),
            ("reason", &self.reason),
            ("created_after", &self.created_after),
            ("created_before", &self.created_before),
        ];
        let given: Vec<String> =
            pairs.iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| format!("{k}={}", encode(v))).collect();
        given.join("&")
    }
}

/// Percent-encodes a query value.
pub(crate) fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `?…` of the dead-letter list: its filter, its page and the last action's notice.
#[derive(Debug, Deserialize)]
pub(crate) struct DeadLettersQuery {
    #[serde(flatten)]
    filter: Filter,
    after: Option<String>,
    notice: Option<String>,
}

#[derive(Template)]
#[template(path = "dead_letters.html")]
struct DeadLettersPage {
    layout: Layout,
    filter: Filter,
    back: String,
    items: Vec<DeadLetterView>,
    next: Option<String>,
    triggers: Vec<String>,
    can_manage: bool,
}

/// The app's dead letters, filtered, with single and bulk actions.
pub(crate) async fn dead_letters(
    State(state): State<ApiState>,
    session: Session,
    Query(q): Query<DeadLettersQuery>,
) -> Response {
    page(
        async {
            let page = PageQuery { after: q.after.clone(), limit: Some(50) };
            let found = state.ops.list_dead_letters(&session.caller, q.filter.query(), &page).await?;
            let triggers = state
                .ops
                .list_triggers(&session.caller, &PageQuery { after: None, limit: Some(500) })
                .await?;
            let mut layout = Layout::new(&state, &session, "Dead letters".into(), "dead-letters").await?;
            layout.notice = q.notice;
            Ok(DeadLettersPage {
                layout,
                back: q.filter.query_string(),
                filter: q.filter,
                items: found.items,
                next: found.next,
                triggers: triggers.items.into_iter().map(|t| t.name).collect(),
                can_manage: may(&session.caller, Capability::AppDeadLetterManage),
            })
        }
        .await,
    )
}

#[derive(Template)]
#[template(path = "dead_letter.html")]
struct DeadLetterPage {
    layout: Layout,
    dead: DeadLetterView,
    payload: String,
    can_manage: bool,
}

/// One dead letter: its event, last error and attempts, and its actions.
pub(crate) async fn dead_letter(
    State(state): State<ApiState>,
    session: Session,
    PathParams((_, id)): PathParams<(String, String)>,
    Query(notice): Query<Notice>,
) -> Response {
    page(
        async {
            let dead = state.ops.dead_letter(&session.caller, &id).await?;
            let mut layout = Layout::new(&state, &session, "Dead letter".into(), "dead-letters").await?;
            layout.notice = notice.notice;
            Ok(DeadLetterPage {
                layout,
                payload: serde_json::to_string_pretty(&dead.event).unwrap_or_default(),
                dead,
                can_manage: may(&session.caller, Capability::AppDeadLetterManage),
            })
        }
        .await,
    )
}

#[derive(Template)]
#[template(path = "abandoned.html")]
struct AbandonedPage {
    layout: Layout,
    items: Vec<AbandonedView>,
}

/// The sync results nobody waited for.
pub(crate) async fn abandoned(State(state): State<ApiState>, session: Session) -> Response {
    page(
        async {
            let found = state
                .ops
                .list_abandoned(&session.caller, &PageQuery { after: None, limit: Some(100) })
                .await?;
            Ok(AbandonedPage {
                layout: Layout::new(&state, &session, "Abandoned executions".into(), "abandoned").await?,
                items: found.items,
            })
        }
        .await,
    )
}

#[derive(Template)]
#[template(path = "delivery.html")]
struct DeliveryPage {
    layout: Layout,
    delivery: DeliveryDetailView,
    envelope: String,
    can_cancel: bool,
}

/// One delivery: its envelope and its attempts so far.
pub(crate) async fn delivery(
    State(state): State<ApiState>,
    session: Session,
    PathParams((_, id)): PathParams<(String, String)>,
) -> Response {
    page(
        async {
            let delivery = state.ops.delivery(&session.caller, &id).await?;
            Ok(DeliveryPage {
                layout: Layout::new(&state, &session, "Delivery".into(), "triggers").await?,
                envelope: serde_json::to_string_pretty(&delivery.event).unwrap_or_default(),
                delivery,
                can_cancel: may(&session.caller, Capability::AppDeadLetterManage),
            })
        }
        .await,
    )
}
