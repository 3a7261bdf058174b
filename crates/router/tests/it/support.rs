//! What the router's tests set up alike: an app with a trigger, a nats-server `serve` accepts,
//! `serve` as a process, and an SMTP server that catches what it sends.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use picloud_core::{AppSlug, HandlerName, Role, TriggerName};
use picloud_store::*;
use picloud_testkit::NatsServer;

/// App `shop`, its admin, and one enabled trigger of it.
pub struct Shop {
    pub app: App,
    pub admin: Principal,
    pub trigger: Trigger,
}

/// Creates app `shop` with an admin principal and a trigger `name` of `spec`, served by handler
/// function `handler` and registered by that admin.
pub async fn shop_with_trigger(store: &PgStore, name: &str, spec: TriggerSpec, handler: &str) -> Shop {
    let app = store.create_app(&AppSlug::parse("shop").unwrap()).await.unwrap();
    let admin = store.create_principal("shop-admin", false).await.unwrap();
    store.set_role(app.id, admin.id, Role::Admin).await.unwrap();
    let handler = Handler::Function(HandlerName::parse(handler).unwrap());
    let new = NewTrigger::new(app.id, TriggerName::parse(name).unwrap(), spec, handler, admin.id);
    let trigger = store.create_trigger(&new).await.unwrap();
    Shop { app, admin, trigger }
}

/// The `max_payload` of the shipped NATS configs (`nats/dev.conf`, `nats/cluster-*.conf`): what
/// `serve` needs at its default `PICLOUD_MAX_PAYLOAD_BYTES`.
const SHIPPED_MAX_PAYLOAD: &str = "max_payload: 3MB\n";

/// A nats-server configured as the shipped configs are for what `serve` checks (its
/// `max_payload`), without their users; its config is written to `dir`.
pub async fn nats_for_serve(dir: &Path) -> NatsServer {
    let config = dir.join("nats.conf");
    std::fs::write(&config, SHIPPED_MAX_PAYLOAD).unwrap();
    NatsServer::start_with_config(&config).await.expect("start nats-server")
}

/// How long a `serve` process may take to log a line or to exit.
const DEADLINE: Duration = Duration::from_secs(60);

/// A `picloud-router serve` process logging to a file; killed if the test ends early.
pub struct Serving {
    pub child: Child,
    log: PathBuf,
}

impl Serving {
    /// Starts `serve` with only the `PICLOUD_*` variables of `env` (none of the environment the
    /// tests run in), on any free HTTP port and with a test `PICLOUD_TOKEN_SECRET` unless `env`
    /// says otherwise.
    pub async fn start(dir: &Path, env: &[(&str, &str)]) -> Serving {
        let log = dir.join("serve.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_picloud-router"));
        cmd.arg("serve");
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("PICLOUD_")) {
            cmd.env_remove(k);
        }
        cmd.env_remove("DATABASE_URL")
            .env("PICLOUD_TOKEN_SECRET", "serve-test-secret-0123456789")
            .env("PICLOUD_HTTP_ADDR", "127.0.0.1:0")
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = picloud_testkit::spawn_tied(cmd).await.expect("start picloud-router serve");
        Serving { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log has a line containing `needle`, and returns that line.
    pub async fn logged(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(line) = self.log().lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            assert!(self.child.try_wait().unwrap().is_none(), "serve exited early:\n{}", self.log());
            assert!(Instant::now() < deadline, "no {needle:?} in the log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the node serves, and returns the HTTP address it logged.
    pub async fn http_addr(&mut self) -> String {
        let line = self.logged("serving").await;
        let addr = line.split("addr=").nth(1).unwrap_or_else(|| panic!("no address in {line:?}"));
        addr.split_whitespace().next().unwrap_or_default().to_owned()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
        assert!(sent.success(), "SIGTERM sent");
    }

    /// Waits for the process to exit.
    pub async fn exit_status(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "serve did not exit:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
