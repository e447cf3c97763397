//! Closed-loop load of an ingress (`quicmesh bench h3-load`): HTTP/3 for the ingress gateway, which only
//! outside HTTP/3 clients reach, or HTTP/2 over TLS for the ingress it is compared with (HAProxy).
//! `connections` connections, `streams` request loops on each, every request a POST of `payload` bytes
//! whose answer is read to its end; latency from request to the end of the answer. With `gate`, the
//! connections are made first, `{"event":"connected"}` is printed and the load starts at a line on stdin
//! (the loss scenario switches loss on in between).

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

/// The wire an ingress is loaded over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Wire {
    /// HTTP/3 over QUIC.
    H3,
    /// HTTP/2 over TLS over TCP (ALPN h2).
    H2,
}

/// What to load and how hard.
#[derive(Debug, Clone)]
pub struct H3Load {
    /// The ingress's address (UDP for h3, TCP for h2).
    pub target: SocketAddr,
    /// HTTP/3 or HTTP/2 over TLS.
    pub wire: Wire,
    /// Connect first, then wait for a line on stdin before loading.
    pub gate: bool,
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
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
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

/// TLS 1.3 client settings verifying the server against `ca`, offering `alpn`.
fn tls_config(ca: &Path, alpn: &[u8]) -> anyhow::Result<rustls::ClientConfig> {
    let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in quicmesh_transport::identity::pem::certs(&pem)? {
        roots.add(c)?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(quicmesh_transport::quic::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

fn client_config(ca: &Path) -> anyhow::Result<quinn::ClientConfig> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls_config(ca, b"h3")?)?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// A request sender of either wire, cloned into each request loop.
#[derive(Clone)]
enum Sender {
    H3(h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>),
    H2(hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>>),
}

impl Sender {
    async fn exchange(&mut self, uri: &http::Uri, body: &Bytes) -> anyhow::Result<()> {
        match self {
            Sender::H3(s) => exchange(s, uri, body).await,
            Sender::H2(s) => {
                use http_body_util::BodyExt;
                let req = http::Request::post(uri.clone())
                    .body(http_body_util::Full::new(body.clone()))?;
                let resp = s.send_request(req).await?;
                let ok = resp.status().is_success();
                let status = resp.status();
                resp.into_body().collect().await?;
                anyhow::ensure!(ok, "status {status}");
                Ok(())
            }
        }
    }
}

/// One HTTP/2 connection over TLS to `cfg.target`.
async fn h2_connect(cfg: &H3Load, tls: &tokio_rustls::TlsConnector) -> anyhow::Result<Sender> {
    let tcp = tokio::net::TcpStream::connect(cfg.target).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from(cfg.host.clone())?;
    let io = tls.connect(name, tcp).await?;
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await?;
    tokio::spawn(conn);
    Ok(Sender::H2(send))
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
    let unspecified: std::net::IpAddr = if cfg.target.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let mut ep = quinn::Endpoint::client(SocketAddr::new(unspecified, 0))?;
    ep.set_default_client_config(client_config(&cfg.ca)?);
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls_config(&cfg.ca, b"h2")?));
    let uri: http::Uri = format!("https://{}{}", cfg.host, cfg.path).parse()?;
    let body = Bytes::from(vec![b'x'; cfg.payload]);
    let mut senders = Vec::new();
    for _ in 0..cfg.connections {
        let sender = match cfg.wire {
            Wire::H3 => {
                let conn = ep.connect(cfg.target, &cfg.host)?.await?;
                let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn)).await?;
                tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
                Sender::H3(send)
            }
            Wire::H2 => h2_connect(&cfg, &tls).await?,
        };
        senders.push(sender);
    }
    if cfg.gate {
        use tokio::io::AsyncBufReadExt;
        println!("{{\"event\":\"connected\"}}");
        let mut line = String::new();
        tokio::io::BufReader::new(tokio::io::stdin())
            .read_line(&mut line)
            .await?;
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
                    match tokio::time::timeout(Duration::from_secs(5), send.exchange(&uri, &body))
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
