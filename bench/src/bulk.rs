//! Bulk throughput of one connection: TCP into the sink server (direct or through a proxy pair), and the
//! raw QUIC ceiling (quinn alone, one stream, in this process) that puts the tunnel's figure in context.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

use crate::server::MAGIC_SINK;

/// Result of one bulk transfer.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct BulkOutcome {
    /// Bytes the receiver counted.
    pub bytes: u64,
    /// Seconds from first write to the receiver's count arriving.
    pub secs: f64,
    /// Gigabits per second.
    pub gbit_s: f64,
}

impl BulkOutcome {
    fn new(bytes: u64, secs: f64) -> Self {
        Self {
            bytes,
            secs,
            gbit_s: bytes as f64 * 8.0 / secs.max(1e-9) / 1e9,
        }
    }
}

/// Sends up to `limit` bytes, for at most `duration`, on one TCP connection to the sink at `addr`.
pub async fn tcp_bulk(
    addr: SocketAddr,
    limit: u64,
    duration: Duration,
) -> anyhow::Result<BulkOutcome> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| anyhow::anyhow!("bulk connect to {addr}: {e}"))?;
    s.write_all(MAGIC_SINK).await?;
    let chunk = vec![0xa5u8; 256 * 1024];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < limit && start.elapsed() < duration {
        s.write_all(&chunk).await?;
        sent += chunk.len() as u64;
    }
    s.shutdown().await?;
    let mut count = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut count))
        .await
        .map_err(|_| anyhow::anyhow!("bulk: no byte count from the sink within 30 s"))??;
    let got = u64::from_be_bytes(count);
    anyhow::ensure!(
        got == sent,
        "bulk: sent {sent} bytes, the sink counted {got}"
    );
    Ok(BulkOutcome::new(got, start.elapsed().as_secs_f64()))
}

fn udp_socket(buf: usize) -> anyhow::Result<std::net::UdpSocket> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    // The kernel caps these at net.core.{r,w}mem_max; a smaller buffer is not an error.
    let _ = s.set_recv_buffer_size(buf);
    let _ = s.set_send_buffer_size(buf);
    s.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())?;
    Ok(s.into())
}

fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(16 * 1024 * 1024));
    t.receive_window(quinn::VarInt::from_u32(32 * 1024 * 1024));
    t.send_window(32 * 1024 * 1024);
    t
}

/// Raw QUIC ceiling: one bidirectional quinn stream on loopback carrying up to `limit` bytes for at most
/// `duration`, server and client in this process, 4 MiB UDP buffers, no tunnel framing.
pub async fn quic_ceiling(limit: u64, duration: Duration) -> anyhow::Result<BulkOutcome> {
    let provider = quicmesh_transport::quic::provider();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let cert_der = ck.cert.der().clone();
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert_der.clone()], key_der)?;
    server_tls.alpn_protocols = vec![b"bench".to_vec()];
    let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(server_tls)?,
    ));
    server_cfg.transport_config(Arc::new(transport()));
    // The server runs on its own thread and runtime, as a second process would.
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let server_thread = std::thread::spawn(move || -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let server = quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                Some(server_cfg),
                udp_socket(4 << 20)?,
                Arc::new(quinn::TokioRuntime),
            )?;
            let _ = addr_tx.send(server.local_addr()?);
            let conn = tokio::time::timeout(Duration::from_secs(10), server.accept())
                .await?
                .ok_or_else(|| anyhow::anyhow!("quic endpoint closed"))?
                .await?;
            let (mut send, mut recv) = conn.accept_bi().await?;
            let mut total = 0u64;
            while let Some(chunk) = recv.read_chunk(1 << 20, true).await? {
                total += chunk.bytes.len() as u64;
            }
            send.write_all(&total.to_be_bytes()).await?;
            send.finish()?;
            // Keep the connection until the client has read the count and closed.
            let _ = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
            anyhow::Ok(())
        })
    });
    let server_addr = addr_rx
        .await
        .map_err(|_| anyhow::anyhow!("quic ceiling: the server did not start"))?;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der)?;
    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_tls.alpn_protocols = vec![b"bench".to_vec()];
    let mut client_cfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)?,
    ));
    client_cfg.transport_config(Arc::new(transport()));
    let client = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        udp_socket(4 << 20)?,
        Arc::new(quinn::TokioRuntime),
    )?;

    let conn = client
        .connect_with(client_cfg, server_addr, "localhost")?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let chunk = Bytes::from(vec![0xa5u8; 1 << 20]);
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < limit && start.elapsed() < duration {
        send.write_chunk(chunk.clone()).await?;
        sent += chunk.len() as u64;
    }
    send.finish()?;
    let mut count = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(30), recv.read_exact(&mut count))
        .await
        .map_err(|_| anyhow::anyhow!("quic ceiling: no byte count within 30 s"))??;
    let secs = start.elapsed().as_secs_f64();
    conn.close(0u32.into(), b"done");
    client.wait_idle().await;
    match tokio::task::spawn_blocking(move || server_thread.join()).await {
        Ok(Ok(r)) => r?,
        _ => anyhow::bail!("quic ceiling: the server thread panicked"),
    }
    let got = u64::from_be_bytes(count);
    anyhow::ensure!(got == sent, "quic ceiling: sent {sent}, received {got}");
    Ok(BulkOutcome::new(got, secs))
}
