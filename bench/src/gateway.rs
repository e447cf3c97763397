//! Node gateway vs sidecars: the same workloads on one node served by one sidecar each, then by one
//! node gateway, with the same load, in the same run.
//!
//! `N` workloads (default 10) in a ring: workload `i` serves service `s<i>` (a bench echo app) and calls
//! `s<i+1>`. Sidecar topology: `N` quicmesh processes, each with the workload's certificate, an inbound
//! port and one outbound listener. Gateway topology: one quicmesh process with the node's certificate and
//! `N` `[[workload]]`s (their certificates, sources 127.0.0.(10+i)), one inbound port and one outbound
//! listener per service. The load is the same closed loop for both: per workload, `connections` TCP
//! connections from the workload's source address, each sending `payload`-byte echo requests one at a
//! time (the bench server's TCP echo), so every request crosses one proxy hop out and one in. Figures:
//! requests per second, proxy CPU time per request (all proxy processes' CPU during the measured window
//! over the requests answered in it), and proxy resident memory per workload after the run; the report
//! gives the gateway's figures as ratios to the sidecars'. Both topologies run one proxy thread per
//! process (the proxies' default), so the sidecars have N threads to the gateway's one.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path as FsPath, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::{io::AsyncWriteExt, net::TcpSocket};

use crate::{
    certs,
    client::Conn,
    server::{self, AppServer},
    topology::{self, Placement, Proc},
};

/// How the comparison runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewaySettings {
    /// Workloads on the node.
    pub workloads: usize,
    /// Closed-loop connections per workload.
    pub connections: usize,
    /// Request (and echo) size, bytes.
    pub payload: usize,
    /// Load before the measured window.
    #[serde(with = "humantime_serde")]
    pub warmup: Duration,
    /// The measured window.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
}

/// What one topology did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Figures {
    /// Proxy processes.
    pub processes: usize,
    /// Requests answered in the measured window.
    pub requests: u64,
    /// Requests that failed (connect, I/O or timeout), warmup included.
    pub errors: u64,
    /// Requests per second in the window.
    pub req_per_s: f64,
    /// Proxy CPU time per request, microseconds.
    pub cpu_us_per_request: f64,
    /// Proxy resident memory after the run, KiB per workload.
    pub rss_kib_per_workload: f64,
}

/// The gateway's figures over the sidecars'.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ratios {
    /// Requests per second (above 1: the gateway serves more).
    pub req_per_s: f64,
    /// CPU per request (below 1: the gateway spends less).
    pub cpu_per_request: f64,
    /// Memory per workload (below 1: the gateway holds less).
    pub memory_per_workload: f64,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayReport {
    /// Settings.
    pub settings: GatewaySettings,
    /// One sidecar per workload.
    pub sidecars: Figures,
    /// One gateway for all.
    pub gateway: Figures,
    /// Gateway / sidecars.
    pub ratios: Ratios,
    /// `/proc/loadavg` at the end (other work on the machine shows here).
    pub load_average: String,
}

/// The source address workload `i`'s app connects from.
fn source(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + i as u8))
}

/// A UDP port free now on loopback (a proxy binds it a moment later: the endpoints are written into
/// configurations before the proxies start).
fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs both topologies and writes `gateway.json` into `out` when given.
pub async fn run(
    settings: GatewaySettings,
    quicmesh_bin: &FsPath,
    bench_bin: PathBuf,
    out: Option<PathBuf>,
) -> anyhow::Result<GatewayReport> {
    let n = settings.workloads;
    anyhow::ensure!(
        (2..=200).contains(&n),
        "--workloads must be 2..=200, got {n}"
    );
    anyhow::ensure!(settings.connections >= 1, "--connections must be positive");
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let names: Vec<String> = (0..n).map(|i| format!("w{i}")).collect();
    let mut all: Vec<&str> = names.iter().map(String::as_str).collect();
    all.push("node");
    let (ca, leaves) = certs::generate_named(d, &all)?;
    let mut apps = Vec::with_capacity(n);
    for _ in 0..n {
        apps.push(AppServer::spawn(SocketAddr::from(([127, 0, 0, 1], 0)), None).await?);
    }
    let placement = Placement::loopback(apps[0].addr(), bench_bin);
    let q = |p: &FsPath| format!("{:?}", p.display().to_string());
    const PORT: u16 = 7;

    // One sidecar per workload.
    let ports: Vec<u16> = (0..n).map(|_| free_udp_port()).collect::<Result<_, _>>()?;
    let mut procs = Vec::with_capacity(n);
    let mut entries = Vec::with_capacity(n);
    for i in 0..n {
        let next = (i + 1) % n;
        let cfg = format!(
            "[identity]\ncert = {}\nkey = {}\ntrust_bundle = {}\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
[inbound]\nlisten = \"127.0.0.1:{}\"\nports = [{{ port = {PORT}, app = \"{}\" }}]\n\n\
[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"s{next}.bench\"\nport = {PORT}\nendpoints = [\"127.0.0.1:{}\"]\n\
server_identities = [\"w{next}\"]\n",
            q(&leaves[i].cert),
            q(&leaves[i].key),
            q(&ca),
            ports[i],
            apps[i].addr(),
            ports[next],
        );
        let (p, ready) = topology::start_quicmesh(
            &format!("sidecar-{i}"),
            quicmesh_bin,
            &placement,
            &None,
            &cfg,
            d,
        )
        .await?;
        let entry = *ready
            .outbound
            .first()
            .ok_or_else(|| anyhow::anyhow!("sidecar-{i}: no outbound address"))?;
        entries.push((source(i), entry));
        procs.push(p);
    }
    let sidecars = measure(&settings, &entries, &procs).await?;
    drop(procs);

    // One gateway for every workload.
    let port = free_udp_port()?;
    let mut mesh = String::new();
    for i in 0..n {
        mesh.push_str(&format!(
            "---\nkind: Service\nmetadata: {{name: s{i}, namespace: bench}}\nspec: {{ports: [{{port: {PORT}, protocol: tcp}}], identities: [w{i}]}}\n\
---\nkind: Endpoint\nmetadata: {{name: s{i}-gw, namespace: bench}}\nspec: {{service: s{i}, address: \"127.0.0.1:{port}\", spiffe_id: \"spiffe://{}/ns/bench/sa/w{i}\"}}\n",
            certs::TRUST_DOMAIN
        ));
    }
    let mesh_path = d.join("gateway-mesh.yaml");
    std::fs::write(&mesh_path, mesh)?;
    let mut cfg = format!(
        "mesh = {}\n\n[identity]\ncert = {}\nkey = {}\ntrust_bundle = {}\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[inbound]\nlisten = \"127.0.0.1:{port}\"\n\n",
        q(&mesh_path),
        q(&leaves[n].cert),
        q(&leaves[n].key),
        q(&ca),
    );
    for i in 0..n {
        cfg.push_str(&format!(
            "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"s{i}.bench\"\nport = {PORT}\n\n\
[[workload]]\nname = \"w{i}\"\nsources = [\"{}\"]\ncert = {}\nkey = {}\nservices = [\"s{i}\"]\nports = [{{ port = {PORT}, app = \"{}\" }}]\n\n",
            source(i),
            q(&leaves[i].cert),
            q(&leaves[i].key),
            apps[i].addr(),
        ));
    }
    let (p, ready) =
        topology::start_quicmesh("gateway", quicmesh_bin, &placement, &None, &cfg, d).await?;
    anyhow::ensure!(
        ready.outbound.len() == n,
        "gateway: {n} outbound listeners expected"
    );
    let entries: Vec<_> = (0..n)
        .map(|i| (source(i), ready.outbound[(i + 1) % n]))
        .collect();
    let procs = vec![p];
    let gateway = measure(&settings, &entries, &procs).await?;
    drop(procs);

    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let report = GatewayReport {
        ratios: Ratios {
            req_per_s: ratio(gateway.req_per_s, sidecars.req_per_s),
            cpu_per_request: ratio(gateway.cpu_us_per_request, sidecars.cpu_us_per_request),
            memory_per_workload: ratio(gateway.rss_kib_per_workload, sidecars.rss_kib_per_workload),
        },
        settings,
        sidecars,
        gateway,
        load_average: std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_owned(),
    };
    print_report(&report);
    if let Some(out) = out {
        std::fs::create_dir_all(&out)?;
        let path = out.join("gateway.json");
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
        println!("written: {}", path.display());
    }
    Ok(report)
}

fn print_report(r: &GatewayReport) {
    let s = &r.settings;
    println!(
        "node gateway vs sidecars: {} workloads, {} connections each, {} B echo requests, {:?} measured",
        s.workloads, s.connections, s.payload, s.duration
    );
    println!(
        "{:<10} {:>6} {:>10} {:>8} {:>12} {:>14}",
        "topology", "procs", "req/s", "errors", "CPU us/req", "KiB/workload"
    );
    for (name, f) in [("sidecars", &r.sidecars), ("gateway", &r.gateway)] {
        println!(
            "{name:<10} {:>6} {:>10.0} {:>8} {:>12.1} {:>14.0}",
            f.processes, f.req_per_s, f.errors, f.cpu_us_per_request, f.rss_kib_per_workload
        );
    }
    println!(
        "gateway / sidecars: req/s x{:.2}, CPU per request x{:.2}, memory per workload x{:.2} (load average {})",
        r.ratios.req_per_s, r.ratios.cpu_per_request, r.ratios.memory_per_workload, r.load_average
    );
}

/// Puts the closed-loop load on `entries` (source address, entry) and samples `procs` around the
/// measured window.
async fn measure(
    settings: &GatewaySettings,
    entries: &[(IpAddr, SocketAddr)],
    procs: &[Proc],
) -> anyhow::Result<Figures> {
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let payload = Bytes::from(vec![0x5a; settings.payload]);
    let mut tasks = Vec::new();
    for &(src, entry) in entries {
        for _ in 0..settings.connections {
            let (ok, errors, counting, stop, payload) = (
                ok.clone(),
                errors.clone(),
                counting.clone(),
                stop.clone(),
                payload.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let mut conn = match connect_from(src, entry).await {
                        Ok(c) => c,
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    while !stop.load(Ordering::Relaxed) {
                        match conn.request(&payload, Duration::from_secs(5)).await {
                            Ok(()) if counting.load(Ordering::Relaxed) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(()) => {}
                            Err(_) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        }
                    }
                }
            }));
        }
    }
    tokio::time::sleep(settings.warmup).await;
    let cpu = |procs: &[Proc]| procs.iter().map(|p| p.sample().cpu_s).sum::<f64>();
    let before = cpu(procs);
    let started = tokio::time::Instant::now();
    counting.store(true, Ordering::Relaxed);
    tokio::time::sleep(settings.duration).await;
    counting.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let after = cpu(procs);
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    let rss: u64 = procs.iter().map(|p| p.sample().rss_kib).sum();
    let requests = ok.load(Ordering::Relaxed);
    Ok(Figures {
        processes: procs.len(),
        requests,
        errors: errors.load(Ordering::Relaxed),
        req_per_s: requests as f64 / elapsed,
        cpu_us_per_request: if requests > 0 {
            (after - before) * 1e6 / requests as f64
        } else {
            f64::NAN
        },
        rss_kib_per_workload: rss as f64 / entries.len() as f64,
    })
}

/// A TCP echo connection to `entry` from `src` (the workload's address).
async fn connect_from(src: IpAddr, entry: SocketAddr) -> std::io::Result<Conn> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(src, 0))?;
    let mut stream = tokio::time::timeout(Duration::from_secs(5), sock.connect(entry))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect"))??;
    let _ = stream.set_nodelay(true);
    stream.write_all(server::MAGIC_ECHO).await?;
    Ok(Conn::Tcp {
        stream,
        buf: Vec::new(),
    })
}
