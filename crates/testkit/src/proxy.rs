//! A TCP proxy on 127.0.0.1 that a test cuts and restores: a network partition between a
//! process and the server it talks to, without root or network namespaces.
//!
//! A cut behaves like a blackhole, not like a refusal: nothing is closed and nothing is answered.
//! - Connections open at the cut stop carrying bytes both ways and both their ends are held
//!   open silently (no FIN, no RST): reads on either side hang, as across a real partition.
//!   Their state does not outlive the partition: on restore both ends are reset (RST), as after
//!   a partition longer than the peers' patience (a firewall's or a server's connection state
//!   gone), so the client must notice and reconnect.
//! - Connections made during the cut are accepted (the kernel completes the handshake anyway)
//!   and held without being connected to the target; on restore they are connected and
//!   forwarded, like a handshake retried across the partition that succeeds once it heals.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::WriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use picloud_local::{IoContext, Result};

/// Bytes read from one side before they are written to the other.
const BUFFER: usize = 16 * 1024;

/// The state of the link, shared by the proxy and its connections.
#[derive(Debug, Clone, Copy, Default)]
struct Link {
    /// Whether the link is cut now.
    cut: bool,
    /// Cuts so far: a connection forwards only while this is the count it started under.
    cuts: u64,
    /// Connections forwarding bytes now.
    forwarding: usize,
    /// Connections held: made during a cut and waiting to be forwarded, or open at a cut and
    /// waiting to be reset.
    held: usize,
}

/// A TCP proxy listening on a free 127.0.0.1 port and forwarding every connection to `target`,
/// until it is [cut](TcpProxy::cut) (see the module's documentation for what a cut does).
///
/// Dropping it closes its listener and every connection through it.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    link: Arc<watch::Sender<Link>>,
    accepting: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free 127.0.0.1 port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> Result<TcpProxy> {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.context(|| "binding the proxy to 127.0.0.1")?;
        let addr = listener.local_addr().context(|| "reading the proxy's address")?;
        let link = Arc::new(watch::Sender::new(Link::default()));
        let accepting = tokio::spawn(accept(listener, target, link.clone()));
        Ok(TcpProxy { addr, link, accepting })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients connect to (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Cuts the link: returns once no connection forwards a byte any more.
    pub async fn cut(&self) {
        self.link.send_modify(|link| {
            link.cut = true;
            link.cuts += 1;
        });
        let mut link = self.link.subscribe();
        // The sender lives in `self`: the channel cannot close while we wait.
        let _ = link.wait_for(|link| link.forwarding == 0).await;
    }

    /// Restores the link: connections open at the cut are reset, those made since are
    /// forwarded, and new ones are forwarded again.
    pub fn restore(&self) {
        self.link.send_modify(|link| link.cut = false);
    }

    /// The connections held by a cut now: made during it and waiting to be forwarded, or open
    /// at it and waiting to be reset.
    pub fn held(&self) -> usize {
        self.link.borrow().held
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// Accepts connections and serves each in a task of its own; the tasks end with this one.
async fn accept(listener: TcpListener, target: SocketAddr, link: Arc<watch::Sender<Link>>) {
    let mut connections = JoinSet::new();
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                connections.spawn(serve(client, target, link.clone()));
            }
            Err(error) => tracing::warn!(%error, "the proxy could not accept a connection"),
        }
        while connections.try_join_next().is_some() {}
    }
}

/// How forwarding ended.
enum Ended {
    /// One side closed or failed: the other is closed too.
    Closed,
    /// The link was cut.
    Cut,
}

/// One connection: held while the link is cut, then connected to the target and forwarded
/// until one side closes, or until a cut, after which both ends are held and reset on restore.
async fn serve(mut client: TcpStream, target: SocketAddr, link: Arc<watch::Sender<Link>>) {
    let mut watch = link.subscribe();
    hold(&link, &mut watch).await;
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        reset(client);
        return;
    };
    let mut started = None;
    link.send_if_modified(|link| {
        if !link.cut {
            link.forwarding += 1;
            started = Some(link.cuts);
        }
        false
    });
    if let Some(cuts) = started {
        let ended = forward(&mut client, &mut upstream, &mut watch, cuts).await;
        link.send_modify(|link| link.forwarding -= 1);
        if let Ended::Closed = ended {
            return;
        }
    }
    hold(&link, &mut watch).await;
    reset(client);
    reset(upstream);
}

/// Waits, counted as held, while the link is cut.
async fn hold(link: &watch::Sender<Link>, watch: &mut watch::Receiver<Link>) {
    if !watch.borrow().cut {
        return;
    }
    link.send_modify(|link| link.held += 1);
    // The sender outlives every connection task (they end with the accept task).
    let _ = watch.wait_for(|link| !link.cut).await;
    link.send_modify(|link| link.held -= 1);
}

/// Copies bytes both ways until one side closes or the cut count moves past `cuts`; no byte
/// read after the cut is written.
async fn forward(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    watch: &mut watch::Receiver<Link>,
    cuts: u64,
) -> Ended {
    let (mut client_read, mut client_write) = client.split();
    let (mut upstream_read, mut upstream_write) = upstream.split();
    let (mut to_upstream, mut to_client) = (vec![0u8; BUFFER], vec![0u8; BUFFER]);
    loop {
        let (read, buffer, to) = tokio::select! {
            biased;
            _ = watch.wait_for(|link| link.cuts != cuts) => return Ended::Cut,
            read = client_read.read(&mut to_upstream) => (read, &to_upstream, &mut upstream_write),
            read = upstream_read.read(&mut to_client) => (read, &to_client, &mut client_write),
        };
        if let Some(ended) = pass(read, buffer, to, watch, cuts).await {
            return ended;
        }
    }
}

/// Writes what one side's `read` got to the other side, unless the link was cut meanwhile;
/// `Some` when forwarding ends.
async fn pass(
    read: std::io::Result<usize>,
    buffer: &[u8],
    to: &mut WriteHalf<'_>,
    watch: &mut watch::Receiver<Link>,
    cuts: u64,
) -> Option<Ended> {
    let n = match read {
        Ok(0) | Err(_) => return Some(Ended::Closed),
        Ok(n) => n,
    };
    tokio::select! {
        biased;
        _ = watch.wait_for(|link| link.cuts != cuts) => Some(Ended::Cut),
        written = to.write_all(&buffer[..n]) => written.is_err().then_some(Ended::Closed),
    }
}

/// Closes `stream` with a reset (RST) rather than a FIN.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}
