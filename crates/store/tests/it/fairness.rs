//! Fairness between apps (DESIGN §13), against both stores: a claim shares its rows among the
//! apps with due rows, takes no more of an app than its room in the relay's share, walks a
//! bounded number of apps and goes on where it stopped.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use picloud_core::flow::Flow;
use picloud_core::{AppId, CollectionPattern, TopicName, TriggerConfig};
use picloud_store::events::{self, EventContext};
use picloud_store::*;
use uuid::Uuid;

use crate::support::*;

conformance!(
    a_claim_shares_its_rows_among_the_apps_with_due_rows_oldest_first_within_each,
    an_app_that_holds_its_share_gets_nothing_and_one_near_it_gets_its_room,
    apps_with_only_later_rows_take_no_part_of_a_claim,
    a_claim_walks_a_bounded_number_of_apps_and_the_next_goes_on_where_it_stopped,
    a_claim_smaller_than_the_apps_due_leaves_the_next_apps_their_turn_first,
    the_claim_of_limited_rows_keeps_each_app_within_its_room,
);

/// `count` due rows of `t`'s trigger, each one millisecond after the last.
async fn backlog<S: Store>(s: &S, t: &Tenant, trigger: &Trigger, count: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for _ in 0..count {
        let row = delivery(t, trigger, Duration::ZERO);
        ids.push(row.id);
        insert(s, &[row]).await;
        s.clock().advance(Duration::from_millis(1));
    }
    ids
}

fn per_app(rows: &[ClaimedDelivery]) -> HashMap<AppId, usize> {
    let mut counts = HashMap::new();
    for row in rows {
        *counts.entry(row.app_id).or_default() += 1;
    }
    counts
}

fn walk<'a>(from: Option<AppId>, share: u32, held: &'a [(AppId, u32)]) -> Walk<'a> {
    Walk { from, share: AppShare { per_app: share, held } }
}

async fn a_claim_shares_its_rows_among_the_apps_with_due_rows_oldest_first_within_each<S: Store>(s: S) {
    let (a, a_trigger) = tenant_with_trigger(&s, "backlog").await;
    let (b, b_trigger) = tenant_with_trigger(&s, "quiet").await;
    let a_rows = backlog(&s, &a, &a_trigger, 30).await;
    let b_rows = backlog(&s, &b, &b_trigger, 3).await;

    let claimed = s.claim_shared(10, LEASE, "n", walk(None, u32::MAX, &[])).await.unwrap();
    let ids: Vec<Uuid> = claimed.claim.rows.iter().map(|r| r.id).collect();
    assert!(b_rows.iter().all(|id| ids.contains(id)), "the newer app's rows are not left behind the backlog");
    let a_ids: HashSet<Uuid> =
        claimed.claim.rows.iter().filter(|r| r.app_id == a.app.id).map(|r| r.id).collect();
    assert_eq!(
        a_ids,
        a_rows[..5].iter().copied().collect(),
        "each app gives its oldest rows first, half of the claim each"
    );
    assert!(claimed.more, "the backlog gave all its part: more is due");

    let rest = s.claim_shared(100, LEASE, "n", walk(None, u32::MAX, &[])).await.unwrap();
    assert_eq!(
        per_app(&rest.claim.rows),
        HashMap::from([(a.app.id, 25)]),
        "one app left: it takes the claim"
    );
    assert!(!rest.more, "everything due was claimed");
}

async fn an_app_that_holds_its_share_gets_nothing_and_one_near_it_gets_its_room<S: Store>(s: S) {
    let (a, a_trigger) = tenant_with_trigger(&s, "backlog").await;
    let (b, b_trigger) = tenant_with_trigger(&s, "quiet").await;
    backlog(&s, &a, &a_trigger, 20).await;
    backlog(&s, &b, &b_trigger, 20).await;

    let held = [(a.app.id, 8), (b.app.id, 5)];
    let claimed = s.claim_shared(100, LEASE, "n", walk(None, 8, &held)).await.unwrap();
    assert_eq!(per_app(&claimed.claim.rows), HashMap::from([(b.app.id, 3)]));
    assert!(claimed.more, "b gave all its room; a has rows left");

    let unbounded = s.claim_due(100, LEASE, "n").await.unwrap();
    assert_eq!(per_app(&unbounded.rows), HashMap::from([(a.app.id, 20), (b.app.id, 17)]));
}

async fn apps_with_only_later_rows_take_no_part_of_a_claim<S: Store>(s: S) {
    let (a, a_trigger) = tenant_with_trigger(&s, "now").await;
    for slug in ["later-1", "later-2", "later-3"] {
        let (t, trigger) = tenant_with_trigger(&s, slug).await;
        insert(&s, &[delivery(&t, &trigger, Duration::from_secs(10))]).await;
    }
    backlog(&s, &a, &a_trigger, 10).await;

    let claimed = s.claim_shared(8, LEASE, "n", walk(None, u32::MAX, &[])).await.unwrap();
    assert_eq!(per_app(&claimed.claim.rows), HashMap::from([(a.app.id, 8)]), "the only due app takes it all");
    s.clock().advance(Duration::from_secs(10));
    let later = s.claim_shared(100, LEASE, "n", walk(None, u32::MAX, &[])).await.unwrap();
    assert_eq!(later.claim.rows.len(), 5, "a's 2 left and the later rows, now due");
}

async fn a_claim_walks_a_bounded_number_of_apps_and_the_next_goes_on_where_it_stopped<S: Store>(s: S) {
    let apps = APPS_PER_CLAIM as usize + 2;
    let mut all = Vec::new();
    for n in 0..apps {
        let (t, trigger) = tenant_with_trigger(&s, &format!("app-{n}")).await;
        insert(&s, &[delivery(&t, &trigger, Duration::ZERO)]).await;
        all.push(t.app.id);
    }
    all.sort();

    let first = s.claim_shared(1000, LEASE, "n", walk(None, u32::MAX, &[])).await.unwrap();
    let mut visited: Vec<AppId> = first.claim.rows.iter().map(|r| r.app_id).collect();
    visited.sort();
    assert_eq!(visited, all[..APPS_PER_CLAIM as usize], "the lowest ids first, so many at most");
    let resume_at = first.resume_at.expect("the walk stopped before the last app");
    assert!(!first.more, "each app visited gave all it had");

    let second = s.claim_shared(1000, LEASE, "n", walk(Some(resume_at), u32::MAX, &[])).await.unwrap();
    let mut rest: Vec<AppId> = second.claim.rows.iter().map(|r| r.app_id).collect();
    rest.sort();
    assert_eq!(rest, all[APPS_PER_CLAIM as usize..], "the next walk starts past the last app visited");
    assert_eq!(second.resume_at, None, "it visited the last app: the next walk starts over");
    assert!(!second.more);

    let again = s.claim_shared(1000, LEASE, "n", walk(None, u32::MAX, &[])).await.unwrap();
    assert!(again.claim.rows.is_empty() && !again.more, "every row is in flight");
}

async fn a_claim_smaller_than_the_apps_due_leaves_the_next_apps_their_turn_first<S: Store>(s: S) {
    let mut apps = Vec::new();
    for slug in ["one", "two", "three"] {
        let (t, trigger) = tenant_with_trigger(&s, slug).await;
        backlog(&s, &t, &trigger, 4).await;
        apps.push(t.app.id);
    }
    apps.sort();

    let mut from = None;
    let mut turns = Vec::new();
    for _ in 0..3 {
        let claimed = s.claim_shared(2, LEASE, "n", walk(from, u32::MAX, &[])).await.unwrap();
        assert_eq!(claimed.claim.rows.len(), 2);
        assert!(claimed.more);
        let mut took: Vec<AppId> = claimed.claim.rows.iter().map(|r| r.app_id).collect();
        took.sort();
        turns.push(took);
        from = claimed.resume_at;
    }
    assert_eq!(turns[0], [apps[0], apps[1]], "one row each of the first apps, as many as the claim takes");
    assert_eq!(turns[1], [apps[2], apps[2]], "the next claim starts with the app left without a turn");
    assert_eq!(turns[2], [apps[0], apps[1]], "then the walk starts over");
}

async fn the_claim_of_limited_rows_keeps_each_app_within_its_room<S: Store>(s: S) {
    let t = tenant(&s, "limited").await;
    let flow = Some(Flow { concurrency: Some(100), ..Flow::default() });
    for name in ["one", "two"] {
        let mut new =
            new_trigger(&t, name, TriggerSpec::Pubsub { topic: CollectionPattern::parse("t").unwrap() });
        new.flow = flow;
        s.create_trigger(&new).await.unwrap();
    }
    let config = TriggerConfig::default();
    let cx = EventContext { app_id: t.app.id, app_slug: &t.app.slug, depth: 0, config: &config };
    let mut tx = s.begin().await.unwrap();
    for n in 0..10 {
        let message = json(&format!(r#"{{"n":{n}}}"#));
        events::publish(&s, &mut tx, &cx, &TopicName::parse("t").unwrap(), &message, None).await.unwrap();
    }
    s.commit(tx).await.unwrap();

    let held = [(t.app.id, 2)];
    let share = AppShare { per_app: 5, held: &held };
    let holder = Holder { id: Uuid::now_v7(), node: "n", busy: &[], share };
    let claimed = s.claim_limited(100, LEASE, holder).await.unwrap().claim.rows;
    assert_eq!(claimed.len(), 3, "two triggers of one app share the app's room of 3");
    let triggers: Vec<_> = claimed.iter().filter_map(|r| r.trigger_id).collect();
    assert!(triggers.windows(2).any(|w| w[0] != w[1]), "the triggers took turns within it");
}
