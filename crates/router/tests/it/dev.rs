//! `picloud-router dev`: the README's first command, run as a real process.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running `dev` and what its banner told.
struct Dev {
    child: Child,
    url: String,
    token: String,
    curl: String,
}

impl Dev {
    async fn start(dir: &Path) -> Dev {
        let mut child = Command::new(env!("CARGO_BIN_EXE_picloud-router"))
            .args(["dev", "--dir"])
            .arg(dir)
            .env("PICLOUD_HTTP_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start picloud-router dev");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut url, mut token, mut curl) = (None, None, None);
        let banner = async {
            while let Some(line) = lines.next_line().await.unwrap() {
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
        tokio::time::timeout(Duration::from_secs(120), banner).await.expect("the banner within 2 minutes");
        Dev { child, url: url.unwrap(), token: token.unwrap(), curl: curl.unwrap() }
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

#[tokio::test]
async fn dev_serves_with_a_working_example_stops_on_ctrl_c_and_keeps_its_data_for_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(&dir.path().join(".picloud")).await;
    let http = reqwest::Client::new();
    let curl =
        std::process::Command::new("sh").arg("-c").arg(&dev.curl).output().expect("run the printed curl");
    let answered: serde_json::Value =
        serde_json::from_slice(&curl.stdout).expect("the curl example answers JSON");
    assert_eq!(answered, serde_json::json!({"version": 1}), "the printed example writes a KV entry");
    let (token, status) = (dev.token.clone(), dev.interrupt().await);
    assert!(status.success(), "Ctrl-C stops dev cleanly: {status}");

    let again = Dev::start(&dir.path().join(".picloud")).await;
    assert_eq!(again.token, token, "the admin token still works in the next run");
    let kept: serde_json::Value = http
        .get(format!("{}/v1/apps/demo/kv/notes/hello", again.url))
        .bearer_auth(&again.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        kept,
        serde_json::json!({"value": {"text": "hi"}, "version": 1}),
        "the data survived the restart"
    );
    assert!(again.interrupt().await.success());
}
