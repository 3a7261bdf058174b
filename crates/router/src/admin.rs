//! `admin`: the operator's commands, straight against the database. Each prints the JSON the
//! HTTP API would answer, one document per line, so scripts can read it.

use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;
use picloud_api::ops::dead_letters::DeadLetterQuery;
use picloud_api::ops::deliveries::DeliveryQuery;
use picloud_api::views::CreateToken;
use picloud_api::{ApiError, Caller, Ops, Page, PageQuery};
use picloud_core::token::{LifetimeOutOfRange, token_lifetime};
use picloud_store::AuthRepo as _;
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
    /// Deliveries in the outbox.
    #[command(subcommand)]
    Deliveries(DeliveriesCommand),
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

/// `admin deliveries …` (cancelling one is the API's: it tells the handler over NATS).
#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// List an app's deliveries in the outbox, oldest first.
    List {
        app: String,
        /// Only those in this state: pending, scheduled, in_flight or waiting.
        #[arg(long)]
        state: Option<String>,
        /// Only those of this trigger.
        #[arg(long)]
        trigger: Option<String>,
    },
    /// One delivery, with its event and its last attempts.
    Show { app: String, id: Uuid },
}

/// `--expires-in`: `3600`, `90s`, `15m`, `12h` or `30d`, within the lifetime `POST /v1/tokens`
/// allows (`token_lifetime`).
fn parse_expires_in(text: &str) -> Result<Duration, String> {
    let invalid = || {
        format!(
            "expected seconds or a number with s, m, h or d (e.g. 30d), from {LifetimeOutOfRange}; not {text:?}"
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
    token_lifetime(seconds).map_err(|_| invalid())
}

#[allow(clippy::print_stdout)]
fn print(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// Prints every item of a listing, page by page, as `page` reads them.
async fn print_all<T: Serialize, F>(mut page: impl FnMut(PageQuery) -> F) -> anyhow::Result<()>
where
    F: Future<Output = Result<Page<T>, ApiError>>,
{
    let mut after = None;
    loop {
        let found = page(PageQuery { after, limit: Some(500) }).await?;
        for item in &found.items {
            print(item)?;
        }
        match found.next {
            Some(next) => after = Some(next),
            None => return Ok(()),
        }
    }
}

/// The operator, on app `slug` when one is named.
async fn operator(ops: &Ops, slug: Option<&str>) -> anyhow::Result<Caller> {
    let app = match slug {
        Some(slug) => {
            Some(ops.store().app_by_slug(slug).await?.ok_or_else(|| anyhow::anyhow!("no app {slug}"))?)
        }
        None => None,
    };
    Ok(Caller::operator(app))
}

/// Runs one command. A refusal is told by its code and message, as the API's error body carries
/// them (the HTTP status means nothing here).
pub async fn run(ops: &Ops, command: AdminCommand) -> anyhow::Result<()> {
    execute(ops, command).await.map_err(|e| match e.downcast::<ApiError>() {
        Ok(refused) => anyhow::anyhow!("{}: {}", refused.code(), refused.message()),
        Err(other) => other,
    })
}

async fn execute(ops: &Ops, command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::Bootstrap { name, force, expires_in } => {
            match ops.bootstrap(name, force, expires_in).await? {
                Some(token) => print(&token),
                None => bail!(
                    "a platform admin exists already: mint a token for it with `admin tokens create`, or pass --force to create another"
                ),
            }
        }
        AdminCommand::Apps(AppsCommand::Create { slug }) => {
            print(&ops.create_app(&operator(ops, None).await?, slug).await?)
        }
        AdminCommand::Apps(AppsCommand::List) => {
            let operator = &operator(ops, None).await?;
            print_all(|page| async move { ops.list_apps(operator, &page).await }).await
        }
        AdminCommand::Apps(AppsCommand::Delete { slug }) => {
            print(&ops.delete_app(&operator(ops, Some(&slug)).await?).await?)
        }
        AdminCommand::Principals(PrincipalsCommand::Create { name, platform_admin }) => {
            print(&ops.create_principal(&operator(ops, None).await?, &name, platform_admin).await?)
        }
        AdminCommand::Members(MembersCommand::Set { app, principal, role }) => {
            print(&ops.set_member(&operator(ops, Some(&app)).await?, &principal.to_string(), &role).await?)
        }
        AdminCommand::Members(MembersCommand::Remove { app, principal }) => {
            ops.remove_member(&operator(ops, Some(&app)).await?, &principal.to_string()).await?;
            print(&serde_json::json!({"app": app, "principal_id": principal, "removed": true}))
        }
        AdminCommand::Tokens(TokensCommand::Create { principal, app }) => {
            let body = CreateToken { principal_id: Some(principal), app, scopes: None, expires_in_s: None };
            print(&ops.mint_token(&operator(ops, None).await?, &body).await?)
        }
        AdminCommand::Tokens(TokensCommand::Revoke { id }) => {
            ops.revoke_token(&operator(ops, None).await?, &id.to_string()).await?;
            print(&serde_json::json!({"id": id, "revoked": true}))
        }
        AdminCommand::Triggers(TriggersCommand::List { app }) => {
            let operator = &operator(ops, Some(&app)).await?;
            print_all(|page| async move { ops.list_triggers(operator, &page).await }).await
        }
        AdminCommand::Triggers(TriggersCommand::Delete { app, name }) => {
            ops.delete_trigger(&operator(ops, Some(&app)).await?, &name).await?;
            print(&serde_json::json!({"app": app, "name": name, "deleted": true}))
        }
        AdminCommand::DeadLetters(DeadLettersCommand::List { app, unresolved }) => {
            let operator = &operator(ops, Some(&app)).await?;
            let query = DeadLetterQuery {
                resolution: unresolved.then(|| "unresolved".to_owned()),
                ..DeadLetterQuery::default()
            };
            print_all(|page| {
                let query = query.clone();
                async move { ops.list_dead_letters(operator, query, &page).await }
            })
            .await
        }
        AdminCommand::DeadLetters(DeadLettersCommand::Replay { app, id }) => {
            print(&ops.replay_dead_letter(&operator(ops, Some(&app)).await?, &id.to_string()).await?)
        }
        AdminCommand::DeadLetters(DeadLettersCommand::Ignore { app, id }) => {
            print(&ops.ignore_dead_letter(&operator(ops, Some(&app)).await?, &id.to_string()).await?)
        }
        AdminCommand::Deliveries(DeliveriesCommand::List { app, state, trigger }) => {
            let operator = &operator(ops, Some(&app)).await?;
            let query = DeliveryQuery { trigger, state };
            print_all(|page| {
                let query = query.clone();
                async move { ops.list_deliveries(operator, query, &page).await }
            })
            .await
        }
        AdminCommand::Deliveries(DeliveriesCommand::Show { app, id }) => {
            print(&ops.delivery(&operator(ops, Some(&app)).await?, &id.to_string()).await?)
        }
    }
}
