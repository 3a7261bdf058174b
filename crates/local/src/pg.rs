//! Throwaway and persistent PostgreSQL servers: `initdb`, start, readiness, shutdown and restart.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sqlx::Connection as _;
use tempfile::TempDir;

use crate::binaries::PgBinaries;
use crate::error::{Error, IoContext, Result};
use crate::process::{self, ServerProcess};
use crate::sys;

/// How long a server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `initdb` may take (it syncs the cluster to disk in durable mode).
const INITDB_TIMEOUT: Duration = Duration::from_secs(180);
/// How many ports a throwaway server tries before giving up on "address already in use".
const PORT_ATTEMPTS: usize = 5;
/// Drop: fast shutdown, then immediate shutdown (which also stops the backends), then SIGKILL.
const DROP_STEPS: &[(libc::c_int, Duration)] =
    &[(libc::SIGINT, Duration::from_secs(5)), (libc::SIGQUIT, Duration::from_secs(5))];
/// `stop`: like drop, but gives the fast shutdown's checkpoint time to finish.
const STOP_STEPS: &[(libc::c_int, Duration)] =
    &[(libc::SIGINT, Duration::from_secs(60)), (libc::SIGQUIT, Duration::from_secs(5))];
/// An immediate shutdown: the postmaster stops its backends at once and exits.
const IMMEDIATE_STEPS: &[(libc::c_int, Duration)] = &[(libc::SIGQUIT, Duration::from_secs(10))];
/// How long a restart keeps retrying while its fixed port is still taken.
const RESTART_PORT_TIMEOUT: Duration = Duration::from_secs(15);
/// The server's log file, in its dir.
const LOG_FILE: &str = "postgres.log";
/// The system user PostgreSQL runs as when we are root.
const PG_USER: &str = "postgres";

/// Options of a Postgres server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgOptions {
    /// `false` (tests): `fsync`, `synchronous_commit` and `full_page_writes` off, `initdb
    /// --no-sync`. `true` (benchmarks): every setting at its default except the listen
    /// address, port and `max_connections`.
    pub durable: bool,
    /// `max_connections` of the server.
    pub max_connections: u32,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self { durable: false, max_connections: 300 }
    }
}

/// How [`PgServer::restart`] stops the server: PostgreSQL's shutdown modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgShutdown {
    /// `pg_ctl stop -m fast` (SIGINT to the postmaster): every session is ended and its open
    /// transaction rolled back, a checkpoint is written, and the server exits.
    Fast,
    /// `pg_ctl stop -m immediate` (SIGQUIT): every process exits at once, without a checkpoint,
    /// as in a crash; the next start recovers from the WAL. What was committed without waiting
    /// for the WAL (`synchronous_commit = off`, the default of [`PgOptions`] that are not
    /// `durable`) may be lost.
    Immediate,
}

/// A PostgreSQL server listening on `127.0.0.1` (TCP only), started by this process.
///
/// Dropping it stops the server (SIGINT, then SIGQUIT, then SIGKILL) and, unless it was
/// started with [`PgServer::start_persistent`], removes its data.
#[derive(Debug)]
pub struct PgServer {
    port: u16,
    data_dir: PathBuf,
    /// What a restart launches again: the binaries, the dir holding the log, the owner, the
    /// options.
    binaries: PgBinaries,
    dir: PathBuf,
    owner: Option<(u32, u32)>,
    opts: PgOptions,
    /// Declared before `_temp_dir`: the process stops before its dir is removed.
    process: ServerProcess,
    /// The throwaway server's dir (`None` when persistent).
    _temp_dir: Option<TempDir>,
}

impl PgServer {
    /// Runs `initdb -A trust -E UTF8 --locale=C -U postgres` into a fresh dir under
    /// `temp_dir()/picloud-local/` and starts `postgres` on a free 127.0.0.1 port, TCP only,
    /// returning once it accepts connections. Removed and killed on drop.
    ///
    /// As root, `initdb` and `postgres` run as the `postgres` system user.
    pub async fn start(opts: PgOptions) -> Result<PgServer> {
        let binaries = PgBinaries::locate()?;
        let owner = server_user()?;
        let dir = process::server_dir("pg")?;
        process::chown(dir.path(), owner)?;
        let data_dir = dir.path().join("data");
        initdb(&binaries, dir.path(), &data_dir, owner, opts).await?;
        let mut attempt = 1;
        loop {
            let port = process::free_port()?;
            match launch(&binaries, dir.path(), &data_dir, port, owner, opts).await {
                Ok(process) => {
                    return Ok(PgServer {
                        port,
                        data_dir,
                        binaries,
                        dir: dir.path().to_owned(),
                        owner,
                        opts,
                        process,
                        _temp_dir: Some(dir),
                    });
                }
                Err(error) if attempt < PORT_ATTEMPTS && process::address_in_use(&error) => {
                    tracing::debug!(port, "port taken before postgres bound it, retrying");
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Starts a server whose data survives it, for the `dev` command: the cluster lives in
    /// `dir/data` (created by `initdb` only if it holds no cluster yet), the log in
    /// `dir/postgres.log`, and the server listens on `127.0.0.1:port`. Dropping it stops the
    /// server but keeps the data.
    ///
    /// As root, the server runs as the `postgres` user, which must be able to reach `dir`.
    pub async fn start_persistent(dir: &Path, port: u16, opts: PgOptions) -> Result<PgServer> {
        let binaries = PgBinaries::locate()?;
        let owner = server_user()?;
        let dir = std::path::absolute(dir).context(|| format!("resolving {}", dir.display()))?;
        std::fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
        process::chown(&dir, owner)?;
        let data_dir = dir.join("data");
        if !data_dir.join("PG_VERSION").exists() {
            initdb(&binaries, &dir, &data_dir, owner, opts).await?;
        }
        let process = launch(&binaries, &dir, &data_dir, port, owner, opts).await?;
        Ok(PgServer { port, data_dir, binaries, dir, owner, opts, process, _temp_dir: None })
    }

    /// The TCP port the server listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:<port>/<database>` (trust authentication, no password).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server's log file (every start of it appends to the same file).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }

    /// The postmaster's process id.
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// Fast shutdown (SIGINT) and wait for the exit; escalates to an immediate shutdown and
    /// then SIGKILL if the server does not stop within a minute. A throwaway server's data is
    /// removed afterwards.
    pub async fn stop(mut self) -> Result<()> {
        self.process.shutdown(STOP_STEPS).await;
        Ok(())
    }

    /// Stops the server in `mode` and waits for its exit (escalating as [`PgServer::stop`] does
    /// if it does not exit), then starts it again on the same port and data directory and
    /// returns once it accepts connections: after an immediate shutdown, once its crash
    /// recovery is done. Sessions open before the restart are gone.
    pub async fn restart(&mut self, mode: PgShutdown) -> Result<()> {
        let steps = match mode {
            PgShutdown::Fast => STOP_STEPS,
            PgShutdown::Immediate => IMMEDIATE_STEPS,
        };
        self.process.shutdown(steps).await;
        let deadline = Instant::now() + RESTART_PORT_TIMEOUT;
        loop {
            let launched =
                launch(&self.binaries, &self.dir, &self.data_dir, self.port, self.owner, self.opts).await;
            match launched {
                Ok(process) => {
                    self.process = process;
                    return Ok(());
                }
                Err(error) if process::address_in_use(&error) && Instant::now() < deadline => {
                    tracing::debug!(port = self.port, "port still taken, retrying restart");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }
}

/// `Some((uid, gid))` of the `postgres` user when we are root (PostgreSQL refuses to run as
/// root), `None` otherwise (the server runs as us).
fn server_user() -> Result<Option<(u32, u32)>> {
    if sys::euid() != 0 {
        return Ok(None);
    }
    match sys::user_ids(PG_USER).context(|| format!("looking up the {PG_USER} user"))? {
        Some(ids) => Ok(Some(ids)),
        None => Err(Error::MissingUser { user: PG_USER.to_owned() }),
    }
}

/// A command that runs as `owner` (if any) in `dir`.
fn command(program: &Path, dir: &Path, owner: Option<(u32, u32)>) -> Command {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = Command::new(program);
    // The server user may not be allowed into our working directory.
    cmd.current_dir(dir);
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

async fn initdb(
    binaries: &PgBinaries,
    dir: &Path,
    data_dir: &Path,
    owner: Option<(u32, u32)>,
    opts: PgOptions,
) -> Result<()> {
    let mut cmd = command(&binaries.initdb, dir, owner);
    cmd.arg("-D").arg(data_dir).args(["-A", "trust", "-E", "UTF8", "--locale=C", "-U", "postgres"]);
    if !opts.durable {
        cmd.arg("--no-sync");
    }
    let mut initdb = ServerProcess::spawn(
        cmd,
        format!("initdb {}", data_dir.display()),
        dir.join("initdb.log"),
        libc::SIGKILL,
        &[],
    )
    .await?;
    match initdb.wait_exit(INITDB_TIMEOUT).await {
        Some(status) if status.success() => Ok(()),
        Some(status) => Err(initdb.failure(format!("exited with {status}"))),
        None => Err(initdb.failure(format!("did not finish within {}s", INITDB_TIMEOUT.as_secs()))),
    }
}

/// Starts `postgres` on `data_dir` and waits until it accepts connections.
async fn launch(
    binaries: &PgBinaries,
    dir: &Path,
    data_dir: &Path,
    port: u16,
    owner: Option<(u32, u32)>,
    opts: PgOptions,
) -> Result<ServerProcess> {
    let mut cmd = command(&binaries.postgres, dir, owner);
    cmd.arg("-D").arg(data_dir).arg("-p").arg(port.to_string());
    let mut settings = vec![
        "listen_addresses=127.0.0.1".to_owned(),
        "unix_socket_directories=".to_owned(),
        format!("max_connections={}", opts.max_connections),
    ];
    if !opts.durable {
        settings.extend(["fsync=off", "synchronous_commit=off", "full_page_writes=off"].map(str::to_owned));
    }
    for setting in settings {
        cmd.arg("-c").arg(setting);
    }
    // SIGQUIT is an immediate shutdown: the postmaster also stops its backends.
    let mut server = ServerProcess::spawn(
        cmd,
        format!("postgres on port {port}"),
        dir.join(LOG_FILE),
        libc::SIGQUIT,
        DROP_STEPS,
    )
    .await?;
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    server.wait_ready(READY_TIMEOUT, "accepted connection", || accepts_connections(&url)).await?;
    Ok(server)
}

async fn accepts_connections(url: &str) -> bool {
    let attempt = tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(url));
    match attempt.await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            true
        }
        _ => false,
    }
}
