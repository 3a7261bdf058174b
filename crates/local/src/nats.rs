//! Throwaway nats-server processes: single servers and loopback clusters, with stop/restart
//! on the same ports and readiness probes (client `INFO` line, `/routez` route count).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use crate::binaries;
use crate::error::{Error, IoContext, Result};
use crate::process::{self, ServerProcess};

/// How long a server may take to accept clients (and, in a cluster, to get its routes).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a restart keeps retrying while its fixed port is still taken.
const RESTART_PORT_TIMEOUT: Duration = Duration::from_secs(15);
/// How many sets of ports a fresh server or cluster tries on "address already in use".
const PORT_ATTEMPTS: usize = 5;
/// Timeout of one readiness probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The cluster name of [`NatsCluster`]s.
const CLUSTER_NAME: &str = "picloud-test";

/// A nats-server process listening on `127.0.0.1`, started by this process.
///
/// Dropping it kills the server (SIGKILL) and removes its dir (which holds its log).
#[derive(Debug)]
pub struct NatsServer {
    binary: PathBuf,
    /// Every argument, ports included: a restart reuses them as they are.
    args: Vec<OsString>,
    /// Variables added to the server's environment (e.g. passwords its config reads as `$VAR`).
    env: Vec<(OsString, OsString)>,
    port: u16,
    monitoring_port: Option<u16>,
    /// In a cluster, the number of routes the server must have to count as ready.
    routes: Option<usize>,
    /// The running process; behind a mutex only so that `is_running(&self)` can reap it.
    process: Mutex<Option<ServerProcess>>,
    /// Declared after `process`: the server is killed before its dir is removed.
    dir: TempDir,
}

impl NatsServer {
    /// Starts `nats-server -a 127.0.0.1 -p <free port> -m <free port>` and returns once a
    /// client connection receives the server's `INFO` line.
    pub async fn start() -> Result<NatsServer> {
        Self::start_fresh(None, None).await
    }

    /// Starts `nats-server -c <config> -a 127.0.0.1 -p <free port>`: the caller's config file,
    /// with the address and port on the command line overriding it.
    pub async fn start_with_config(config: &Path) -> Result<NatsServer> {
        let config = std::path::absolute(config).context(|| format!("resolving {}", config.display()))?;
        Self::start_fresh(Some(&config), None).await
    }

    /// Starts `nats-server -c <config> -a 127.0.0.1 -p <port>`: as [`Self::start_with_config`],
    /// on a port of the caller's choosing (an error if it is taken).
    pub async fn start_with_config_on(config: &Path, port: u16) -> Result<NatsServer> {
        let config = std::path::absolute(config).context(|| format!("resolving {}", config.display()))?;
        Self::start_fresh(Some(&config), Some(port)).await
    }

    /// Starts a server on `port`, or on free ports (trying again when one was taken meanwhile).
    async fn start_fresh(config: Option<&Path>, port: Option<u16>) -> Result<NatsServer> {
        let binary = binaries::nats_server()?;
        let mut server = Self {
            binary,
            args: Vec::new(),
            env: Vec::new(),
            port: 0,
            monitoring_port: None,
            routes: None,
            process: Mutex::new(None),
            dir: process::server_dir("nats")?,
        };
        let mut attempt = 1;
        loop {
            server.port = match port {
                Some(port) => port,
                None => process::free_port()?,
            };
            server.monitoring_port = match config {
                Some(_) => None,
                None => Some(process::free_port()?),
            };
            let mut args: Vec<OsString> = Vec::new();
            if let Some(config) = config {
                args.extend(["-c".into(), config.into()]);
            }
            args.extend(["-a", "127.0.0.1", "-p"].map(OsString::from));
            args.push(server.port.to_string().into());
            if let Some(monitoring_port) = server.monitoring_port {
                args.extend(["-m".into(), monitoring_port.to_string().into()]);
            }
            server.args = args;
            match server.launch().await {
                Ok(()) => return Ok(server),
                Err(error)
                    if port.is_none() && attempt < PORT_ATTEMPTS && process::address_in_use(&error) =>
                {
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// The client port (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The HTTP monitoring port, if the server has one (not when started with a config).
    pub fn monitoring_port(&self) -> Option<u16> {
        self.monitoring_port
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The process id while the server runs.
    pub fn pid(&self) -> Option<u32> {
        let mut process = self.process.lock().unwrap_or_else(PoisonError::into_inner);
        let process = process.as_mut()?;
        process.exited().is_none().then(|| process.id())
    }

    /// Kills the server (SIGKILL) and waits until it is gone. Its ports are remembered for
    /// [`NatsServer::restart`] (but not held: another process could take them meanwhile).
    pub async fn stop(&mut self) -> Result<()> {
        let process = self.process.get_mut().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(mut process) = process {
            process.shutdown(&[]).await;
        }
        Ok(())
    }

    /// Starts the server again with the same arguments and ports (stopping it first if it
    /// runs) and waits until it is ready; a cluster node also waits until it has its routes
    /// to every other node again.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        let deadline = Instant::now() + RESTART_PORT_TIMEOUT;
        loop {
            match self.launch().await {
                Err(error) if process::address_in_use(&error) && Instant::now() < deadline => {
                    tracing::debug!(port = self.port, "port still taken, retrying restart");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                result => return result,
            }
        }
    }

    /// Whether the server process is running.
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    async fn launch(&mut self) -> Result<()> {
        self.spawn().await?;
        self.wait_ready().await
    }

    async fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new(&self.binary);
        cmd.args(&self.args).envs(self.env.iter().map(|(k, v)| (k, v)));
        let process = ServerProcess::spawn(
            cmd,
            format!("nats-server on port {}", self.port),
            self.dir.path().join("nats-server.log"),
            libc::SIGKILL,
            &[],
        )
        .await?;
        *self.process.get_mut().unwrap_or_else(PoisonError::into_inner) = Some(process);
        Ok(())
    }

    /// Waits for the `INFO` line and, in a cluster, for the routes; on failure the process
    /// is killed.
    async fn wait_ready(&mut self) -> Result<()> {
        let port = self.port;
        let (routes, monitoring_port) = (self.routes, self.monitoring_port);
        let slot = self.process.get_mut().unwrap_or_else(PoisonError::into_inner);
        let Some(process) = slot.as_mut() else {
            return Err(Error::InvalidArgument("nats-server is not running".into()));
        };
        let mut ready = process
            .wait_ready(READY_TIMEOUT, "INFO line from a client connection", || sends_info(port))
            .await;
        if let (Ok(()), Some(expected), Some(monitoring_port)) = (&ready, routes, monitoring_port) {
            let what = format!("{expected} routes in /routez");
            ready = process
                .wait_ready(READY_TIMEOUT, &what, || async move {
                    route_count(monitoring_port).await == Some(expected)
                })
                .await;
        }
        if ready.is_err() {
            *slot = None;
        }
        ready
    }
}

/// Whether a client connection to `port` receives the `INFO` line.
async fn sends_info(port: u16) -> bool {
    let probe = async {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).await.ok()?;
        Some(line.starts_with("INFO "))
    };
    matches!(tokio::time::timeout(PROBE_TIMEOUT, probe).await, Ok(Some(true)))
}

/// The `num_routes` of `http://127.0.0.1:<monitoring_port>/routez`, fetched with a plain
/// HTTP/1.0 GET.
async fn route_count(monitoring_port: u16) -> Option<usize> {
    let fetch = async {
        let mut stream = TcpStream::connect(("127.0.0.1", monitoring_port)).await.ok()?;
        stream.write_all(b"GET /routez HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        Some(response)
    };
    let response = tokio::time::timeout(PROBE_TIMEOUT, fetch).await.ok()??;
    json_usize(&response, "num_routes")
}

/// The unsigned integer value of the first `"key": <n>` in `json`.
fn json_usize(json: &str, key: &str) -> Option<usize> {
    let after_key = &json[json.find(&format!("\"{key}\""))? + key.len() + 2..];
    let value = after_key.trim_start().strip_prefix(':')?.trim_start();
    let digits = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    value[..digits].parse().ok()
}

/// The loopback ports of one node of a cluster started with [`NatsCluster::start_with_configs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatsNodePorts {
    /// Client connections (`port`).
    pub client: u16,
    /// Routes from the other nodes (`cluster { listen }`).
    pub cluster: u16,
    /// HTTP monitoring (`http_port`), where readiness reads `/routez`.
    pub monitoring: u16,
}

/// A cluster of nats-servers on loopback, named `picloud-test`: every node has a client, a
/// cluster and a monitoring port and routes to every other node.
///
/// Dropping it kills every node.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `nodes` servers and returns once every one of them reports `nodes - 1` routes
    /// on its `/routez` monitoring endpoint.
    pub async fn start(nodes: usize) -> Result<NatsCluster> {
        let binary = binaries::nats_server()?;
        Self::boot_on_free_ports(nodes, |ports| {
            let mut servers = Vec::with_capacity(nodes);
            for (i, node) in ports.iter().enumerate() {
                let routes: Vec<String> = ports
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, other)| format!("nats://127.0.0.1:{}", other.cluster))
                    .collect();
                let mut args: Vec<OsString> = [
                    "-a".to_owned(),
                    "127.0.0.1".to_owned(),
                    "-p".to_owned(),
                    node.client.to_string(),
                    "-m".to_owned(),
                    node.monitoring.to_string(),
                    "-n".to_owned(),
                    format!("{CLUSTER_NAME}-{i}"),
                    "--cluster_name".to_owned(),
                    CLUSTER_NAME.to_owned(),
                    "--cluster".to_owned(),
                    format!("nats://127.0.0.1:{}", node.cluster),
                ]
                .map(OsString::from)
                .into();
                if !routes.is_empty() {
                    args.extend(["--routes".into(), routes.join(",").into()]);
                }
                servers.push(NatsServer {
                    binary: binary.clone(),
                    args,
                    env: Vec::new(),
                    port: node.client,
                    monitoring_port: Some(node.monitoring),
                    routes: Some(nodes - 1),
                    process: Mutex::new(None),
                    dir: process::server_dir("nats")?,
                });
            }
            Ok(servers)
        })
        .await
    }

    /// Starts one node per config file of the caller's: `write_config(i, ports)` writes node
    /// `i`'s config for the free loopback ports `ports[i]` (routing to the others' `cluster`
    /// ports) and returns its path. Each node runs `nats-server -c <config> -a 127.0.0.1` with
    /// `env` added to its environment (e.g. the passwords a config reads as `$VAR`); the config
    /// must listen on its `client`, `cluster` and `monitoring` (`http_port`) ports. Returns once
    /// every node reports `nodes - 1` routes on `/routez`; on "address already in use" it
    /// starts over with new ports, calling `write_config` again.
    pub async fn start_with_configs<F>(
        nodes: usize,
        env: &[(&str, &str)],
        mut write_config: F,
    ) -> Result<NatsCluster>
    where
        F: FnMut(usize, &[NatsNodePorts]) -> std::io::Result<PathBuf>,
    {
        let binary = binaries::nats_server()?;
        let env: Vec<(OsString, OsString)> = env.iter().map(|&(k, v)| (k.into(), v.into())).collect();
        Self::boot_on_free_ports(nodes, |ports| {
            let mut servers = Vec::with_capacity(nodes);
            for (i, node) in ports.iter().enumerate() {
                let config = write_config(i, ports).context(|| format!("writing the config of node {i}"))?;
                let config =
                    std::path::absolute(&config).context(|| format!("resolving {}", config.display()))?;
                servers.push(NatsServer {
                    binary: binary.clone(),
                    args: vec!["-c".into(), config.into(), "-a".into(), "127.0.0.1".into()],
                    env: env.clone(),
                    port: node.client,
                    monitoring_port: Some(node.monitoring),
                    routes: Some(nodes - 1),
                    process: Mutex::new(None),
                    dir: process::server_dir("nats")?,
                });
            }
            Ok(servers)
        })
        .await
    }

    /// Picks free loopback ports for `nodes` nodes, has `servers` describe the nodes on them,
    /// and boots them; the nodes' routes name each other's ports, so on "address already in
    /// use" it starts over with a whole new set.
    async fn boot_on_free_ports(
        nodes: usize,
        mut servers: impl FnMut(&[NatsNodePorts]) -> Result<Vec<NatsServer>>,
    ) -> Result<NatsCluster> {
        if nodes == 0 {
            return Err(Error::InvalidArgument("a cluster needs at least one node".into()));
        }
        let mut attempt = 1;
        loop {
            let mut ports = Vec::with_capacity(nodes);
            for _ in 0..nodes {
                let (client, cluster, monitoring) =
                    (process::free_port()?, process::free_port()?, process::free_port()?);
                ports.push(NatsNodePorts { client, cluster, monitoring });
            }
            let mut booting = servers(&ports)?;
            match Self::boot(&mut booting).await {
                Ok(()) => return Ok(NatsCluster { nodes: booting }),
                Err(error) if attempt < PORT_ATTEMPTS && process::address_in_use(&error) => {
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Spawns every node first (each waits for routes to the others), then waits for each.
    async fn boot(servers: &mut [NatsServer]) -> Result<()> {
        for server in servers.iter_mut() {
            server.spawn().await?;
        }
        for server in servers.iter_mut() {
            server.wait_ready().await?;
        }
        Ok(())
    }

    /// Node `i` (panics if there is no such node), e.g. to stop and restart it; a restarted
    /// node rejoins its routes before [`NatsServer::restart`] returns.
    pub fn node(&mut self, i: usize) -> &mut NatsServer {
        &mut self.nodes[i]
    }

    /// The client URLs of the nodes, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// The client URLs, comma-separated (the form `PICLOUD_NATS_URL` takes).
    pub fn url_list(&self) -> String {
        self.urls().join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::json_usize;

    #[test]
    fn the_route_count_is_read_from_pretty_printed_json() {
        let body =
            "HTTP/1.0 200 OK\r\n\r\n{\n  \"server_id\": \"X\",\n  \"num_routes\": 2,\n  \"routes\": []\n}";
        assert_eq!(json_usize(body, "num_routes"), Some(2));
        assert_eq!(json_usize("{\"num_routes\":0}", "num_routes"), Some(0));
        assert_eq!(json_usize("{}", "num_routes"), None);
    }
}
