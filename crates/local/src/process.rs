//! Server child processes: the spawner thread that forks them, their per-server temp dirs and
//! log files, free ports, readiness polling and shutdown.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, Once, PoisonError, mpsc};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::sync::oneshot;

use crate::error::{Error, IoContext, Result};
use crate::sys;

/// How often readiness and exit are polled.
const POLL: Duration = Duration::from_millis(20);

/// How many lines of a server's log an error shows.
const TAIL_LINES: usize = 30;

/// A request to the spawner thread: the command to spawn and where to send the outcome.
type SpawnRequest = (Command, oneshot::Sender<io::Result<Child>>);

/// The spawner thread's inbox. The thread lives as long as the process because this sender,
/// kept in a static, is never dropped: the kernel delivers a child's parent-death signal when
/// the *thread* that forked it exits, so every server must be forked by a thread that never
/// exits before the process does (tokio's blocking threads and test threads may exit any time).
static SPAWNER: Mutex<Option<mpsc::Sender<SpawnRequest>>> = Mutex::new(None);

/// Forks `cmd` from the spawner thread with `death_signal` as its parent-death signal, so the
/// child gets it when this process dies, however it dies.
pub(crate) async fn spawn(mut cmd: Command, death_signal: libc::c_int) -> io::Result<Child> {
    sys::set_parent_death_signal(&mut cmd, death_signal);
    let (reply, outcome) = oneshot::channel();
    {
        let mut spawner = SPAWNER.lock().unwrap_or_else(PoisonError::into_inner);
        if spawner.is_none() {
            let (tx, rx) = mpsc::channel::<SpawnRequest>();
            std::thread::Builder::new().name("picloud-local-spawner".into()).spawn(move || {
                while let Ok((mut cmd, reply)) = rx.recv() {
                    // The caller gave up (its future was dropped): do not leave the child behind.
                    if let Err(Ok(mut child)) = reply.send(cmd.spawn()) {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                }
            })?;
            *spawner = Some(tx);
        }
        let tx = spawner.as_ref().expect("spawner was just set");
        tx.send((cmd, reply)).map_err(|_| io::Error::other("the spawner thread is gone"))?;
    }
    outcome.await.map_err(|_| io::Error::other("the spawner thread dropped the request"))?
}

/// A running (or exited, not yet dropped) server process with its log file.
///
/// Dropping it runs `drop_steps` (signal, then wait up to the duration for the exit) and
/// finally SIGKILLs and reaps the process if it is still there.
#[derive(Debug)]
pub(crate) struct ServerProcess {
    child: Child,
    /// E.g. `postgres on port 40123`, for errors and logs.
    label: String,
    /// The file the process's stdout and stderr go to.
    log: PathBuf,
    /// Length of the log when this process started: its tail is read from here on.
    log_start: u64,
    /// Graceful shutdown steps tried on drop before SIGKILL.
    drop_steps: &'static [(libc::c_int, Duration)],
}

impl ServerProcess {
    /// Spawns `cmd` with stdin closed and stdout/stderr appended to `log`.
    pub(crate) async fn spawn(
        mut cmd: Command,
        label: String,
        log: PathBuf,
        death_signal: libc::c_int,
        drop_steps: &'static [(libc::c_int, Duration)],
    ) -> Result<Self> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .context(|| format!("opening log file {}", log.display()))?;
        let log_start = out.metadata().map(|m| m.len()).unwrap_or(0);
        let err = out.try_clone().context(|| format!("opening log file {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            // Own process group: a Ctrl-C in the terminal goes to the owner, which decides
            // when and in which order its servers stop.
            .process_group(0);
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = spawn(cmd, death_signal).await.context(|| format!("spawning {program}"))?;
        tracing::debug!(pid = child.id(), %label, "spawned server process");
        Ok(Self { child, label, log, log_start, drop_steps })
    }

    /// The process id.
    pub(crate) fn id(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the process has exited (and is reaped).
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        // An error here means the child was reaped elsewhere, which we never do: call it gone.
        self.child.try_wait().unwrap_or_else(|_| Some(ExitStatus::default()))
    }

    /// An [`Error::Startup`] for this process with the tail of its log.
    pub(crate) fn failure(&self, reason: impl Into<String>) -> Error {
        Error::Startup {
            server: self.label.clone(),
            reason: reason.into(),
            log: self.log.clone(),
            log_tail: log_tail(&self.log, self.log_start),
        }
    }

    /// Polls `ready` until it says yes, the process exits, or `timeout` passes; `what` names
    /// the awaited condition in the error, e.g. `a client connection`.
    pub(crate) async fn wait_ready<F, Fut>(
        &mut self,
        timeout: Duration,
        what: &str,
        mut ready: F,
    ) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Err(self.failure(format!("exited during startup ({status})")));
            }
            if ready().await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.failure(format!("no {what} after {}s", timeout.as_secs())));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub(crate) async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Blocking [`Self::wait_exit`], for `Drop`.
    fn wait_exit_blocking(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends each signal of `steps` in turn until the process exits; SIGKILLs it if none did.
    pub(crate) async fn shutdown(&mut self, steps: &[(libc::c_int, Duration)]) {
        for &(signal, timeout) in steps {
            if self.exited().is_some() {
                return;
            }
            if let Err(error) = sys::signal(&mut self.child, signal) {
                tracing::warn!(%error, label = %self.label, signal, "cannot signal server");
            }
            if self.wait_exit(timeout).await.is_some() {
                return;
            }
            tracing::warn!(label = %self.label, signal, "server ignored the signal, escalating");
        }
        let _ = self.child.kill();
        // After SIGKILL the exit is prompt; polling (not `wait`) keeps the runtime free.
        if self.wait_exit(Duration::from_secs(30)).await.is_none() {
            let _ = self.child.wait();
        }
    }

    /// Blocking [`Self::shutdown`], for `Drop`.
    pub(crate) fn shutdown_blocking(&mut self, steps: &[(libc::c_int, Duration)]) {
        for &(signal, timeout) in steps {
            if self.exited().is_some() {
                return;
            }
            let _ = sys::signal(&mut self.child, signal);
            if self.wait_exit_blocking(timeout).is_some() {
                return;
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.shutdown_blocking(self.drop_steps);
    }
}

/// Whether a startup error says the port was taken (so a retry on another port may work).
pub(crate) fn address_in_use(error: &Error) -> bool {
    matches!(error, Error::Startup { log_tail, .. }
        if log_tail.to_ascii_lowercase().contains("address already in use"))
}

/// The last [`TAIL_LINES`] lines of `log` written after byte `start`.
pub(crate) fn log_tail(log: &Path, start: u64) -> String {
    const MAX_BYTES: u64 = 16 * 1024;
    let read = || -> io::Result<String> {
        let mut file = File::open(log)?;
        let len = file.metadata()?.len();
        let from = start.max(len.saturating_sub(MAX_BYTES));
        file.seek(SeekFrom::Start(from))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().collect();
        Ok(lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n"))
    };
    match read() {
        Ok(tail) if tail.trim().is_empty() => "(log is empty)".to_owned(),
        Ok(tail) => tail,
        Err(error) => format!("(cannot read log: {error})"),
    }
}

/// Ports this process has handed out, so two servers of one test process never race for the
/// same port between our probe and their bind.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback port that was free a moment ago (bind to port 0, read it, release it).
///
/// Another process may still take it before the server binds; callers retry on
/// "address already in use".
pub(crate) fn free_port() -> Result<u16> {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    for _ in 0..100 {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|listener| listener.local_addr())
            .context(|| "probing for a free port on 127.0.0.1")?
            .port();
        if handed_out.insert(port) {
            return Ok(port);
        }
    }
    Err(Error::Io {
        context: "probing for a free port on 127.0.0.1".into(),
        source: io::Error::other("the kernel kept returning ports already handed out"),
    })
}

/// Removes sibling dirs of dead processes once per process.
static CLEAN_STALE: Once = Once::new();

/// `temp_dir()/picloud-local`, created with mode 0755 so the `postgres` user can reach its
/// server dirs; on first use, removes the dirs left behind by processes that no longer run.
pub(crate) fn base_dir() -> Result<PathBuf> {
    let base = std::env::temp_dir().join("picloud-local");
    std::fs::create_dir_all(&base).context(|| format!("creating {}", base.display()))?;
    let meta = std::fs::metadata(&base).context(|| format!("reading {}", base.display()))?;
    if std::os::unix::fs::MetadataExt::uid(&meta) == sys::euid()
        && meta.permissions().mode() & 0o7777 != 0o755
    {
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755))
            .context(|| format!("setting the mode of {}", base.display()))?;
    }
    CLEAN_STALE.call_once(|| remove_stale_dirs(&base));
    Ok(base)
}

/// A fresh dir `base_dir()/<kind>-<pid>-<random>`, removed when the returned value drops.
pub(crate) fn server_dir(kind: &str) -> Result<TempDir> {
    let base = base_dir()?;
    tempfile::Builder::new()
        .prefix(&format!("{kind}-{}-", std::process::id()))
        .tempdir_in(&base)
        .context(|| format!("creating a {kind} dir in {}", base.display()))
}

/// Removes `<kind>-<pid>-*` dirs in `base` whose pid no longer runs (a killed test process
/// never drops its servers).
fn remove_stale_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) =
            name.to_str().and_then(|name| name.split('-').nth(1)).and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::debug!(dir = %entry.path().display(), "removing a dead process's dir");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The blocking-safe `chown` used to hand a dir to the server's user.
pub(crate) fn chown(path: &Path, owner: Option<(u32, u32)>) -> Result<()> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .context(|| format!("chown {} to uid {uid}", path.display()))?;
    }
    Ok(())
}
