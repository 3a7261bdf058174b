//! The body of one delivery: the CloudEvents envelope of DESIGN §6, serialized once per attempt.

use picloud_core::TriggerId;
use picloud_core::protocol::{EnvelopeRef, rfc3339_millis};
use picloud_core::token::DeliveryToken;
use picloud_store::ClaimedDelivery;

/// Who a delivery runs as, as its envelope says: the trigger, and the delivery token acting for
/// its registering principal (absent for emails), with what the token says, to sign it again for
/// a later deadline.
#[derive(Debug, Clone)]
pub(crate) struct RunAs {
    pub trigger: String,
    pub trigger_id: TriggerId,
    pub claims: DeliveryToken,
    pub token: String,
}

/// Serializes the envelope of `row`'s current attempt.
pub(crate) fn envelope(
    row: &ClaimedDelivery,
    app: &str,
    run_as: Option<&RunAs>,
    deadline_ms: i64,
) -> Vec<u8> {
    let time = rfc3339_millis(row.created_at);
    let envelope = EnvelopeRef {
        specversion: "1.0",
        id: row.id,
        event_type: &row.event_type,
        source: &row.source,
        subject: row.subject.as_deref(),
        time: &time,
        datacontenttype: "application/json",
        data: &row.payload,
        picloudattempt: row.attempt,
        picloudapp: app,
        picloudkind: row.kind.as_str(),
        picloudtrigger: run_as.map(|r| r.trigger.as_str()),
        picloudtriggerid: run_as.map(|r| r.trigger_id.as_uuid()),
        piclouddepth: row.depth,
        picloudprincipal: run_as.map(|r| r.claims.principal.as_uuid()),
        picloudorderingkey: row.ordering_key.as_deref(),
        picloudtoken: run_as.map(|r| r.token.as_str()),
        piclouddeadline: deadline_ms,
    };
    let mut body = Vec::with_capacity(512 + row.payload.get().len());
    serde_json::to_writer(&mut body, &envelope).expect("an envelope serializes");
    body
}

#[cfg(test)]
mod tests {
    use picloud_core::protocol::{ENVELOPE_FRAME_BYTES, EventKind, MAX_ERROR_BYTES, event_type, source};
    use picloud_core::token::TokenKey;
    use picloud_core::{AppId, PrincipalId, Role, ScopeSet};
    use picloud_store::{DeadLetter, DeadLetterReason, EventHeaders};
    use serde_json::value::RawValue;
    use time::OffsetDateTime;
    use uuid::Uuid;

    use super::*;

    /// The longest name there is (200 bytes), made of the character JSON escapes to two.
    fn longest_name() -> String {
        "\"".repeat(200)
    }

    fn row(source: String, payload: Box<RawValue>) -> ClaimedDelivery {
        ClaimedDelivery {
            id: Uuid::now_v7(),
            app_id: AppId::new(),
            trigger_id: Some(TriggerId::new()),
            kind: EventKind::DeadLetter,
            event_type: event_type::DEAD_LETTER_CREATED.into(),
            source,
            subject: Some(longest_name()),
            payload,
            depth: u32::MAX,
            attempt: u32::MAX,
            max_attempts: u32::MAX,
            reply_to: None,
            dead_letter_id: None,
            last_error: None,
            created_at: OffsetDateTime::now_utc(),
            ordering_key: Some(picloud_core::flow::kv_ordering_key(&longest_name(), &longest_name())),
            in_lane: true,
            gated: true,
        }
    }

    #[test]
    fn a_kv_updates_data_is_its_two_values_in_a_frame_that_fits_the_reserve() {
        let value = serde_json::Value::String("x".repeat(100_000));
        let data = picloud_store::kv_event_data(
            &longest_name(),
            &longest_name(),
            picloud_store::KvOp::Put,
            Some(&value),
            Some(&value),
            i64::MAX,
        );
        let frame = data.get().len() - 2 * value.to_string().len();
        assert!(frame <= picloud_core::protocol::EVENT_DATA_FRAME_BYTES, "a frame of {frame} bytes");
    }

    #[test]
    fn the_largest_frame_an_envelope_puts_around_its_data_fits_the_reserve() {
        // The largest data any write produces, wrapped as a dead letter (the largest frame the
        // platform adds itself): the longest names, the longest error, escaped at every turn.
        let data = format!("\"{}\"", "x".repeat(100_000));
        let app = "a".repeat(63);
        let dead = DeadLetter {
            id: Uuid::now_v7(),
            app_id: AppId::new(),
            trigger_id: Some(TriggerId::new()),
            trigger_name: Some("t".repeat(63)),
            kind: EventKind::Kv,
            delivery_id: Uuid::now_v7(),
            payload: RawValue::from_string(data.clone()).unwrap(),
            headers: EventHeaders {
                event_type: event_type::KV_PUT.into(),
                source: source::kv(&app, &longest_name()),
                subject: Some(longest_name()),
                time: OffsetDateTime::now_utc(),
                depth: u32::MAX,
                ordering_key: Some(picloud_core::flow::kv_ordering_key(&longest_name(), &longest_name())),
            },
            attempts: u32::MAX,
            reason: DeadLetterReason::Exhausted,
            last_error: Some("\"".repeat(MAX_ERROR_BYTES)),
            created_at: OffsetDateTime::now_utc(),
            resolution: None,
            resolved_at: None,
            held_lane: None,
        };
        let payload =
            serde_json::value::to_raw_value(&picloud_store::events::dead_letter_data(&dead)).unwrap();
        let claims = DeliveryToken {
            principal: PrincipalId::new(),
            app: AppId::new(),
            depth: u32::MAX,
            deadline_ms: i64::MAX,
            scopes: ScopeSet::for_role(Role::Admin),
        };
        let token = TokenKey::new(b"0123456789abcdef").sign(&claims);
        let run_as = RunAs { trigger: "t".repeat(63), trigger_id: TriggerId::new(), claims, token };
        let body = envelope(&row(source::dead_letters(&app), payload), &app, Some(&run_as), i64::MAX);
        let frame = body.len() - data.len();
        assert!(frame <= ENVELOPE_FRAME_BYTES, "a frame of {frame} bytes");
    }
}
