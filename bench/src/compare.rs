//! The side-by-side comparison: every scenario run against every path (direct, quicmesh, the HAProxy
//! mTLS pair) in one invocation, targets alternating inside each scenario and their order rotating from
//! one scenario and round to the next, so slow drift of the machine lands on all of them alike.
//!
//! Figures, each reported as a ratio to direct: added latency at fixed rates (open loop, HTTP/1.1, 1 KiB),
//! max req/s at 64 connections per protocol (closed loop), bulk Gbit/s on one connection, small
//! request/response req/s over 100 and 1,000 concurrent connections, proxy CPU per request and peak RSS,
//! proxy memory idle and with 1,000 open tunneled connections, and the raw QUIC ceiling for context.
//!
//! With the HTTP-aware paths among the targets (`quicmesh-l7`, `peer-http`) the same run becomes issue 8's
//! L7 comparison: fixed-rate latency per protocol, HTTP/2 with many streams per connection, raw-TCP
//! scenarios skipped on the L7 paths (they carry only HTTP), and a table of the L7 goals in
//! `latest-l7.md`, so the opaque comparison's `latest.md` stays what it was.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path as FsPath, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    bulk::{self, BulkOutcome},
    certs,
    client::Protocol,
    load::{self, LoadOutcome, LoadSpec, Mode, Summary},
    machine::{self, MachineInfo, ProcSample},
    report::{self, Table, ms, ratio},
    server::AppServer,
    topology::{self, Path, Placement, Target},
};

/// Settings of one comparison.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompareSettings {
    /// Paths compared; `direct` is always first.
    pub targets: Vec<Target>,
    /// Measured length of each load run.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Repetitions of the whole scenario list.
    pub rounds: usize,
    /// Open-loop rates for the added-latency figures.
    pub rates: Vec<f64>,
    /// Protocols of the added-latency figures.
    #[serde(default = "http1_only")]
    pub latency_protocols: Vec<Protocol>,
    /// Concurrent requests per HTTP/2 connection in the max-throughput scenario (workers sharing each
    /// connection).
    #[serde(default = "one")]
    pub streams: usize,
    /// Connections for the fixed-rate and max-throughput figures.
    pub connections: usize,
    /// Protocols of the max-throughput figure.
    pub protocols: Vec<Protocol>,
    /// Connection counts of the small request/response figure.
    pub rr_connections: Vec<usize>,
    /// Payload of the small request/response figure.
    pub rr_payload: usize,
    /// Byte cap of a bulk transfer.
    pub bulk_bytes: u64,
    /// Time cap of a bulk transfer.
    #[serde(with = "humantime_serde")]
    pub bulk_duration: Duration,
    /// Connections held open for the memory figure.
    pub memory_connections: usize,
    /// Measure the raw QUIC ceiling.
    pub quic_ceiling: bool,
    /// `nbthread` of each HAProxy.
    pub haproxy_threads: usize,
    /// `[quic]` lines given to the quicmesh proxies (empty: their defaults).
    #[serde(default)]
    pub quic_toml: String,
    /// Concurrent clients of the new-connections scenario (each: connect, one 128 B exchange, close,
    /// again); 0 skips it.
    #[serde(default)]
    pub new_connections: usize,
    /// The ztunnel binary given with `--ztunnel` (else `QUICMESH_BENCH_ZTUNNEL`), for the `ztunnel`
    /// target.
    #[serde(default)]
    pub ztunnel_bin: Option<PathBuf>,
}

fn http1_only() -> Vec<Protocol> {
    vec![Protocol::Http1]
}

fn one() -> usize {
    1
}

impl CompareSettings {
    /// The full comparison.
    pub fn full(targets: Vec<Target>) -> Self {
        Self {
            targets,
            duration: Duration::from_secs(5),
            rounds: 1,
            rates: vec![1000.0, 5000.0],
            latency_protocols: http1_only(),
            streams: 1,
            connections: 64,
            protocols: Protocol::ALL.to_vec(),
            rr_connections: vec![100, 1000],
            rr_payload: 128,
            bulk_bytes: 8 << 30,
            bulk_duration: Duration::from_secs(5),
            memory_connections: 1000,
            quic_ceiling: true,
            haproxy_threads: 1,
            quic_toml: String::new(),
            new_connections: 64,
            ztunnel_bin: None,
        }
    }

    /// A few seconds in all, tiny rates: the smoke test.
    pub fn smoke(targets: Vec<Target>) -> Self {
        Self {
            targets,
            duration: Duration::from_millis(300),
            rounds: 1,
            rates: vec![200.0],
            latency_protocols: http1_only(),
            streams: 1,
            connections: 4,
            protocols: Protocol::ALL.to_vec(),
            rr_connections: vec![20],
            rr_payload: 128,
            bulk_bytes: 16 << 20,
            bulk_duration: Duration::from_secs(2),
            memory_connections: 20,
            quic_ceiling: true,
            haproxy_threads: 1,
            quic_toml: String::new(),
            new_connections: 4,
            ztunnel_bin: None,
        }
    }
}

#[derive(Debug, Clone)]
enum Work {
    Load(LoadSpec),
    /// New TCP connections: each client connects, makes one exchange and closes, again and again.
    Connect(LoadSpec),
    Bulk,
}

#[derive(Debug, Clone)]
struct Scenario {
    id: String,
    title: String,
    work: Work,
}

fn scenarios(s: &CompareSettings) -> Vec<Scenario> {
    let mut out = Vec::new();
    // HTTP/2's concurrent streams per connection apply to the closed loop (max req/s); the fixed-rate
    // runs keep one request at a time per connection, so their latency is the path's, not a queue's.
    let spec = |p: Protocol, mode: Mode| {
        let mut spec = LoadSpec::new(p, mode, s.connections, s.duration);
        if p == Protocol::Http2 && mode == Mode::Closed {
            spec.streams = s.streams.max(1);
        }
        spec
    };
    let conns = |p: Protocol, mode: Mode| {
        if p == Protocol::Http2 && mode == Mode::Closed && s.streams > 1 {
            format!("{} connections × {} streams", s.connections, s.streams)
        } else {
            format!("{} connections", s.connections)
        }
    };
    for &p in &s.latency_protocols {
        for &rate in &s.rates {
            // HTTP/1.1 keeps the id it has always had, so figures stay comparable across runs.
            let id = match p {
                Protocol::Http1 => format!("latency-{}rps", rate as u64),
                _ => format!("latency-{}-{}rps", p.name(), rate as u64),
            };
            out.push(Scenario {
                id,
                title: format!(
                    "{} 1 KiB, open loop {} req/s, {}",
                    p.name(),
                    rate as u64,
                    conns(p, Mode::Open { rate })
                ),
                work: Work::Load(spec(p, Mode::Open { rate })),
            });
        }
    }
    for &p in &s.protocols {
        out.push(Scenario {
            id: format!("max-{}", p.name()),
            title: format!(
                "{} 1 KiB, closed loop, {}",
                p.name(),
                conns(p, Mode::Closed)
            ),
            work: Work::Load(spec(p, Mode::Closed)),
        });
    }
    for &n in &s.rr_connections {
        let mut spec = LoadSpec::new(Protocol::Tcp, Mode::Closed, n, s.duration);
        spec.payload = s.rr_payload;
        out.push(Scenario {
            id: format!("rr-{n}conns"),
            title: format!(
                "TCP {} B request/response, closed loop, {n} connections",
                s.rr_payload
            ),
            work: Work::Load(spec),
        });
    }
    if s.new_connections > 0 {
        let mut spec = LoadSpec::new(Protocol::Tcp, Mode::Closed, s.new_connections, s.duration);
        spec.payload = s.rr_payload;
        out.push(Scenario {
            id: "new-conns".into(),
            title: format!(
                "new TCP connections, {} clients each connecting, one {} B exchange, closing",
                s.new_connections, s.rr_payload
            ),
            work: Work::Connect(spec),
        });
    }
    out.push(Scenario {
        id: "bulk".into(),
        title: "bulk TCP, one connection".into(),
        work: Work::Bulk,
    });
    out
}

/// What the proxies of a path spent during one scenario.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProxyCost {
    /// Process role.
    pub name: String,
    /// CPU seconds spent.
    pub cpu_s: f64,
    /// Peak RSS during the scenario, KiB.
    pub peak_rss_kib: u64,
}

/// One scenario on one path (merged over rounds).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// Scenario id.
    pub scenario: String,
    /// Scenario description.
    pub title: String,
    /// Path.
    pub target: Target,
    /// Load figures, for load scenarios.
    pub load: Option<Summary>,
    /// Bulk figures, for the bulk scenario (the best round).
    pub bulk: Option<BulkOutcome>,
    /// Proxy cost per process, summed over rounds (peak: max).
    pub proxies: Vec<ProxyCost>,
    /// Proxy CPU microseconds per successful request (all proxy processes together).
    pub proxy_cpu_us_per_request: Option<f64>,
}

/// Proxy memory of a path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryFigure {
    /// Path.
    pub target: Target,
    /// Per process: (name, idle RSS KiB, RSS KiB with the connections open).
    pub processes: Vec<(String, u64, u64)>,
    /// Connections held open.
    pub connections: usize,
}

/// Everything one comparison produced (the JSON file).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompareReport {
    /// Machine.
    pub machine: MachineInfo,
    /// Settings.
    pub settings: CompareSettings,
    /// The quicmesh binary used, if any.
    pub quicmesh_bin: Option<PathBuf>,
    /// Paths that could not be set up, and why.
    pub skipped: BTreeMap<String, String>,
    /// Every scenario on every path.
    pub runs: Vec<RunResult>,
    /// Proxy memory idle and loaded.
    pub memory: Vec<MemoryFigure>,
    /// Raw QUIC ceiling.
    pub quic_ceiling: Option<BulkOutcome>,
}

/// Inputs of [`compare`] besides the settings.
#[derive(Debug, Clone)]
pub struct CompareEnv {
    /// quicmesh binary (`None`: the quicmesh path is skipped with a reason).
    pub quicmesh_bin: Option<PathBuf>,
    /// Harness binary (for probes in namespaces; unused on loopback).
    pub bench_bin: PathBuf,
    /// Results directory (`None`: write nothing).
    pub out: Option<PathBuf>,
}

struct Acc {
    outcome: Option<LoadOutcome>,
    bulk: Option<BulkOutcome>,
    cost: Vec<ProxyCost>,
}

impl LoadOutcome {
    fn merge(&mut self, other: LoadOutcome) -> anyhow::Result<()> {
        self.latency.add(&other.latency)?;
        self.service.add(&other.service)?;
        self.ok += other.ok;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.elapsed += other.elapsed;
        Ok(())
    }
}

/// Runs the comparison; prints the tables; writes JSON and SVG files when `env.out` is set.
pub async fn compare(settings: CompareSettings, env: CompareEnv) -> anyhow::Result<CompareReport> {
    let dir = tempfile::Builder::new()
        .prefix("quicmesh-bench-")
        .tempdir()?;
    let certs = certs::generate(dir.path())?;
    let app = AppServer::spawn(SocketAddr::from(([127, 0, 0, 1], 0)), None).await?;
    let mut placement = Placement::loopback(app.addr(), env.bench_bin.clone());
    placement.haproxy_threads = settings.haproxy_threads;
    placement.quic_toml = settings.quic_toml.clone();
    if settings.targets.contains(&Target::Ztunnel) {
        placement.ztunnel = crate::ztunnel::resolve_here(settings.ztunnel_bin.as_deref());
    }
    let mut skipped = BTreeMap::new();
    let mut paths: Vec<Path> = Vec::new();
    let mut targets = vec![Target::Direct];
    targets.extend(
        settings
            .targets
            .iter()
            .copied()
            .filter(|t| *t != Target::Direct),
    );
    let mut idle: BTreeMap<Target, Vec<u64>> = BTreeMap::new();
    for t in targets {
        let path = topology::start(
            t,
            &placement,
            &certs,
            env.quicmesh_bin.as_deref(),
            dir.path(),
        )
        .await;
        match path {
            Ok(p) => {
                idle.insert(t, p.samples().iter().map(|s| s.rss_kib).collect());
                tracing::info!(target_path = t.name(), entry = %p.entry, "path ready");
                paths.push(p);
            }
            Err(e) => {
                tracing::warn!(target_path = t.name(), "skipped: {e:#}");
                println!("skipping {}: {e:#}", t.name());
                skipped.insert(t.name().to_owned(), format!("{e:#}"));
            }
        }
    }

    let list = scenarios(&settings);
    let mut acc: BTreeMap<(usize, Target), Acc> = BTreeMap::new();
    let n = paths.len();
    for round in 0..settings.rounds {
        for (si, sc) in list.iter().enumerate() {
            for k in 0..n {
                let path = &mut paths[(k + si + round) % n];
                let protocol = match &sc.work {
                    Work::Load(spec) | Work::Connect(spec) => spec.protocol,
                    Work::Bulk => Protocol::Tcp,
                };
                // An L7 path carries no raw TCP: those scenarios are not run on it.
                let Some(addr) = path.entry_for(protocol) else {
                    continue;
                };
                path.check_alive()?;
                let before: Vec<ProcSample> = path.samples();
                path.reset_peaks();
                tracing::info!(scenario = %sc.id, round, target_path = path.target.name(), "running");
                let entry = acc.entry((si, path.target)).or_insert_with(|| Acc {
                    outcome: None,
                    bulk: None,
                    cost: path
                        .procs
                        .iter()
                        .map(|p| ProxyCost {
                            name: p.name.clone(),
                            ..Default::default()
                        })
                        .collect(),
                });
                match &sc.work {
                    Work::Load(spec) => {
                        let o = load::run(spec, addr, async {}).await?;
                        match &mut entry.outcome {
                            Some(prev) => prev.merge(o)?,
                            None => entry.outcome = Some(o),
                        }
                    }
                    Work::Connect(spec) => {
                        let o = load::new_connections(spec, addr).await?;
                        match &mut entry.outcome {
                            Some(prev) => prev.merge(o)?,
                            None => entry.outcome = Some(o),
                        }
                    }
                    Work::Bulk => {
                        let b = bulk::tcp_bulk(addr, settings.bulk_bytes, settings.bulk_duration)
                            .await?;
                        if entry.bulk.is_none_or(|prev| b.gbit_s > prev.gbit_s) {
                            entry.bulk = Some(b);
                        }
                    }
                }
                for ((c, b), a) in entry.cost.iter_mut().zip(&before).zip(path.samples()) {
                    c.cpu_s += a.cpu_s - b.cpu_s;
                    c.peak_rss_kib = c.peak_rss_kib.max(a.peak_rss_kib);
                }
            }
        }
    }

    let mut runs = Vec::new();
    for ((si, target), a) in acc {
        let sc = &list[si];
        let load = a.outcome.as_ref().map(LoadOutcome::summary);
        let cpu: f64 = a.cost.iter().map(|c| c.cpu_s).sum();
        let per_req = load
            .as_ref()
            .filter(|l| l.ok > 0 && !a.cost.is_empty())
            .map(|l| cpu * 1e6 / l.ok as f64);
        runs.push(RunResult {
            scenario: sc.id.clone(),
            title: sc.title.clone(),
            target,
            load,
            bulk: a.bulk,
            proxies: a.cost,
            proxy_cpu_us_per_request: per_req,
        });
    }

    // Memory with many open connections, after the load (allocators rarely give memory back, which is
    // what an operator sees too).
    let mut memory = Vec::new();
    for path in &mut paths {
        if path.procs.is_empty() {
            continue;
        }
        path.check_alive()?;
        // HTTP/1.1 connections on an L7 path (it carries no raw TCP), tunneled TCP ones elsewhere.
        let protocol = if path.target.is_l7() {
            Protocol::Http1
        } else {
            Protocol::Tcp
        };
        let (mut conns, failed) = load::connect_all(
            protocol,
            path.entry,
            settings.memory_connections,
            Duration::from_secs(10),
        )
        .await;
        let payload = bytes::Bytes::from_static(&[7u8; 64]);
        for c in &mut conns {
            // One exchange each, so every tunnel stream (or pooled upstream) is fully set up end to end.
            let _ = c.request(&payload, Duration::from_secs(10)).await;
        }
        if failed > 0 {
            tracing::warn!(
                failed,
                target_path = path.target.name(),
                "memory figure: connections failed"
            );
        }
        let loaded: Vec<u64> = path.samples().iter().map(|s| s.rss_kib).collect();
        let idle_rss = idle.get(&path.target).cloned().unwrap_or_default();
        memory.push(MemoryFigure {
            target: path.target,
            processes: path
                .procs
                .iter()
                .zip(idle_rss.iter().zip(loaded))
                .map(|(p, (i, l))| (p.name.clone(), *i, l))
                .collect(),
            connections: conns.len(),
        });
        drop(conns);
    }
    drop(paths);

    let quic_ceiling = if settings.quic_ceiling {
        match bulk::quic_ceiling(settings.bulk_bytes, settings.bulk_duration).await {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!("raw QUIC ceiling failed: {e:#}");
                None
            }
        }
    } else {
        None
    };

    let report = CompareReport {
        machine: machine::machine_info(),
        settings,
        quicmesh_bin: env.quicmesh_bin.clone(),
        skipped,
        runs,
        memory,
        quic_ceiling,
    };
    let (detail, ratios) = tables(&report);
    println!("\n{detail}\n{ratios}");
    if let Some(g) = l7_goals(&report) {
        println!("{g}");
    }
    if let Some(g) = policy_goals(&report) {
        println!("{g}");
    }
    if let Some(out) = &env.out {
        write_outputs(&report, out, &detail, &ratios)?;
    }
    Ok(report)
}

fn write_outputs(
    report: &CompareReport,
    out: &FsPath,
    detail: &Table,
    ratios: &Table,
) -> anyhow::Result<()> {
    let stamp = report.machine.unix_time;
    let json = report::write_json(out, &format!("compare-{stamp}.json"), report)?;
    println!("results: {}", json.display());
    let mut by_scenario: BTreeMap<&str, Vec<report::Series>> = BTreeMap::new();
    let mut titles = BTreeMap::new();
    for r in &report.runs {
        if let Some(l) = &r.load {
            by_scenario
                .entry(&r.scenario)
                .or_default()
                .push((r.target.name().to_owned(), l.curve.clone()));
            titles.insert(r.scenario.as_str(), r.title.as_str());
        }
    }
    for (id, series) in by_scenario {
        let title = titles.get(id).copied().unwrap_or(id);
        let svg = report::percentile_svg(title, &series);
        let p = out.join(format!("compare-{stamp}-{id}.svg"));
        std::fs::write(&p, svg)?;
        println!("plot: {}", p.display());
    }
    let goals = [l7_goals(report), policy_goals(report)]
        .into_iter()
        .flatten()
        .map(|g| g.markdown() + "\n")
        .collect::<String>();
    let md = format!(
        "<!-- written by `quicmesh bench compare` at unix time {stamp} on {} ({} cores), {} round(s) of {} -->\n\n{goals}{}\n{}",
        report.machine.cpu,
        report.machine.cores,
        report.settings.rounds,
        humantime::format_duration(report.settings.duration),
        ratios.markdown(),
        detail.markdown()
    );
    // The L7, policy and ztunnel comparisons keep their own latest tables, so they do not replace the
    // opaque one.
    let name = if report.settings.targets.contains(&Target::QuicmeshL7Policy) {
        "latest-policy.md"
    } else if report.settings.targets.contains(&Target::Ztunnel) {
        "latest-ztunnel.md"
    } else if report.settings.targets.iter().any(|t| t.is_l7()) {
        "latest-l7.md"
    } else {
        "latest.md"
    };
    std::fs::write(out.join(name), md)?;
    Ok(())
}

fn find<'a>(report: &'a CompareReport, scenario: &str, t: Target) -> Option<&'a RunResult> {
    report
        .runs
        .iter()
        .find(|r| r.scenario == scenario && r.target == t)
}

/// Issue 8's goals for the L7 path against HAProxy `mode http`, per protocol that ran on both: max req/s at
/// least 1.2x, proxy CPU per request at most 0.8x.
pub fn l7_goals(report: &CompareReport) -> Option<Table> {
    let mut t = Table::new(["goal", "quicmesh-l7", "peer-haproxy-http", "ratio", "met"]);
    for p in [Protocol::Http1, Protocol::Http2, Protocol::GrpcUnary] {
        let id = format!("max-{}", p.name());
        let (Some(q), Some(h)) = (
            find(report, &id, Target::QuicmeshL7),
            find(report, &id, Target::PeerHttp),
        ) else {
            continue;
        };
        let rps = |r: &RunResult| r.load.as_ref().map_or(0.0, |l| l.throughput_rps);
        let (qr, hr) = (rps(q), rps(h));
        let met = |ok: bool| if ok { "yes" } else { "no" };
        t.row([
            format!("{id} req/s ≥ 1.2x"),
            format!("{qr:.0}"),
            format!("{hr:.0}"),
            ratio(qr, hr),
            met(hr > 0.0 && qr / hr >= 1.2).to_owned(),
        ]);
        if let (Some(qc), Some(hc)) = (q.proxy_cpu_us_per_request, h.proxy_cpu_us_per_request) {
            t.row([
                format!("{id} proxy CPU µs/req ≤ 0.8x"),
                format!("{qc:.1}"),
                format!("{hc:.1}"),
                ratio(qc, hc),
                met(hc > 0.0 && qc / hc <= 0.8).to_owned(),
            ]);
        }
    }
    (!t.is_empty()).then_some(t)
}

/// Issue 9's goal for policy enforcement, per scenario that ran on both `quicmesh-l7-policy` and
/// `quicmesh-l7` (100 authorization rules and a rate limit that never triggers vs no policy, same run):
/// req/s and proxy CPU per request within 5%.
pub fn policy_goals(report: &CompareReport) -> Option<Table> {
    let mut t = Table::new(["goal", "with policy", "without", "ratio", "met"]);
    let mut ids: Vec<&str> = report.runs.iter().map(|r| r.scenario.as_str()).collect();
    ids.dedup();
    for id in ids {
        let (Some(p), Some(n)) = (
            find(report, id, Target::QuicmeshL7Policy),
            find(report, id, Target::QuicmeshL7),
        ) else {
            continue;
        };
        let met = |ok: bool| if ok { "yes" } else { "no" };
        if let (Some(pl), Some(nl)) = (&p.load, &n.load)
            && id.starts_with("max-")
        {
            let (pr, nr) = (pl.throughput_rps, nl.throughput_rps);
            t.row([
                format!("{id} req/s ≥ 0.95x"),
                format!("{pr:.0}"),
                format!("{nr:.0}"),
                ratio(pr, nr),
                met(nr > 0.0 && pr / nr >= 0.95).to_owned(),
            ]);
        }
        if let (Some(pc), Some(nc)) = (p.proxy_cpu_us_per_request, n.proxy_cpu_us_per_request) {
            t.row([
                format!("{id} proxy CPU µs/req ≤ 1.05x"),
                format!("{pc:.1}"),
                format!("{nc:.1}"),
                ratio(pc, nc),
                met(nc > 0.0 && pc / nc <= 1.05).to_owned(),
            ]);
        }
    }
    (!t.is_empty()).then_some(t)
}

/// Paths in the order of the ratio table's columns.
const COLUMNS: [Target; 6] = [
    Target::Quicmesh,
    Target::QuicmeshL7,
    Target::QuicmeshL7Policy,
    Target::Peer,
    Target::PeerHttp,
    Target::Ztunnel,
];

/// Head-to-head ratios shown when both paths ran: each quicmesh path against its HAProxy counterpart,
/// the L7 path with policies against the same path without, and the opaque quicmesh path and the HAProxy
/// pair against ztunnel.
const PAIRS: [(Target, Target); 5] = [
    (Target::Quicmesh, Target::Peer),
    (Target::QuicmeshL7, Target::PeerHttp),
    (Target::QuicmeshL7Policy, Target::QuicmeshL7),
    (Target::Quicmesh, Target::Ztunnel),
    (Target::Ztunnel, Target::Peer),
];

/// Column-header name of a path.
fn short(t: Target) -> &'static str {
    match t {
        Target::Peer => "peer",
        Target::PeerHttp => "peer-http",
        t => t.name(),
    }
}

/// The detail table (every run) and the ratio table (every figure against direct, each quicmesh path
/// against its HAProxy counterpart).
pub fn tables(report: &CompareReport) -> (Table, Table) {
    let mut detail = Table::new([
        "scenario",
        "path",
        "req/s",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "max",
        "errors",
        "Gbit/s",
        "proxy µs/req",
        "proxy peak MiB",
    ]);
    for r in &report.runs {
        let peak: u64 = r.proxies.iter().map(|p| p.peak_rss_kib).sum();
        let mut cells = vec![r.scenario.clone(), r.target.name().to_owned()];
        match &r.load {
            Some(l) => {
                let p = l.latency_ms;
                cells.extend([
                    format!("{:.0}", l.throughput_rps),
                    ms(p.p50),
                    ms(p.p90),
                    ms(p.p99),
                    ms(p.p999),
                    ms(p.max),
                    l.error_count().to_string(),
                    "-".into(),
                ]);
            }
            None => {
                cells.extend(["-", "-", "-", "-", "-", "-", "0"].map(String::from));
                cells.push(r.bulk.map_or("-".into(), |b| format!("{:.2}", b.gbit_s)));
            }
        }
        cells.push(
            r.proxy_cpu_us_per_request
                .map_or("-".into(), |v| format!("{v:.1}")),
        );
        cells.push(if r.proxies.is_empty() {
            "-".into()
        } else {
            format!("{:.1}", peak as f64 / 1024.0)
        });
        detail.row(cells);
    }

    let present: Vec<Target> = COLUMNS
        .into_iter()
        .filter(|t| report.runs.iter().any(|r| r.target == *t))
        .collect();
    let pairs: Vec<(Target, Target)> = PAIRS
        .into_iter()
        .filter(|(a, b)| present.contains(a) && present.contains(b))
        .collect();
    let mut headers = vec!["figure".to_owned(), "direct".to_owned()];
    headers.extend(present.iter().map(|t| t.name().to_owned()));
    headers.extend(present.iter().map(|t| format!("{}/direct", short(*t))));
    headers.extend(
        pairs
            .iter()
            .map(|(a, b)| format!("{}/{}", short(*a), short(*b))),
    );
    let mut ratios = Table::new(headers);
    // One figure: the direct cell, the ratio base (direct, or another baseline), each path's value.
    let mut row = |name: String,
                   direct: Option<f64>,
                   base: Option<f64>,
                   vals: &dyn Fn(Target) -> Option<f64>,
                   fmt: &dyn Fn(f64) -> String| {
        let v: Vec<Option<f64>> = present.iter().map(|t| vals(*t)).collect();
        if direct.is_none() && v.iter().all(Option::is_none) {
            return;
        }
        let show = |v: Option<f64>| v.map_or("-".into(), fmt);
        let rat = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => ratio(a, b),
            _ => "-".into(),
        };
        let mut cells = vec![name, show(direct)];
        cells.extend(v.iter().map(|x| show(*x)));
        cells.extend(v.iter().map(|x| rat(*x, base)));
        cells.extend(pairs.iter().map(|(a, b)| rat(vals(*a), vals(*b))));
        ratios.row(cells);
    };
    let ids: Vec<String> = {
        let mut v: Vec<String> = report.runs.iter().map(|r| r.scenario.clone()).collect();
        v.dedup();
        v
    };
    for id in &ids {
        let cpu = |t: Target| find(report, id, t).and_then(|r| r.proxy_cpu_us_per_request);
        let load = |t: Target| find(report, id, t).and_then(|r| r.load.as_ref());
        if id.starts_with("latency-") {
            let p50 = |t: Target| load(t).map(|l| l.latency_ms.p50);
            row(
                format!("{id} p50"),
                p50(Target::Direct),
                p50(Target::Direct),
                &p50,
                &ms,
            );
            let p99 = |t: Target| load(t).map(|l| l.latency_ms.p99);
            row(
                format!("{id} p99"),
                p99(Target::Direct),
                p99(Target::Direct),
                &p99,
                &ms,
            );
            row(format!("{id} proxy CPU µs/req"), None, None, &cpu, &|v| {
                format!("{v:.1}")
            });
        } else if id == "bulk" {
            let g = |t: Target| find(report, id, t).and_then(|r| r.bulk).map(|b| b.gbit_s);
            row(
                "bulk Gbit/s (1 conn)".into(),
                g(Target::Direct),
                g(Target::Direct),
                &g,
                &|v| format!("{v:.2}"),
            );
        } else {
            let rps = |t: Target| load(t).map(|l| l.throughput_rps);
            let unit = if id == "new-conns" { "conn/s" } else { "req/s" };
            row(
                format!("{id} {unit}"),
                rps(Target::Direct),
                rps(Target::Direct),
                &rps,
                &|v| format!("{v:.0}"),
            );
            row(format!("{id} proxy CPU µs/req"), None, None, &cpu, &|v| {
                format!("{v:.1}")
            });
        }
    }
    let peak = |t: Target| -> Option<f64> {
        let per_proc = report
            .runs
            .iter()
            .filter(|r| r.target == t)
            .flat_map(|r| r.proxies.iter().map(|p| p.peak_rss_kib))
            .max()?;
        Some(per_proc as f64 / 1024.0)
    };
    let mem = |t: Target, loaded: bool| -> Option<f64> {
        let m = report.memory.iter().find(|m| m.target == t)?;
        let v = m
            .processes
            .iter()
            .map(|(_, i, l)| if loaded { *l } else { *i })
            .max()?;
        Some(v as f64 / 1024.0)
    };
    let mib = |v: f64| format!("{v:.1}");
    row(
        "peak RSS per proxy, MiB (max over scenarios)".into(),
        None,
        None,
        &peak,
        &mib,
    );
    row(
        "RSS per proxy idle, MiB".into(),
        None,
        None,
        &|t| mem(t, false),
        &mib,
    );
    row(
        format!(
            "RSS per proxy with {} open, MiB",
            report.settings.memory_connections
        ),
        None,
        None,
        &|t| mem(t, true),
        &mib,
    );
    if let Some(c) = report.quic_ceiling {
        let gbit = |t: Target| {
            find(report, "bulk", t)
                .and_then(|r| r.bulk)
                .map(|b| b.gbit_s)
        };
        let fmt = |v: f64| format!("{v:.2}");
        // Shown in the quicmesh column (the first column when quicmesh is not compared).
        let column = if present.contains(&Target::Quicmesh) {
            Target::Quicmesh
        } else {
            present.first().copied().unwrap_or(Target::Quicmesh)
        };
        row(
            "raw QUIC ceiling Gbit/s (quinn alone, 1 stream)".into(),
            None,
            gbit(Target::Direct),
            &|t| (t == column).then_some(c.gbit_s),
            &fmt,
        );
        if gbit(Target::Quicmesh).is_some() {
            row(
                "quicmesh bulk / raw QUIC ceiling".into(),
                None,
                Some(c.gbit_s),
                &|t| (t == Target::Quicmesh).then(|| gbit(t)).flatten(),
                &fmt,
            );
        }
    }
    (detail, ratios)
}
