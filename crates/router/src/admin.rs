//! `admin`: the operator's commands, straight against the database. Each prints the JSON the
//! HTTP API would answer, one document per line, so scripts can read it.

use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Subcommand;
use picloud_api::routes::dead_letters::{ignore_dead_letter, replay_dead_letter};
use picloud_api::views::{AppView, DeadLetterView, PrincipalView, TokenCreated, TriggerView};
use picloud_core::token::{generate_api_token, hash_api_token};
use picloud_core::{AppSlug, Role, TriggerConfig};
use picloud_store::{
    App, AuthRepo, DeadLetterFilter, DeadLetterRepo, NewApiToken, NewPlatformAdmin, PgStore,
    Transactional as _, TriggerRepo,
};
use serde::Serialize;
use uuid::Uuid;

/// Administration commands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create the first platform-admin principal and print its token (shown this once only).
    /// Refuses when a platform admin exists, unless --force.
    Bootstrap {
        /// The principal's name.
        #[arg(long, default_value = "admin")]
        name: String,
        /// Create another platform admin although one exists.
        #[arg(long)]
        force: bool,
        /// The token expires after this long: seconds, or a number with s, m, h or d (`30d`).
        /// Without it the token does not expire.
        #[arg(long, value_name = "DURATION", value_parser = parse_expires_in)]
        expires_in: Option<Duration>,
    },
    /// Apps.
    #[command(subcommand)]
    Apps(AppsCommand),
    /// Principals.
    #[command(subcommand)]
    Principals(PrincipalsCommand),
    /// App members and their roles.
    #[command(subcommand)]
    Members(MembersCommand),
    /// API tokens.
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Triggers.
    #[command(subcommand)]
    Triggers(TriggersCommand),
    /// Dead letters.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLettersCommand),
}

/// `admin apps …`
#[derive(Debug, Subcommand)]
pub enum AppsCommand {
    /// Create an app.
    Create { slug: String },
    /// List every app.
    List,
    /// Delete an app and everything of it.
    Delete { slug: String },
}

/// `admin principals …`
#[derive(Debug, Subcommand)]
pub enum PrincipalsCommand {
    /// Create a principal.
    Create {
        name: String,
        /// Make it a platform admin.
        #[arg(long)]
        platform_admin: bool,
    },
}

/// `admin members …`
#[derive(Debug, Subcommand)]
pub enum MembersCommand {
    /// Give a principal a role on an app: viewer, developer or admin.
    Set { app: String, principal: Uuid, role: String },
    /// Take a principal's role on an app away.
    Remove { app: String, principal: Uuid },
}

/// `admin tokens …`
#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Mint a token for a principal, optionally limited to one app; prints it this once.
    Create {
        principal: Uuid,
        #[arg(long)]
        app: Option<String>,
    },
    /// Revoke a token by id.
    Revoke { id: Uuid },
}

/// `admin triggers …`
#[derive(Debug, Subcommand)]
pub enum TriggersCommand {
    /// List an app's triggers.
    List { app: String },
    /// Delete a trigger (its dead letters stay).
    Delete { app: String, name: String },
}

/// `admin dead-letters …`
#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// List an app's dead letters, newest first.
    List {
        app: String,
        /// Only the unresolved ones.
        #[arg(long)]
        unresolved: bool,
    },
    /// Deliver a dead letter's event to its trigger again.
    Replay { app: String, id: Uuid },
    /// Mark an unresolved dead letter ignored.
    Ignore { app: String, id: Uuid },
}

/// The longest `--expires-in`: as `POST /v1/tokens` allows.
const MAX_EXPIRES_IN: Duration = Duration::from_secs(picloud_core::token::MAX_TOKEN_LIFETIME_S);

/// `--expires-in`: `3600`, `90s`, `15m`, `12h` or `30d`, from one second to ten years.
fn parse_expires_in(text: &str) -> Result<Duration, String> {
    let invalid = || {
        format!(
            "expected seconds or a number with s, m, h or d (e.g. 30d), from 1 second to 10 years; not {text:?}"
        )
    };
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let seconds_per_unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(invalid()),
    };
    let seconds =
        number.parse::<u64>().ok().and_then(|n| n.checked_mul(seconds_per_unit)).ok_or_else(invalid)?;
    let duration = Duration::from_secs(seconds);
    if duration.is_zero() || duration > MAX_EXPIRES_IN {
        return Err(invalid());
    }
    Ok(duration)
}

#[allow(clippy::print_stdout)]
fn print(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

async fn app(store: &PgStore, slug: &str) -> anyhow::Result<App> {
    store.app_by_slug(slug).await?.with_context(|| format!("no app {slug}"))
}

async fn mint(store: &PgStore, principal: Uuid, app: Option<App>) -> anyhow::Result<TokenCreated> {
    let secret = generate_api_token();
    let token = store
        .create_token(&NewApiToken {
            id: Uuid::now_v7(),
            principal_id: principal,
            token_hash: hash_api_token(&secret),
            app_id: app.as_ref().map(|a| a.id),
            scopes: None,
            expires_at: None,
        })
        .await?;
    Ok(TokenCreated::new(&token, secret, app.map(|a| a.slug.into_string())))
}

/// Runs one command.
pub async fn run(store: &PgStore, command: AdminCommand, triggers: &TriggerConfig) -> anyhow::Result<()> {
    match command {
        AdminCommand::Bootstrap { name, force, expires_in } => {
            let secret = generate_api_token();
            let admin = NewPlatformAdmin {
                name,
                token_id: Uuid::now_v7(),
                token_hash: hash_api_token(&secret),
                expires_at: expires_in.map(|after| time::OffsetDateTime::now_utc() + after),
            };
            let mut tx = store.begin().await?;
            let (_, token) = match store.bootstrap_platform_admin(&mut tx, &admin, force).await {
                Err(picloud_store::Error::PlatformAdminExists) => bail!(
                    "a platform admin exists already: mint a token for it with `admin tokens create`, or pass --force to create another"
                ),
                bootstrapped => bootstrapped?,
            };
            store.commit(tx).await?;
            print(&TokenCreated::new(&token, secret, None))
        }
        AdminCommand::Apps(AppsCommand::Create { slug }) => {
            let slug = AppSlug::parse(&slug).map_err(|e| anyhow::anyhow!("slug: {e}"))?;
            print(&AppView::from(store.create_app(&slug).await?))
        }
        AdminCommand::Apps(AppsCommand::List) => {
            let mut after: Option<String> = None;
            loop {
                let page = store.list_apps(None, after.as_deref(), 500).await?;
                after = page.items.last().map(|a| a.slug.as_str().to_owned());
                for app in page.items {
                    print(&AppView::from(app))?;
                }
                if !page.has_more {
                    return Ok(());
                }
            }
        }
        AdminCommand::Apps(AppsCommand::Delete { slug }) => {
            let app = app(store, &slug).await?;
            store.delete_app(app.id).await?;
            print(&AppView::from(app))
        }
        AdminCommand::Principals(PrincipalsCommand::Create { name, platform_admin }) => {
            print(&PrincipalView::from(store.create_principal(&name, platform_admin).await?))
        }
        AdminCommand::Members(MembersCommand::Set { app: slug, principal, role }) => {
            let role = Role::parse(&role)
                .with_context(|| format!("role: expected viewer, developer or admin, not {role:?}"))?;
            let app = app(store, &slug).await?;
            store.principal(principal).await?.with_context(|| format!("no principal {principal}"))?;
            store.set_role(app.id, principal, role).await?;
            print(&serde_json::json!({"app": slug, "principal_id": principal, "role": role.as_str()}))
        }
        AdminCommand::Members(MembersCommand::Remove { app: slug, principal }) => {
            let app = app(store, &slug).await?;
            if !store.remove_member(app.id, principal).await? {
                bail!("principal {principal} is not a member of {slug}");
            }
            print(&serde_json::json!({"app": slug, "principal_id": principal, "removed": true}))
        }
        AdminCommand::Tokens(TokensCommand::Create { principal, app: slug }) => {
            store.principal(principal).await?.with_context(|| format!("no principal {principal}"))?;
            let app = match slug {
                Some(slug) => Some(app(store, &slug).await?),
                None => None,
            };
            print(&mint(store, principal, app).await?)
        }
        AdminCommand::Tokens(TokensCommand::Revoke { id }) => {
            if !store.revoke_token(id).await? {
                bail!("no token {id}");
            }
            print(&serde_json::json!({"id": id, "revoked": true}))
        }
        AdminCommand::Triggers(TriggersCommand::List { app: slug }) => {
            let app = app(store, &slug).await?;
            let mut after: Option<String> = None;
            loop {
                let page = store.list_triggers(app.id, after.as_deref(), 500).await?;
                after = page.items.last().map(|t| t.name.as_str().to_owned());
                for trigger in page.items {
                    print(&TriggerView::from(trigger))?;
                }
                if !page.has_more {
                    return Ok(());
                }
            }
        }
        AdminCommand::Triggers(TriggersCommand::Delete { app: slug, name }) => {
            let app = app(store, &slug).await?;
            if !store.delete_trigger(app.id, &name).await? {
                bail!("no trigger {name} in {slug}");
            }
            print(&serde_json::json!({"app": slug, "name": name, "deleted": true}))
        }
        AdminCommand::DeadLetters(DeadLettersCommand::List { app: slug, unresolved }) => {
            let app = app(store, &slug).await?;
            let filter = DeadLetterFilter { resolution: unresolved.then_some(None), trigger_name: None };
            let mut after = None;
            loop {
                let page = store.list_dead_letters(app.id, &filter, after, 500).await?;
                after = page.items.last().map(|d| d.id);
                for dead in page.items {
                    print(&DeadLetterView::from(dead))?;
                }
                if !page.has_more {
                    return Ok(());
                }
            }
        }
        AdminCommand::DeadLetters(DeadLettersCommand::Replay { app: slug, id }) => {
            let app = app(store, &slug).await?;
            print(&replay_dead_letter(store, triggers, app.id, id).await?)
        }
        AdminCommand::DeadLetters(DeadLettersCommand::Ignore { app: slug, id }) => {
            let app = app(store, &slug).await?;
            print(&ignore_dead_letter(store, app.id, id).await?)
        }
    }
}
