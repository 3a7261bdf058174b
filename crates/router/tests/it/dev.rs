//! `picloud-router dev`: the README's first command, run as a real process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a `dev` may take to print its banner, and an email to reach its catcher.
const DEADLINE: Duration = Duration::from_secs(120);

/// A running `dev` and what its banner told.
struct Dev {
    child: Child,
    url: String,
    token: String,
    curl: String,
    /// Every line of the banner, up to the curl example.
    banner: Vec<String>,
}

impl Dev {
    async fn start(dir: &Path) -> Dev {
        Self::start_with(dir, &[]).await
    }

    /// [`Dev::start`] with more variables in its environment.
    async fn start_with(dir: &Path, vars: &[(&str, &str)]) -> Dev {
        let mut child = Command::new(env!("CARGO_BIN_EXE_picloud-router"))
            .args(["dev", "--dir"])
            .arg(dir)
            .envs(vars.iter().copied())
            .env("PICLOUD_HTTP_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start picloud-router dev");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut url, mut token, mut curl, mut banner) = (None, None, None, Vec::new());
        let read = async {
            while let Some(line) = lines.next_line().await.unwrap() {
                banner.push(line.clone());
                let words: Vec<&str> = line.split_whitespace().collect();
                match words.as_slice() {
                    ["API", u, ..] => url = Some((*u).to_owned()),
                    ["token", t, ..] => token = Some((*t).to_owned()),
                    ["curl", ..] => {
                        curl = Some(line.trim().to_owned());
                        return;
                    }
                    _ => {}
                }
            }
            panic!("dev exited before printing its banner");
        };
        tokio::time::timeout(DEADLINE, read).await.expect("the banner within 2 minutes");
        Dev { child, url: url.unwrap(), token: token.unwrap(), curl: curl.unwrap(), banner }
    }

    /// Ctrl-C, and the exit status.
    async fn interrupt(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running").to_string();
        let sent = std::process::Command::new("kill").args(["-INT", &pid]).status().expect("run kill");
        assert!(sent.success(), "SIGINT sent");
        tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("exit within a minute")
            .unwrap()
    }
}

/// The values `dev` wrote for other terminals.
fn dev_env(dir: &Path) -> BTreeMap<String, String> {
    picloud_testkit::parse_env_file(&std::fs::read_to_string(dir.join("dev.env")).expect("dev.env written"))
}

/// The `.eml` files in `dir`.
fn mail_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "eml"))
                .collect()
        })
        .unwrap_or_default()
}

/// Everything a terminal that loaded `env` uses answers: the API with the token, NATS as the
/// app's handler user, and Postgres.
async fn reachable_with(env: &BTreeMap<String, String>) {
    let http = reqwest::Client::new();
    let kept: serde_json::Value = http
        .get(format!("{}/v1/apps/demo/kv/notes/hello", env["PICLOUD_URL"]))
        .bearer_auth(&env["PICLOUD_TOKEN"])
        .send()
        .await
        .expect("the API at the saved PICLOUD_URL")
        .json()
        .await
        .unwrap();
    assert_eq!(kept, json!({"value": {"text": "hi"}, "version": 1}), "the data survived the restart");
    let nats = async_nats::ConnectOptions::with_user_and_password(
        env["PICLOUD_NATS_APP_USER"].clone(),
        env["PICLOUD_NATS_APP_PASSWORD"].clone(),
    )
    .custom_inbox_prefix(format!("_INBOX_{}", env["PICLOUD_APP"]))
    .connect(&env["PICLOUD_NATS_URL"])
    .await
    .expect("NATS at the saved PICLOUD_NATS_URL");
    nats.flush().await.expect("the app's user is accepted");
    let pool =
        sqlx::PgPool::connect(&env["PICLOUD_DATABASE_URL"]).await.expect("the saved PICLOUD_DATABASE_URL");
    let apps: i64 = sqlx::query_scalar("SELECT count(*) FROM apps").fetch_one(&pool).await.unwrap();
    assert_eq!(apps, 1, "the app demo");
}

#[tokio::test]
async fn dev_serves_with_a_working_example_stops_on_ctrl_c_and_keeps_its_data_for_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().join(".picloud");
    let dev = Dev::start(&dir).await;
    let curl =
        std::process::Command::new("sh").arg("-c").arg(&dev.curl).output().expect("run the printed curl");
    let answered: serde_json::Value =
        serde_json::from_slice(&curl.stdout).expect("the curl example answers JSON");
    assert_eq!(answered, json!({"version": 1}), "the printed example writes a KV entry");
    let first = dev_env(&dir);
    assert_eq!(
        (first["PICLOUD_URL"].as_str(), first["PICLOUD_TOKEN"].as_str()),
        (dev.url.as_str(), dev.token.as_str())
    );
    let (token, status) = (dev.token.clone(), dev.interrupt().await);
    assert!(status.success(), "Ctrl-C stops dev cleanly: {status}");

    let again = Dev::start(&dir).await;
    assert_eq!(again.token, token, "the admin token still works in the next run");
    assert_eq!(dev_env(&dir), first, "the next run keeps every port, so dev.env does not change");
    reachable_with(&first).await;
    assert!(again.interrupt().await.success());
}

#[tokio::test]
async fn a_taken_port_is_replaced_and_said_and_dev_env_follows() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().join(".picloud");
    let dev = Dev::start(&dir).await;
    let curl = std::process::Command::new("sh").arg("-c").arg(&dev.curl).output().unwrap();
    assert!(curl.status.success());
    assert!(dev.interrupt().await.success());
    let first = dev_env(&dir);
    let nats_port = first["PICLOUD_NATS_URL"].rsplit_once(':').unwrap().1.to_owned();
    let squatter = std::net::TcpListener::bind(format!("127.0.0.1:{nats_port}")).expect("take the NATS port");

    let again = Dev::start(&dir).await;
    let now = dev_env(&dir);
    assert_ne!(now["PICLOUD_NATS_URL"], first["PICLOUD_NATS_URL"]);
    let said = format!("nats-server: port {nats_port} (the last run's) is taken, so it listens on");
    assert!(
        again.banner.iter().any(|line| line.contains(&said)),
        "the banner says so:\n{}",
        again.banner.join("\n")
    );
    assert_eq!(now["PICLOUD_URL"], first["PICLOUD_URL"], "the free ports are kept");
    reachable_with(&now).await;
    drop(squatter);
    assert!(again.interrupt().await.success());
}

#[tokio::test]
async fn an_email_sent_in_dev_reaches_its_catcher_and_the_node_stays_ready() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().join(".picloud");
    let dev = Dev::start(&dir).await;
    let http = reqwest::Client::new();
    let sent = http
        .post(format!("{}/v1/apps/demo/emails", dev.url))
        .bearer_auth(&dev.token)
        .json(&json!({"to": ["reader@example.com"], "subject": "Hello from dev", "text": "The first line.\nThe second."}))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), reqwest::StatusCode::ACCEPTED);
    let deadline = Instant::now() + DEADLINE;
    let kept = loop {
        if let [file] = mail_files(&dir.join("mail")).as_slice() {
            break std::fs::read_to_string(file).unwrap();
        }
        assert!(Instant::now() < deadline, "no email in {} within {DEADLINE:?}", dir.join("mail").display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(kept.contains("Subject: Hello from dev"), "{kept}");
    assert!(kept.contains("The first line."), "{kept}");
    let ready = http.get(format!("{}/readyz", dev.url)).send().await.unwrap();
    assert_eq!(ready.status(), reqwest::StatusCode::OK, "{}", ready.text().await.unwrap());
    assert!(dev.interrupt().await.success());
}

#[tokio::test]
async fn with_an_smtp_server_of_its_own_dev_sends_there_and_catches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().join(".picloud");
    let mut theirs = picloud_testkit::MailCatcher::start().await.unwrap();
    let dev = Dev::start_with(&dir, &[("PICLOUD_SMTP_URL", &theirs.url())]).await;
    assert!(dev.banner.iter().any(|line| line.contains("no catcher")), "{}", dev.banner.join("\n"));
    let sent = reqwest::Client::new()
        .post(format!("{}/v1/apps/demo/emails", dev.url))
        .bearer_auth(&dev.token)
        .json(&json!({"to": ["reader@example.com"], "subject": "To their server", "text": "Hi."}))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), reqwest::StatusCode::ACCEPTED);
    let mail = tokio::time::timeout(DEADLINE, theirs.next()).await.expect("the email at their server");
    assert_eq!(mail.subject, "To their server");
    assert!(mail_files(&dir.join("mail")).is_empty(), "dev caught nothing itself");
    assert!(!dev_env(&dir).contains_key("PICLOUD_SMTP_URL"), "their URL is not written down");
    assert!(dev.interrupt().await.success());
}
