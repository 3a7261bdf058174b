//! Standard Webhooks signatures (<https://www.standardwebhooks.com>): the `whsec_` secret, the
//! `webhook-*` header names and the `v1` HMAC-SHA256 signature of `{id}.{timestamp}.{body}`.
//! Pure functions: the executor that POSTs lives in `picloud-dispatch`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The prefix of a webhook signing secret; the rest is the key, base64-encoded.
pub const SECRET_PREFIX: &str = "whsec_";
/// The header with the message id (for us: the delivery id, stable across attempts).
pub const ID_HEADER: &str = "webhook-id";
/// The header with the signing time, in unix seconds.
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";
/// The header with the space-separated signatures (`v1,<base64>`).
pub const SIGNATURE_HEADER: &str = "webhook-signature";

/// Why a webhook secret cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WebhookSecretError {
    /// The secret does not start with `whsec_`.
    #[error("a webhook secret starts with {SECRET_PREFIX}")]
    MissingPrefix,
    /// What follows `whsec_` is not standard base64.
    #[error("a webhook secret is {SECRET_PREFIX} followed by standard base64")]
    NotBase64,
    /// The key is empty.
    #[error("a webhook secret's key is not empty")]
    Empty,
}

/// The signing key of one webhook: the base64-decoded part of a `whsec_…` secret.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookKey(Vec<u8>);

impl std::fmt::Debug for WebhookKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookKey(<hidden>)")
    }
}

impl WebhookKey {
    /// Decodes a `whsec_<base64>` secret.
    pub fn from_secret(secret: &str) -> Result<WebhookKey, WebhookSecretError> {
        let encoded = secret.strip_prefix(SECRET_PREFIX).ok_or(WebhookSecretError::MissingPrefix)?;
        let key = STANDARD.decode(encoded).map_err(|_| WebhookSecretError::NotBase64)?;
        if key.is_empty() {
            return Err(WebhookSecretError::Empty);
        }
        Ok(WebhookKey(key))
    }

    /// The `webhook-signature` value for a message: `v1,` + base64 of
    /// HMAC-SHA256(key, `{id}.{timestamp}.{body}`).
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

/// Signs one message with a `whsec_…` secret: the `webhook-signature` header value.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Result<String, WebhookSecretError> {
    Ok(WebhookKey::from_secret(secret)?.sign(id, timestamp, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_the_test_vector_of_the_specification() {
        let signature = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        )
        .unwrap();
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn signatures_match_the_reference_implementation() {
        let signature = sign(
            "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1649367553,
            br#"{"email":"test@example.com","username":"test_user"}"#,
        )
        .unwrap();
        assert_eq!(signature, "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=");
    }

    #[test]
    fn id_timestamp_and_body_all_change_the_signature() {
        let key = WebhookKey::from_secret("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        let base = key.sign("a", 1, b"{}");
        assert_ne!(base, key.sign("b", 1, b"{}"));
        assert_ne!(base, key.sign("a", 2, b"{}"));
        assert_ne!(base, key.sign("a", 1, b"{ }"));
    }

    #[test]
    fn secrets_without_the_prefix_or_with_bad_base64_are_refused() {
        assert_eq!(
            WebhookKey::from_secret("C2FVsBQIhrscChlQIMV+b5sSYspob7oD"),
            Err(WebhookSecretError::MissingPrefix)
        );
        assert_eq!(WebhookKey::from_secret("whsec_not base64!"), Err(WebhookSecretError::NotBase64));
        assert_eq!(WebhookKey::from_secret("whsec_"), Err(WebhookSecretError::Empty));
    }

    #[test]
    fn a_key_does_not_show_in_debug_output() {
        let key = WebhookKey::from_secret("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        assert_eq!(format!("{key:?}"), "WebhookKey(<hidden>)");
    }
}
