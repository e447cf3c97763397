//! The side-by-side comparison: every scenario run against every path (direct, quicmesh, the HAProxy
//! mTLS pair) in one invocation, targets alternating inside each scenario and their order rotating from
//! one scenario and round to the next, so slow drift of the machine lands on all of them alike.
//!
//! Figures, each reported as a ratio to direct: added latency at fixed rates (open loop, HTTP/1.1, 1 KiB),
//! max req/s at 64 connections per protocol (closed loop), bulk Gbit/s on one connection, small
//! request/response req/s over 100 and 1,000 concurrent connections, proxy CPU per request and peak RSS,
//! proxy memory idle and with 1,000 open tunneled connections, and the raw QUIC ceiling for context.

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
}

impl CompareSettings {
    /// The full comparison.
    pub fn full(targets: Vec<Target>) -> Self {
        Self {
            targets,
            duration: Duration::from_secs(5),
            rounds: 1,
            rates: vec![1000.0, 5000.0],
            connections: 64,
            protocols: Protocol::ALL.to_vec(),
            rr_connections: vec![100, 1000],
            rr_payload: 128,
            bulk_bytes: 8 << 30,
            bulk_duration: Duration::from_secs(5),
            memory_connections: 1000,
            quic_ceiling: true,
            haproxy_threads: 1,
        }
    }

    /// A few seconds in all, tiny rates: the smoke test.
    pub fn smoke(targets: Vec<Target>) -> Self {
        Self {
            targets,
            duration: Duration::from_millis(300),
            rounds: 1,
            rates: vec![200.0],
            connections: 4,
            protocols: Protocol::ALL.to_vec(),
            rr_connections: vec![20],
            rr_payload: 128,
            bulk_bytes: 16 << 20,
            bulk_duration: Duration::from_secs(2),
            memory_connections: 20,
            quic_ceiling: true,
            haproxy_threads: 1,
        }
    }
}

#[derive(Debug, Clone)]
enum Work {
    Load(LoadSpec),
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
    for &rate in &s.rates {
        out.push(Scenario {
            id: format!("latency-{}rps", rate as u64),
            title: format!(
                "HTTP/1.1 1 KiB, open loop {} req/s, {} connections",
                rate as u64, s.connections
            ),
            work: Work::Load(LoadSpec::new(
                Protocol::Http1,
                Mode::Open { rate },
                s.connections,
                s.duration,
            )),
        });
    }
    for &p in &s.protocols {
        out.push(Scenario {
            id: format!("max-{}", p.name()),
            title: format!(
                "{} 1 KiB, closed loop, {} connections",
                p.name(),
                s.connections
            ),
            work: Work::Load(LoadSpec::new(p, Mode::Closed, s.connections, s.duration)),
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
        let path = match t {
            Target::Direct => Ok(Path::direct(&placement)),
            Target::Peer => topology::haproxy_pair(&placement, &certs, dir.path()).await,
            Target::Quicmesh => match &env.quicmesh_bin {
                Some(bin) => topology::quicmesh_pair(&placement, &certs, bin, dir.path()).await,
                None => Err(anyhow::anyhow!(
                    "no quicmesh binary (build it with `cargo build --release`, or pass --quicmesh-bin)"
                )),
            },
        };
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
                        let o = load::run(spec, path.entry, async {}).await?;
                        match &mut entry.outcome {
                            Some(prev) => prev.merge(o)?,
                            None => entry.outcome = Some(o),
                        }
                    }
                    Work::Bulk => {
                        let b =
                            bulk::tcp_bulk(path.entry, settings.bulk_bytes, settings.bulk_duration)
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
        let (mut conns, failed) = load::connect_all(
            Protocol::Tcp,
            path.entry,
            settings.memory_connections,
            Duration::from_secs(10),
        )
        .await;
        let payload = bytes::Bytes::from_static(&[7u8; 64]);
        for c in &mut conns {
            // One exchange each, so every tunnel stream is fully set up end to end.
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
    let md = format!(
        "<!-- written by `quicmesh bench compare` at unix time {stamp} on {} ({} cores) -->\n\n{}\n{}",
        report.machine.cpu,
        report.machine.cores,
        ratios.markdown(),
        detail.markdown()
    );
    std::fs::write(out.join("latest.md"), md)?;
    Ok(())
}

fn find<'a>(report: &'a CompareReport, scenario: &str, t: Target) -> Option<&'a RunResult> {
    report
        .runs
        .iter()
        .find(|r| r.scenario == scenario && r.target == t)
}

/// The detail table (every run) and the ratio table (every figure against direct, quicmesh against peer).
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

    let has = |t: Target| report.runs.iter().any(|r| r.target == t);
    let (q, p) = (has(Target::Quicmesh), has(Target::Peer));
    let mut ratios = Table::new([
        "figure",
        "direct",
        "quicmesh",
        "peer-haproxy",
        "quicmesh/direct",
        "peer/direct",
        "quicmesh/peer",
    ]);
    let mut fig = |name: String,
                   get: &dyn Fn(&RunResult) -> Option<f64>,
                   fmt: &dyn Fn(f64) -> String,
                   with_direct: bool| {
        let val = |t: Target, present: bool| {
            if present {
                report
                    .runs
                    .iter()
                    .find(|r| r.target == t && get(r).is_some())
                    .and_then(get)
            } else {
                None
            }
        };
        let d = if with_direct {
            val(Target::Direct, true)
        } else {
            None
        };
        let qv = val(Target::Quicmesh, q);
        let pv = val(Target::Peer, p);
        if d.is_none() && qv.is_none() && pv.is_none() {
            return;
        }
        let show = |v: Option<f64>| v.map_or("-".into(), fmt);
        let rat = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => ratio(a, b),
            _ => "-".into(),
        };
        ratios.row([
            name,
            show(d),
            show(qv),
            show(pv),
            rat(qv, d),
            rat(pv, d),
            rat(qv, pv),
        ]);
    };
    let ids: Vec<(String, String)> = {
        let mut v: Vec<(String, String)> = report
            .runs
            .iter()
            .map(|r| (r.scenario.clone(), r.title.clone()))
            .collect();
        v.dedup();
        v
    };
    for (id, _) in &ids {
        let id2 = id.clone();
        let scen = move |r: &RunResult| r.scenario == id2;
        if id.starts_with("latency-") {
            let s = scen.clone();
            fig(
                format!("{id} p50"),
                &move |r| {
                    s(r).then(|| r.load.as_ref().map(|l| l.latency_ms.p50))
                        .flatten()
                },
                &ms,
                true,
            );
            let s = scen.clone();
            fig(
                format!("{id} p99"),
                &move |r| {
                    s(r).then(|| r.load.as_ref().map(|l| l.latency_ms.p99))
                        .flatten()
                },
                &ms,
                true,
            );
            let s = scen.clone();
            fig(
                format!("{id} proxy CPU µs/req"),
                &move |r| s(r).then_some(r.proxy_cpu_us_per_request).flatten(),
                &|v| format!("{v:.1}"),
                false,
            );
        } else if id == "bulk" {
            let s = scen.clone();
            fig(
                "bulk Gbit/s (1 conn)".into(),
                &move |r| s(r).then(|| r.bulk.map(|b| b.gbit_s)).flatten(),
                &|v| format!("{v:.2}"),
                true,
            );
        } else {
            let s = scen.clone();
            fig(
                format!("{id} req/s"),
                &move |r| {
                    s(r).then(|| r.load.as_ref().map(|l| l.throughput_rps))
                        .flatten()
                },
                &|v| format!("{v:.0}"),
                true,
            );
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
    let mib = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
    for (name, qv, pv) in [
        (
            "peak RSS per proxy, MiB (max over scenarios)",
            peak(Target::Quicmesh),
            peak(Target::Peer),
        ),
        (
            "RSS per proxy idle, MiB",
            mem(Target::Quicmesh, false),
            mem(Target::Peer, false),
        ),
        (
            "RSS per proxy with memory_connections open, MiB",
            mem(Target::Quicmesh, true),
            mem(Target::Peer, true),
        ),
    ] {
        if qv.is_some() || pv.is_some() {
            let rat = match (qv, pv) {
                (Some(a), Some(b)) => ratio(a, b),
                _ => "-".into(),
            };
            let name = name.replace(
                "memory_connections",
                &report.settings.memory_connections.to_string(),
            );
            ratios.row([
                name,
                "-".into(),
                mib(qv),
                mib(pv),
                "-".into(),
                "-".into(),
                rat,
            ]);
        }
    }
    if let Some(c) = report.quic_ceiling {
        let d = find(report, "bulk", Target::Direct)
            .and_then(|r| r.bulk)
            .map(|b| b.gbit_s);
        let qb = find(report, "bulk", Target::Quicmesh)
            .and_then(|r| r.bulk)
            .map(|b| b.gbit_s);
        let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
        ratios.row([
            "raw QUIC ceiling Gbit/s (quinn alone, 1 stream)".to_owned(),
            "-".into(),
            format!("{:.2}", c.gbit_s),
            "-".into(),
            d.map_or("-".into(), |d| ratio(c.gbit_s, d)),
            "-".into(),
            "-".into(),
        ]);
        if qb.is_some() {
            ratios.row([
                "quicmesh bulk / raw QUIC ceiling".to_owned(),
                "-".into(),
                fmt(qb),
                "-".into(),
                qb.map_or("-".into(), |qb| ratio(qb, c.gbit_s)),
                "-".into(),
                "-".into(),
            ]);
        }
    }
    (detail, ratios)
}
