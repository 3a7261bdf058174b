//! What a worker saw of its deliveries, kept when asked ([`crate::Worker::record`]): how many
//! each handler had in flight at once, and in which order each ordering key's deliveries came.
//! For tests and diagnostics: it keeps every delivery until dropped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use uuid::Uuid;

/// One delivery a handler was handed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handed {
    /// The handler.
    pub handler: String,
    /// The delivery id.
    pub id: Uuid,
    /// The attempt.
    pub attempt: u32,
    /// Its ordering key, if it has one.
    pub ordering_key: Option<String>,
    /// When it was handed to the handler, in unix milliseconds.
    pub started_ms: i64,
    /// When it ended for the router, in unix milliseconds: the handler's answer, or the
    /// delivery's deadline if that came first (the router no longer counts it in flight then,
    /// whatever the handler does). `None` until the handler answers, even past the deadline
    /// ([`Record::in_flight`] and [`Record::peak_in_flight`] count it out at the deadline).
    pub ended_ms: Option<i64>,
    /// The delivery's deadline, in unix milliseconds.
    pub deadline_ms: i64,
}

impl Handed {
    /// When it ended for the router as of `now_ms`: its end, or its deadline once passed.
    fn end_as_of(&self, now_ms: i64) -> Option<i64> {
        self.ended_ms.or((self.deadline_ms <= now_ms).then_some(self.deadline_ms))
    }
}

/// The deliveries a worker was handed, in the order it was handed them; clones share it.
#[derive(Debug, Clone, Default)]
pub struct Record {
    handed: Arc<Mutex<Vec<Handed>>>,
}

impl Record {
    /// An empty record.
    pub fn new() -> Record {
        Record::default()
    }

    /// Every delivery handed so far, in the order handed.
    pub fn handed(&self) -> Vec<Handed> {
        self.handed.lock().expect("record lock").clone()
    }

    /// How many deliveries of `handler` were in flight at once at most, as the router counts
    /// them: from being handed until the answer or the deadline, whichever came first. In one
    /// millisecond ends count before starts.
    pub fn peak_in_flight(&self, handler: &str) -> usize {
        let now = now_ms();
        let handed = self.handed.lock().expect("record lock");
        let mut edges: Vec<(i64, i32)> = handed
            .iter()
            .filter(|h| h.handler == handler)
            .flat_map(|h| [(h.started_ms, 1), (h.end_as_of(now).unwrap_or(i64::MAX), -1)])
            .collect();
        edges.sort_unstable();
        let (mut in_flight, mut peak) = (0i32, 0i32);
        for (_, step) in edges {
            in_flight += step;
            peak = peak.max(in_flight);
        }
        peak as usize
    }

    /// Deliveries of `handler` in flight now, as the router counts them.
    pub fn in_flight(&self, handler: &str) -> usize {
        let now = now_ms();
        let handed = self.handed.lock().expect("record lock");
        handed.iter().filter(|h| h.handler == handler && h.end_as_of(now).is_none_or(|end| end > now)).count()
    }

    /// The deliveries of `handler` that have an ordering key, per key, in the order handed.
    pub fn by_key(&self, handler: &str) -> BTreeMap<String, Vec<Handed>> {
        let mut by_key: BTreeMap<String, Vec<Handed>> = BTreeMap::new();
        let handed = self.handed.lock().expect("record lock");
        for h in handed.iter().filter(|h| h.handler == handler) {
            if let Some(key) = &h.ordering_key {
                by_key.entry(key.clone()).or_default().push(h.clone());
            }
        }
        by_key
    }

    /// Notes a delivery handed to `handler`: its place in the record.
    pub(crate) fn started(&self, handler: &str, delivery: &crate::Delivery) -> usize {
        let mut handed = self.handed.lock().expect("record lock");
        handed.push(Handed {
            handler: handler.to_owned(),
            id: delivery.id,
            attempt: delivery.attempt,
            ordering_key: delivery.ordering_key().map(str::to_owned),
            started_ms: now_ms(),
            ended_ms: None,
            deadline_ms: delivery.deadline_ms,
        });
        handed.len() - 1
    }

    /// Notes that the delivery at `place` ended.
    fn ended(&self, place: usize) {
        let mut handed = self.handed.lock().expect("record lock");
        let h = &mut handed[place];
        h.ended_ms = Some(now_ms().min(h.deadline_ms));
    }
}

/// Notes the end of the delivery at its place in a record when dropped: after its answer, or
/// with its handler's future when it is cancelled.
pub(crate) struct Ending {
    record: Record,
    place: usize,
}

impl Ending {
    /// The end of the delivery at `place` of `record`, noted on drop.
    pub(crate) fn new(record: &Record, place: usize) -> Ending {
        Ending { record: record.clone(), place }
    }
}

impl Drop for Ending {
    fn drop(&mut self) {
        self.record.ended(self.place);
    }
}

/// Now in unix milliseconds, as deadlines are given.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
