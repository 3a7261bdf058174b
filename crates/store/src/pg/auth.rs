//! Apps, principals, memberships and API tokens in Postgres.

use picloud_core::{AppId, AppSlug, PrincipalId, Role};
use sqlx::Row;
use uuid::Uuid;

use super::rows;
use super::{PgStore, violated};
use crate::model::*;
use crate::{AuthRepo, Authenticated, Error, Result, Standing};

const AUTHENTICATED: &str = "p.id AS principal_id, p.name AS principal_name, p.platform_admin,
       p.created_at AS principal_created_at,
       a.id AS app_id, a.slug AS app_slug, a.created_at AS app_created_at, m.role,
       (SELECT epoch FROM config_epoch) AS config_epoch";

fn authenticated(row: &sqlx::postgres::PgRow, token: Option<ApiToken>) -> Result<Authenticated> {
    let app_id: Option<AppId> = rows::opt_id(row, "app_id")?;
    let app = match app_id {
        Some(id) => Some(App {
            id,
            slug: AppSlug::parse(row.try_get::<String, _>("app_slug")?)
                .map_err(|e| rows::corrupt("apps", e.to_string()))?,
            created_at: row.try_get("app_created_at")?,
        }),
        None => None,
    };
    Ok(Authenticated {
        principal: Principal {
            id: rows::id(row, "principal_id")?,
            name: row.try_get("principal_name")?,
            platform_admin: row.try_get("platform_admin")?,
            created_at: row.try_get("principal_created_at")?,
        },
        token,
        app,
        role: rows::role(row.try_get("role")?)?,
        config_epoch: row.try_get("config_epoch")?,
    })
}

impl AuthRepo for PgStore {
    async fn authenticate_token(&self, hash: &[u8; 32], app: Option<&str>) -> Result<Option<Authenticated>> {
        let row = sqlx::query(&format!(
            "SELECT t.id, t.principal_id, t.app_id AS token_app_id, t.scopes, t.expires_at, t.revoked_at,
                    t.created_at, {AUTHENTICATED}
               FROM api_tokens t
               JOIN principals p ON p.id = t.principal_id
               LEFT JOIN apps a ON a.slug = $2
               LEFT JOIN app_members m ON m.app_id = a.id AND m.principal_id = p.id
              WHERE t.token_hash = $1"
        ))
        .bind(&hash[..])
        .bind(app)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            let token = ApiToken {
                id: r.try_get("id")?,
                principal_id: rows::id(&r, "principal_id")?,
                app_id: rows::opt_id(&r, "token_app_id")?,
                scopes: rows::scopes_from("api_tokens", r.try_get("scopes")?)?,
                expires_at: r.try_get("expires_at")?,
                revoked_at: r.try_get("revoked_at")?,
                created_at: r.try_get("created_at")?,
            };
            authenticated(&r, Some(token))
        })
        .transpose()
    }

    async fn authenticate_principal(
        &self,
        principal: PrincipalId,
        app: Option<&str>,
    ) -> Result<Option<Authenticated>> {
        let row = sqlx::query(&format!(
            "SELECT {AUTHENTICATED}
               FROM principals p
               LEFT JOIN apps a ON a.slug = $2
               LEFT JOIN app_members m ON m.app_id = a.id AND m.principal_id = p.id
              WHERE p.id = $1"
        ))
        .bind(principal.as_uuid())
        .bind(app)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| authenticated(&r, None)).transpose()
    }

    async fn config_epoch(&self, tx: &mut Self::Tx) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT epoch FROM config_epoch").fetch_one(&mut **tx).await?)
    }

    async fn create_app(&self, slug: &AppSlug) -> Result<App> {
        let row = sqlx::query(
            "INSERT INTO apps (id, slug, created_at) VALUES ($1, $2, coalesce($3, now()))
             RETURNING id, slug, created_at",
        )
        .bind(AppId::new().as_uuid())
        .bind(slug.as_str())
        .bind(self.now())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| match violated(&e) {
            Some((code, _)) if code == "23505" => Error::DuplicateApp(slug.to_string()),
            _ => e.into(),
        })?;
        rows::app(&row)
    }

    async fn app_by_slug(&self, slug: &str) -> Result<Option<App>> {
        let row = sqlx::query("SELECT id, slug, created_at FROM apps WHERE slug = $1")
            .bind(slug)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(rows::app).transpose()
    }

    async fn app_by_id(&self, id: AppId) -> Result<Option<App>> {
        let row = sqlx::query("SELECT id, slug, created_at FROM apps WHERE id = $1")
            .bind(id.as_uuid())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(rows::app).transpose()
    }

    async fn list_apps(
        &self,
        member: Option<PrincipalId>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Page<App>> {
        let fetched = sqlx::query(
            "SELECT a.id, a.slug, a.created_at FROM apps a
              WHERE ($1::uuid IS NULL
                     OR EXISTS (SELECT 1 FROM app_members m WHERE m.app_id = a.id AND m.principal_id = $1))
                AND ($2::text IS NULL OR a.slug > $2)
              ORDER BY a.slug LIMIT $3",
        )
        .bind(member.map(PrincipalId::as_uuid))
        .bind(after)
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        Ok(Page::of(fetched.iter().map(rows::app).collect::<Result<_>>()?, limit))
    }

    async fn delete_app(&self, id: AppId) -> Result<bool> {
        let id = id.as_uuid();
        let mut tx = self.pool.begin().await?;
        // The outbox and KV entries have no foreign keys (see the migration): their rows go
        // explicitly.
        sqlx::query("DELETE FROM outbox WHERE app_id = $1").bind(id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM kv_entries WHERE app_id = $1").bind(id).execute(&mut *tx).await?;
        let deleted = sqlx::query("DELETE FROM apps WHERE id = $1").bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(deleted.rows_affected() == 1)
    }

    async fn create_principal(&self, name: &str, platform_admin: bool) -> Result<Principal> {
        self.insert_principal(&self.pool, name, platform_admin).await
    }

    async fn principal(&self, id: PrincipalId) -> Result<Option<Principal>> {
        let row = sqlx::query("SELECT id, name, platform_admin, created_at FROM principals WHERE id = $1")
            .bind(id.as_uuid())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(rows::principal).transpose()
    }

    async fn set_role(&self, app_id: AppId, principal_id: PrincipalId, role: Role) -> Result<()> {
        sqlx::query(
            "INSERT INTO app_members (app_id, principal_id, role) VALUES ($1, $2, $3)
             ON CONFLICT (app_id, principal_id) DO UPDATE SET role = excluded.role",
        )
        .bind(app_id.as_uuid())
        .bind(principal_id.as_uuid())
        .bind(role.as_str())
        .execute(&self.pool)
        .await
        .map_err(|e| match violated(&e) {
            Some((code, constraint)) if code == "23503" && constraint.contains("principal") => {
                Error::PrincipalNotFound(principal_id)
            }
            Some((code, _)) if code == "23503" => Error::AppNotFound(app_id.to_string()),
            _ => e.into(),
        })?;
        Ok(())
    }

    async fn remove_member(&self, app_id: AppId, principal_id: PrincipalId) -> Result<bool> {
        let done = sqlx::query("DELETE FROM app_members WHERE app_id = $1 AND principal_id = $2")
            .bind(app_id.as_uuid())
            .bind(principal_id.as_uuid())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn standing(&self, app_id: AppId, principal_id: PrincipalId) -> Result<Option<Standing>> {
        let row = sqlx::query(
            "SELECT p.platform_admin, m.role FROM principals p
               LEFT JOIN app_members m ON m.principal_id = p.id AND m.app_id = $1
              WHERE p.id = $2",
        )
        .bind(app_id.as_uuid())
        .bind(principal_id.as_uuid())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(Standing {
                platform_admin: r.try_get("platform_admin")?,
                role: rows::role(r.try_get("role")?)?,
            })
        })
        .transpose()
    }

    async fn create_token(&self, token: &NewApiToken) -> Result<ApiToken> {
        self.insert_token(&self.pool, token).await
    }

    async fn token_by_hash(&self, hash: &[u8; 32]) -> Result<Option<(ApiToken, Principal)>> {
        let row = sqlx::query(
            "SELECT t.id, t.principal_id, t.app_id, t.scopes, t.expires_at, t.revoked_at, t.created_at,
                    p.name, p.platform_admin, p.created_at AS principal_created_at
               FROM api_tokens t JOIN principals p ON p.id = t.principal_id
              WHERE t.token_hash = $1",
        )
        .bind(&hash[..])
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            let token = rows::api_token(&r)?;
            let principal = Principal {
                id: token.principal_id,
                name: r.try_get("name")?,
                platform_admin: r.try_get("platform_admin")?,
                created_at: r.try_get("principal_created_at")?,
            };
            Ok((token, principal))
        })
        .transpose()
    }

    async fn token(&self, id: Uuid) -> Result<Option<ApiToken>> {
        let row = sqlx::query(
            "SELECT id, principal_id, app_id, scopes, expires_at, revoked_at, created_at
               FROM api_tokens WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(rows::api_token).transpose()
    }

    async fn revoke_token(&self, id: Uuid) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE api_tokens SET revoked_at = coalesce($2, now()) WHERE id = $1 AND revoked_at IS NULL",
        )
        .bind(id)
        .bind(self.now())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn bootstrap_platform_admin(
        &self,
        tx: &mut Self::Tx,
        admin: &NewPlatformAdmin,
        force: bool,
    ) -> Result<(Principal, ApiToken)> {
        // Conflicts with itself and with every insert of a principal: bootstraps take turns, and
        // the second of two finds the first one's admin.
        sqlx::query("LOCK TABLE principals IN SHARE ROW EXCLUSIVE MODE").execute(&mut **tx).await?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM principals WHERE platform_admin)")
                .fetch_one(&mut **tx)
                .await?;
        if exists && !force {
            return Err(Error::PlatformAdminExists);
        }
        let principal = self.insert_principal(&mut **tx, &admin.name, true).await?;
        let token = NewApiToken {
            id: admin.token_id,
            principal_id: principal.id,
            token_hash: admin.token_hash,
            app_id: None,
            scopes: None,
            expires_at: admin.expires_at,
        };
        let token = self.insert_token(&mut **tx, &token).await?;
        Ok((principal, token))
    }
}

impl PgStore {
    async fn insert_principal(
        &self,
        executor: impl sqlx::PgExecutor<'_>,
        name: &str,
        platform_admin: bool,
    ) -> Result<Principal> {
        let row = sqlx::query(
            "INSERT INTO principals (id, name, platform_admin, created_at)
             VALUES ($1, $2, $3, coalesce($4, now()))
             RETURNING id, name, platform_admin, created_at",
        )
        .bind(PrincipalId::new().as_uuid())
        .bind(name)
        .bind(platform_admin)
        .bind(self.now())
        .fetch_one(executor)
        .await?;
        rows::principal(&row)
    }

    async fn insert_token(
        &self,
        executor: impl sqlx::PgExecutor<'_>,
        token: &NewApiToken,
    ) -> Result<ApiToken> {
        let row = sqlx::query(
            "INSERT INTO api_tokens (id, principal_id, token_hash, app_id, scopes, expires_at, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, coalesce($7, now()))
             RETURNING id, principal_id, app_id, scopes, expires_at, revoked_at, created_at",
        )
        .bind(token.id)
        .bind(token.principal_id.as_uuid())
        .bind(&token.token_hash[..])
        .bind(token.app_id.map(AppId::as_uuid))
        .bind(rows::scopes_to(token.scopes))
        .bind(token.expires_at)
        .bind(self.now())
        .fetch_one(executor)
        .await
        .map_err(|e| match violated(&e) {
            Some((code, constraint)) if code == "23503" && constraint.contains("principal") => {
                Error::PrincipalNotFound(token.principal_id)
            }
            Some((code, _)) if code == "23503" => {
                Error::AppNotFound(token.app_id.map(|a| a.to_string()).unwrap_or_default())
            }
            _ => e.into(),
        })?;
        rows::api_token(&row)
    }
}
