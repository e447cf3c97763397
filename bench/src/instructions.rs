//! Instructions per tunneled request and per tunneled MiB, counted by valgrind's callgrind in every proxy
//! of a path. Timings on a shared 2-core machine move by ±10% from run to run; instruction counts of the
//! same work move by well under 1%, so this is the figure that shows whether a change to the hot path
//! made it cheaper. Every proxy (quicmesh and HAProxy alike) runs under callgrind; its counters are
//! zeroed after the load's connections are up and warm, and dumped when the load ends, so start-up and
//! handshakes are not counted.
//!
//! Needs `valgrind` (with `callgrind_control`); skips with the reason otherwise.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path as FsPath, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    bulk, certs,
    client::Protocol,
    load::{self, LoadSpec, Mode},
    machine::{self, MachineInfo},
    otlp_sink::OtlpSink,
    report::{self, Table},
    server::AppServer,
    topology::{self, Path, Placement, Target, which},
};

/// What to count.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstructionSettings {
    /// Paths.
    pub targets: Vec<Target>,
    /// Requests of the request/response run (TCP echo on opaque paths, `l7_protocol` on L7 paths).
    pub requests: u64,
    /// Protocol of the requests on L7 paths.
    #[serde(default = "http1")]
    pub l7_protocol: Protocol,
    /// Concurrent requests per connection where `l7_protocol` multiplexes (HTTP/2, gRPC unary).
    #[serde(default = "one")]
    pub streams: usize,
    /// Concurrent connections of that run.
    pub connections: usize,
    /// Bytes each request and response carries.
    pub payload: usize,
    /// MiB of the bulk run (opaque paths).
    pub bulk_mib: u64,
    /// Keep the callgrind dumps (their directory is printed), for `callgrind_annotate`.
    #[serde(default)]
    pub keep_dumps: bool,
    /// `[quic]` lines given to the quicmesh proxies (empty: their defaults).
    #[serde(default)]
    pub quic_toml: String,
    /// With a value, the quicmesh proxies trace (`[tracing] sample_percent`) and export their spans
    /// over OTLP to a collector in the harness that counts them.
    #[serde(default)]
    pub tracing_percent: Option<u32>,
}

fn http1() -> Protocol {
    Protocol::Http1
}

fn one() -> usize {
    1
}

/// Counts of one run on one path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Counted {
    /// Path.
    pub target: Target,
    /// `requests` or `bulk`.
    pub work: String,
    /// Requests answered, or MiB moved.
    pub units: f64,
    /// Instructions per proxy process (name -> Ir) over the run.
    pub per_proxy: BTreeMap<String, u64>,
    /// All proxies' instructions per unit.
    pub per_unit: f64,
    /// Spans the harness's collector received during the run (tracing on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spans: Option<u64>,
}

/// The JSON file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstructionReport {
    /// Machine.
    pub machine: MachineInfo,
    /// Settings.
    pub settings: InstructionSettings,
    /// Paths that could not run, and why.
    pub skipped: BTreeMap<String, String>,
    /// Counts.
    pub runs: Vec<Counted>,
}

/// Ran, or skipped with a reason.
pub type InstructionOutcome = report::Outcome<InstructionReport>;

/// Why the count cannot run here, if it cannot.
pub fn missing_prerequisite() -> Option<String> {
    ["valgrind", "callgrind_control"]
        .into_iter()
        .find(|t| which(t).is_none())
        .map(|t| format!("`{t}` not found (Debian: apt-get install -y valgrind)"))
}

async fn control(args: &[&str]) -> anyhow::Result<()> {
    let out = tokio::process::Command::new("callgrind_control")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| anyhow::anyhow!("cannot run callgrind_control: {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "callgrind_control {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    Ok(())
}

/// Zeroes the counters of every proxy of `path`.
async fn zero(path: &Path) -> anyhow::Result<()> {
    for p in &path.procs {
        control(&["-z", &p.pid().to_string()]).await?;
    }
    Ok(())
}

/// The `totals:` figure of a callgrind dump.
pub fn parse_totals(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("totals:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Dumps every proxy of `path` and reads what each executed since the last zero.
async fn dump(path: &Path, dir: &FsPath) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for p in &path.procs {
        let pid = p.pid().to_string();
        control(&["-d", &pid]).await?;
        // Dumps are numbered `<pid>.callgrind.<n>`: the newest is the one just written.
        let prefix = format!("{pid}.callgrind.");
        let newest = std::fs::read_dir(dir)?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let n: u32 = name.strip_prefix(&prefix)?.parse().ok()?;
                Some((n, e.path()))
            })
            .max_by_key(|(n, _)| *n)
            .ok_or_else(|| {
                anyhow::anyhow!("no callgrind dump of {} in {}", p.name, dir.display())
            })?;
        let text = std::fs::read_to_string(&newest.1)?;
        let ir = parse_totals(&text)
            .ok_or_else(|| anyhow::anyhow!("no totals in {}", newest.1.display()))?;
        out.insert(p.name.clone(), ir);
    }
    Ok(out)
}

fn counted(target: Target, work: &str, units: f64, per_proxy: BTreeMap<String, u64>) -> Counted {
    let total: u64 = per_proxy.values().sum();
    Counted {
        target,
        work: work.to_owned(),
        units,
        per_unit: total as f64 / units.max(1e-9),
        per_proxy,
        spans: None,
    }
}

async fn count_path(
    path: &Path,
    s: &InstructionSettings,
    dir: &FsPath,
    sink: Option<&OtlpSink>,
) -> anyhow::Result<Vec<Counted>> {
    let mut runs = Vec::new();
    let protocol = if path.target.is_l7() {
        s.l7_protocol
    } else {
        Protocol::Tcp
    };
    let entry = path.entry_for(protocol).ok_or_else(|| {
        anyhow::anyhow!("{} has no {} entry", path.target.name(), protocol.name())
    })?;
    let mut spec = LoadSpec::new(
        protocol,
        Mode::Closed,
        s.connections,
        Duration::from_secs(300),
    );
    spec.max_requests = s.requests;
    spec.streams = s.streams.max(1);
    spec.payload = s.payload;
    spec.timeout = Duration::from_secs(30);
    spec.progress = false;
    let mut zeroed = Ok(());
    let outcome = load::run(&spec, entry, async { zeroed = zero(path).await }).await?;
    zeroed?;
    let irs = dump(path, dir).await?;
    anyhow::ensure!(
        outcome.errors.is_empty(),
        "{}: requests failed under callgrind: {:?}",
        path.target.name(),
        outcome.errors
    );
    let mut run = counted(path.target, "requests", outcome.ok as f64, irs);
    if let Some(sink) = sink.filter(|_| path.target.is_l7()) {
        // The batch in flight when the counters were dumped arrives within the export interval.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while sink.spans() == 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::ensure!(
            sink.spans() > 0 || s.tracing_percent == Some(0),
            "{}: tracing on, but no span reached the collector",
            path.target.name()
        );
        run.spans = Some(sink.spans());
    }
    runs.push(run);
    if let Some(tcp) = path.entry_for(Protocol::Tcp).filter(|_| s.bulk_mib > 0) {
        // A first small transfer warms the path; then the counted one.
        bulk::tcp_bulk(tcp, 1 << 20, Duration::from_secs(60)).await?;
        zero(path).await?;
        let b = bulk::tcp_bulk(tcp, s.bulk_mib << 20, Duration::from_secs(600)).await?;
        let irs = dump(path, dir).await?;
        runs.push(counted(
            path.target,
            "bulk",
            b.bytes as f64 / f64::from(1 << 20),
            irs,
        ));
    }
    Ok(runs)
}

/// Counts instructions on every target, prints the table, writes JSON into `out`.
pub async fn run(
    s: InstructionSettings,
    quicmesh_bin: Option<PathBuf>,
    bench_bin: PathBuf,
    out: Option<PathBuf>,
) -> anyhow::Result<InstructionOutcome> {
    if let Some(why) = missing_prerequisite() {
        return Ok(InstructionOutcome::Skipped(why));
    }
    let dir = tempfile::Builder::new()
        .prefix("quicmesh-bench-instructions-")
        .tempdir()?;
    let certs = certs::generate(dir.path())?;
    let app = AppServer::spawn(SocketAddr::from(([127, 0, 0, 1], 0)), None).await?;
    let mut placement = Placement::loopback(app.addr(), bench_bin);
    placement.quic_toml = s.quic_toml.clone();
    let sink = match s.tracing_percent {
        Some(p) => {
            let sink = OtlpSink::start().await?;
            placement.proxy_toml = format!(
                "[tracing]\notlp_endpoint = \"http://{}\"\nsample_percent = {p}\n",
                sink.addr()
            );
            Some(sink)
        }
        None => None,
    };
    placement.wrapper = vec![
        "valgrind".into(),
        "--tool=callgrind".into(),
        // Every dump names its functions in full, so each one reads on its own in callgrind_annotate.
        "--compress-strings=no".into(),
        format!("--callgrind-out-file={}/%p.callgrind", dir.path().display()),
    ];
    let mut skipped = BTreeMap::new();
    let mut runs = Vec::new();
    for &t in s.targets.iter().filter(|t| **t != Target::Direct) {
        let path =
            topology::start(t, &placement, &certs, quicmesh_bin.as_deref(), dir.path()).await;
        match path {
            Ok(path) => {
                tracing::info!(target_path = t.name(), "counting instructions");
                runs.extend(count_path(&path, &s, dir.path(), sink.as_ref()).await?);
            }
            Err(e) => {
                println!("skipping {}: {e:#}", t.name());
                skipped.insert(t.name().to_owned(), format!("{e:#}"));
            }
        }
    }
    if s.keep_dumps {
        let kept = dir.keep();
        println!("callgrind dumps kept in {}", kept.display());
    }
    let report = InstructionReport {
        machine: machine::machine_info(),
        settings: s,
        skipped,
        runs,
    };
    let table = table(&report);
    println!("\n{table}");
    if let Some(out) = out {
        let stamp = report.machine.unix_time;
        let path = report::write_json(&out, &format!("instructions-{stamp}.json"), &report)?;
        println!("results: {}", path.display());
        let md = format!(
            "<!-- written by `quicmesh bench instructions` at unix time {stamp}: {} requests of {} B over \
{} connections, {} MiB bulk -->\n\n{}",
            report.settings.requests,
            report.settings.payload,
            report.settings.connections,
            report.settings.bulk_mib,
            table.markdown()
        );
        std::fs::write(out.join("latest-instructions.md"), md)?;
    }
    Ok(InstructionOutcome::Done(Box::new(report)))
}

/// work | path | instructions per unit (both proxies) | client side | server side | / HAProxy
pub fn table(report: &InstructionReport) -> Table {
    let mut t = Table::new([
        "work",
        "path",
        "instructions / unit",
        "client proxy",
        "server proxy",
        "/ peer",
    ]);
    for r in &report.runs {
        let side = |suffix: &str| {
            r.per_proxy
                .iter()
                .find(|(name, _)| name.ends_with(suffix))
                .map_or("-".to_owned(), |(_, ir)| {
                    format!("{:.0}", *ir as f64 / r.units.max(1e-9))
                })
        };
        // The HAProxy pair of the same layer is the baseline.
        let peer = if r.target.is_l7() {
            Target::PeerHttp
        } else {
            Target::Peer
        };
        let base = report
            .runs
            .iter()
            .find(|x| x.target == peer && x.work == r.work)
            .map(|x| x.per_unit);
        t.row([
            if r.work == "bulk" {
                "per MiB".to_owned()
            } else {
                "per request".to_owned()
            },
            r.target.name().to_owned(),
            format!("{:.0}", r.per_unit),
            side("client"),
            side("server"),
            match base {
                Some(b) if r.target != peer => report::ratio(r.per_unit, b),
                _ => "-".into(),
            },
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_come_from_the_dump() {
        let dump = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nsummary: 0\nfn=main\n1 5\ntotals: 123456\n";
        assert_eq!(parse_totals(dump), Some(123_456));
        assert_eq!(parse_totals("events: Ir\n"), None);
    }
}
