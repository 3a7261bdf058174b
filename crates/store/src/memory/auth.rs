//! Principals, apps, memberships and tokens in memory.

use super::*;

impl AuthRepo for MemStore {
    async fn authenticate_token(&self, hash: &[u8; 32], app: Option<&str>) -> Result<Option<Authenticated>> {
        let s = self.lock().await;
        Ok(s.tokens.values().find(|(_, h)| h == hash).and_then(|(token, _)| {
            s.principals.get(&token.principal_id).map(|p| s.authenticated(p, Some(token.clone()), app))
        }))
    }

    async fn authenticate_principal(
        &self,
        principal: PrincipalId,
        app: Option<&str>,
    ) -> Result<Option<Authenticated>> {
        let s = self.lock().await;
        Ok(s.principals.get(&principal).map(|p| s.authenticated(p, None, app)))
    }

    async fn config_epoch(&self, tx: &mut MemTx) -> Result<i64> {
        Ok(tx.state.config_epoch)
    }

    async fn create_app(&self, slug: &AppSlug) -> Result<App> {
        let mut s = self.lock().await;
        if s.apps.values().any(|a| a.slug == *slug) {
            return Err(Error::DuplicateApp(slug.to_string()));
        }
        let app = App { id: AppId::new(), slug: slug.clone(), created_at: self.now() };
        s.apps.insert(app.id, app.clone());
        s.config_epoch += 1;
        Ok(app)
    }

    async fn app_by_slug(&self, slug: &str) -> Result<Option<App>> {
        Ok(self.lock().await.apps.values().find(|a| a.slug.as_str() == slug).cloned())
    }

    async fn app_by_id(&self, id: AppId) -> Result<Option<App>> {
        Ok(self.lock().await.apps.get(&id).cloned())
    }

    async fn list_apps(
        &self,
        member: Option<PrincipalId>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Page<App>> {
        let s = self.lock().await;
        let mut apps: Vec<App> = s
            .apps
            .values()
            .filter(|a| member.is_none_or(|p| s.members.contains_key(&(a.id, p))))
            .filter(|a| after.is_none_or(|after| a.slug.as_str() > after))
            .cloned()
            .collect();
        apps.sort_by(|a, b| a.slug.cmp(&b.slug));
        apps.truncate(limit as usize + 1);
        Ok(Page::of(apps, limit))
    }

    async fn delete_app(&self, id: AppId) -> Result<bool> {
        let mut s = self.lock().await;
        if s.apps.remove(&id).is_none() {
            return Ok(false);
        }
        s.members.retain(|(app, _), _| *app != id);
        s.tokens.retain(|_, (t, _)| t.app_id != Some(id));
        s.kv.retain(|(app, _, _), _| *app != id);
        s.triggers.retain(|_, t| t.app_id != id);
        let State { triggers, cron_ticks, .. } = &mut *s;
        cron_ticks.retain(|trigger, _| triggers.contains_key(trigger));
        s.outbox.retain(|_, r| r.new.app_id != id);
        s.dead_letters.retain(|_, d| d.app_id != id);
        s.abandoned.retain(|_, a| a.app_id != id);
        s.config_epoch += 1;
        Ok(true)
    }

    async fn create_principal(&self, name: &str, platform_admin: bool) -> Result<Principal> {
        let now = self.now();
        Ok(self.lock().await.insert_principal(name, platform_admin, now))
    }

    async fn principal(&self, id: PrincipalId) -> Result<Option<Principal>> {
        Ok(self.lock().await.principals.get(&id).cloned())
    }

    async fn set_role(&self, app_id: AppId, principal_id: PrincipalId, role: Role) -> Result<()> {
        let mut s = self.lock().await;
        if !s.principals.contains_key(&principal_id) {
            return Err(Error::PrincipalNotFound(principal_id));
        }
        if !s.apps.contains_key(&app_id) {
            return Err(Error::AppNotFound(app_id.to_string()));
        }
        s.members.insert((app_id, principal_id), role);
        s.config_epoch += 1;
        Ok(())
    }

    async fn remove_member(&self, app_id: AppId, principal_id: PrincipalId) -> Result<bool> {
        let mut s = self.lock().await;
        s.config_epoch += 1;
        Ok(s.members.remove(&(app_id, principal_id)).is_some())
    }

    async fn standing(&self, app_id: AppId, principal_id: PrincipalId) -> Result<Option<Standing>> {
        let s = self.lock().await;
        Ok(s.principals.get(&principal_id).map(|p| Standing {
            platform_admin: p.platform_admin,
            role: s.members.get(&(app_id, principal_id)).copied(),
        }))
    }

    async fn create_token(&self, token: &NewApiToken) -> Result<ApiToken> {
        let now = self.now();
        self.lock().await.insert_token(token, now)
    }

    async fn token_by_hash(&self, hash: &[u8; 32]) -> Result<Option<(ApiToken, Principal)>> {
        let s = self.lock().await;
        Ok(s.tokens
            .values()
            .find(|(_, h)| h == hash)
            .and_then(|(t, _)| s.principals.get(&t.principal_id).map(|p| (t.clone(), p.clone()))))
    }

    async fn token(&self, id: Uuid) -> Result<Option<ApiToken>> {
        Ok(self.lock().await.tokens.get(&id).map(|(t, _)| t.clone()))
    }

    async fn revoke_token(&self, id: Uuid) -> Result<bool> {
        let now = self.now();
        let mut s = self.lock().await;
        match s.tokens.get_mut(&id) {
            Some((t, _)) if t.revoked_at.is_none() => {
                t.revoked_at = Some(now);
                s.config_epoch += 1;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn bootstrap_platform_admin(
        &self,
        tx: &mut MemTx,
        admin: &NewPlatformAdmin,
        force: bool,
    ) -> Result<(Principal, ApiToken)> {
        let s = &mut *tx.state;
        if !force && s.principals.values().any(|p| p.platform_admin) {
            return Err(Error::PlatformAdminExists);
        }
        let now = self.now();
        let principal = s.insert_principal(&admin.name, true, now);
        let token = s.insert_token(
            &NewApiToken {
                id: admin.token_id,
                principal_id: principal.id,
                token_hash: admin.token_hash,
                app_id: None,
                scopes: None,
                expires_at: admin.expires_at,
            },
            now,
        )?;
        Ok((principal, token))
    }
}
