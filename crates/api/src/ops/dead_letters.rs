//! Dead letters (list, count, get, replay, ignore) and the abandoned-executions log.

use picloud_core::Capability;
use picloud_store::{DeadLetterFilter, Resolution, Store, events};
use uuid::Uuid;

use super::Ops;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorCode};
use crate::extract::{Page, PageQuery};
use crate::views::{AbandonedView, CountView, DeadLetterView, Replayed};

/// Which dead letters a list shows.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterQuery {
    /// `unresolved`, or a resolution: `replayed`, `ignored`, `handled_by_script`, `handler_failed`.
    pub resolution: Option<String>,
    /// Only those of this trigger (by name).
    pub trigger: Option<String>,
}

fn resolution(value: Option<&str>) -> Result<Option<Option<Resolution>>, ApiError> {
    value
        .map(|r| match r {
            "unresolved" => Ok(None),
            other => Resolution::parse(other).map(Some).ok_or_else(|| {
                ApiError::invalid(
                    "resolution",
                    "expected unresolved, replayed, ignored, handled_by_script or handler_failed",
                )
            }),
        })
        .transpose()
}

/// A dead letter's id: a text that is not one names no dead letter.
fn dead_letter_id(raw: &str) -> Result<Uuid, ApiError> {
    raw.parse().map_err(|_| not_found(raw))
}

fn not_found(id: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::DeadLetterNotFound, format!("no dead letter {id}"))
}

impl<S: Store> Ops<S> {
    /// A page of the app's dead letters, newest first.
    pub async fn list_dead_letters(
        &self,
        caller: &Caller,
        query: DeadLetterQuery,
        page: &PageQuery,
    ) -> Result<Page<DeadLetterView>, ApiError> {
        let app = caller.require_app(Capability::AppRead)?;
        let filter = DeadLetterFilter {
            resolution: resolution(query.resolution.as_deref())?,
            trigger_name: query.trigger,
        };
        let found = self.store.list_dead_letters(app.id, &filter, page.after_id()?, page.limit()).await?;
        Ok(Page::from_store(found, |d| d.id.to_string(), DeadLetterView::from))
    }

    /// How many of the app's dead letters are unresolved (the only count there is).
    pub async fn count_dead_letters(
        &self,
        caller: &Caller,
        resolution: Option<&str>,
    ) -> Result<CountView, ApiError> {
        let app = caller.require_app(Capability::AppRead)?;
        if resolution.is_some_and(|r| r != "unresolved") {
            return Err(ApiError::invalid("resolution", "only unresolved dead letters are counted"));
        }
        Ok(CountView { count: self.store.unresolved_count(app.id).await? })
    }

    /// One dead letter, with its event.
    pub async fn dead_letter(&self, caller: &Caller, id: &str) -> Result<DeadLetterView, ApiError> {
        let app = caller.require_app(Capability::AppRead)?;
        let dead = self.store.dead_letter(app.id, dead_letter_id(id)?).await?;
        Ok(dead.ok_or_else(|| not_found(id))?.into())
    }

    /// Delivers the dead letter's event again to its trigger (attempts reset); it becomes
    /// `replayed`, once, however many replays race.
    pub async fn replay_dead_letter(&self, caller: &Caller, id: &str) -> Result<Replayed, ApiError> {
        let app = caller.require_app(Capability::AppDeadLetterManage)?;
        let id = dead_letter_id(id)?;
        // Locked until the replay commits: a concurrent replay waits, then finds it replayed.
        let mut tx = self.store.begin().await?;
        let dead = self.store.lock_dead_letter(&mut tx, app.id, id).await?.ok_or_else(|| not_found(id))?;
        if dead.resolution == Some(Resolution::Replayed) {
            return Err(ApiError::new(ErrorCode::AlreadyReplayed, "this dead letter was replayed already"));
        }
        // Everything it reads is read in this transaction: with the row locked, a second
        // connection would deadlock a pool that concurrent replays of one dead letter have filled.
        let (delivery_id, dead) = events::replay(&self.store, &mut tx, &dead, &self.triggers).await?;
        events::commit_and_wake(&self.store, tx).await?;
        Ok(Replayed { dead_letter: dead.into(), delivery_id })
    }

    /// Marks an unresolved dead letter `ignored`.
    pub async fn ignore_dead_letter(&self, caller: &Caller, id: &str) -> Result<DeadLetterView, ApiError> {
        let app = caller.require_app(Capability::AppDeadLetterManage)?;
        let id = dead_letter_id(id)?;
        let mut tx = self.store.begin().await?;
        let ignored = self.store.resolve(&mut tx, app.id, id, Resolution::Ignored, true).await?;
        self.store.commit(tx).await?;
        match ignored {
            Some(dead) => Ok(dead.into()),
            None => match self.store.dead_letter(app.id, id).await? {
                Some(_) => {
                    Err(ApiError::new(ErrorCode::AlreadyResolved, "this dead letter is resolved already"))
                }
                None => Err(not_found(id)),
            },
        }
    }

    /// A page of the sync results nobody waited for, newest first.
    pub async fn list_abandoned(
        &self,
        caller: &Caller,
        page: &PageQuery,
    ) -> Result<Page<AbandonedView>, ApiError> {
        let app = caller.require_app(Capability::AppRead)?;
        let found = self.store.list_abandoned(app.id, page.after_id()?, page.limit()).await?;
        Ok(Page::from_store(found, |a| a.id.to_string(), AbandonedView::from))
    }
}
