//! Running a role as a child process and talking to it line by line.

use std::process::Stdio;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// A child `picloud-bench <role>` process.
pub struct Role {
    name: &'static str,
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Role {
    /// Starts `picloud-bench <args…>` and waits for its `ready`.
    pub async fn spawn(name: &'static str, args: &[&str]) -> anyhow::Result<Role> {
        Ok(Self::spawn_reporting(name, args).await?.0)
    }

    /// Starts `picloud-bench <args…>` and waits for its `ready <detail>`, returning the detail.
    pub async fn spawn_reporting(name: &'static str, args: &[&str]) -> anyhow::Result<(Role, String)> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the {name}"))?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let mut role = Role { name, child, stdin, stdout };
        let ready = role.line().await?;
        let detail = ready
            .strip_prefix("ready")
            .map(|rest| rest.trim().to_owned())
            .with_context(|| format!("the {name} said {ready:?} instead of ready"))?;
        Ok((role, detail))
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or_default()
    }

    /// Sends one command line.
    pub async fn send(&mut self, command: &str) -> anyhow::Result<()> {
        self.stdin.write_all(format!("{command}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// The next line the role prints.
    pub async fn line(&mut self) -> anyhow::Result<String> {
        self.stdout.next_line().await?.with_context(|| format!("the {} exited", self.name))
    }

    /// Asks the role to stop and waits for it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.send("stop").await?;
        let status = self.child.wait().await?;
        anyhow::ensure!(status.success(), "the {} ended with {status}", self.name);
        Ok(())
    }
}
