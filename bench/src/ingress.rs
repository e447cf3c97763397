//! The ingress under packet loss (`quicmesh bench ingress`): outside clients in one network namespace,
//! the ingress and the app in the other, joined by the loss scenario's veth pair with nftables dropping a
//! share of the packets each way. Two ingresses side by side in one run: quicmesh's HTTP/3 gateway (each
//! request its own QUIC stream from the client, then into the mesh over QUIC to a server proxy in front of
//! the app) and HAProxy terminating HTTP/2 over TLS and speaking h2 to the app (what users would otherwise
//! put at the edge; one hop fewer). Each is loaded closed-loop by `bench h3-load` over its own wire, the
//! connections made before loss is switched on, so the figures are those of established clients.
//!
//! Root only, like the loss scenario: anything missing makes it skip with the reason.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path as FsPath, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::process::Command;

use crate::{
    certs,
    h3load::{H3Summary, Wire},
    loss::{self, Netns},
    machine::{self, MachineInfo},
    report::{self, Table, ms, ratio},
    topology::{self, Ingress, Placement},
};

/// Settings of the ingress scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IngressSettings {
    /// Loss levels, percent of arriving packets dropped in each direction.
    pub loss_percent: Vec<u32>,
    /// Client connections per ingress.
    pub connections: usize,
    /// Concurrent requests per connection.
    pub streams: usize,
    /// Request body, bytes (the answer echoes it).
    pub payload: usize,
    /// Measured length of each run.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// `nbthread` of HAProxy.
    pub haproxy_threads: usize,
}

/// The two ingresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Edge {
    /// quicmesh's gateway: HTTP/3 in, the mesh behind.
    QuicmeshH3,
    /// HAProxy: HTTP/2 over TLS in, h2 to the app.
    HaproxyH2,
}

impl Edge {
    /// Name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Edge::QuicmeshH3 => "quicmesh-h3-ingress",
            Edge::HaproxyH2 => "haproxy-h2-ingress",
        }
    }

    fn wire(self) -> Wire {
        match self {
            Edge::QuicmeshH3 => Wire::H3,
            Edge::HaproxyH2 => Wire::H2,
        }
    }
}

/// One (loss level, ingress) run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IngressRun {
    /// Percent dropped.
    pub loss_percent: u32,
    /// Which ingress.
    pub edge: Edge,
    /// What the client measured.
    pub summary: H3Summary,
}

/// The JSON file of the scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IngressReport {
    /// Machine.
    pub machine: MachineInfo,
    /// Settings.
    pub settings: IngressSettings,
    /// Ingresses that could not be started, and why.
    pub skipped: BTreeMap<String, String>,
    /// Every run.
    pub runs: Vec<IngressRun>,
}

/// Ran, or skipped with a reason.
pub type IngressOutcome = report::Outcome<IngressReport>;

/// One load run from the client namespace; loss switched on once its connections are up.
async fn load_in(
    net: &Netns,
    bench_bin: &FsPath,
    edge: Edge,
    entry: SocketAddr,
    ca: &FsPath,
    s: &IngressSettings,
    percent: u32,
) -> anyhow::Result<H3Summary> {
    let wire = match edge.wire() {
        Wire::H3 => "h3",
        Wire::H2 => "h2",
    };
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &net.client])
        .arg(bench_bin)
        .args(["bench", "h3-load", "--gate-stdin", "--wire", wire])
        .args(["--target", &entry.to_string(), "--ca"])
        .arg(ca)
        .args(["--host", certs::INGRESS_HOST])
        .args(["--connections", &s.connections.to_string()])
        .args(["--streams", &s.streams.to_string()])
        .args(["--payload", &s.payload.to_string()])
        .arg("--duration")
        .arg(format!("{}ms", s.duration.as_millis()));
    // Each request has a 5 s deadline in the client; a closed loop ends within one of it.
    loss::gated(net, cmd, percent, s.duration + Duration::from_secs(40)).await
}

/// Runs the scenario (or says why it cannot), prints its table, writes JSON and Markdown into `out`.
pub async fn run(
    s: IngressSettings,
    quicmesh_bin: Option<PathBuf>,
    bench_bin: PathBuf,
    out: Option<PathBuf>,
) -> anyhow::Result<IngressOutcome> {
    if let Some(why) = loss::missing_prerequisite() {
        return Ok(IngressOutcome::Skipped(why));
    }
    let dir = tempfile::Builder::new()
        .prefix("quicmesh-bench-ingress-")
        .tempdir()?;
    let certs = certs::generate(dir.path())?;
    let net = Netns::create().await?;
    let app = SocketAddr::new(IpAddr::V4(loss::SERVER_IP), loss::APP_PORT);
    let _server = loss::serve_in(&net.server, &bench_bin, app).await?;
    let placement = Placement {
        client_ns: Some(net.client.clone()),
        server_ns: Some(net.server.clone()),
        server_ip: IpAddr::V4(loss::SERVER_IP),
        app,
        bench_bin: bench_bin.clone(),
        haproxy_threads: s.haproxy_threads,
        quic_toml: String::new(),
        proxy_toml: String::new(),
        wrapper: Vec::new(),
        ztunnel: Err("the ingress scenario has no ztunnel path".to_owned()),
    };
    let mut skipped = BTreeMap::new();
    let mut edges: Vec<(Edge, Ingress)> = Vec::new();
    let quicmesh = match quicmesh_bin.as_deref() {
        Some(bin) => topology::quicmesh_ingress(&placement, &certs, bin, dir.path()).await,
        None => Err(anyhow::anyhow!(
            "no quicmesh binary (build it with `cargo build --release -p quicmesh`, or pass --quicmesh-bin)"
        )),
    };
    let haproxy = topology::haproxy_ingress(&placement, &certs, dir.path()).await;
    for (edge, started) in [(Edge::QuicmeshH3, quicmesh), (Edge::HaproxyH2, haproxy)] {
        match started {
            Ok(i) => edges.push((edge, i)),
            Err(e) => {
                println!("skipping {}: {e:#}", edge.name());
                skipped.insert(edge.name().to_owned(), format!("{e:#}"));
            }
        }
    }
    let mut runs = Vec::new();
    for (li, &percent) in s.loss_percent.iter().enumerate() {
        let n = edges.len();
        for k in 0..n {
            let (edge, ingress) = &mut edges[(k + li) % n];
            for p in &mut ingress.procs {
                p.check_alive()?;
            }
            tracing::info!(loss = percent, ingress = edge.name(), "ingress run");
            let summary = load_in(
                &net,
                &bench_bin,
                *edge,
                ingress.entry,
                &certs.ca,
                &s,
                percent,
            )
            .await?;
            runs.push(IngressRun {
                loss_percent: percent,
                edge: *edge,
                summary,
            });
        }
    }
    drop(edges);
    runs.sort_by_key(|r| (r.loss_percent, r.edge));
    let report = IngressReport {
        machine: machine::machine_info(),
        settings: s,
        skipped,
        runs,
    };
    let table = table(&report);
    println!("\n{table}");
    if let Some(out) = out {
        let stamp = report.machine.unix_time;
        let path = report::write_json(&out, &format!("ingress-{stamp}.json"), &report)?;
        println!("results: {}", path.display());
        let md = format!(
            "<!-- written by `quicmesh bench ingress` at unix time {stamp} on {} ({} cores): {} connections × {} \
streams of {}-byte POSTs, {} per run -->\n\n{}",
            report.machine.cpu,
            report.machine.cores,
            report.settings.connections,
            report.settings.streams,
            report.settings.payload,
            humantime::format_duration(report.settings.duration),
            table.markdown()
        );
        std::fs::write(out.join("latest-ingress.md"), md)?;
    }
    Ok(IngressOutcome::Done(Box::new(report)))
}

/// loss | ingress | req/s | p50 | p99 | max | errors | req/s vs HAProxy | HAProxy p99 / this p99
pub fn table(report: &IngressReport) -> Table {
    let mut t = Table::new([
        "loss",
        "ingress",
        "req/s",
        "p50",
        "p99",
        "max",
        "errors",
        "req/s / haproxy",
        "haproxy p99 / this",
    ]);
    let us = |v: u64| v as f64 / 1000.0;
    for r in &report.runs {
        let base = report
            .runs
            .iter()
            .find(|x| x.loss_percent == r.loss_percent && x.edge == Edge::HaproxyH2)
            .map(|x| x.summary)
            .filter(|_| r.edge != Edge::HaproxyH2);
        let m = r.summary;
        t.row([
            format!("{}%", r.loss_percent),
            r.edge.name().to_owned(),
            format!("{:.0}", m.rps),
            ms(us(m.p50_us)),
            ms(us(m.p99_us)),
            ms(us(m.max_us)),
            m.errors.to_string(),
            base.map_or("-".into(), |b| ratio(m.rps, b.rps)),
            base.map_or("-".into(), |b| ratio(us(b.p99_us), us(m.p99_us))),
        ]);
    }
    t
}
