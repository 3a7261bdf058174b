//! A trigger's `batch` (DESIGN §14): its deliveries go to the handler many at a time.

use serde::Serialize;
use serde_json::Value;

use crate::flow::{FieldError, integer_in, object_in, refuse_in};

/// The smallest `max_size`: a batch of one is no batch.
pub const MIN_BATCH_SIZE: u32 = 2;
/// The largest `max_size`.
pub const MAX_BATCH_SIZE: u32 = 1_000;
/// The longest `max_wait_ms`: one minute.
pub const MAX_BATCH_WAIT_MS: u32 = 60_000;

/// A trigger's `batch`: up to `max_size` deliveries in one request, sent when that many are due
/// or the oldest has waited `max_wait_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Batch {
    /// Deliveries in one request, at most.
    pub max_size: u32,
    /// How long the oldest delivery of an unfilled batch waits for more, at most.
    pub max_wait_ms: u32,
}

impl Batch {
    /// Parses and checks a `batch` object as a client sends it; `null` is no batching. Every
    /// refusal names its field.
    pub fn from_json(value: &Value) -> Result<Option<Batch>, FieldError> {
        if value.is_null() {
            return Ok(None);
        }
        let map = object_in("batch", value, "", &["max_size", "max_wait_ms"])?;
        let field = |name: &str, min: u32, max: u32| {
            map.get(name)
                .ok_or_else(|| refuse_in("batch", name, "required"))
                .and_then(|v| integer_in("batch", v, name, min, max))
        };
        Ok(Some(Batch {
            max_size: field("max_size", MIN_BATCH_SIZE, MAX_BATCH_SIZE)?,
            max_wait_ms: field("max_wait_ms", 0, MAX_BATCH_WAIT_MS)?,
        }))
    }

    /// How long the oldest delivery of an unfilled batch waits for more.
    pub fn max_wait(&self) -> std::time::Duration {
        std::time::Duration::from_millis(u64::from(self.max_wait_ms))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn refused(value: &Value) -> String {
        Batch::from_json(value).expect_err("refused").field
    }

    #[test]
    fn a_batch_reads_back_as_given_and_null_is_none() {
        let batch = Batch::from_json(&json!({"max_size": 100, "max_wait_ms": 0})).unwrap().unwrap();
        assert_eq!(batch, Batch { max_size: 100, max_wait_ms: 0 });
        assert_eq!(Batch::from_json(&serde_json::to_value(batch).unwrap()).unwrap(), Some(batch));
        assert_eq!(Batch::from_json(&Value::Null).unwrap(), None);
    }

    #[test]
    fn every_refusal_names_its_field() {
        assert_eq!(refused(&json!(5)), "batch");
        assert_eq!(refused(&json!({"max_wait_ms": 10})), "batch.max_size");
        assert_eq!(refused(&json!({"max_size": 10})), "batch.max_wait_ms");
        assert_eq!(refused(&json!({"max_size": MIN_BATCH_SIZE - 1, "max_wait_ms": 10})), "batch.max_size");
        assert_eq!(refused(&json!({"max_size": MAX_BATCH_SIZE + 1, "max_wait_ms": 10})), "batch.max_size");
        assert_eq!(
            refused(&json!({"max_size": 10, "max_wait_ms": MAX_BATCH_WAIT_MS + 1})),
            "batch.max_wait_ms"
        );
        assert_eq!(refused(&json!({"max_size": 10, "max_wait_ms": -1})), "batch.max_wait_ms");
        assert_eq!(refused(&json!({"max_size": 10, "max_wait_ms": 5, "size": 3})), "batch.size");
    }
}
