//! Apps, principals and memberships.

use picloud_core::{AppSlug, Capability, PrincipalId, Role};
use picloud_store::Store;

use super::Ops;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorCode};
use crate::extract::{Page, PageQuery};
use crate::views::{AppView, MemberView, PrincipalView};

/// A principal's id: a text that is not one names no principal.
pub(crate) fn principal_id(raw: &str) -> Result<PrincipalId, ApiError> {
    raw.parse().map_err(|_| ApiError::new(ErrorCode::PrincipalNotFound, format!("no principal {raw}")))
}

impl<S: Store> Ops<S> {
    /// Creates an app (platform admins).
    pub async fn create_app(&self, caller: &Caller, slug: String) -> Result<AppView, ApiError> {
        caller.require(Capability::ManageApps)?;
        let slug = AppSlug::parse(slug).map_err(|e| ApiError::invalid("slug", e))?;
        Ok(self.store.create_app(&slug).await?.into())
    }

    /// A page of the apps the caller can see, by slug: every app for platform admins, else the
    /// caller's, and only its one app for credentials limited to one.
    pub async fn list_apps(&self, caller: &Caller, page: &PageQuery) -> Result<Page<AppView>, ApiError> {
        let member = if caller.principal.platform_admin { None } else { Some(caller.principal.id) };
        let after = page.after()?;
        let mut found = self.store.list_apps(member, after.as_deref(), page.limit()).await?;
        if let Some(only) = caller.limited_to_app() {
            found.items.retain(|a| a.id == only);
        }
        Ok(Page::from_store(found, |a| a.slug.to_string(), AppView::from))
    }

    /// Deletes the caller's app and everything of it (platform admins).
    pub async fn delete_app(&self, caller: &Caller) -> Result<AppView, ApiError> {
        caller.require(Capability::ManageApps)?;
        let app = caller.require_app(Capability::AppRead)?;
        self.store.delete_app(app.id).await?;
        Ok(app.clone().into())
    }

    /// Creates a principal (platform admins).
    pub async fn create_principal(
        &self,
        caller: &Caller,
        name: &str,
        platform_admin: bool,
    ) -> Result<PrincipalView, ApiError> {
        caller.require(Capability::ManagePrincipals)?;
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 200 {
            return Err(ApiError::invalid("name", "expected 1 to 200 characters"));
        }
        Ok(self.store.create_principal(name, platform_admin).await?.into())
    }

    /// Gives a principal a role on the caller's app.
    pub async fn set_member(
        &self,
        caller: &Caller,
        principal: &str,
        role: &str,
    ) -> Result<MemberView, ApiError> {
        let app = caller.require_app(Capability::AppManageMembers)?;
        let role = Role::parse(role)
            .ok_or_else(|| ApiError::invalid("role", "expected viewer, developer or admin"))?;
        let principal_id = principal_id(principal)?;
        self.store.set_role(app.id, principal_id, role).await?;
        Ok(MemberView { app: app.slug.to_string(), principal_id: principal_id.as_uuid(), role })
    }

    /// Takes a principal's role on the caller's app away.
    pub async fn remove_member(&self, caller: &Caller, principal: &str) -> Result<(), ApiError> {
        let app = caller.require_app(Capability::AppManageMembers)?;
        if self.store.remove_member(app.id, principal_id(principal)?).await? {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::MemberNotFound,
                format!("{principal} is not a member of {}", app.slug),
            ))
        }
    }
}
