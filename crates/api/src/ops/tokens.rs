//! API tokens: minted no wider than the credentials minting them (`TokenLimits::admits`),
//! revoked by their owner or a principal manager, and the first platform admin's.

use std::time::Duration;

use picloud_core::token::{Widening, generate_api_token, hash_api_token, token_lifetime};
use picloud_core::{Capability, PrincipalId, Scope, ScopeSet};
use picloud_store::{NewApiToken, NewPlatformAdmin, Store};
use uuid::Uuid;

use super::Ops;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorCode};
use crate::views::{CreateToken, TokenCreated};

/// The scopes a token is asked for, by name: 422 naming the first that is not one.
fn scopes(names: &[String]) -> Result<ScopeSet, ApiError> {
    names
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Scope::parse(s).ok_or_else(|| {
                ApiError::invalid(
                    &format!("scopes[{i}]"),
                    "expected platform_admin, app_admin, app_write, app_publish, app_send, app_invoke or app_read",
                )
            })
        })
        .collect()
}

/// How long a token is asked to live, if it is: [`token_lifetime`]'s range, or 422.
fn lifetime(seconds: Option<u64>) -> Result<Option<Duration>, ApiError> {
    seconds
        .map(token_lifetime)
        .transpose()
        .map_err(|range| ApiError::invalid("expires_in_s", format!("expected {range}")))
}

impl<S: Store> Ops<S> {
    /// Mints a token, for the caller or (with ManagePrincipals) another principal, limited to an
    /// app the principal holds a role on when one is named. It can be no wider than the
    /// credentials minting it, and outlive them no more. The secret is in the answer only.
    pub async fn mint_token(&self, caller: &Caller, body: &CreateToken) -> Result<TokenCreated, ApiError> {
        if caller.is_delivery() {
            return Err(ApiError::forbidden("delivery tokens cannot mint tokens"));
        }
        let principal_id = body.principal_id.map(PrincipalId::from_uuid).unwrap_or(caller.principal.id);
        if principal_id != caller.principal.id {
            caller.require(Capability::ManagePrincipals)?;
        }
        let standing = self
            .store
            .authenticate_principal(principal_id, body.app.as_deref())
            .await?
            .ok_or(picloud_store::Error::PrincipalNotFound(principal_id))?;
        // An app the token's principal holds no role on is answered like one that does not
        // exist: the same rule as every app route, so that slugs cannot be probed here either.
        // The operator, who reads the database anyway, may mint it as asked.
        let app = match body.app.as_deref() {
            Some(slug) => Some(
                standing
                    .app
                    .filter(|_| {
                        caller.is_operator() || standing.principal.platform_admin || standing.role.is_some()
                    })
                    .ok_or_else(|| ApiError::new(ErrorCode::AppNotFound, format!("no app {slug}")))?,
            ),
            None => None,
        };
        // Each limit is read, then held to the caller's, in turn: what is asked of the first
        // is answered before the next is read.
        let held = caller.token_limits();
        let widening = |widening: Widening| ApiError::forbidden(widening.to_string());
        let app_id = app.as_ref().map(|a| a.id);
        held.admits_app(app_id).map_err(widening)?;
        let scopes = body.scopes.as_deref().map(scopes).transpose()?;
        held.admits_scopes(scopes).map_err(widening)?;
        let expires_at = lifetime(body.expires_in_s)?.map(|after| self.store.clock().now() + after);
        held.admits_expiry(expires_at).map_err(widening)?;
        let secret = generate_api_token();
        let token = self
            .store
            .create_token(&NewApiToken {
                id: Uuid::now_v7(),
                principal_id,
                token_hash: hash_api_token(&secret),
                app_id,
                scopes,
                expires_at,
            })
            .await?;
        Ok(TokenCreated::new(&token, secret, app.map(|a| a.slug.into_string())))
    }

    /// Revokes a token: its owner's own, or any with ManagePrincipals. A token revoked already is
    /// as gone as one that never was.
    pub async fn revoke_token(&self, caller: &Caller, id: &str) -> Result<(), ApiError> {
        let not_found = || ApiError::new(ErrorCode::TokenNotFound, format!("no token {id}"));
        let token_id: Uuid = id.parse().map_err(|_| not_found())?;
        let token = self.store.token(token_id).await?.ok_or_else(not_found)?;
        if token.principal_id != caller.principal.id || caller.is_delivery() {
            caller.require(Capability::ManagePrincipals)?;
        }
        if self.store.revoke_token(token_id).await? { Ok(()) } else { Err(not_found()) }
    }

    /// Creates a platform-admin principal named `name` and its token, living `expires_in` when
    /// given: the operator's way in to a database without one. Refused (`Ok(None)`) when a
    /// platform admin exists already, unless `force`.
    pub async fn bootstrap(
        &self,
        name: String,
        force: bool,
        expires_in: Option<Duration>,
    ) -> Result<Option<TokenCreated>, ApiError> {
        let secret = generate_api_token();
        let admin = NewPlatformAdmin {
            name,
            token_id: Uuid::now_v7(),
            token_hash: hash_api_token(&secret),
            expires_at: lifetime(expires_in.map(|d| d.as_secs()))?
                .map(|after| self.store.clock().now() + after),
        };
        let mut tx = self.store.begin().await?;
        let (_, token) = match self.store.bootstrap_platform_admin(&mut tx, &admin, force).await {
            Err(picloud_store::Error::PlatformAdminExists) => return Ok(None),
            bootstrapped => bootstrapped?,
        };
        self.store.commit(tx).await?;
        Ok(Some(TokenCreated::new(&token, secret, None)))
    }
}
