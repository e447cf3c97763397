//! `quicmesh up`: the whole mesh on loopback in one process, for a first look.
//!
//! The controller starts in-process on a temporary data directory (its CA, sled store and gRPC listener
//! on loopback) and creates two join tokens; an echo service sits behind a sidecar with an inbound QUIC
//! endpoint; a second sidecar offers the service on a loopback TCP port. Both sidecars run in controller
//! mode: they generate their keys, bootstrap with their token, register and learn the echo endpoint over
//! Watch. A client then drives request/response traffic through the tunnel for `--duration`, and the
//! figures and the proxies' own metrics are printed. Everything runs on real sockets: gRPC over TLS to
//! the controller, TCP to the sidecars, QUIC between them.

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
use quicmesh_controller::{Controller, state::StateOptions};
use quicmesh_transport::{
    Proxy, ProxyConfig,
    state::{ServiceRef, StateHandle},
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
    /// Lifetime of the sidecars' certificates (they renew at about 60% of it).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    leaf_ttl: Duration,
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

/// How a sidecar joins the mesh.
struct Join<'a> {
    controller: SocketAddr,
    bundle: &'a Path,
    token: String,
    id: String,
}

fn proxy_config(
    dir: &Path,
    name: &str,
    join: &Join<'_>,
    body: &str,
) -> anyhow::Result<ProxyConfig> {
    let token_file = dir.join(format!("{name}.token"));
    std::fs::write(&token_file, &join.token)?;
    let text = format!(
        "[controller]\naddress = \"{}\"\ntrust_bundle = \"{}\"\njoin_token_file = \"{}\"\nidentity = \"{}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n{body}",
        join.controller,
        join.bundle.display(),
        token_file.display(),
        join.id,
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, &text)?;
    Ok(ProxyConfig::parse(&path, &text)?)
}

struct Sidecar {
    addrs: quicmesh_transport::ProxyAddresses,
    state: StateHandle,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// Binds a sidecar and waits (bounded) until it holds its first certificate and configuration from the
/// controller.
async fn start(dir: &Path, name: &str, join: &Join<'_>, body: &str) -> anyhow::Result<Sidecar> {
    let cfg = proxy_config(dir, name, join, body)?;
    let proxy = Proxy::bind(&cfg, &dir.join(format!("{name}.toml"))).await?;
    tokio::time::timeout(Duration::from_secs(15), proxy.readiness().wait())
        .await
        .with_context(|| {
            format!(
                "{name} sidecar got no certificate or configuration from the controller in 15 s"
            )
        })?;
    let addrs = proxy.addresses().clone();
    let state = proxy.state();
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(proxy.run(async move {
        let _ = rx.await;
    }));
    Ok(Sidecar {
        addrs,
        state,
        stop,
        task,
    })
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
    let controller = Controller::bind(
        StateOptions {
            trust_domain: Some(td.into()),
            leaf_ttl: Some(args.leaf_ttl),
            ..StateOptions::new(d.join("controller"))
        },
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .await
    .context("starting the controller")?;
    let state = controller.state().clone();
    let controller_addr = controller.addr();
    let bundle = state.bundle_path();
    let (controller_stop, controller_rx) = oneshot::channel::<()>();
    let controller_task = tokio::spawn(controller.serve(async move {
        let _ = controller_rx.await;
    }));
    println!(
        "controller {controller_addr} (trust domain {td}, data in {}, leaf lifetime {})",
        d.join("controller").display(),
        humantime::format_duration(args.leaf_ttl)
    );
    let mut joins = Vec::new();
    for sa in ["echo", "client"] {
        let (token, _) = state
            .create_token("default", sa, 600, false)
            .await
            .map_err(|e| anyhow::anyhow!("creating a join token for {sa}: {e}"))?;
        joins.push(Join {
            controller: controller_addr,
            bundle: &bundle,
            token,
            id: format!("spiffe://{td}/ns/default/sa/{sa}"),
        });
    }
    println!("join tokens created for spiffe://{td}/ns/default/sa/{{echo,client}}");

    let echo = echo_server().await?;
    // Secure naming: the echo endpoint registers only for an existing Service, and only the identity
    // the Service allows (by default the account named like it, `echo`) may serve it.
    let service = quicmesh_controller::model::parse_yaml_documents(&format!(
        "kind: Service\nmetadata: {{name: echo, namespace: default}}\nspec: {{ports: [{{port: {}, protocol: tcp}}]}}\n",
        echo.port()
    ))
    .map_err(|e| anyhow::anyhow!("the echo Service: {e}"))?;
    state
        .put_all(service, quicmesh_controller::resources::WriteMode::Apply)
        .await
        .map_err(|e| anyhow::anyhow!("creating the echo Service: {e}"))?;
    let server = start(
        d,
        "server",
        &joins[0],
        &format!("[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"{echo}\"\nservices = [\"echo\"]\n"),
    )
    .await?;
    let inbound = server
        .addrs
        .inbound
        .context("server proxy has no inbound address")?;
    let client_px = start(
        d,
        "client",
        &joins[1],
        &format!(
            "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"echo\"\nport = {}\n",
            echo.port()
        ),
    )
    .await?;
    // The client learnt the echo endpoint from the controller's first snapshot (part of its readiness).
    let learnt = client_px
        .state
        .load()
        .upstream(&ServiceRef::parse("echo", "default"))
        .endpoints
        .clone();
    anyhow::ensure!(
        !learnt.is_empty(),
        "the client sidecar learnt no echo endpoint from the controller"
    );
    let target = client_px.addrs.outbound[0];
    println!(
        "sidecars bootstrapped with their join tokens; client learnt echo at {learnt:?} from the controller"
    );
    println!(
        "echo service {echo} <- server sidecar (QUIC {inbound}, admin {}) <- client sidecar (TCP {target}, admin {})",
        server.addrs.admin, client_px.addrs.admin
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
        ("client sidecar", client_px.addrs.admin),
        ("server sidecar", server.addrs.admin),
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
    let _ = client_px.stop.send(());
    let _ = server.stop.send(());
    let _ = client_px.task.await;
    let _ = server.task.await;
    let _ = controller_stop.send(());
    let _ = controller_task.await;
    if tally.failures.load(Ordering::Relaxed) > 0 || requests == 0 {
        anyhow::bail!("traffic through the mesh failed");
    }
    Ok(())
}
