//! `dev`: the one command of the README. Starts a PostgreSQL and a nats-server from the binaries
//! on this machine under `./.picloud/` (Postgres keeps its data between runs) and an SMTP catcher
//! (emails logged and kept under `./.picloud/mail/`; not when `PICLOUD_SMTP_URL` names a server of
//! the operator's own), migrates, makes the app `demo` and an admin token, prints how to reach
//! everything, and serves until Ctrl-C. Every run reuses the ports of
//! the last one (saved in `.picloud/dev.env`) unless they are taken, so the values a terminal
//! loaded stay true across restarts.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use picloud_api::views::CreateToken;
use picloud_api::{Caller, Ops};
use picloud_core::TriggerConfig;
use picloud_core::net::{ALLOW_NETS_VAR, AllowNets};
use picloud_core::token::{generate_api_token, hash_api_token};
use picloud_local::{MailCatcher, MailDir, MailOptions, NatsServer, PgOptions, PgServer};
use picloud_store::{App, AuthRepo as _, PgStore};

use crate::serve::{self, Node};

/// The NATS users and permissions every deployment uses (`nats/tenants.conf`).
const TENANTS_CONF: &str = include_str!("../../../nats/tenants.conf");
/// The shipped development config of nats-server (server name, `max_payload`, the users of
/// `tenants.conf`), which `dev` runs without its ports (see [`nats_conf`]).
const DEV_CONF: &str = include_str!("../../../nats/dev.conf");
/// The app `dev` makes.
const APP: &str = "demo";
/// Why a port is the one `dev` asks for first: the last run used it.
const LAST_RUN: &str = "the last run's";
/// `PICLOUD_WEBHOOK_ALLOW_NETS` unless the environment sets it: webhooks may reach this machine.
const WEBHOOK_ALLOW_NETS: &str = "127.0.0.0/8,::1/128";
/// The API's port on a first run when `PICLOUD_HTTP_ADDR` is unset.
const HTTP_PORT: u16 = 8080;
/// How many caught emails stay in `.picloud/mail/`.
const MAIL_KEPT: usize = 100;

/// Options of `picloud-router dev`.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Where the servers keep their files.
    #[arg(long, default_value = ".picloud")]
    dir: PathBuf,
}

/// `tenants.conf` with the development passwords written in, so nats-server needs no
/// environment of its own.
fn tenants_with_passwords(passwords: &BTreeMap<String, String>) -> String {
    let mut names: Vec<&String> = passwords.keys().collect();
    // Longest first: no variable is replaced inside a longer one's name.
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    names.into_iter().fold(TENANTS_CONF.to_owned(), |conf, name| {
        conf.replace(&format!("${name}"), &format!("\"{}\"", passwords[name]))
    })
}

/// `nats/dev.conf` without `port` and `http_port`: the testkit gives the server a free client
/// port, and `dev` needs no monitoring port.
fn nats_conf() -> String {
    DEV_CONF
        .lines()
        .filter(|line| !["port:", "http_port:"].iter().any(|key| line.trim_start().starts_with(key)))
        .map(|line| format!("{line}\n"))
        .collect()
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The port of a URL such as `nats://127.0.0.1:4222` or `postgres://u@127.0.0.1:5432/db`.
fn port_of(url: &str) -> Option<u16> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?']).next()?;
    authority.rsplit_once(':')?.1.parse().ok()
}

/// The ports `dev` chose, and what it has to say about them.
#[derive(Default)]
struct Ports {
    /// One line per server that could not have the port it wanted.
    moved: Vec<String>,
}

impl Ports {
    /// `wanted` (the last run's port, or a default) when it is free on 127.0.0.1, else a free
    /// port, noting the change.
    fn choose(&mut self, server: &str, wanted: Option<u16>, why: &str) -> anyhow::Result<u16> {
        let Some(wanted) = wanted else { return free_port() };
        if std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, wanted)).is_ok() {
            return Ok(wanted);
        }
        let port = free_port()?;
        let note = format!("{server}: port {wanted} ({why}) is taken, so it listens on {port}");
        tracing::warn!("{note}");
        self.moved.push(note);
        Ok(port)
    }
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The state `dev` keeps between runs: the delivery-token key and the admin token.
struct Saved {
    path: PathBuf,
    values: BTreeMap<String, String>,
}

impl Saved {
    fn load(dir: &Path) -> Saved {
        let path = dir.join("dev.env");
        let values =
            std::fs::read_to_string(&path).map(|t| picloud_local::parse_env_file(&t)).unwrap_or_default();
        Saved { path, values }
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// The port of the saved URL `key`.
    fn port(&self, key: &str) -> Option<u16> {
        self.get(key).and_then(port_of)
    }

    fn save(&self) -> anyhow::Result<()> {
        let mut text = String::from(
            "# Written by `picloud-router dev`: development values only.\n\
             # Use them in a shell with: set -a; . .picloud/dev.env; set +a\n",
        );
        for (key, value) in &self.values {
            text.push_str(&format!("{key}={value}\n"));
        }
        // Readable by the owner only: it holds an admin token and the delivery-token key.
        use std::io::Write as _;
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&self.path)
            .with_context(|| format!("writing {}", self.path.display()))?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(text.as_bytes()).with_context(|| format!("writing {}", self.path.display()))
    }
}

/// PostgreSQL on `port`, keeping its data under `dir`, with the database `picloud`: the server
/// and that database's URL.
async fn start_postgres(dir: &Path, port: u16) -> anyhow::Result<(PgServer, String)> {
    let pg = PgServer::start_persistent(
        &dir.join("postgres"),
        port,
        PgOptions { durable: true, max_connections: 100 },
    )
    .await
    .context("starting PostgreSQL")?;
    PgStore::connect(&pg.url("postgres"), 1)
        .await
        .context("connecting to the dev Postgres")?
        .create_database_if_missing("picloud")
        .await?;
    let url = pg.url("picloud");
    Ok((pg, url))
}

/// Where emails go: an SMTP server of the operator's own (`PICLOUD_SMTP_URL`, unless it is the
/// catcher's URL a shell loaded from dev.env), else a catcher keeping them in `mail_dir`.
async fn start_mail(
    mail_dir: &Path,
    ports: &mut Ports,
    saved: &Saved,
) -> anyhow::Result<(Option<MailCatcher>, String)> {
    let own_smtp = serve::env("PICLOUD_SMTP_URL")
        .filter(|url| !url.trim().is_empty() && Some(url.as_str()) != saved.get("PICLOUD_SMTP_URL"));
    if let Some(url) = own_smtp {
        return Ok((None, url));
    }
    let port = ports.choose("the SMTP catcher", saved.port("PICLOUD_SMTP_URL"), LAST_RUN)?;
    let catcher = MailCatcher::start_with(MailOptions {
        port,
        keep: Some(MailDir { dir: mail_dir.to_owned(), keep: MAIL_KEPT }),
        refuse_rcpt: Vec::new(),
        forget: true,
    })
    .await
    .context("starting the SMTP catcher")?;
    let url = catcher.url();
    Ok((Some(catcher), url))
}

/// Migrates the database at `database_url` and makes what the tour uses: the app `demo` and an
/// admin token (the `saved` one while it still authenticates).
async fn prepare_database(database_url: &str, saved: Option<&str>) -> anyhow::Result<String> {
    let store = PgStore::connect(database_url, 2).await.context("connecting to the dev Postgres")?;
    serve::migrate(&store).await?;
    // Nothing dev writes here fires a trigger or registers a webhook: the defaults do.
    let ops = Ops::new(store, TriggerConfig::default(), AllowNets::default());
    let app = demo_app(&ops).await?;
    let token = admin_token(&ops, app, saved).await;
    ops.store().pool().close().await;
    token
}

/// The app `dev` makes, made on the first run.
async fn demo_app(ops: &Ops) -> anyhow::Result<App> {
    if let Some(app) = ops.store().app_by_slug(APP).await? {
        return Ok(app);
    }
    ops.create_app(&Caller::operator(None), APP.to_owned()).await?;
    ops.store().app_by_slug(APP).await?.context("the app dev made is gone")
}

/// A token that still authenticates, or a fresh platform-admin principal (admin of `demo`) and
/// its token.
async fn admin_token(ops: &Ops, app: App, saved: Option<&str>) -> anyhow::Result<String> {
    if let Some(token) = saved {
        let found = ops.store().token_by_hash(&hash_api_token(token)).await?;
        if found.is_some_and(|(t, _)| t.revoked_at.is_none()) {
            return Ok(token.to_owned());
        }
    }
    let operator = Caller::operator(Some(app));
    let principal = ops.create_principal(&operator, "dev-admin", true).await?;
    ops.set_member(&operator, &principal.id.to_string(), "admin").await?;
    let mint = CreateToken { principal_id: Some(principal.id), app: None, scopes: None, expires_in_s: None };
    Ok(ops.mint_token(&operator, &mint).await?.token)
}

/// Where the API listens: `PICLOUD_HTTP_ADDR` as given, unless its port is 0 or it is unset; then
/// dev chooses the port (the last run's, else 8080 when unset), saying so when it cannot.
fn http_addr(ports: &mut Ports, saved: &Saved) -> anyhow::Result<SocketAddr> {
    let given = match serve::env("PICLOUD_HTTP_ADDR").filter(|text| !text.trim().is_empty()) {
        Some(text) => Some(text.trim().parse::<SocketAddr>().map_err(|_| {
            anyhow::anyhow!("PICLOUD_HTTP_ADDR: {text:?} is not an address such as 127.0.0.1:8080")
        })?),
        None => None,
    };
    if let Some(addr) = given.filter(|a| a.port() != 0) {
        return Ok(addr);
    }
    let ip = given.map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |a| a.ip());
    let (wanted, why) = match saved.port("PICLOUD_URL") {
        Some(port) => (Some(port), LAST_RUN),
        None => (given.is_none().then_some(HTTP_PORT), "the default"),
    };
    Ok(SocketAddr::new(ip, ports.choose("the API", wanted, why)?))
}

/// Runs `dev` until Ctrl-C or SIGTERM.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    picloud_local::require_server_binaries()?;
    let dir = std::path::absolute(&args.dir)?;
    std::fs::create_dir_all(dir.join("nats")).with_context(|| format!("creating {}", dir.display()))?;
    let mut saved = Saved::load(&dir);
    let mut ports = Ports::default();
    let pg_port = ports.choose("PostgreSQL", saved.port("PICLOUD_DATABASE_URL"), LAST_RUN)?;
    let (pg, database_url) = start_postgres(&dir, pg_port).await?;

    let passwords = picloud_local::nats_dev_env();
    write(&dir.join("nats/tenants.conf"), &tenants_with_passwords(&passwords))?;
    write(&dir.join("nats/nats.conf"), &nats_conf())?;
    let nats_port = ports.choose("nats-server", saved.port("PICLOUD_NATS_URL"), LAST_RUN)?;
    let nats = NatsServer::start_with_config_on(&dir.join("nats/nats.conf"), nats_port)
        .await
        .context("starting nats-server")?;
    let mail_dir = dir.join("mail");
    let (mail, smtp_url) = start_mail(&mail_dir, &mut ports, &saved).await?;
    let http_addr = http_addr(&mut ports, &saved)?;

    let token = prepare_database(&database_url, saved.get("PICLOUD_TOKEN")).await?;
    let token_secret =
        saved.get("PICLOUD_TOKEN_SECRET").map(str::to_owned).unwrap_or_else(generate_api_token);
    let app_password = passwords.get("PICLOUD_NATS_APP_DEMO_PASSWORD").cloned().unwrap_or_default();
    let overlay: HashMap<&str, String> = HashMap::from([
        ("PICLOUD_DATABASE_URL", database_url.clone()),
        ("PICLOUD_NATS_URL", nats.url()),
        ("PICLOUD_NATS_USER", "router".to_owned()),
        ("PICLOUD_NATS_PASSWORD", passwords.get("PICLOUD_NATS_ROUTER_PASSWORD").cloned().unwrap_or_default()),
        ("PICLOUD_TOKEN_SECRET", token_secret.clone()),
        ("PICLOUD_SMTP_URL", smtp_url.clone()),
        ("PICLOUD_HTTP_ADDR", http_addr.to_string()),
    ]);
    let default = |name: &str| (name == ALLOW_NETS_VAR).then(|| WEBHOOK_ALLOW_NETS.to_owned());
    let lookup =
        |name: &str| overlay.get(name).cloned().or_else(|| serve::env(name)).or_else(|| default(name));
    // Its servers are its own, on this machine, with the development passwords of nats/dev.env.
    let node = Node::from_lookup(&lookup, serve::Secrets::Development)?;
    let nats_url = nats.url();
    let banner = |addr: std::net::SocketAddr| {
        let url = format!("http://{addr}");
        saved.values.extend([
            ("PICLOUD_TOKEN_SECRET".to_owned(), token_secret.clone()),
            ("PICLOUD_TOKEN".to_owned(), token.clone()),
            ("PICLOUD_URL".to_owned(), url.clone()),
            ("PICLOUD_DATABASE_URL".to_owned(), database_url.clone()),
            ("PICLOUD_NATS_URL".to_owned(), nats_url.clone()),
            ("PICLOUD_APP".to_owned(), APP.to_owned()),
            ("PICLOUD_NATS_APP_USER".to_owned(), format!("app-{APP}")),
            ("PICLOUD_NATS_APP_PASSWORD".to_owned(), app_password.clone()),
        ]);
        // The catcher's address is kept for the next run; an operator's SMTP URL (it may hold a
        // password) is not written down.
        match &mail {
            Some(catcher) => saved.values.insert("PICLOUD_SMTP_URL".to_owned(), catcher.url()),
            None => saved.values.remove("PICLOUD_SMTP_URL"),
        };
        if let Err(e) = saved.save() {
            tracing::warn!(error = %e, "could not save .picloud/dev.env");
        }
        print_banner(&Banner {
            url: &url,
            token: &token,
            nats_url: &nats_url,
            app_password: &app_password,
            database_url: &database_url,
            smtp: &match &mail {
                Some(catcher) => format!(
                    "{}    (catches every email: logged, the last {MAIL_KEPT} kept in {})",
                    catcher.url(),
                    mail_dir.display()
                ),
                None => "your PICLOUD_SMTP_URL    (no catcher: emails go to your server)".to_owned(),
            },
            env_file: &saved.path,
            moved: &ports.moved,
        });
    };
    let served = node.run(false, serve::shutdown_signal(), banner).await;
    drop(mail);
    drop(nats);
    pg.stop().await.context("stopping PostgreSQL")?;
    served
}

/// What the banner shows.
struct Banner<'a> {
    url: &'a str,
    token: &'a str,
    nats_url: &'a str,
    app_password: &'a str,
    database_url: &'a str,
    smtp: &'a str,
    env_file: &'a Path,
    moved: &'a [String],
}

#[allow(clippy::print_stdout)]
fn print_banner(b: &Banner<'_>) {
    let Banner { url, token, nats_url, app_password, database_url, smtp, .. } = b;
    let env = b.env_file.display();
    let moved: String = b.moved.iter().map(|note| format!("  {note}\n")).collect();
    let moved = if moved.is_empty() {
        String::new()
    } else {
        format!("\nPorts changed since the last run: load {env} again in other terminals.\n{moved}")
    };
    println!(
        "\npicloud-router dev is serving (Ctrl-C stops everything)\n\n  \
         API        {url}    (OpenAPI: {url}/v1/openapi.json)\n  \
         console    {url}/console    (sign in with the token below)\n  \
         token      {token}    (platform admin, admin of app `{APP}`)\n  \
         NATS       {nats_url}    (handlers of `{APP}`: user app-{APP}, password {app_password}, inbox prefix _INBOX_{APP})\n  \
         Postgres   {database_url}\n  \
         SMTP       {smtp}\n  \
         all above  {env}    (set -a; . {env}; set +a)\n{moved}\n\
         Try it:\n  \
         curl -s -X PUT {url}/v1/apps/{APP}/kv/notes/hello -H 'Authorization: Bearer {token}' \
         -H 'Content-Type: application/json' -d '{{\"text\": \"hi\"}}'\n",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_of_each_saved_url_is_read() {
        assert_eq!(port_of("postgres://postgres@127.0.0.1:40123/picloud"), Some(40123));
        assert_eq!(port_of("nats://127.0.0.1:4222"), Some(4222));
        assert_eq!(port_of("http://127.0.0.1:8080"), Some(8080));
        assert_eq!(port_of("smtp://127.0.0.1:2525?tls=none"), Some(2525));
        assert_eq!(port_of("nats://localhost"), None);
        assert_eq!(port_of("not a url"), None);
    }

    #[test]
    fn a_taken_port_is_replaced_and_said() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let wanted = taken.local_addr().unwrap().port();
        let mut ports = Ports::default();
        let port = ports.choose("nats-server", Some(wanted), "the last run's").unwrap();
        assert_ne!(port, wanted);
        assert_eq!(
            ports.moved,
            [format!("nats-server: port {wanted} (the last run's) is taken, so it listens on {port}")]
        );
        drop(taken);
        let mut ports = Ports::default();
        assert_eq!(ports.choose("nats-server", Some(wanted), "the last run's").unwrap(), wanted);
        assert!(ports.moved.is_empty(), "a free port is kept without a word");
    }
}
