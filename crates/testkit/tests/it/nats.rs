//! `NatsServer` and `NatsCluster`, spoken to with the raw NATS protocol.

use std::time::{Duration, Instant};

use picloud_testkit::{NatsCluster, NatsServer, eventually_within};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

const TIMEOUT: Duration = Duration::from_secs(30);

/// A NATS client connection speaking the text protocol.
struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Client {
    /// Connects, reads the server's `INFO` and sends `CONNECT`.
    async fn connect(port: u16) -> anyhow::Result<Client> {
        let (read, writer) = TcpStream::connect(("127.0.0.1", port)).await?.into_split();
        let mut client = Client { reader: BufReader::new(read), writer };
        let info = client.line().await?;
        anyhow::ensure!(info.starts_with("INFO "), "expected INFO, got {info:?}");
        client.send("CONNECT {\"verbose\":false,\"pedantic\":false}\r\n").await?;
        Ok(client)
    }

    async fn send(&mut self, data: &str) -> anyhow::Result<()> {
        self.writer.write_all(data.as_bytes()).await?;
        Ok(())
    }

    async fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        let read = tokio::time::timeout(TIMEOUT, self.reader.read_line(&mut line)).await??;
        anyhow::ensure!(read > 0, "the server closed the connection");
        Ok(line.trim_end().to_owned())
    }

    /// PING and wait for the PONG: everything sent before is processed by the server.
    async fn flush(&mut self) -> anyhow::Result<()> {
        self.send("PING\r\n").await?;
        loop {
            let line = self.line().await?;
            anyhow::ensure!(!line.starts_with("-ERR"), "server error: {line}");
            if line == "PONG" {
                return Ok(());
            }
        }
    }

    /// Forwards every `MSG` (header line, payload) to the returned channel, answering PINGs.
    fn messages(mut self) -> mpsc::Receiver<(String, String)> {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok(line) = self.line().await {
                if line == "PING" {
                    let _ = self.send("PONG\r\n").await;
                } else if line.starts_with("MSG ") {
                    let Ok(payload) = self.line().await else { break };
                    if tx.send((line, payload)).await.is_err() {
                        break;
                    }
                }
            }
        });
        rx
    }
}

/// The `num_routes` the node's `/routez` reports.
async fn route_count(server: &NatsServer) -> Option<usize> {
    let port = server.monitoring_port()?;
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    stream.write_all(b"GET /routez HTTP/1.0\r\n\r\n").await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let rest = &response[response.find("\"num_routes\":")? + "\"num_routes\":".len()..];
    let digits: String = rest.trim_start().chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[tokio::test]
async fn a_nats_server_accepts_a_client() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;

    let stream = TcpStream::connect(("127.0.0.1", server.port())).await?;
    let mut line = String::new();
    tokio::time::timeout(TIMEOUT, BufReader::new(stream).read_line(&mut line)).await??;

    assert!(line.starts_with("INFO "), "{line:?}");
    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));
    assert!(server.is_running());
    Ok(())
}

#[tokio::test]
async fn a_stopped_nats_server_refuses_connections_and_accepts_them_again_after_restart_on_the_same_port()
-> anyhow::Result<()> {
    let mut server = NatsServer::start().await?;
    let port = server.port();

    server.stop().await?;
    assert!(!server.is_running());
    let refused = TcpStream::connect(("127.0.0.1", port)).await;
    assert!(refused.is_err(), "a stopped server accepted a connection");

    server.restart().await?;
    assert!(server.is_running());
    assert_eq!(server.port(), port);
    let mut client = Client::connect(port).await?;
    client.flush().await?;
    Ok(())
}

#[tokio::test]
async fn a_nats_server_started_with_a_config_uses_it_but_listens_on_its_own_port() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("nats.conf");
    std::fs::write(&config, "server_name: picloud-config-test\nport: 4222\n")?;

    let server = NatsServer::start_with_config(&config).await?;
    let stream = TcpStream::connect(("127.0.0.1", server.port())).await?;
    let mut info = String::new();
    tokio::time::timeout(TIMEOUT, BufReader::new(stream).read_line(&mut info)).await??;

    assert_ne!(server.port(), 4222);
    assert!(info.contains("\"server_name\":\"picloud-config-test\""), "{info}");
    Ok(())
}

#[tokio::test]
async fn a_three_node_cluster_routes_messages_between_nodes() -> anyhow::Result<()> {
    let mut cluster = NatsCluster::start(3).await?;
    let urls = cluster.urls();
    assert_eq!(urls.len(), 3);
    assert_eq!(cluster.url_list(), urls.join(","));
    let (port_0, port_2) = (cluster.node(0).port(), cluster.node(2).port());

    let mut subscriber = Client::connect(port_2).await?;
    subscriber.send("SUB picloud.test 1\r\n").await?;
    subscriber.flush().await?;
    let mut messages = subscriber.messages();
    let mut publisher = Client::connect(port_0).await?;

    // Node 2 tells node 0 about the subscription asynchronously: publish until it arrives.
    let deadline = Instant::now() + TIMEOUT;
    let received = loop {
        publisher.send("PUB picloud.test 5\r\nhello\r\n").await?;
        publisher.flush().await?;
        match tokio::time::timeout(Duration::from_millis(100), messages.recv()).await {
            Ok(Some(message)) => break message,
            Ok(None) => anyhow::bail!("the subscriber's connection closed"),
            Err(_) => anyhow::ensure!(Instant::now() < deadline, "no message reached node 2"),
        }
    };

    assert!(received.0.starts_with("MSG picloud.test 1 5"), "{received:?}");
    assert_eq!(received.1, "hello");
    Ok(())
}

#[tokio::test]
async fn a_cluster_node_rejoins_after_restart() -> anyhow::Result<()> {
    let mut cluster = NatsCluster::start(3).await?;
    for i in 0..3 {
        assert_eq!(route_count(cluster.node(i)).await, Some(2), "node {i} before the restart");
    }

    cluster.node(1).stop().await?;
    assert!(!cluster.node(1).is_running());
    let node_0 = &*cluster.node(0);
    eventually_within("node 0 lost its route to node 1", TIMEOUT, || async {
        (route_count(node_0).await == Some(1)).then_some(())
    })
    .await;
    cluster.node(1).restart().await?;

    for i in 0..3 {
        let node = &*cluster.node(i);
        eventually_within(&format!("node {i} has 2 routes again"), TIMEOUT, || async {
            (route_count(node).await == Some(2)).then_some(())
        })
        .await;
    }
    assert!(cluster.node(1).is_running());
    Ok(())
}
