//! Packet loss: the client side (load generator, client-side proxy) and the server side (server-side
//! proxy, application) in two network namespaces joined by a veth pair, segmentation offloads off so a
//! dropped packet is one segment, and nftables dropping a share of the packets arriving on each veth end
//! (`numgen random mod 100 < N`). Loss is switched on only after every connection is up, then many
//! concurrent request/response exchanges run at a fixed rate (open loop): with quicmesh they are streams
//! of one QUIC connection, with the TCP paths each is its own TCP connection. With `--protocol http2
//! --connections 1 --streams N` the app instead multiplexes N requests over one HTTP/2 connection: only
//! the L7 quicmesh path then gives each request its own stream (and its own loss recovery); every other
//! path carries that connection as one ordered byte stream.
//!
//! Root only: anything missing (root, `ip`, `nft`, `ethtool`) makes the scenario skip with the reason.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path as FsPath, PathBuf},
    process::Stdio,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::Command,
};

use crate::{
    bulk::BulkOutcome,
    certs,
    client::Protocol,
    load::Summary,
    machine::{self, MachineInfo},
    report::{self, Table, ms, ratio},
    topology::{self, Path, Placement, Target, which},
};

/// Settings of the loss scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LossSettings {
    /// Loss levels, percent of arriving packets dropped in each direction.
    pub loss_percent: Vec<u32>,
    /// Open-loop rate, req/s.
    pub rate: f64,
    /// Concurrent connections.
    pub connections: usize,
    /// Concurrent requests per connection where the protocol multiplexes (HTTP/2, gRPC unary).
    #[serde(default = "one")]
    pub streams: usize,
    /// Measured length of each run.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Protocol of the exchanges.
    pub protocol: Protocol,
    /// Paths besides direct.
    pub targets: Vec<Target>,
    /// `nbthread` of each HAProxy.
    pub haproxy_threads: usize,
    /// Length of the bulk transfer (one TCP connection into the sink) at each loss level on each path
    /// that carries raw TCP; zero skips it.
    #[serde(default, with = "humantime_serde")]
    pub bulk_duration: Duration,
    /// `[quic]` lines given to the quicmesh proxies (empty: their defaults).
    #[serde(default)]
    pub quic_toml: String,
    /// The ztunnel binary given with `--ztunnel` (else `QUICMESH_BENCH_ZTUNNEL`), for the `ztunnel`
    /// target.
    #[serde(default)]
    pub ztunnel_bin: Option<PathBuf>,
}

fn one() -> usize {
    1
}

/// One (loss level, path) run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LossRun {
    /// Percent dropped.
    pub loss_percent: u32,
    /// Path.
    pub target: Target,
    /// Load figures.
    pub summary: Summary,
    /// Bulk transfer under the same loss, when the path carries raw TCP and bulk runs were asked for.
    #[serde(default)]
    pub bulk: Option<BulkOutcome>,
}

/// The JSON file of the loss scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LossReport {
    /// Machine.
    pub machine: MachineInfo,
    /// Settings.
    pub settings: LossSettings,
    /// Paths that could not be set up, and why.
    pub skipped: BTreeMap<String, String>,
    /// Every run.
    pub runs: Vec<LossRun>,
}

/// Ran, or skipped with a reason.
pub type LossOutcome = report::Outcome<LossReport>;

pub(crate) const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 233, 0, 1);
pub(crate) const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 233, 0, 2);
pub(crate) const APP_PORT: u16 = 7000;

/// Why the scenario cannot run here, if it cannot.
pub fn missing_prerequisite() -> Option<String> {
    if !machine::is_root() {
        return Some("not root (network namespaces and nftables need root)".into());
    }
    for tool in ["ip", "nft", "ethtool"] {
        if which(tool).is_none() {
            return Some(format!(
                "`{tool}` not found (Debian: apt-get install -y iproute2 nftables ethtool)"
            ));
        }
    }
    None
}

async fn sh(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| anyhow::anyhow!("cannot run {program}: {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

async fn nft(ns: &str, script: &str) -> anyhow::Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    // A write that fails (nft or `ip netns exec` exited early) is reported with what they printed.
    let written = match child.stdin.take() {
        Some(mut stdin) => stdin.write_all(script.as_bytes()).await,
        None => Ok(()),
    };
    let out = child.wait_with_output().await?;
    anyhow::ensure!(
        out.status.success() && written.is_ok(),
        "nft in {ns} failed ({}{}): {}",
        out.status,
        written
            .err()
            .map(|e| format!(", its input: {e}"))
            .unwrap_or_default(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The two namespaces and their veth pair; removed on drop.
pub(crate) struct Netns {
    pub(crate) client: String,
    pub(crate) server: String,
    client_if: String,
    server_if: String,
}

impl Netns {
    pub(crate) async fn create() -> anyhow::Result<Self> {
        // Unique per process and per call: two scenarios of one process (tests run the loss and ingress
        // scenarios side by side) must not remove each other's namespaces as stale.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 100;
        let id = format!("{}-{n}", std::process::id() % 100_000);
        let n = Self {
            client: format!("qmb-c-{id}"),
            server: format!("qmb-s-{id}"),
            client_if: format!("qmbc{id}"),
            server_if: format!("qmbs{id}"),
        };
        n.remove_sync();
        sh("ip", &["netns", "add", &n.client]).await?;
        sh("ip", &["netns", "add", &n.server]).await?;
        sh(
            "ip",
            &[
                "link",
                "add",
                &n.client_if,
                "type",
                "veth",
                "peer",
                "name",
                &n.server_if,
            ],
        )
        .await?;
        for (ns, ifname, ip) in [
            (&n.client, &n.client_if, CLIENT_IP),
            (&n.server, &n.server_if, SERVER_IP),
        ] {
            sh("ip", &["link", "set", ifname, "netns", ns]).await?;
            sh(
                "ip",
                &["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", ifname],
            )
            .await?;
            sh("ip", &["-n", ns, "link", "set", ifname, "up"]).await?;
            sh("ip", &["-n", ns, "link", "set", "lo", "up"]).await?;
            // One dropped packet must be one segment, not a 64 KB super-packet.
            sh(
                "ip",
                &[
                    "netns", "exec", ns, "ethtool", "-K", ifname, "gso", "off", "gro", "off",
                    "tso", "off",
                ],
            )
            .await?;
            nft(
                ns,
                "table inet qmbloss {\n  chain input {\n    type filter hook input priority 0; policy accept;\n  }\n}\n",
            )
            .await?;
        }
        Ok(n)
    }

    /// Drops `percent` of packets arriving on each veth end (0: none).
    pub(crate) async fn set_loss(&self, percent: u32) -> anyhow::Result<()> {
        for (ns, ifname) in [
            (&self.client, &self.client_if),
            (&self.server, &self.server_if),
        ] {
            let mut script = "flush chain inet qmbloss input\n".to_owned();
            if percent > 0 {
                script.push_str(&format!(
                    "add rule inet qmbloss input iifname \"{ifname}\" numgen random mod 100 < {percent} drop\n"
                ));
            }
            nft(ns, &script).await?;
        }
        Ok(())
    }

    fn remove_sync(&self) {
        for ns in [&self.client, &self.server] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.remove_sync();
    }
}

/// A server process of the harness inside a namespace.
pub(crate) async fn serve_in(
    ns: &str,
    bench_bin: &FsPath,
    listen: SocketAddr,
) -> anyhow::Result<tokio::process::Child> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(bench_bin)
        .args([
            "bench",
            "serve",
            "--listen",
            &listen.to_string(),
            "--max-time",
            "1h",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("bench server: no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .map_err(|_| anyhow::anyhow!("bench server in {ns} not ready within 10 s"))??
        .ok_or_else(|| anyhow::anyhow!("bench server in {ns} exited before it was ready"))?;
    anyhow::ensure!(
        line.contains("\"ready\""),
        "bench server: unexpected first line {line}"
    );
    Ok(child)
}

/// One load run in the client namespace; loss switched on once its connections are up.
async fn load_in(
    net: &Netns,
    bench_bin: &FsPath,
    entry: SocketAddr,
    s: &LossSettings,
    percent: u32,
) -> anyhow::Result<Summary> {
    let request_timeout = Duration::from_secs(30);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &net.client])
        .arg(bench_bin)
        .args([
            "bench",
            "load",
            "--gate-stdin",
            "--json",
            "--target",
            &entry.to_string(),
        ])
        .args([
            "--protocol",
            s.protocol.name(),
            "--rate",
            &s.rate.to_string(),
        ])
        .args(["--connections", &s.connections.to_string()])
        .args(["--streams", &s.streams.max(1).to_string()])
        .arg("--duration")
        .arg(format!("{}ms", s.duration.as_millis()))
        .arg("--timeout")
        .arg(format!("{}ms", request_timeout.as_millis()));
    gated(
        net,
        cmd,
        percent,
        s.duration + request_timeout + Duration::from_secs(30),
    )
    .await
}

/// Runs a gated load client (`--gate-stdin`: it connects, prints `{"event":"connected"}` and waits
/// for a line) in the client namespace: loss is switched on once it is connected and off when it is
/// done (or `bound` passed); its one JSON result line is returned.
pub(crate) async fn gated<T: serde::de::DeserializeOwned>(
    net: &Netns,
    mut cmd: Command,
    percent: u32,
    bound: Duration,
) -> anyhow::Result<T> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("load: no stdin"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("load: no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let result = tokio::time::timeout(bound, async {
        let first = lines
            .next_line()
            .await?
            .ok_or_else(|| anyhow::anyhow!("load client exited before connecting"))?;
        anyhow::ensure!(
            first.contains("\"connected\""),
            "load client: unexpected line {first}"
        );
        net.set_loss(percent).await?;
        stdin.write_all(b"go\n").await?;
        let line = lines
            .next_line()
            .await?
            .ok_or_else(|| anyhow::anyhow!("load client exited without a result"))?;
        Ok(serde_json::from_str::<T>(&line)?)
    })
    .await;
    net.set_loss(0).await?;
    let result =
        result.map_err(|_| anyhow::anyhow!("load run did not finish within {bound:?}"))??;
    let _ = child.wait().await;
    Ok(result)
}

/// One bulk transfer from the client namespace through `entry` into the sink, with `percent` loss each
/// way for its whole length (connection setup included: a TCP path pays its handshake under loss, the
/// quicmesh path reuses its established QUIC connection, as each would in production).
async fn bulk_in(
    net: &Netns,
    bench_bin: &FsPath,
    entry: SocketAddr,
    duration: Duration,
    percent: u32,
) -> anyhow::Result<BulkOutcome> {
    net.set_loss(percent).await?;
    let out = tokio::time::timeout(
        duration + Duration::from_secs(60),
        Command::new("ip")
            .args(["netns", "exec", &net.client])
            .arg(bench_bin)
            .args(["bench", "bulk", "--json", "--target", &entry.to_string()])
            .arg("--duration")
            .arg(format!("{}ms", duration.as_millis()))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await;
    net.set_loss(0).await?;
    let out = out.map_err(|_| anyhow::anyhow!("bulk run through {entry} did not finish"))??;
    anyhow::ensure!(
        out.status.success(),
        "bulk run through {entry} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Runs the loss scenario (or says why it cannot), prints its table, writes JSON and plots into `out`.
pub async fn run(
    s: LossSettings,
    quicmesh_bin: Option<PathBuf>,
    bench_bin: PathBuf,
    out: Option<PathBuf>,
) -> anyhow::Result<LossOutcome> {
    if let Some(why) = missing_prerequisite() {
        return Ok(LossOutcome::Skipped(why));
    }
    let dir = tempfile::Builder::new()
        .prefix("quicmesh-bench-loss-")
        .tempdir()?;
    let certs = certs::generate(dir.path())?;
    let ztunnel = crate::ztunnel::resolve_here(s.ztunnel_bin.as_deref());
    let net = Netns::create().await?;
    let app = SocketAddr::new(IpAddr::V4(SERVER_IP), APP_PORT);
    let _server = serve_in(&net.server, &bench_bin, app).await?;
    let placement = Placement {
        client_ns: Some(net.client.clone()),
        server_ns: Some(net.server.clone()),
        server_ip: IpAddr::V4(SERVER_IP),
        app,
        bench_bin: bench_bin.clone(),
        haproxy_threads: s.haproxy_threads,
        quic_toml: s.quic_toml.clone(),
        proxy_toml: String::new(),
        wrapper: Vec::new(),
        ztunnel: ztunnel.clone(),
    };
    let mut skipped = BTreeMap::new();
    let mut paths = vec![Path::direct(&placement)];
    for t in s.targets.iter().copied().filter(|t| *t != Target::Direct) {
        let p = topology::start(t, &placement, &certs, quicmesh_bin.as_deref(), dir.path()).await;
        match p {
            Ok(p) => paths.push(p),
            Err(e) => {
                println!("skipping {}: {e:#}", t.name());
                skipped.insert(t.name().to_owned(), format!("{e:#}"));
            }
        }
    }
    let mut runs = Vec::new();
    for (li, &percent) in s.loss_percent.iter().enumerate() {
        let n = paths.len();
        for k in 0..n {
            let path = &mut paths[(k + li) % n];
            let Some(entry) = path.entry_for(s.protocol) else {
                continue;
            };
            path.check_alive()?;
            tracing::info!(loss = percent, target_path = path.target.name(), "loss run");
            let summary = load_in(&net, &bench_bin, entry, &s, percent).await?;
            let bulk = match path.entry_for(Protocol::Tcp) {
                Some(tcp) if !s.bulk_duration.is_zero() => {
                    path.check_alive()?;
                    tracing::info!(loss = percent, target_path = path.target.name(), "bulk run");
                    Some(bulk_in(&net, &bench_bin, tcp, s.bulk_duration, percent).await?)
                }
                _ => None,
            };
            runs.push(LossRun {
                loss_percent: percent,
                target: path.target,
                summary,
                bulk,
            });
        }
    }
    drop(paths);
    runs.sort_by_key(|r| (r.loss_percent, r.target));
    let report = LossReport {
        machine: machine::machine_info(),
        settings: s,
        skipped,
        runs,
    };
    let table = table(&report);
    println!("\n{table}");
    let bulk = bulk_table(&report);
    if let Some(b) = &bulk {
        println!("\n{b}");
    }
    if let Some(out) = out {
        let stamp = report.machine.unix_time;
        let path = report::write_json(&out, &format!("loss-{stamp}.json"), &report)?;
        println!("results: {}", path.display());
        for &percent in &report.settings.loss_percent {
            let series: Vec<report::Series> = report
                .runs
                .iter()
                .filter(|r| r.loss_percent == percent)
                .map(|r| (r.target.name().to_owned(), r.summary.curve.clone()))
                .collect();
            let title = format!(
                "{} at {} req/s, {} connections × {} streams, {percent}% loss",
                report.settings.protocol.name(),
                report.settings.rate,
                report.settings.connections,
                report.settings.streams.max(1)
            );
            let p = out.join(format!("loss-{stamp}-{percent}pct.svg"));
            std::fs::write(&p, report::percentile_svg(&title, &series))?;
            println!("plot: {}", p.display());
        }
        // The L7 and ztunnel comparisons keep their own latest tables, so they do not replace the opaque
        // one.
        let l7 = report.settings.targets.iter().any(|t| t.is_l7());
        let name = if l7 {
            "latest-l7-loss.md"
        } else if report.settings.targets.contains(&Target::Ztunnel) {
            "latest-ztunnel-loss.md"
        } else {
            "latest-loss.md"
        };
        let mut md = format!(
            "<!-- written by `quicmesh bench loss` at unix time {stamp} on {} ({} cores): {} at {} req/s, \
{} connections × {} streams, {} per run -->\n\n{}",
            report.machine.cpu,
            report.machine.cores,
            report.settings.protocol.name(),
            report.settings.rate,
            report.settings.connections,
            report.settings.streams.max(1),
            humantime::format_duration(report.settings.duration),
            table.markdown()
        );
        if let Some(b) = &bulk {
            md.push('\n');
            md.push_str(&b.markdown());
        }
        if let Some(goals) = l7_goals(&report) {
            md.push('\n');
            md.push_str(&goals.markdown());
        }
        std::fs::write(out.join(name), md)?;
    }
    Ok(LossOutcome::Done(Box::new(report)))
}

/// The quicmesh path the last column compares against: the L7 one when it ran, else the opaque one.
fn reference(report: &LossReport) -> Target {
    if report.runs.iter().any(|r| r.target == Target::QuicmeshL7) {
        Target::QuicmeshL7
    } else {
        Target::Quicmesh
    }
}

/// loss | path | p50 | p99 | p99.9 | max | errors | req/s | p99 vs direct | quicmesh p99 vs this
pub fn table(report: &LossReport) -> Table {
    let reference = reference(report);
    let mut t = Table::new([
        "loss".to_owned(),
        "path".to_owned(),
        "req/s".to_owned(),
        "p50".to_owned(),
        "p99".to_owned(),
        "p99.9".to_owned(),
        "max".to_owned(),
        "errors".to_owned(),
        "p50/direct".to_owned(),
        "p99/direct".to_owned(),
        format!("{} p99 / this", reference.name()),
    ]);
    for r in &report.runs {
        let same = |tg: Target| {
            report
                .runs
                .iter()
                .find(|x| x.loss_percent == r.loss_percent && x.target == tg)
                .map(|x| x.summary.latency_ms)
        };
        let d = same(Target::Direct);
        let q = same(reference);
        let l = r.summary.latency_ms;
        t.row([
            format!("{}%", r.loss_percent),
            r.target.name().to_owned(),
            format!("{:.0}", r.summary.throughput_rps),
            ms(l.p50),
            ms(l.p99),
            ms(l.p999),
            ms(l.max),
            r.summary.error_count().to_string(),
            d.map_or("-".into(), |d| ratio(l.p50, d.p50)),
            d.map_or("-".into(), |d| ratio(l.p99, d.p99)),
            match (q, r.target) {
                (Some(q), tg) if tg != reference => ratio(q.p99, l.p99),
                _ => "-".into(),
            },
        ]);
    }
    t
}

/// loss | path | bulk Gbit/s | /direct | this / peer-haproxy: bulk under loss, one TCP connection, when
/// any run measured it.
pub fn bulk_table(report: &LossReport) -> Option<Table> {
    let mut t = Table::new(["loss", "path", "bulk Gbit/s", "/ direct", "/ peer-haproxy"]);
    let gbit = |percent: u32, tg: Target| {
        report
            .runs
            .iter()
            .find(|x| x.loss_percent == percent && x.target == tg)
            .and_then(|x| x.bulk)
            .map(|b| b.gbit_s)
    };
    for r in &report.runs {
        let Some(b) = r.bulk else { continue };
        let vs = |tg: Target| match gbit(r.loss_percent, tg) {
            Some(base) if tg != r.target => ratio(b.gbit_s, base),
            _ => "-".into(),
        };
        t.row([
            format!("{}%", r.loss_percent),
            r.target.name().to_owned(),
            format!("{:.2}", b.gbit_s),
            vs(Target::Direct),
            vs(Target::Peer),
        ]);
    }
    (!t.is_empty()).then_some(t)
}

/// The L7 loss goals (p99 ≤ 5 ms at 1% loss, ≤ 10 ms at 5%, no errors) against the `quicmesh-l7` runs,
/// when there are any.
pub fn l7_goals(report: &LossReport) -> Option<Table> {
    let mut t = Table::new(["goal", "measured", "met"]);
    for r in report
        .runs
        .iter()
        .filter(|r| r.target == Target::QuicmeshL7)
    {
        let limit_ms = match r.loss_percent {
            0 => continue,
            1 => 5.0,
            _ => 10.0,
        };
        let p99 = r.summary.latency_ms.p99;
        let errors = r.summary.error_count();
        t.row([
            format!(
                "quicmesh-l7 at {}% loss: p99 ≤ {limit_ms} ms, 0 errors",
                r.loss_percent
            ),
            format!("p99 {}, {errors} errors", ms(p99)),
            if p99 <= limit_ms && errors == 0 {
                "yes".to_owned()
            } else {
                format!("no ({})", ratio(p99, limit_ms))
            },
        ]);
    }
    (!t.is_empty()).then_some(t)
}
