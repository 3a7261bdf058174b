//! The console's actions: each a form post, checked for the session's form token first, then
//! done through the API's operations as the session's caller (which check the capability again,
//! whatever the page showed), then redirected to the page it came from with what it did.

use askama::Template;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Redirect, Response};
use picloud_api::ops::dead_letters::BulkAction;
use picloud_api::views::PatchTrigger;
use picloud_api::{ApiError, ApiState};
use serde::Deserialize;

use crate::pages::{ErrorPage, Filter, Layout, encode, render};
use crate::session::{Posted, Session};

/// A form with nothing but its form token.
#[derive(Debug, Deserialize)]
pub(crate) struct Plain {
    #[serde(default)]
    csrf: String,
}

/// Where an action goes back to, with its notice.
fn back(to: &str, notice: &str) -> Response {
    let joiner = if to.contains('?') { '&' } else { '?' };
    axum::response::IntoResponse::into_response(Redirect::to(&format!(
        "{to}{joiner}notice={}",
        encode(notice)
    )))
}

/// Checks the form token, then runs `act`: its notice on the page `to`, or its error's page.
async fn act(
    state: &ApiState,
    session: &Session,
    csrf: &str,
    to: &str,
    act: impl Future<Output = Result<String, ApiError>>,
) -> Response {
    if let Some(refused) = session.refuse_form(state, csrf) {
        return refused;
    }
    match act.await {
        Ok(notice) => back(to, &notice),
        Err(e) => ErrorPage::of(&e),
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct EnabledForm {
    #[serde(default)]
    csrf: String,
    enabled: bool,
}

/// Enables or disables a trigger.
pub(crate) async fn set_enabled(
    State(state): State<ApiState>,
    session: Session,
    Path((app, name)): Path<(String, String)>,
    Posted(form): Posted<EnabledForm>,
) -> Response {
    let patch =
        PatchTrigger { enabled: Some(form.enabled), handler: None, retry: None, flow: None, batch: None };
    act(&state, &session, &form.csrf, &format!("/console/apps/{app}"), async {
        state.ops.patch_trigger(&session.caller, &name, patch).await?;
        Ok(format!("Trigger {name} {}.", if form.enabled { "enabled" } else { "disabled" }))
    })
    .await
}

/// Deletes a trigger.
pub(crate) async fn delete_trigger(
    State(state): State<ApiState>,
    session: Session,
    Path((app, name)): Path<(String, String)>,
    Posted(form): Posted<Plain>,
) -> Response {
    act(&state, &session, &form.csrf, &format!("/console/apps/{app}"), async {
        state.ops.delete_trigger(&session.caller, &name).await?;
        Ok(format!("Trigger {name} deleted."))
    })
    .await
}

/// Replays one dead letter.
pub(crate) async fn replay(
    State(state): State<ApiState>,
    session: Session,
    Path((app, id)): Path<(String, String)>,
    Posted(form): Posted<Plain>,
) -> Response {
    act(&state, &session, &form.csrf, &format!("/console/apps/{app}/dead-letters/{id}"), async {
        let replayed = state.ops.replay_dead_letter(&session.caller, &id).await?;
        Ok(format!("Replayed as delivery {}.", replayed.delivery_id))
    })
    .await
}

/// Ignores one dead letter.
pub(crate) async fn ignore(
    State(state): State<ApiState>,
    session: Session,
    Path((app, id)): Path<(String, String)>,
    Posted(form): Posted<Plain>,
) -> Response {
    act(&state, &session, &form.csrf, &format!("/console/apps/{app}/dead-letters/{id}"), async {
        state.ops.ignore_dead_letter(&session.caller, &id).await?;
        Ok("Ignored.".to_owned())
    })
    .await
}

/// Cancels a delivery (telling its handler when an attempt runs).
pub(crate) async fn cancel(
    State(state): State<ApiState>,
    session: Session,
    Path((app, id)): Path<(String, String)>,
    Posted(form): Posted<Plain>,
) -> Response {
    if let Some(refused) = session.refuse_form(&state, &form.csrf) {
        return refused;
    }
    let mut to = format!("/console/apps/{app}");
    if let Ok(delivery) = state.ops.delivery(&session.caller, &id).await
        && let Some(trigger) = delivery.delivery.trigger
    {
        to = format!("/console/apps/{app}/triggers/{trigger}");
    }
    act(&state, &session, &form.csrf, &to, async {
        let dead = state.cancel_delivery(&session.caller, &id).await?;
        Ok(format!("Delivery {} cancelled.", dead.delivery_id))
    })
    .await
}

#[derive(Debug, Deserialize)]
pub(crate) struct BulkForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    confirm: bool,
    #[serde(flatten)]
    filter: Filter,
}

#[derive(Template)]
#[template(path = "bulk.html")]
struct BulkPage {
    layout: Layout,
    action: String,
    count: u64,
    filter: Filter,
    back: String,
}

/// A bulk replay or ignore of the filtered dead letters: first the dry run's count and a form to
/// confirm it, then (confirmed) the action.
pub(crate) async fn bulk(
    State(state): State<ApiState>,
    session: Session,
    Path(app): Path<String>,
    Posted(form): Posted<BulkForm>,
) -> Response {
    if let Some(refused) = session.refuse_form(&state, &form.csrf) {
        return refused;
    }
    let action = match form.action.as_str() {
        "replay" => BulkAction::Replay,
        "ignore" => BulkAction::Ignore,
        _ => {
            return ErrorPage::response(
                StatusCode::UNPROCESSABLE_ENTITY,
                "The action must be replay or ignore.",
            );
        }
    };
    let list = format!("/console/apps/{app}/dead-letters?{}", form.filter.query_string());
    if form.confirm {
        return act(&state, &session, &form.csrf, &list, async {
            let done = state.ops.bulk_dead_letters(&session.caller, action, &form.filter.bulk(false)).await?;
            let verb = if action == BulkAction::Replay { "Replayed" } else { "Ignored" };
            Ok(format!("{verb} {} dead letters.", done.count))
        })
        .await;
    }
    let counted = async {
        let count =
            state.ops.bulk_dead_letters(&session.caller, action, &form.filter.bulk(true)).await?.count;
        let layout = Layout::new(&state, &session, "Confirm".into(), "dead-letters").await?;
        Ok::<_, ApiError>(BulkPage {
            layout,
            action: form.action.clone(),
            count,
            back: list.clone(),
            filter: form.filter,
        })
    };
    match counted.await {
        Ok(page) => render(&page, StatusCode::OK),
        Err(e) => ErrorPage::of(&e),
    }
}
