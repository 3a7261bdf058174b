//! A trigger's statistics (DESIGN §15): its attempts over a window, bucket by bucket, and where
//! its deliveries (or its app's) are now.

use picloud_core::{Capability, StatsWindow, TriggerId};
use picloud_store::{AttemptStats, Store, TriggerBacklog};
use time::OffsetDateTime;

use super::Ops;
use super::triggers::not_found;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::PageQuery;
use crate::views::{AttemptsView, BacklogView, StatsBucketView, TriggerStatsView, TriggerView};

/// The window a query names; `1h` when it names none.
pub fn window(name: Option<&str>) -> Result<StatsWindow, ApiError> {
    match name {
        None => Ok(StatsWindow::Hour),
        Some(name) => {
            StatsWindow::parse(name).ok_or_else(|| ApiError::invalid("window", "expected 1h, 24h or 7d"))
        }
    }
}

/// The start of the first of `window`'s buckets that end after `now`, the current one last: its
/// buckets are aligned to its step from the Unix epoch.
pub fn window_start(window: StatsWindow, now: OffsetDateTime) -> OffsetDateTime {
    let step = window.step().as_secs() as i64;
    let current = now.unix_timestamp().div_euclid(step) * step;
    let first = current - (i64::from(window.buckets()) - 1) * step;
    OffsetDateTime::from_unix_timestamp(first).expect("a time within range")
}

impl<S: Store> Ops<S> {
    /// Where the deliveries of the caller's app are now, all triggers' and its emails.
    pub async fn app_backlog(&self, caller: &Caller) -> Result<BacklogView, ApiError> {
        let app = caller.require_app(Capability::AppRead)?;
        let mut backlog = TriggerBacklog::default();
        for (_, of_trigger) in self.store.backlogs(app.id).await? {
            backlog.add(&of_trigger);
        }
        Ok(BacklogView::at(backlog, self.store.clock().now()))
    }

    /// The trigger's attempts in `window`'s buckets and its backlog now.
    pub async fn trigger_stats(
        &self,
        caller: &Caller,
        name: &str,
        window_name: Option<&str>,
    ) -> Result<TriggerStatsView, ApiError> {
        let app = caller.require_app(Capability::AppRead)?;
        let window = window(window_name)?;
        let trigger = self.store.trigger(app.id, name).await?.ok_or_else(|| not_found(name))?;
        let backlogs = self.store.backlogs(app.id).await?;
        self.stats_of(trigger.id, window, backlog_of(&backlogs, trigger.id)).await
    }

    /// A page of the app's triggers, each with its last hour's statistics and its backlog: the
    /// app's outbox is read once for all of them.
    pub async fn triggers_overview(
        &self,
        caller: &Caller,
        page: &PageQuery,
    ) -> Result<Vec<(TriggerView, TriggerStatsView)>, ApiError> {
        let app = caller.require_app(Capability::AppRead)?;
        let triggers = self.list_triggers(caller, page).await?;
        let backlogs = self.store.backlogs(app.id).await?;
        let mut overview = Vec::with_capacity(triggers.items.len());
        for trigger in triggers.items {
            let id = TriggerId::from_uuid(trigger.id);
            let stats = self.stats_of(id, StatsWindow::Hour, backlog_of(&backlogs, id)).await?;
            overview.push((trigger, stats));
        }
        Ok(overview)
    }

    async fn stats_of(
        &self,
        trigger_id: TriggerId,
        window: StatsWindow,
        backlog: TriggerBacklog,
    ) -> Result<TriggerStatsView, ApiError> {
        let now = self.store.clock().now();
        let since = window_start(window, now);
        let found = self.store.attempt_stats(trigger_id, since, window.step()).await?;
        let mut total = AttemptStats::new(trigger_id);
        let buckets = (0..window.buckets())
            .map(|i| {
                let start = since + window.step() * i;
                let attempts = found.iter().find(|b| b.start == start).map(|b| &b.attempts);
                let attempts = attempts.cloned().unwrap_or_else(|| AttemptStats::new(trigger_id));
                total.merge(&attempts);
                StatsBucketView {
                    start: crate::views::rfc3339(start),
                    attempts: AttemptsView::from(&attempts),
                }
            })
            .collect();
        Ok(TriggerStatsView {
            window: window.as_str().to_owned(),
            bucket_seconds: window.step().as_secs(),
            buckets,
            total: AttemptsView::from(&total),
            backlog: BacklogView::at(backlog, now),
        })
    }
}

/// The backlog of `trigger_id` among an app's.
fn backlog_of(backlogs: &[(Option<TriggerId>, TriggerBacklog)], trigger_id: TriggerId) -> TriggerBacklog {
    backlogs.iter().find(|(id, _)| *id == Some(trigger_id)).map(|(_, b)| *b).unwrap_or_default()
}
