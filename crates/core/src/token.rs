//! Secrets that travel: API bearer tokens (`pcr_…`, stored only as SHA-256 hashes) and delivery
//! tokens (`pdt_…`, HMAC-signed by the relay, verified by the API).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::auth::ScopeSet;
use crate::ids::{AppId, PrincipalId};

/// The prefix of every API token.
pub const API_TOKEN_PREFIX: &str = "pcr_";
/// The prefix of every delivery token.
pub const DELIVERY_TOKEN_PREFIX: &str = "pdt_";

/// The longest an API token may be minted to live, in seconds: ten years (`expires_in_s`,
/// `admin … --expires-in`).
pub const MAX_TOKEN_LIFETIME_S: u64 = 10 * 365 * 86_400;

/// The lifetime a token may be minted with, in seconds: from one second to
/// [`MAX_TOKEN_LIFETIME_S`]; the refusal says the range.
pub fn token_lifetime(seconds: u64) -> Result<std::time::Duration, LifetimeOutOfRange> {
    if seconds == 0 || seconds > MAX_TOKEN_LIFETIME_S {
        return Err(LifetimeOutOfRange);
    }
    Ok(std::time::Duration::from_secs(seconds))
}

/// A token lifetime outside what [`token_lifetime`] allows; it displays the range allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("1 second to 10 years")]
pub struct LifetimeOutOfRange;

/// A fresh API token: `pcr_` + 32 random bytes, base64url. Shown once, stored as its hash.
pub fn generate_api_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{API_TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// The SHA-256 of a token, the only form in which the store keeps it.
pub fn hash_api_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// What a delivery token grants: act as `principal` on `app`, writing events of `depth`, with
/// `scopes`, until `deadline_ms` (unix milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryToken {
    /// The trigger's registering principal.
    pub principal: PrincipalId,
    /// The app the delivery belongs to.
    pub app: AppId,
    /// The depth of events written with this token (the delivery's depth + 1).
    pub depth: u32,
    /// Unix milliseconds after which the token is refused.
    pub deadline_ms: i64,
    /// The principal's scopes on the app when the delivery was made.
    pub scopes: ScopeSet,
}

/// Why a delivery token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not a delivery token at all.
    #[error("malformed delivery token")]
    Malformed,
    /// Signed with another key, or altered.
    #[error("delivery token signature does not verify")]
    BadSignature,
    /// Past its deadline.
    #[error("delivery token expired")]
    Expired,
}

const VERSION: u8 = 1;
const PAYLOAD_LEN: usize = 1 + 16 + 16 + 4 + 8 + 1;

/// The key delivery tokens are signed and verified with (`PICLOUD_TOKEN_SECRET`).
#[derive(Clone)]
pub struct TokenKey(Hmac<Sha256>);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// A key from the secret's bytes.
    pub fn new(secret: &[u8]) -> Self {
        Self(Hmac::new_from_slice(secret).expect("HMAC accepts keys of any length"))
    }

    fn mac(&self, payload: &[u8]) -> [u8; 32] {
        let mut mac = self.0.clone();
        mac.update(payload);
        mac.finalize().into_bytes().into()
    }

    /// Signs `token` into its `pdt_…` text.
    pub fn sign(&self, token: &DeliveryToken) -> String {
        let mut payload = [0u8; PAYLOAD_LEN];
        payload[0] = VERSION;
        payload[1..17].copy_from_slice(token.principal.as_uuid().as_bytes());
        payload[17..33].copy_from_slice(token.app.as_uuid().as_bytes());
        payload[33..37].copy_from_slice(&token.depth.to_be_bytes());
        payload[37..45].copy_from_slice(&token.deadline_ms.to_be_bytes());
        payload[45] = token.scopes.bits();
        let mac = self.mac(&payload);
        let mut out = String::with_capacity(4 + 62 + 1 + 43);
        out.push_str(DELIVERY_TOKEN_PREFIX);
        URL_SAFE_NO_PAD.encode_string(payload, &mut out);
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(mac, &mut out);
        out
    }

    /// The form token (against cross-site request forgery) of the console session that holds API
    /// token `session`: a MAC of the token's hash under this key, the same on every node.
    pub fn form_token(&self, session: &str) -> String {
        let mut payload = b"console-form:".to_vec();
        payload.extend_from_slice(&hash_api_token(session));
        URL_SAFE_NO_PAD.encode(self.mac(&payload))
    }

    /// Whether `given` is the form token of `session` (compared in constant time).
    pub fn is_form_token(&self, session: &str, given: &str) -> bool {
        let Ok(given) = URL_SAFE_NO_PAD.decode(given) else { return false };
        let mut check = self.0.clone();
        check.update(b"console-form:");
        check.update(&hash_api_token(session));
        check.verify_slice(&given).is_ok()
    }

    /// Verifies a `pdt_…` text at `now_ms`, returning what it grants.
    pub fn verify(&self, text: &str, now_ms: i64) -> Result<DeliveryToken, TokenError> {
        let body = text.strip_prefix(DELIVERY_TOKEN_PREFIX).ok_or(TokenError::Malformed)?;
        let (payload, mac) = body.split_once('.').ok_or(TokenError::Malformed)?;
        let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| TokenError::Malformed)?;
        let mac = URL_SAFE_NO_PAD.decode(mac).map_err(|_| TokenError::Malformed)?;
        if payload.len() != PAYLOAD_LEN || payload[0] != VERSION {
            return Err(TokenError::Malformed);
        }
        let mut check = self.0.clone();
        check.update(&payload);
        check.verify_slice(&mac).map_err(|_| TokenError::BadSignature)?;
        let field = |range: std::ops::Range<usize>| &payload[range];
        let token = DeliveryToken {
            principal: PrincipalId::from_uuid(
                Uuid::from_slice(field(1..17)).map_err(|_| TokenError::Malformed)?,
            ),
            app: AppId::from_uuid(Uuid::from_slice(field(17..33)).map_err(|_| TokenError::Malformed)?),
            depth: u32::from_be_bytes(field(33..37).try_into().map_err(|_| TokenError::Malformed)?),
            deadline_ms: i64::from_be_bytes(field(37..45).try_into().map_err(|_| TokenError::Malformed)?),
            scopes: ScopeSet::from_bits(payload[45]),
        };
        if token.deadline_ms < now_ms {
            return Err(TokenError::Expired);
        }
        Ok(token)
    }
}

/// How far an API token reaches: the app it is limited to, the scopes it is narrowed to, and when
/// it expires. `None` is no limit of that kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenLimits {
    /// The one app the token acts on.
    pub app: Option<AppId>,
    /// The scopes the token holds at most, whatever its principal's role.
    pub scopes: Option<ScopeSet>,
    /// When the token stops authenticating.
    pub expires_at: Option<time::OffsetDateTime>,
}

/// Why a token may not be minted with the limits asked for: it would reach further than the
/// credentials minting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Widening {
    /// Another app, or every app, asked by credentials limited to one app.
    #[error("credentials limited to one app can only mint tokens limited to that app")]
    App,
    /// A scope the minting token does not hold, or no narrowing at all.
    #[error("a token narrowed to some scopes can only mint tokens within them")]
    Scopes,
    /// A later expiry than the minting token's, or none.
    #[error(
        "a token that expires can only mint tokens that expire no later (this one expires at {})",
        crate::protocol::rfc3339_millis(*.0)
    )]
    Expiry(time::OffsetDateTime),
}

impl TokenLimits {
    /// Whether credentials with these limits may mint a token with limits `wanted`: only one no
    /// wider in any of them (the same app, a subset of the scopes, an expiry no later), so that a
    /// chain of tokens each minted with the one before never reaches further than the first.
    pub fn admits(&self, wanted: &TokenLimits) -> Result<(), Widening> {
        self.admits_app(wanted.app)?;
        self.admits_scopes(wanted.scopes)?;
        self.admits_expiry(wanted.expires_at)
    }

    /// The app part of [`TokenLimits::admits`]: credentials limited to one app mint tokens
    /// limited to it. Checked on its own where it is answered before the other fields are read.
    pub fn admits_app(&self, wanted: Option<AppId>) -> Result<(), Widening> {
        if self.app.is_some() && wanted != self.app {
            return Err(Widening::App);
        }
        Ok(())
    }

    /// The scopes part of [`TokenLimits::admits`]: a subset of the scopes held, when they are
    /// narrowed.
    pub fn admits_scopes(&self, wanted: Option<ScopeSet>) -> Result<(), Widening> {
        if let Some(held) = self.scopes
            && wanted.is_none_or(|scopes| scopes.intersect(held) != scopes)
        {
            return Err(Widening::Scopes);
        }
        Ok(())
    }

    /// The expiry part of [`TokenLimits::admits`]: no later than the one held, when it expires.
    pub fn admits_expiry(&self, wanted: Option<time::OffsetDateTime>) -> Result<(), Widening> {
        if let Some(held) = self.expires_at
            && wanted.is_none_or(|expires_at| expires_at > held)
        {
            return Err(Widening::Expiry(held));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::auth::{Role, Scope};

    fn sample() -> DeliveryToken {
        DeliveryToken {
            principal: PrincipalId::new(),
            app: AppId::new(),
            depth: 3,
            deadline_ms: 1_764_324_030_123,
            scopes: ScopeSet::for_role(Role::Developer),
        }
    }

    #[test]
    fn a_signed_token_verifies_to_what_was_signed() {
        let key = TokenKey::new(b"secret");
        let token = sample();
        let text = key.sign(&token);
        assert!(text.starts_with("pdt_"));
        assert_eq!(key.verify(&text, token.deadline_ms), Ok(token));
    }

    #[test]
    fn a_token_past_its_deadline_is_refused() {
        let key = TokenKey::new(b"secret");
        let token = sample();
        assert_eq!(key.verify(&key.sign(&token), token.deadline_ms + 1), Err(TokenError::Expired));
    }

    #[test]
    fn a_token_signed_with_another_key_is_refused() {
        let text = TokenKey::new(b"other").sign(&sample());
        assert_eq!(TokenKey::new(b"secret").verify(&text, 0), Err(TokenError::BadSignature));
    }

    #[test]
    fn an_altered_token_is_refused() {
        let key = TokenKey::new(b"secret");
        let mut token = sample();
        let text = key.sign(&token);
        token.depth = 0;
        let forged_payload = key.sign(&token);
        let spliced =
            format!("{}.{}", forged_payload.split_once('.').unwrap().0, text.split_once('.').unwrap().1);
        assert_eq!(key.verify(&spliced, 0), Err(TokenError::BadSignature));
        for junk in ["", "pdt_", "pdt_abc", "pcr_abc.def", "pdt_!!!.???"] {
            assert_eq!(key.verify(junk, 0), Err(TokenError::Malformed), "{junk}");
        }
    }

    #[test]
    fn scopes_survive_the_round_trip() {
        let key = TokenKey::new(b"k");
        let token = DeliveryToken { scopes: ScopeSet::EMPTY.with(Scope::AppPublish), ..sample() };
        assert_eq!(key.verify(&key.sign(&token), 0).unwrap().scopes, token.scopes);
    }

    #[test]
    fn api_tokens_are_prefixed_random_and_hashed_to_32_bytes() {
        let a = generate_api_token();
        let b = generate_api_token();
        assert!(a.starts_with("pcr_") && a.len() == 4 + 43, "{a}");
        assert_ne!(a, b);
        assert_eq!(hash_api_token(&a), hash_api_token(&a));
        assert_ne!(hash_api_token(&a), hash_api_token(&b));
    }

    /// Any delivery token.
    fn token() -> impl Strategy<Value = DeliveryToken> {
        (any::<u128>(), any::<u128>(), any::<u32>(), any::<i64>(), any::<u8>()).prop_map(
            |(principal, app, depth, deadline_ms, scopes)| DeliveryToken {
                principal: PrincipalId::from_uuid(Uuid::from_u128(principal)),
                app: AppId::from_uuid(Uuid::from_u128(app)),
                depth,
                deadline_ms,
                scopes: ScopeSet::from_bits(scopes),
            },
        )
    }

    /// Texts shaped like a delivery token: the prefix, base64url payloads of any length, a dot.
    fn token_like() -> impl Strategy<Value = String> {
        (prop::collection::vec(any::<u8>(), 0..64), prop::collection::vec(any::<u8>(), 0..40), any::<bool>())
            .prop_map(|(payload, mac, valid_payload)| {
                let mut payload = payload;
                if valid_payload {
                    payload.resize(PAYLOAD_LEN, 0);
                    payload[0] = VERSION;
                }
                format!(
                    "{DELIVERY_TOKEN_PREFIX}{}.{}",
                    URL_SAFE_NO_PAD.encode(payload),
                    URL_SAFE_NO_PAD.encode(mac)
                )
            })
    }

    proptest! {
        #[test]
        fn verifying_any_text_never_panics_and_never_succeeds_without_the_key(
            text in prop_oneof![any::<String>(), token_like()],
            now_ms in any::<i64>(),
        ) {
            let verified = TokenKey::new(b"secret").verify(&text, now_ms);
            prop_assert!(verified.is_err(), "{text:?} verified as {verified:?}");
        }

        #[test]
        fn a_signed_token_verifies_to_what_was_signed_until_its_deadline(
            token in token(),
            before in 0i64..1_000_000,
        ) {
            let key = TokenKey::new(b"secret");
            let text = key.sign(&token);
            prop_assert_eq!(key.verify(&text, token.deadline_ms.saturating_sub(before)), Ok(token));
            if let Some(after) = token.deadline_ms.checked_add(1) {
                prop_assert_eq!(key.verify(&text, after), Err(TokenError::Expired));
            }
            prop_assert_eq!(TokenKey::new(b"other").verify(&text, i64::MIN), Err(TokenError::BadSignature));
        }

        #[test]
        fn changing_any_one_character_of_a_token_makes_it_fail(
            token in token(),
            at in any::<prop::sample::Index>(),
            by in any::<char>(),
        ) {
            let key = TokenKey::new(b"secret");
            let mut chars: Vec<char> = key.sign(&token).chars().collect();
            let at = at.index(chars.len());
            prop_assume!(chars[at] != by);
            chars[at] = by;
            let altered: String = chars.into_iter().collect();
            prop_assert!(key.verify(&altered, i64::MIN).is_err(), "{altered} still verifies");
        }
    }

    fn limits() -> impl Strategy<Value = TokenLimits> {
        let apps = [AppId::from_uuid(Uuid::from_u128(1)), AppId::from_uuid(Uuid::from_u128(2))];
        (
            proptest::option::of(proptest::sample::select(apps.to_vec())),
            proptest::option::of((0u8..=0x7f).prop_map(ScopeSet::from_bits)),
            proptest::option::of(
                (0i64..4).prop_map(|h| time::OffsetDateTime::UNIX_EPOCH + time::Duration::hours(h)),
            ),
        )
            .prop_map(|(app, scopes, expires_at)| TokenLimits { app, scopes, expires_at })
    }

    /// Limits of up to six tokens, each to mint the next.
    fn chains() -> impl Strategy<Value = Vec<TokenLimits>> {
        proptest::collection::vec(limits(), 1..6)
    }

    /// Whether `inner` reaches nowhere `outer` does not, written from the definition: every app,
    /// scope and instant `inner` allows, `outer` allows too. A token not narrowed to scopes holds
    /// every scope there will ever be, one added later included, which no narrowed token holds.
    fn within(inner: &TokenLimits, outer: &TokenLimits) -> bool {
        let apps = outer.app.is_none() || inner.app == outer.app;
        let holds = |limits: &TokenLimits, scope: Option<Scope>| match (limits.scopes, scope) {
            (None, _) => true,
            (Some(set), Some(scope)) => set.contains(scope),
            (Some(_), None) => false,
        };
        let added_later = None;
        let scopes = Scope::ALL
            .iter()
            .map(|s| Some(*s))
            .chain([added_later])
            .all(|s| !holds(inner, s) || holds(outer, s));
        let expiry = match (inner.expires_at, outer.expires_at) {
            (_, None) => true,
            (None, Some(_)) => false,
            (Some(inner), Some(outer)) => inner <= outer,
        };
        apps && scopes && expiry
    }

    proptest! {
        #[test]
        fn a_token_is_minted_exactly_when_it_reaches_no_further(held in limits(), wanted in limits()) {
            prop_assert_eq!(held.admits(&wanted).is_ok(), within(&wanted, &held));
        }

        #[test]
        fn a_chain_of_minted_tokens_never_reaches_further_than_its_first(chain in chains()) {
            let admitted: Vec<_> = chain.windows(2).take_while(|w| w[0].admits(&w[1]).is_ok()).collect();
            if let Some(last) = admitted.last() {
                prop_assert!(within(&last[1], &chain[0]));
            }
        }
    }

    #[test]
    fn the_refusal_names_what_would_widen() {
        let at = time::OffsetDateTime::UNIX_EPOCH;
        let held = TokenLimits {
            app: Some(AppId::from_uuid(Uuid::from_u128(1))),
            scopes: None,
            expires_at: Some(at),
        };
        assert_eq!(held.admits(&TokenLimits::default()), Err(Widening::App));
        let same_app = TokenLimits { app: held.app, ..TokenLimits::default() };
        assert_eq!(held.admits(&same_app), Err(Widening::Expiry(at)));
        assert!(Widening::Expiry(at).to_string().ends_with("expires at 1970-01-01T00:00:00.000Z)"));
        let narrowed = TokenLimits { scopes: Some(ScopeSet::EMPTY.with(Scope::AppRead)), ..held };
        assert_eq!(narrowed.admits(&TokenLimits { expires_at: Some(at), ..same_app }), Err(Widening::Scopes));
    }

    #[test]
    fn a_token_lives_one_second_to_ten_years() {
        assert_eq!(token_lifetime(0), Err(LifetimeOutOfRange));
        assert_eq!(token_lifetime(1), Ok(std::time::Duration::from_secs(1)));
        assert!(token_lifetime(MAX_TOKEN_LIFETIME_S).is_ok());
        assert_eq!(token_lifetime(MAX_TOKEN_LIFETIME_S + 1), Err(LifetimeOutOfRange));
        assert_eq!(MAX_TOKEN_LIFETIME_S / (365 * 86_400), 10, "the refusal says ten years");
    }

    /// Relays sign and API nodes verify, and in a rolling upgrade they run different versions:
    /// the layout of a token is a wire format, pinned here by one fixed token.
    #[test]
    fn the_token_layout_is_fixed_across_versions() {
        let key = TokenKey::new(b"a fixed key of the layout test");
        let token = DeliveryToken {
            principal: PrincipalId::from_uuid(Uuid::from_u128(0x0192_0000_0000_7000_8000_0000_0000_0001)),
            app: AppId::from_uuid(Uuid::from_u128(0x0192_0000_0000_7000_8000_0000_0000_0002)),
            depth: 2,
            deadline_ms: 1_764_324_030_123,
            scopes: ScopeSet::for_role(Role::Developer),
        };
        const SIGNED: &str = concat!(
            "pdt_AQGSAAAAAHAAgAAAAAAAAAEBkgAAAABwAIAAAAAAAAACAAAAAgAAAZrJ6DarfA",
            "._FIsS_0gy5tolCYUuSpE-uxUe7sKZVC4Quz32d7AUPQ"
        );
        assert_eq!(key.sign(&token), SIGNED);
        assert_eq!(key.verify(SIGNED, 0), Ok(token));
    }

    #[test]
    fn a_form_token_belongs_to_its_session_and_its_key() {
        let key = TokenKey::new(b"key-one");
        let form = key.form_token("pcr_session");
        assert!(key.is_form_token("pcr_session", &form));
        assert!(!key.is_form_token("pcr_other", &form), "another session's");
        assert!(!TokenKey::new(b"key-two").is_form_token("pcr_session", &form), "another key's");
        assert!(!key.is_form_token("pcr_session", ""), "none");
        assert!(!key.is_form_token("pcr_session", "not base64!"));
    }
}
