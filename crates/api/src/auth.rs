//! Who is calling: a bearer API token (`pcr_…`, looked up by its SHA-256) or a delivery token
//! (`pdt_…`, verified with the node's key), resolved together with the app the route names, and
//! the capability checks of DESIGN §9.

use std::collections::HashMap;

use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use picloud_core::token::{
    DELIVERY_TOKEN_PREFIX, DeliveryToken, TokenError, TokenKey, TokenLimits, hash_api_token,
};
use picloud_core::{Access, AppId, Capability, PrincipalId, Role, ScopeSet};
use picloud_store::{ApiToken, App, Principal, Store, Transactional as _};

use crate::ApiState;
use crate::error::{ApiError, ErrorCode};

/// How the caller authenticated.
#[derive(Debug, Clone)]
pub enum Via {
    /// An API token.
    Token(ApiToken),
    /// A delivery token handed to a handler: acts as the trigger's principal on one app, one
    /// level deeper.
    Delivery(DeliveryToken),
    /// The node's operator (`picloud-router admin`, `dev`, the benchmarks), whose authority is
    /// access to the database itself: every capability, no token limits, depth 0.
    Operator,
}

/// An authenticated caller, with the app its route names (when it exists) and its role there.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The principal acting.
    pub principal: Principal,
    /// How it authenticated: read through [`Caller::via`], so that no code holding a caller
    /// can turn it into another kind (the operator least of all).
    via: Via,
    app: Option<App>,
    role: Option<Role>,
    /// The configuration epoch all this was read at.
    authorized_at: i64,
}

impl Caller {
    /// The node's operator on `app`, acting as no principal of the database: for operations
    /// that record no one as having acted (all but registering a trigger).
    pub fn operator(app: Option<App>) -> Caller {
        let nobody = Principal {
            id: PrincipalId::NOBODY,
            name: "operator".to_owned(),
            platform_admin: true,
            created_at: time::OffsetDateTime::UNIX_EPOCH,
        };
        Caller::operator_as(nobody, app)
    }

    /// The node's operator acting as `principal` on `app`: `principal` is who an operation records
    /// as acting (the principal a trigger runs as); the authority is the operator's, whatever
    /// the principal's role.
    pub fn operator_as(principal: Principal, app: Option<App>) -> Caller {
        let principal = Principal { platform_admin: true, ..principal };
        Caller { principal, via: Via::Operator, app, role: None, authorized_at: 0 }
    }

    /// The depth of events this caller writes: 0, or one more than the delivery's.
    pub fn depth(&self) -> u32 {
        match &self.via {
            Via::Token(_) | Via::Operator => 0,
            Via::Delivery(token) => token.depth,
        }
    }

    /// The scopes the credentials are narrowed to, if any.
    fn token_scopes(&self) -> Option<ScopeSet> {
        match &self.via {
            Via::Token(token) => token.scopes,
            // Read through the delivery rule too: a token signed before it holds no more.
            Via::Delivery(token) => Some(token.scopes.for_delivery()),
            Via::Operator => None,
        }
    }

    /// The app the credentials are limited to, if any.
    pub fn limited_to_app(&self) -> Option<AppId> {
        match &self.via {
            Via::Token(token) => token.app_id,
            Via::Delivery(token) => Some(token.app),
            Via::Operator => None,
        }
    }

    /// The configuration epoch the caller's authorization was read at.
    pub fn authorized_at(&self) -> i64 {
        self.authorized_at
    }

    /// Whether this is a delivery token.
    pub fn is_delivery(&self) -> bool {
        matches!(self.via, Via::Delivery(_))
    }

    /// Whether this is the node's operator (`admin`, `dev`, the benchmarks), never a request.
    pub fn is_operator(&self) -> bool {
        matches!(self.via, Via::Operator)
    }

    /// How the caller authenticated.
    pub fn via(&self) -> &Via {
        &self.via
    }

    /// How far the credentials reach, for what they may mint: an operator's and an unlimited
    /// token's not at all.
    pub(crate) fn token_limits(&self) -> TokenLimits {
        match &self.via {
            Via::Token(token) => {
                TokenLimits { app: token.app_id, scopes: token.scopes, expires_at: token.expires_at }
            }
            Via::Delivery(token) => TokenLimits {
                app: Some(token.app),
                scopes: Some(token.scopes.for_delivery()),
                expires_at: None,
            },
            Via::Operator => TokenLimits::default(),
        }
    }

    /// What the caller holds on the route's app.
    pub fn access(&self) -> Access {
        Access {
            platform_admin: self.principal.platform_admin,
            role: self.role,
            token_scopes: self.token_scopes(),
        }
    }

    /// The route's app, if the caller may exercise `capability` on it: 404 when it does not
    /// exist or the caller may not see it (no role on it, or credentials limited to another
    /// app) — the same answer, so that slugs cannot be probed —, and 403 when the caller sees it
    /// but lacks the role or scope.
    pub fn require_app(&self, capability: Capability) -> Result<&App, ApiError> {
        let app = self
            .app
            .as_ref()
            .filter(|app| self.sees(app))
            .ok_or_else(|| ApiError::new(ErrorCode::AppNotFound, "no such app"))?;
        self.check(capability, Some(&app.slug))?;
        Ok(app)
    }

    /// Whether the caller may know that `app` exists: a platform admin or a member, with
    /// credentials not limited to another app.
    fn sees(&self, app: &App) -> bool {
        (self.principal.platform_admin || self.role.is_some())
            && self.limited_to_app().is_none_or(|limited| limited == app.id)
    }

    /// Checks a capability that is not about one app (ManageApps, ManagePrincipals): never
    /// granted to credentials limited to one app (app-limited tokens, delivery tokens).
    pub fn require(&self, capability: Capability) -> Result<(), ApiError> {
        if self.limited_to_app().is_some() {
            return Err(ApiError::forbidden(format!(
                "{capability:?} is not about one app, and these credentials are limited to one app"
            )));
        }
        self.check(capability, None)
    }

    fn check(&self, capability: Capability, app: Option<&picloud_core::AppSlug>) -> Result<(), ApiError> {
        if self.access().allows(capability) {
            return Ok(());
        }
        let scope = capability.scope();
        let on = app.map(|a| format!(" on app {a}")).unwrap_or_default();
        Err(ApiError::forbidden(format!(
            "{capability:?} needs the {scope} scope{on}, which these credentials do not hold"
        )))
    }
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, Self::Rejection> {
        let credentials = bearer(&parts.headers)?.to_owned();
        let app = RawPathParams::from_request_parts(parts, state).await.ok().and_then(|params| {
            params.iter().find(|(name, _)| *name == "app").map(|(_, value)| value.to_owned())
        });
        authenticate(state, &credentials, app.as_deref()).await
    }
}

/// Resolves credentials (the text after `Bearer `) and the named app on the node of `state`.
/// Shared with the ingest, and with the routes that keep authorizations ([`fresh_caller`]).
pub async fn authenticate(
    state: &ApiState,
    credentials: &str,
    app: Option<&str>,
) -> Result<Caller, ApiError> {
    resolve(state.ops.store(), &state.config.node.token_key, credentials, app).await
}

/// Resolves credentials and the named app in `store`: an API token by its hash, a delivery token
/// by `key`'s signature; expiry is read on the store's clock.
pub(crate) async fn resolve<S: Store>(
    store: &S,
    key: &TokenKey,
    credentials: &str,
    app: Option<&str>,
) -> Result<Caller, ApiError> {
    let now = store.clock().now();
    if credentials.starts_with(DELIVERY_TOKEN_PREFIX) {
        let now_ms = (now.unix_timestamp_nanos() / 1_000_000) as i64;
        let token = key.verify(credentials, now_ms).map_err(|e| match e {
            TokenError::Expired => {
                ApiError::new(ErrorCode::TokenExpired, "the delivery token is past its deadline")
            }
            _ => ApiError::new(ErrorCode::InvalidToken, "the delivery token is not valid"),
        })?;
        let found = store.authenticate_principal(token.principal, app).await?.ok_or_else(|| {
            ApiError::new(ErrorCode::InvalidToken, "the delivery token's principal no longer exists")
        })?;
        return Ok(Caller {
            principal: found.principal,
            via: Via::Delivery(token),
            app: found.app,
            role: found.role,
            authorized_at: found.config_epoch,
        });
    }
    let found = store
        .authenticate_token(&hash_api_token(credentials), app)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::InvalidToken, "unknown token"))?;
    let token = found.token.expect("a token look-up returns the token");
    if token.revoked_at.is_some() {
        return Err(ApiError::new(ErrorCode::TokenRevoked, "the token was revoked"));
    }
    if expired(&token, now) {
        return Err(ApiError::new(ErrorCode::TokenExpired, "the token has expired"));
    }
    Ok(Caller {
        principal: found.principal,
        via: Via::Token(token),
        app: found.app,
        role: found.role,
        authorized_at: found.config_epoch,
    })
}

/// Whether `token` has expired at `now` (the store's clock).
fn expired(token: &ApiToken, now: time::OffsetDateTime) -> bool {
    token.expires_at.is_some_and(|at| at <= now)
}

/// The credentials of an `Authorization: Bearer <token>` header: 401 when it is missing or
/// malformed.
pub fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let header = headers.get(axum::http::header::AUTHORIZATION).ok_or_else(|| {
        ApiError::new(ErrorCode::MissingToken, "an Authorization: Bearer <token> header is required")
    })?;
    header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::new(ErrorCode::InvalidToken, "the Authorization header must be `Bearer <token>`")
        })
}

/// Most authorizations [`KeptAuthorizations`] keeps; past that it starts over.
const KEPT_AUTHORIZATIONS: usize = 4096;

/// API-token callers by token hash and app, each as read at a configuration epoch, for the
/// routes whose write guards itself with that epoch: sync invocations
/// (`picloud_store::events::SyncWaiter::authorized_at`) and KV puts
/// (`picloud_store::FiringPut::authorized_at`). An authorization is used only while it is exactly
/// as fresh as reading it again: a write that finds the epoch moved writes nothing, and the route
/// authenticates afresh ([`kept_caller`], [`fresh_caller`], [`confirmed`]).
#[derive(Debug, Default)]
pub struct KeptAuthorizations(std::sync::Mutex<HashMap<([u8; 32], String), Caller>>);

impl KeptAuthorizations {
    /// The caller `credentials` authenticate as on `app`, if kept and its token has not expired
    /// at `now` (the store's clock).
    pub fn get(&self, credentials: &str, app: &str, now: time::OffsetDateTime) -> Option<Caller> {
        let key = (hash_api_token(credentials), app.to_owned());
        let caller = self.0.lock().expect("authorization cache lock").get(&key).cloned()?;
        match &caller.via {
            Via::Token(token) if !expired(token, now) => Some(caller),
            _ => None,
        }
    }

    /// Keeps `caller`, just authenticated on `app` with API-token `credentials`.
    pub fn keep(&self, credentials: &str, app: &str, caller: &Caller) {
        if !matches!(caller.via, Via::Token(_)) {
            return;
        }
        let mut kept = self.0.lock().expect("authorization cache lock");
        if kept.len() >= KEPT_AUTHORIZATIONS {
            kept.clear();
        }
        kept.insert((hash_api_token(credentials), app.to_owned()), caller.clone());
    }

    /// Forgets what `credentials` were allowed on `app`.
    pub fn forget(&self, credentials: &str, app: &str) {
        self.0
            .lock()
            .expect("authorization cache lock")
            .remove(&(hash_api_token(credentials), app.to_owned()));
    }
}

/// Authenticates `credentials` afresh on `app` and checks that they hold `capability` there.
/// What they authenticate as is kept for the next request, whatever capability that one needs
/// ([`kept_caller`] checks it); credentials that do not authenticate are forgotten.
pub async fn fresh_caller(
    state: &ApiState,
    credentials: &str,
    app: &str,
    capability: Capability,
) -> Result<Caller, ApiError> {
    match authenticate(state, credentials, Some(app)).await {
        Ok(caller) => {
            state.kept.keep(credentials, app, &caller);
            caller.require_app(capability)?;
            Ok(caller)
        }
        Err(refused) => {
            state.kept.forget(credentials, app);
            Err(refused)
        }
    }
}

/// The caller `credentials` authenticate as on `app`, holding `capability` there: the one kept
/// from an earlier request, with the configuration epoch its write must still find (`Some`), or
/// one read afresh by [`fresh_caller`], whose write needs no guard (`None`).
pub async fn kept_caller(
    state: &ApiState,
    credentials: &str,
    app: &str,
    capability: Capability,
) -> Result<(Caller, Option<i64>), ApiError> {
    if let Some(caller) = state.kept.get(credentials, app, state.ops.store().clock().now())
        && caller.require_app(capability).is_ok()
    {
        let epoch = caller.authorized_at();
        return Ok((caller, Some(epoch)));
    }
    Ok((fresh_caller(state, credentials, app, capability).await?, None))
}

/// A write made on an authorization that may have been kept from an earlier request.
#[derive(Debug)]
pub enum Guarded<T> {
    /// Written.
    Written(T),
    /// Not written: the authorization was kept, and the configuration changed since it was read.
    Stale,
}

impl<T> Guarded<T> {
    /// What a write made without a kept authorization wrote: such a write is never stale.
    pub fn unguarded(self) -> Result<T, ApiError> {
        match self {
            Guarded::Written(written) => Ok(written),
            Guarded::Stale => Err(ApiError::internal("an unguarded write was found stale")),
        }
    }
}

/// Makes `write` as `authorized` (what [`kept_caller`] gave for `credentials` on `app` and
/// `capability`): a write found [stale](Guarded::Stale) is made again, unguarded, as the caller
/// authenticated afresh, and an error met on a kept authorization is told once it is
/// [confirmed].
pub async fn write_as<T, Fut>(
    state: &ApiState,
    credentials: &str,
    app: &str,
    capability: Capability,
    authorized: (Caller, Option<i64>),
    mut write: impl FnMut(Caller, Option<i64>) -> Fut,
) -> Result<T, ApiError>
where
    Fut: Future<Output = Result<Guarded<T>, ApiError>>,
{
    let (mut caller, mut authorized_at) = authorized;
    loop {
        match write(caller, authorized_at).await {
            Ok(Guarded::Stale) if authorized_at.is_some() => {
                caller = fresh_caller(state, credentials, app, capability).await?;
                authorized_at = None;
            }
            Ok(written) => return written.unguarded(),
            Err(refused) => {
                return Err(confirmed(state, credentials, app, capability, authorized_at, refused).await);
            }
        }
    }
}

/// `refused`, the answer to a request made on a kept authorization (`authorized_at` is `Some`),
/// once the authorization is confirmed: a node that had not kept it would have refused the caller
/// first.
pub async fn confirmed(
    state: &ApiState,
    credentials: &str,
    app: &str,
    capability: Capability,
    authorized_at: Option<i64>,
    refused: ApiError,
) -> ApiError {
    if authorized_at.is_some()
        && let Err(unauthorized) = fresh_caller(state, credentials, app, capability).await
    {
        return unauthorized;
    }
    refused
}
