//! `quicmesh up`: the whole mesh on loopback in one process, for a first look.
//!
//! A development CA issues two workload certificates; an echo service sits behind a sidecar with an
//! inbound QUIC endpoint; a second sidecar offers the service on a loopback TCP port; a client drives
//! request/response traffic through the tunnel for `--duration`, then the figures and the proxies' own
//! metrics are printed. Everything runs on real sockets: TCP to the sidecars, QUIC between them.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use quicmesh_transport::{
    Proxy, ProxyConfig,
    identity::{CertificateAuthority, SpiffeId},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
};

#[derive(clap::Args)]
pub struct UpArgs {
    /// How long the client drives traffic.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Concurrent client connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Request size in bytes (echoed back).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Requests per connection before it is closed and reopened (each reopening is a new tunnel stream).
    #[arg(long, default_value_t = 100)]
    requests_per_connection: u64,
}

#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    connections: AtomicU64,
    bytes: AtomicU64,
    failures: AtomicU64,
}

async fn echo_server() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

fn proxy_config(dir: &Path, name: &str, body: &str) -> anyhow::Result<ProxyConfig> {
    let text = format!(
        "[identity]\ncert = \"{name}.pem\"\nkey = \"{name}.key\"\ntrust_bundle = \"ca.pem\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n{body}"
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, &text)?;
    Ok(ProxyConfig::parse(&path, &text)?)
}

async fn start(
    dir: &Path,
    name: &str,
    body: &str,
) -> anyhow::Result<(
    quicmesh_transport::ProxyAddresses,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
)> {
    let cfg = proxy_config(dir, name, body)?;
    let proxy = Proxy::bind(&cfg, &dir.join(format!("{name}.toml"))).await?;
    let addrs = proxy.addresses().clone();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(proxy.run(async move {
        let _ = rx.await;
    }));
    Ok((addrs, tx, task))
}

async fn client(
    target: SocketAddr,
    args: Arc<UpArgs>,
    until: Instant,
    tally: Arc<Tally>,
    hist: Arc<std::sync::Mutex<hdrhistogram::Histogram<u64>>>,
) {
    let req = vec![0x5a_u8; args.size];
    let mut resp = vec![0u8; args.size];
    let mut local = hdrhistogram::Histogram::<u64>::new(3).expect("3 significant figures is valid");
    while Instant::now() < until {
        let mut s = match TcpStream::connect(target).await {
            Ok(s) => s,
            Err(_) => {
                tally.failures.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        tally.connections.fetch_add(1, Ordering::Relaxed);
        for _ in 0..args.requests_per_connection {
            if Instant::now() >= until {
                break;
            }
            let t = Instant::now();
            let ok = async {
                s.write_all(&req).await?;
                s.read_exact(&mut resp).await?;
                std::io::Result::Ok(())
            };
            match tokio::time::timeout(Duration::from_secs(5), ok).await {
                Ok(Ok(())) if resp == req => {
                    let _ = local.record(t.elapsed().as_micros() as u64);
                    tally.requests.fetch_add(1, Ordering::Relaxed);
                    tally
                        .bytes
                        .fetch_add(2 * args.size as u64, Ordering::Relaxed);
                }
                _ => {
                    tally.failures.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
    let _ = hist.lock().map(|mut h| h.add(&local));
}

async fn scrape(admin: SocketAddr) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(admin).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut body)).await??;
    Ok(body)
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("creating a working directory")?;
    let d = dir.path();
    let td = "mesh.local";
    let now = time::OffsetDateTime::now_utc();
    let ca = CertificateAuthority::generate(td, now + time::Duration::days(1))?;
    std::fs::write(d.join("ca.pem"), ca.cert_pem())?;
    for (name, sa) in [("client", "client"), ("server", "echo")] {
        let leaf = ca.issue(
            &SpiffeId::new(td, "default", sa)?,
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        )?;
        std::fs::write(d.join(format!("{name}.pem")), leaf.cert_pem)?;
        std::fs::write(d.join(format!("{name}.key")), leaf.key_pem)?;
    }
    println!(
        "development CA for trust domain {td}; identities spiffe://{td}/ns/default/sa/{{client,echo}}"
    );

    let echo = echo_server().await?;
    let (server, server_stop, server_task) = start(
        d,
        "server",
        &format!("[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"{echo}\"\nservices = [\"echo\"]\n"),
    )
    .await?;
    let inbound = server
        .inbound
        .context("server proxy has no inbound address")?;
    let (client_px, client_stop, client_task) = start(
        d,
        "client",
        &format!("[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"echo\"\nport = {}\nendpoints = [\"{inbound}\"]\n", echo.port()),
    )
    .await?;
    let target = client_px.outbound[0];
    println!(
        "echo service {echo} <- server sidecar (QUIC {inbound}, admin {}) <- client sidecar (TCP {target}, admin {})",
        server.admin, client_px.admin
    );
    println!(
        "driving {} connections of {}-byte requests for {:?} ...",
        args.connections, args.size, args.duration
    );

    let args = Arc::new(args);
    let tally = Arc::new(Tally::default());
    let hist = Arc::new(std::sync::Mutex::new(hdrhistogram::Histogram::<u64>::new(
        3,
    )?));
    let started = Instant::now();
    let until = started + args.duration;
    let clients: Vec<_> = (0..args.connections)
        .map(|_| {
            tokio::spawn(client(
                target,
                args.clone(),
                until,
                tally.clone(),
                hist.clone(),
            ))
        })
        .collect();
    for c in clients {
        let _ = c.await;
    }
    let secs = started.elapsed().as_secs_f64();
    let h = hist
        .lock()
        .map_err(|_| anyhow::anyhow!("histogram lock poisoned"))?
        .clone();
    let requests = tally.requests.load(Ordering::Relaxed);
    println!();
    println!(
        "requests        {requests} ({:.0}/s)",
        requests as f64 / secs
    );
    println!(
        "connections     {} tunneled",
        tally.connections.load(Ordering::Relaxed)
    );
    println!(
        "bytes           {} through the tunnel (both ways)",
        tally.bytes.load(Ordering::Relaxed)
    );
    println!("failures        {}", tally.failures.load(Ordering::Relaxed));
    println!(
        "latency         p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    );
    for (name, admin) in [
        ("client sidecar", client_px.admin),
        ("server sidecar", server.admin),
    ] {
        println!("\n{name} metrics (http://{admin}/metrics):");
        let body = scrape(admin).await?;
        for line in body
            .lines()
            .filter(|l| l.starts_with("quicmesh_") && !l.ends_with(" 0"))
        {
            println!("  {line}");
        }
    }
    let _ = client_stop.send(());
    let _ = server_stop.send(());
    let _ = client_task.await;
    let _ = server_task.await;
    if tally.failures.load(Ordering::Relaxed) > 0 || requests == 0 {
        anyhow::bail!("traffic through the mesh failed");
    }
    Ok(())
}
