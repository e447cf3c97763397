//! Closed-loop HTTP/3 load (`quicmesh bench h3-load`): for the ingress gateway, which only outside
//! HTTP/3 clients reach. `connections` QUIC connections, `streams` request loops on each, every request a
//! POST of `payload` bytes whose answer is read to its end; latency from request to the end of the answer.

use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::{Buf, Bytes};
use hdrhistogram::Histogram;
use serde::Serialize;

/// What to load and how hard.
#[derive(Debug, Clone)]
pub struct H3Load {
    /// The gateway's UDP address.
    pub target: SocketAddr,
    /// CA certificates (PEM) that verify the gateway.
    pub ca: std::path::PathBuf,
    /// TLS server name, and the request's `:authority`.
    pub host: String,
    /// Request path.
    pub path: String,
    /// QUIC connections.
    pub connections: usize,
    /// Concurrent requests per connection.
    pub streams: usize,
    /// Request body size.
    pub payload: usize,
    /// Measured length.
    pub duration: Duration,
}

/// The outcome.
#[derive(Debug, Serialize)]
pub struct H3Summary {
    /// Requests answered 2xx.
    pub requests: u64,
    /// Requests that failed or got another status.
    pub errors: u64,
    /// Requests per second.
    pub rps: f64,
    /// Latency percentiles, microseconds.
    pub p50_us: u64,
    /// 99th percentile, microseconds.
    pub p99_us: u64,
    /// Maximum, microseconds.
    pub max_us: u64,
}

fn client_config(ca: &Path) -> anyhow::Result<quinn::ClientConfig> {
    let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in quicmesh_transport::identity::pem::certs(&pem)? {
        roots.add(c)?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(quicmesh_transport::quic::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// One request and its whole answer.
async fn exchange(
    send: &mut h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    uri: &http::Uri,
    body: &Bytes,
) -> anyhow::Result<()> {
    let req = http::Request::post(uri.clone()).body(())?;
    let mut s = send.send_request(req).await?;
    s.send_data(body.clone()).await?;
    s.finish().await?;
    let resp = s.recv_response().await?;
    while let Some(mut d) = s.recv_data().await? {
        d.advance(d.remaining());
    }
    anyhow::ensure!(resp.status().is_success(), "status {}", resp.status());
    Ok(())
}

/// Runs the load and summarises it.
pub async fn run(cfg: H3Load) -> anyhow::Result<H3Summary> {
    let mut ep = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    ep.set_default_client_config(client_config(&cfg.ca)?);
    let uri: http::Uri = format!("https://{}{}", cfg.host, cfg.path).parse()?;
    let body = Bytes::from(vec![b'x'; cfg.payload]);
    let mut senders = Vec::new();
    for _ in 0..cfg.connections {
        let conn = ep.connect(cfg.target, &cfg.host)?.await?;
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn)).await?;
        tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
        senders.push(send);
    }
    let started = Instant::now();
    let until = started + cfg.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for send in &senders {
        for _ in 0..cfg.streams {
            let (mut send, uri, body) = (send.clone(), uri.clone(), body.clone());
            tasks.spawn(async move {
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
                let mut errors = 0u64;
                while Instant::now() < until {
                    let t = Instant::now();
                    match tokio::time::timeout(
                        Duration::from_secs(5),
                        exchange(&mut send, &uri, &body),
                    )
                    .await
                    {
                        Ok(Ok(())) => h.saturating_record(t.elapsed().as_micros() as u64),
                        _ => errors += 1,
                    }
                }
                anyhow::Ok((h, errors))
            });
        }
    }
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0;
    while let Some(r) = tasks.join_next().await {
        let (h, e) = r??;
        all.add(&h)?;
        errors += e;
    }
    let secs = started.elapsed().as_secs_f64();
    ep.close(0u32.into(), b"done");
    Ok(H3Summary {
        requests: all.len(),
        errors,
        rps: all.len() as f64 / secs,
        p50_us: all.value_at_quantile(0.5),
        p99_us: all.value_at_quantile(0.99),
        max_us: all.max(),
    })
}
