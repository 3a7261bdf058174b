//! The body of one delivery: the CloudEvents envelope of DESIGN §6, serialized once per attempt.

use picloud_core::protocol::{EnvelopeRef, rfc3339_millis};
use picloud_store::ClaimedDelivery;
use uuid::Uuid;

/// What the envelope says about the trigger and its principal (absent for emails).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunAs<'a> {
    pub trigger: &'a str,
    pub trigger_id: Uuid,
    pub principal: Uuid,
    pub token: &'a str,
}

/// Serializes the envelope of `row`'s current attempt.
pub(crate) fn envelope(
    row: &ClaimedDelivery,
    app: &str,
    run_as: Option<RunAs<'_>>,
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
        picloudtrigger: run_as.map(|r| r.trigger),
        picloudtriggerid: run_as.map(|r| r.trigger_id),
        piclouddepth: row.depth,
        picloudprincipal: run_as.map(|r| r.principal),
        picloudtoken: run_as.map(|r| r.token),
        piclouddeadline: deadline_ms,
    };
    let mut body = Vec::with_capacity(512 + row.payload.get().len());
    serde_json::to_writer(&mut body, &envelope).expect("an envelope serializes");
    body
}
