//! Dead letters (list, count, get, replay, ignore, and both in bulk) and the
//! abandoned-executions log.

use picloud_core::{Capability, TriggerName};
use picloud_store::{DeadLetterFilter, DeadLetterReason, Resolution, Store, events};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use super::Ops;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorCode};
use crate::extract::{Page, PageQuery};
use crate::views::{AbandonedView, BulkDeadLetters, CountView, DeadLetterView, Replayed};

/// Dead letters a bulk action takes per transaction: a million of them never hold one
/// transaction, nor their row locks, for long.
pub const BULK_BATCH: u32 = 500;

/// What a bulk action does to each dead letter it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BulkAction {
    /// Deliver it again, as [`Ops::replay_dead_letter`] does.
    Replay,
    /// Mark it `ignored`, as [`Ops::ignore_dead_letter`] does.
    Ignore,
}

/// Which dead letters a list shows.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterQuery {
    /// `unresolved`, or a resolution: `replayed`, `ignored`, `handled_by_script`, `handler_failed`.
    pub resolution: Option<String>,
    /// Only those of this trigger (by name).
    pub trigger: Option<String>,
    /// Only those that died for this reason.
    pub reason: Option<String>,
    /// Only those created after this time (RFC 3339).
    pub created_after: Option<String>,
    /// Only those created before this time (RFC 3339).
    pub created_before: Option<String>,
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

/// The dead letters a bulk action takes. A replay never takes a replayed dead letter, nor one it
/// cannot deliver (its trigger was deleted); an ignore takes only unresolved ones.
fn bulk_filter(action: BulkAction, body: &BulkDeadLetters) -> Result<DeadLetterFilter, ApiError> {
    let resolution = resolution(body.resolution.as_deref())?.unwrap_or(None);
    match (action, resolution) {
        (BulkAction::Replay, Some(Resolution::Replayed)) => {
            return Err(ApiError::invalid(
                "resolution",
                "a dead letter is replayed once: expected unresolved, ignored, handled_by_script or handler_failed",
            ));
        }
        (BulkAction::Ignore, Some(_)) => {
            return Err(ApiError::invalid("resolution", "only unresolved dead letters can be ignored"));
        }
        _ => {}
    }
    // A bulk action's trigger is a trigger name (a list's is any text, and matches nothing else).
    if let Some(name) = &body.trigger {
        TriggerName::parse(name.as_str()).map_err(|e| ApiError::invalid("trigger", e))?;
    }
    let query = DeadLetterQuery {
        resolution: None,
        trigger: body.trigger.clone(),
        reason: body.reason.clone(),
        created_after: body.created_after.clone(),
        created_before: body.created_before.clone(),
    };
    Ok(DeadLetterFilter {
        resolution: Some(resolution),
        replayable: action == BulkAction::Replay,
        ..narrowed(&query)?
    })
}

/// The filter of `query`'s trigger, reason and times (its resolution is the caller's to read).
fn narrowed(query: &DeadLetterQuery) -> Result<DeadLetterFilter, ApiError> {
    let reason = query
        .reason
        .as_deref()
        .map(|r| {
            DeadLetterReason::parse(r).ok_or_else(|| {
                ApiError::invalid(
                    "reason",
                    "expected exhausted, rejected, max_depth, unauthorized or cancelled",
                )
            })
        })
        .transpose()?;
    let created_after = time("created_after", query.created_after.as_deref())?;
    let created_before = time("created_before", query.created_before.as_deref())?;
    if let (Some(after), Some(before)) = (created_after, created_before)
        && before <= after
    {
        return Err(ApiError::invalid("created_before", "must be later than created_after"));
    }
    Ok(DeadLetterFilter {
        resolution: None,
        trigger_name: query.trigger.clone(),
        reason,
        created_after,
        created_before,
        replayable: false,
    })
}

/// An RFC 3339 time of the field named `field`.
fn time(field: &str, value: Option<&str>) -> Result<Option<OffsetDateTime>, ApiError> {
    value
        .map(|t| {
            OffsetDateTime::parse(t, &Rfc3339).map_err(|_| {
                ApiError::invalid(field, "expected an RFC 3339 time, such as 2026-01-31T12:00:00Z")
            })
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
        let filter =
            DeadLetterFilter { resolution: resolution(query.resolution.as_deref())?, ..narrowed(&query)? };
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

    /// Replays or ignores every dead letter of the app the body's filter takes (unresolved ones
    /// by default), each once however many bulk actions and single replays race for it, in
    /// transactions of [`BULK_BATCH`] dead letters; answers how many this call acted on. A batch
    /// commits before the next begins: a call that ends early keeps the batches it finished,
    /// and calling again acts on the rest. With `dry_run`, it counts them and changes nothing.
    pub async fn bulk_dead_letters(
        &self,
        caller: &Caller,
        action: BulkAction,
        body: &BulkDeadLetters,
    ) -> Result<CountView, ApiError> {
        let app = caller.require_app(Capability::AppDeadLetterManage)?;
        let filter = bulk_filter(action, body)?;
        if body.dry_run {
            return Ok(CountView { count: self.store.count_dead_letters(app.id, &filter).await? });
        }
        let (mut count, mut after) = (0, None);
        loop {
            let mut tx = self.store.begin().await?;
            let batch = self.store.lock_dead_letters(&mut tx, app.id, &filter, after, BULK_BATCH).await?;
            for &id in &batch {
                match action {
                    BulkAction::Replay => {
                        let dead = self.store.lock_dead_letter(&mut tx, app.id, id).await?;
                        events::replay(
                            &self.store,
                            &mut tx,
                            &dead.ok_or_else(|| not_found(id))?,
                            &self.triggers,
                        )
                        .await?;
                        count += 1;
                    }
                    BulkAction::Ignore => {
                        let ignored =
                            self.store.resolve(&mut tx, app.id, id, Resolution::Ignored, true).await?;
                        count += u64::from(ignored.is_some());
                    }
                }
            }
            // Replays are due now, and so is the next delivery of a lane a resolved dead letter held.
            events::commit_and_wake(&self.store, tx).await?;
            match batch.last() {
                Some(&last) if batch.len() == BULK_BATCH as usize => after = Some(last),
                _ => return Ok(CountView { count }),
            }
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
