//! How a trigger's deliveries flow (DESIGN §13): the `flow` object, checked, and the lane a
//! delivery is handed out in when the trigger orders its deliveries.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A trigger's `flow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Flow {
    /// Whether and how deliveries are ordered.
    pub ordering: Ordering,
    /// At most this many deliveries in flight at once, cluster-wide.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// At most this many attempts started per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    /// A burst of writes to one key reaches the handler once, this long after the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debounce_ms: Option<u32>,
    /// A dead letter keeps its key blocked until it is resolved.
    pub hold_on_dead_letter: bool,
}

/// `flow.ordering`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ordering {
    /// No order between deliveries.
    #[default]
    None,
    /// Deliveries sharing an ordering key go one at a time, in write order.
    Key,
    /// All deliveries of the trigger go one at a time, in write order.
    Trigger,
}

/// `flow.rate`: a token bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rate {
    /// Attempts started per second.
    pub per_second: u32,
    /// The bucket's size (default `per_second`).
    pub burst: u32,
}

impl Rate {
    /// The tokens in the bucket `elapsed` after it held `tokens`: one more every
    /// `1 / per_second` seconds, never more than `burst`. A full bucket is `burst` tokens; an
    /// attempt takes one.
    pub fn refill(&self, tokens: f64, elapsed: std::time::Duration) -> f64 {
        (tokens + elapsed.as_secs_f64() * f64::from(self.per_second)).min(f64::from(self.burst))
    }

    /// How long a bucket holding `tokens` (fewer than one) takes to hold one.
    pub fn until_one(&self, tokens: f64) -> std::time::Duration {
        std::time::Duration::from_secs_f64(((1.0 - tokens) / f64::from(self.per_second)).max(0.0))
    }
}

/// Why a trigger's `flow` or `batch` was refused: the field (`flow.rate.per_second`,
/// `batch.max_size`, …) and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// The field's path, from `flow` or `batch`.
    pub field: String,
    /// The rule it broke.
    pub message: String,
}

/// The largest `concurrency`.
pub const MAX_CONCURRENCY: u32 = 10_000;
/// The largest `rate.per_second` and `rate.burst`.
pub const MAX_RATE: u32 = 1_000_000;
/// The longest `debounce_ms`: one hour.
pub const MAX_DEBOUNCE_MS: u32 = 3_600_000;
/// The longest ordering key a client may give, in bytes.
pub const MAX_ORDERING_KEY_BYTES: usize = 200;

/// The lane of a trigger ordered as a whole (`ordering: trigger`).
pub const TRIGGER_LANE: &str = "";

/// A refusal of `flow.<field>` (of `flow` itself when `field` is empty).
fn refuse(field: &str, message: impl Into<String>) -> FieldError {
    refuse_in("flow", field, message)
}

/// A refusal of `<root>.<field>` (of `<root>` itself when `field` is empty).
pub(crate) fn refuse_in(root: &str, field: &str, message: impl Into<String>) -> FieldError {
    let field = if field.is_empty() { root.to_owned() } else { format!("{root}.{field}") };
    FieldError { field, message: message.into() }
}

fn integer(value: &Value, field: &str, min: u32, max: u32) -> Result<u32, FieldError> {
    integer_in("flow", value, field, min, max)
}

/// `<root>.<field>`, an integer from `min` to `max`.
pub(crate) fn integer_in(
    root: &str,
    value: &Value,
    field: &str,
    min: u32,
    max: u32,
) -> Result<u32, FieldError> {
    value
        .as_u64()
        .filter(|n| (u64::from(min)..=u64::from(max)).contains(n))
        .map(|n| n as u32)
        .ok_or_else(|| refuse_in(root, field, format!("expected an integer from {min} to {max}")))
}

fn object<'a>(
    value: &'a Value,
    field: &str,
    known: &[&str],
) -> Result<&'a serde_json::Map<String, Value>, FieldError> {
    object_in("flow", value, field, known)
}

/// `<root>.<field>`, an object with no field but `known`.
pub(crate) fn object_in<'a>(
    root: &str,
    value: &'a Value,
    field: &str,
    known: &[&str],
) -> Result<&'a serde_json::Map<String, Value>, FieldError> {
    let map = value.as_object().ok_or_else(|| refuse_in(root, field, "expected an object"))?;
    if let Some(unknown) = map.keys().find(|k| !known.contains(&k.as_str())) {
        let at = if field.is_empty() { unknown.clone() } else { format!("{field}.{unknown}") };
        return Err(refuse_in(root, &at, format!("unknown field; expected one of {}", known.join(", "))));
    }
    Ok(map)
}

impl Flow {
    /// Parses and checks a `flow` object as a client sends it; `null` is no flow. Every refusal
    /// names its field.
    pub fn from_json(value: &Value) -> Result<Option<Flow>, FieldError> {
        if value.is_null() {
            return Ok(None);
        }
        let known = ["ordering", "concurrency", "rate", "debounce_ms", "hold_on_dead_letter"];
        let map = object(value, "", &known)?;
        let mut flow = Flow::default();
        for (field, value) in map {
            match field.as_str() {
                "ordering" => {
                    flow.ordering = Ordering::deserialize(value)
                        .map_err(|_| refuse(field, "expected none, key or trigger"))?;
                }
                "concurrency" => flow.concurrency = Some(integer(value, field, 1, MAX_CONCURRENCY)?),
                "rate" => {
                    let rate = object(value, "rate", &["per_second", "burst"])?;
                    let per_second = rate
                        .get("per_second")
                        .ok_or_else(|| refuse("rate.per_second", "required"))
                        .and_then(|v| integer(v, "rate.per_second", 1, MAX_RATE))?;
                    let burst = match rate.get("burst") {
                        None => per_second,
                        Some(v) => integer(v, "rate.burst", 1, MAX_RATE)?,
                    };
                    flow.rate = Some(Rate { per_second, burst });
                }
                "debounce_ms" => flow.debounce_ms = Some(integer(value, field, 1, MAX_DEBOUNCE_MS)?),
                "hold_on_dead_letter" => {
                    flow.hold_on_dead_letter =
                        value.as_bool().ok_or_else(|| refuse(field, "expected true or false"))?;
                }
                _ => unreachable!("object() refused unknown fields"),
            }
        }
        if flow.debounce_ms.is_some() && flow.ordering != Ordering::Key {
            return Err(refuse("debounce_ms", "needs ordering: key"));
        }
        if flow.hold_on_dead_letter && flow.ordering == Ordering::None {
            return Err(refuse("hold_on_dead_letter", "needs ordering: key or trigger"));
        }
        Ok(Some(flow))
    }

    /// Whether the trigger's deliveries are limited (`concurrency` or `rate`): then a relay
    /// claims them only within the limits, never with the rows that flow freely.
    pub fn is_limited(&self) -> bool {
        self.concurrency.is_some() || self.rate.is_some()
    }

    /// The lane a delivery with `ordering_key` goes in: `None` when it is not ordered (no
    /// ordering, or ordering by key and the delivery has no key).
    pub fn lane<'k>(&self, ordering_key: Option<&'k str>) -> Option<&'k str> {
        match self.ordering {
            Ordering::None => None,
            Ordering::Key => ordering_key,
            Ordering::Trigger => Some(TRIGGER_LANE),
        }
    }
}

/// Checks an ordering key a client gives (a job's `ordering_key`, the `Picloud-Ordering-Key`
/// header): 1–200 bytes of printable UTF-8.
pub fn check_ordering_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() || key.len() > MAX_ORDERING_KEY_BYTES || key.chars().any(char::is_control) {
        return Err("expected 1-200 bytes of printable UTF-8");
    }
    Ok(())
}

/// The ordering key of a KV entry's events: `<collection>/<key>`.
pub fn kv_ordering_key(collection: &str, key: &str) -> String {
    format!("{collection}/{key}")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    fn refused(value: &Value) -> String {
        Flow::from_json(value).expect_err("refused").field
    }

    #[test]
    fn a_full_flow_reads_back_as_given() {
        let flow = Flow::from_json(&json!({
            "ordering": "key", "concurrency": 8, "rate": {"per_second": 50, "burst": 100},
            "debounce_ms": 500, "hold_on_dead_letter": true
        }))
        .unwrap()
        .unwrap();
        assert_eq!(
            flow,
            Flow {
                ordering: Ordering::Key,
                concurrency: Some(8),
                rate: Some(Rate { per_second: 50, burst: 100 }),
                debounce_ms: Some(500),
                hold_on_dead_letter: true,
            }
        );
        assert_eq!(Flow::from_json(&serde_json::to_value(flow).unwrap()).unwrap(), Some(flow));
    }

    #[test]
    fn null_is_no_flow_and_burst_defaults_to_the_rate() {
        assert_eq!(Flow::from_json(&Value::Null).unwrap(), None);
        let flow = Flow::from_json(&json!({"rate": {"per_second": 7}})).unwrap().unwrap();
        assert_eq!(flow.rate, Some(Rate { per_second: 7, burst: 7 }));
        assert_eq!(flow.ordering, Ordering::None);
    }

    #[test]
    fn every_refusal_names_its_field() {
        assert_eq!(refused(&json!([])), "flow");
        assert_eq!(refused(&json!({"concurrency": 0})), "flow.concurrency");
        assert_eq!(refused(&json!({"concurrency": 10_001})), "flow.concurrency");
        assert_eq!(refused(&json!({"concurrency": "8"})), "flow.concurrency");
        assert_eq!(refused(&json!({"rate": {}})), "flow.rate.per_second");
        assert_eq!(refused(&json!({"rate": {"per_second": 0}})), "flow.rate.per_second");
        assert_eq!(refused(&json!({"rate": {"per_second": 5, "burst": 0}})), "flow.rate.burst");
        assert_eq!(refused(&json!({"rate": {"per_second": 5, "bursts": 1}})), "flow.rate.bursts");
        assert_eq!(refused(&json!({"rate": 5})), "flow.rate");
        assert_eq!(refused(&json!({"ordering": "keys"})), "flow.ordering");
        assert_eq!(refused(&json!({"debounce_ms": 10})), "flow.debounce_ms");
        assert_eq!(refused(&json!({"ordering": "trigger", "debounce_ms": 10})), "flow.debounce_ms");
        assert_eq!(refused(&json!({"hold_on_dead_letter": true})), "flow.hold_on_dead_letter");
        assert_eq!(
            refused(&json!({"ordering": "key", "hold_on_dead_letter": 1})),
            "flow.hold_on_dead_letter"
        );
        assert_eq!(refused(&json!({"order": "key"})), "flow.order");
        assert_eq!(refused(&json!({"ordering": "key", "hold": true})), "flow.hold");
    }

    #[test]
    fn a_bucket_refills_at_its_rate_up_to_its_burst() {
        let rate = Rate { per_second: 10, burst: 3 };
        assert_eq!(rate.refill(0.0, Duration::from_millis(150)), 1.5);
        assert_eq!(rate.refill(2.5, Duration::from_secs(60)), 3.0);
        assert_eq!(rate.until_one(0.5), Duration::from_millis(50));
        assert_eq!(rate.until_one(1.0), Duration::ZERO);
        let limited = |json: Value| Flow::from_json(&json).unwrap().unwrap().is_limited();
        assert!(limited(json!({"concurrency": 1})));
        assert!(limited(json!({"rate": {"per_second": 1}})));
        assert!(!limited(json!({"ordering": "key"})));
    }

    #[test]
    fn lanes_follow_the_ordering() {
        let by = |ordering| Flow { ordering, ..Flow::default() };
        assert_eq!(by(Ordering::None).lane(Some("k")), None);
        assert_eq!(by(Ordering::Key).lane(Some("k")), Some("k"));
        assert_eq!(by(Ordering::Key).lane(None), None);
        assert_eq!(by(Ordering::Trigger).lane(None), Some(TRIGGER_LANE));
        assert_eq!(by(Ordering::Trigger).lane(Some("k")), Some(TRIGGER_LANE));
    }

    #[test]
    fn ordering_keys_are_one_to_two_hundred_printable_bytes() {
        assert!(check_ordering_key("user-1/orders").is_ok());
        assert!(check_ordering_key(&"é".repeat(100)).is_ok());
        assert!(check_ordering_key(&"é".repeat(101)).is_err());
        assert!(check_ordering_key("").is_err());
        assert!(check_ordering_key("a\nb").is_err());
        assert_eq!(kv_ordering_key("orders", "o-1"), "orders/o-1");
    }
}
