//! `TcpProxy`: forwarding, and what a cut does to open and new connections.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use picloud_testkit::{TcpProxy, TestDatabase, eventually_within};
use sqlx::{Connection, PgConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const TIMEOUT: Duration = Duration::from_secs(30);

/// A TCP echo server that counts its connections and the bytes it received, and reports how
/// each connection ended (`Ok(())` for a close, the error kind for a failure).
struct Echo {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    received: Arc<AtomicUsize>,
    ended: mpsc::UnboundedReceiver<Result<(), ErrorKind>>,
}

impl Echo {
    async fn start() -> anyhow::Result<Echo> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (accepted, received) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (report, ended) = mpsc::unbounded_channel();
        tokio::spawn({
            let (accepted, received) = (accepted.clone(), received.clone());
            async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let (received, report) = (received.clone(), report.clone());
                    tokio::spawn(async move {
                        let mut buffer = [0u8; 1024];
                        let end = loop {
                            match stream.read(&mut buffer).await {
                                Ok(0) => break Ok(()),
                                Ok(n) => {
                                    received.fetch_add(n, Ordering::SeqCst);
                                    if let Err(e) = stream.write_all(&buffer[..n]).await {
                                        break Err(e.kind());
                                    }
                                }
                                Err(e) => break Err(e.kind()),
                            }
                        };
                        let _ = report.send(end);
                    });
                }
            }
        });
        Ok(Echo { addr, accepted, received, ended })
    }
}

/// Sends `message` and reads the echo of it.
async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> anyhow::Result<Vec<u8>> {
    stream.write_all(message).await?;
    let mut echoed = vec![0u8; message.len()];
    tokio::time::timeout(TIMEOUT, stream.read_exact(&mut echoed)).await??;
    Ok(echoed)
}

#[tokio::test]
async fn a_tcp_proxy_forwards_both_ways_to_its_target() -> anyhow::Result<()> {
    let echo = Echo::start().await?;
    let proxy = TcpProxy::start(echo.addr).await?;

    let mut stream = TcpStream::connect(proxy.addr()).await?;
    let echoed = round_trip(&mut stream, b"hello through the proxy").await?;

    assert_eq!(echoed, b"hello through the proxy");
    assert_eq!(proxy.port(), proxy.addr().port());
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 1);
    Ok(())
}

#[tokio::test]
async fn a_connection_made_during_a_cut_is_held_unforwarded_and_forwarded_after_restore() -> anyhow::Result<()>
{
    let echo = Echo::start().await?;
    let proxy = TcpProxy::start(echo.addr).await?;
    proxy.cut().await;

    let mut stream = TcpStream::connect(proxy.addr()).await?;
    stream.write_all(b"sent during the cut").await?;
    eventually_within("the proxy holds the connection", TIMEOUT, || async {
        (proxy.held() == 1).then_some(())
    })
    .await;
    let reached_target_during_cut = echo.accepted.load(Ordering::SeqCst);
    proxy.restore();
    let mut echoed = vec![0u8; b"sent during the cut".len()];
    tokio::time::timeout(TIMEOUT, stream.read_exact(&mut echoed)).await??;

    assert_eq!(reached_target_during_cut, 0, "the proxy connected to the target during the cut");
    assert_eq!(echoed, b"sent during the cut", "the held connection is forwarded after the restore");
    assert_eq!(proxy.held(), 0);
    Ok(())
}

#[tokio::test]
async fn a_connection_open_at_a_cut_hears_nothing_and_both_its_ends_are_reset_on_restore()
-> anyhow::Result<()> {
    let mut echo = Echo::start().await?;
    let proxy = TcpProxy::start(echo.addr).await?;
    let mut stream = TcpStream::connect(proxy.addr()).await?;
    round_trip(&mut stream, b"before").await?;

    proxy.cut().await;
    stream.write_all(b"during the cut").await?;
    eventually_within("the proxy holds the connection", TIMEOUT, || async {
        (proxy.held() == 1).then_some(())
    })
    .await;
    let (mut read_half, _write_half) = stream.split();
    let mut buffer = [0u8; 64];
    let pending_read = read_half.read(&mut buffer);
    tokio::pin!(pending_read);
    let nothing_yet = is_pending_now(&mut pending_read).await;
    proxy.restore();
    let after_restore = tokio::time::timeout(TIMEOUT, pending_read).await?;
    let target_end = tokio::time::timeout(TIMEOUT, echo.ended.recv()).await?;

    assert!(nothing_yet, "the client heard something during the cut");
    assert_eq!(
        after_restore.map_err(|e| e.kind()).err(),
        Some(ErrorKind::ConnectionReset),
        "the client's end is reset on restore"
    );
    assert_eq!(target_end, Some(Err(ErrorKind::ConnectionReset)), "the target's end is reset on restore");
    assert_eq!(echo.received.load(Ordering::SeqCst), b"before".len(), "bytes sent during the cut arrived");
    Ok(())
}

/// Polls `future` once: `true` when it is still pending.
async fn is_pending_now<F: std::future::Future + Unpin>(future: &mut F) -> bool {
    std::future::poll_fn(|cx| std::task::Poll::Ready(std::pin::Pin::new(&mut *future).poll(cx).is_pending()))
        .await
}

#[tokio::test]
async fn a_postgres_session_cut_fails_after_restore_and_a_new_session_through_the_proxy_works()
-> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let url = db.url();
    let port: u16 = url.rsplit_once(':').and_then(|(_, rest)| rest.split('/').next()).unwrap().parse()?;
    let proxy = TcpProxy::start(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    let through_proxy = url.replace(&format!(":{port}/"), &format!(":{}/", proxy.port()));
    let mut session = PgConnection::connect(&through_proxy).await?;
    let one: i32 = sqlx::query_scalar("select 1").fetch_one(&mut session).await?;

    proxy.cut().await;
    let query = tokio::spawn(async move {
        let answer = sqlx::query_scalar::<_, i32>("select 2").fetch_one(&mut session).await;
        answer.map_err(|e| e.to_string())
    });
    eventually_within("the proxy holds the session", TIMEOUT, || async { (proxy.held() == 1).then_some(()) })
        .await;
    let answered_during_cut = query.is_finished();
    proxy.restore();
    let cut_query = tokio::time::timeout(TIMEOUT, query).await??;
    let mut fresh = PgConnection::connect(&through_proxy).await?;
    let three: i32 = sqlx::query_scalar("select 3").fetch_one(&mut fresh).await?;

    assert_eq!(one, 1);
    assert!(!answered_during_cut, "a query was answered during the cut");
    assert!(cut_query.is_err(), "the session open at the cut survived it: {cut_query:?}");
    assert_eq!(three, 3, "a new session through the restored proxy works");
    Ok(())
}
