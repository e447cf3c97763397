//! The harness, exercised as a user runs it but short: the smoke comparison (seconds, tiny rates), the
//! stall test that shows why open loop matters, and the loss scenario in shortened form (root only).
//! Real benchmark runs are never part of the test suite.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use quicmesh_bench::{
    client::Protocol,
    compare::{self, CompareEnv, CompareSettings},
    load::{self, LoadSpec, Mode},
    loss::{self, LossOutcome, LossSettings},
    server::{AppServer, StallPlan},
    topology::{Target, which},
};

fn bench_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_quicmesh-bench"))
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Every scenario runs against direct (and the HAProxy pair when haproxy is installed) without an error,
/// and the JSON, the Markdown tables and one plot per load scenario are written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_comparison_writes_json_table_and_plots() {
    quicmesh_transport::quic::install_provider();
    let have_haproxy = which("haproxy").is_some();
    if !have_haproxy {
        println!("haproxy not installed: the smoke run covers direct only");
    }
    let mut targets = if have_haproxy {
        vec![Target::Peer]
    } else {
        vec![]
    };
    // Without a ztunnel binary the ztunnel path is skipped with its reason, and the rest runs.
    let no_ztunnel = std::env::var_os(quicmesh_bench::ztunnel::ENV).is_none();
    if no_ztunnel {
        targets.push(Target::Ztunnel);
    }
    let mut settings = CompareSettings::smoke(targets);
    settings.duration = Duration::from_millis(250);
    let out = tempfile::tempdir().expect("tempdir");
    let env = CompareEnv {
        quicmesh_bin: None,
        bench_bin: bench_bin(),
        out: Some(out.path().to_path_buf()),
    };
    let report = compare::compare(settings, env)
        .await
        .expect("smoke comparison");
    if no_ztunnel {
        let why = report.skipped.get("ztunnel").expect("ztunnel skipped");
        assert!(why.contains("--ztunnel"), "{why}");
    }

    let paths: Vec<Target> = if have_haproxy {
        vec![Target::Direct, Target::Peer]
    } else {
        vec![Target::Direct]
    };
    // 1 rate, 5 protocols, 1 rr count, new connections, bulk = 9 scenarios per path.
    assert_eq!(report.runs.len(), 9 * paths.len(), "{:#?}", report.runs);
    for r in &report.runs {
        assert!(paths.contains(&r.target));
        if let Some(l) = &r.load {
            assert!(
                l.ok > 0,
                "{} on {:?}: no request succeeded",
                r.scenario,
                r.target
            );
            assert_eq!(
                l.error_count(),
                0,
                "{} on {:?}: {:?}",
                r.scenario,
                r.target,
                l.errors
            );
            assert!(l.latency_ms.p50 > 0.0 && l.latency_ms.p99 >= l.latency_ms.p50);
        } else {
            let b = r.bulk.expect("bulk figures");
            assert!(b.bytes > 0 && b.gbit_s > 0.0);
        }
        if r.target == Target::Peer {
            assert_eq!(r.proxies.len(), 2, "both HAProxy processes are measured");
            assert!(r.proxies.iter().all(|p| p.peak_rss_kib > 0));
        }
    }
    assert!(report.quic_ceiling.is_some_and(|c| c.gbit_s > 0.0));
    if have_haproxy {
        let m = report
            .memory
            .iter()
            .find(|m| m.target == Target::Peer)
            .expect("peer memory");
        assert_eq!(m.connections, 20);
        assert!(
            m.processes
                .iter()
                .all(|(_, idle, loaded)| *idle > 0 && *loaded > 0)
        );
    }

    let files: Vec<String> = std::fs::read_dir(out.path())
        .expect("results dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        files
            .iter()
            .any(|f| f.starts_with("compare-") && f.ends_with(".json")),
        "{files:?}"
    );
    assert_eq!(
        files.iter().filter(|f| f.ends_with(".svg")).count(),
        8,
        "{files:?}"
    );
    // A run with the ztunnel target keeps its own latest table.
    let latest = if no_ztunnel {
        "latest-ztunnel.md"
    } else {
        "latest.md"
    };
    let md = std::fs::read_to_string(out.path().join(latest)).expect("latest table");
    assert!(md.contains("| max-http1 req/s |"), "{md}");
    assert!(md.contains("| new-conns conn/s |"), "{md}");
}

/// Something of scenario `r` succeeded and nothing failed.
fn assert_all_succeeded(r: &compare::RunResult, l: &load::Summary) {
    assert!(
        l.ok > 0,
        "{} on {:?}: nothing succeeded",
        r.scenario,
        r.target
    );
    assert_eq!(
        l.error_count(),
        0,
        "{} on {:?}: {:?}",
        r.scenario,
        r.target,
        l.errors
    );
}

/// The L7 comparison in smoke form: the HTTP-aware quicmesh path (when a release `quicmesh` is built) and
/// the HAProxy `mode http` pair (when haproxy is installed) carry HTTP/1.1, HTTP/2 with several streams per
/// connection, and gRPC without an error, run no raw-TCP scenario, and `latest-l7.md` carries the goals
/// table. Skips with a printed reason when neither path can start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_smoke_comparison() {
    quicmesh_transport::quic::install_provider();
    let quicmesh = quicmesh_bench::topology::find_quicmesh(None);
    let have_haproxy = which("haproxy").is_some();
    let mut targets = Vec::new();
    match &quicmesh {
        Some(_) => targets.push(Target::QuicmeshL7),
        None => println!(
            "no release quicmesh binary (cargo build --release -p quicmesh): quicmesh-l7 not run"
        ),
    }
    if have_haproxy {
        targets.push(Target::PeerHttp);
    } else {
        println!("haproxy not installed: peer-haproxy-http not run");
    }
    if targets.is_empty() {
        println!("skipped: neither L7 path can start here");
        return;
    }
    let mut settings = CompareSettings::smoke(targets.clone());
    settings.duration = Duration::from_millis(250);
    settings.protocols = vec![
        Protocol::Tcp,
        Protocol::Http1,
        Protocol::Http2,
        Protocol::GrpcUnary,
    ];
    settings.latency_protocols = vec![Protocol::Http2];
    settings.streams = 4;
    settings.quic_ceiling = false;
    let out = tempfile::tempdir().expect("tempdir");
    let env = CompareEnv {
        quicmesh_bin: quicmesh,
        bench_bin: bench_bin(),
        out: Some(out.path().to_path_buf()),
    };
    let report = compare::compare(settings, env)
        .await
        .expect("L7 smoke comparison");
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    for t in &targets {
        let ids: Vec<&str> = report
            .runs
            .iter()
            .filter(|r| r.target == *t)
            .map(|r| r.scenario.as_str())
            .collect();
        assert_eq!(
            ids,
            [
                "latency-http2-200rps",
                "max-http1",
                "max-http2",
                "max-grpc-unary"
            ],
            "{t:?}: HTTP scenarios only"
        );
    }
    for r in report.runs.iter().filter(|r| r.target.is_l7()) {
        let l = r.load.as_ref().expect("load figures");
        assert_all_succeeded(r, l);
        assert_eq!(
            r.proxies.len(),
            2,
            "both proxies of {:?} are measured",
            r.target
        );
        assert!(r.proxy_cpu_us_per_request.is_some_and(|c| c > 0.0));
        if r.scenario == "max-http2" {
            assert_eq!(l.spec.streams, 4);
        }
    }
    let md = std::fs::read_to_string(out.path().join("latest-l7.md")).expect("latest-l7.md");
    assert!(
        !out.path().join("latest.md").exists(),
        "the opaque table is left alone"
    );
    if targets.len() == 2 {
        assert!(md.contains("| max-http2 req/s ≥ 1.2x |"), "{md}");
        assert!(md.contains("quicmesh-l7/peer-http"), "{md}");
    }
}

/// The policy comparison in smoke form: `quicmesh-l7` and `quicmesh-l7-policy` (100 authorization rules
/// the bench client passes only at the last, a rate limit that never triggers) in one run, every request
/// answered (a denial or a 429 would count as an error), and `latest-policy.md` with the goals table.
/// Skips with a printed reason without a release `quicmesh`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_smoke_comparison() {
    quicmesh_transport::quic::install_provider();
    let Some(quicmesh) = quicmesh_bench::topology::find_quicmesh(None) else {
        println!("skipped: no release quicmesh binary (cargo build --release -p quicmesh)");
        return;
    };
    let targets = vec![Target::QuicmeshL7, Target::QuicmeshL7Policy];
    let mut settings = CompareSettings::smoke(targets.clone());
    settings.duration = Duration::from_millis(250);
    settings.protocols = vec![Protocol::Http1, Protocol::GrpcUnary];
    settings.rr_connections = vec![];
    settings.quic_ceiling = false;
    let out = tempfile::tempdir().expect("tempdir");
    let env = CompareEnv {
        quicmesh_bin: Some(quicmesh),
        bench_bin: bench_bin(),
        out: Some(out.path().to_path_buf()),
    };
    let report = compare::compare(settings, env)
        .await
        .expect("policy smoke comparison");
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    for r in report.runs.iter().filter(|r| r.target != Target::Direct) {
        let Some(l) = r.load.as_ref() else { continue };
        assert_all_succeeded(r, l);
    }
    let md =
        std::fs::read_to_string(out.path().join("latest-policy.md")).expect("latest-policy.md");
    assert!(md.contains("| max-http1 req/s ≥ 0.95x |"), "{md}");
    assert!(md.contains("quicmesh-l7-policy/quicmesh-l7"), "{md}");
}

/// Open loop catches a 1 s stall inside a 10 s run (p99 near a second); closed loop, on the same kind of
/// server, hides it (p99 stays small, only the max shows it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_catches_a_stall_that_closed_loop_hides() {
    let stall = Some(StallPlan {
        after: Duration::from_secs(4),
        pause: Duration::from_secs(1),
    });
    let open_server = AppServer::spawn(loopback(), stall).await.expect("server");
    let closed_server = AppServer::spawn(loopback(), stall).await.expect("server");
    let run = Duration::from_secs(10);
    let mut open = LoadSpec::new(Protocol::Tcp, Mode::Open { rate: 200.0 }, 4, run);
    open.payload = 64;
    let mut closed = LoadSpec::new(Protocol::Tcp, Mode::Closed, 2, run);
    closed.payload = 64;
    let (o, c) = tokio::join!(
        load::run(&open, open_server.addr(), async {}),
        load::run(&closed, closed_server.addr(), async {}),
    );
    let (o, c) = (
        o.expect("open loop").summary(),
        c.expect("closed loop").summary(),
    );
    println!("open:   {:?} ({} requests)", o.latency_ms, o.ok);
    println!("closed: {:?} ({} requests)", c.latency_ms, c.ok);
    assert_eq!(
        o.error_count() + c.error_count(),
        0,
        "{:?} {:?}",
        o.errors,
        c.errors
    );
    assert!(o.ok >= 1900, "open loop sent its schedule: {}", o.ok);
    assert!(
        (700.0..=1300.0).contains(&o.latency_ms.p99),
        "open-loop p99 should be about the 1 s stall: {:?}",
        o.latency_ms
    );
    assert!(o.latency_ms.p50 < 50.0, "{:?}", o.latency_ms);
    assert!(
        c.latency_ms.max >= 900.0,
        "the closed loop met the stall: {:?}",
        c.latency_ms
    );
    assert!(
        c.latency_ms.p99 < 100.0,
        "closed-loop p99 hides the stall: {:?}",
        c.latency_ms
    );
}

/// The loss scenario in shortened form: two namespaces, 0% and 5% loss, direct and (when installed) the
/// HAProxy pair. Skips with a printed reason when not root or a tool is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_scenario_shortened() {
    if let Some(why) = loss::missing_prerequisite() {
        println!("skipped: {why}");
        return;
    }
    let have_haproxy = which("haproxy").is_some();
    let settings = LossSettings {
        loss_percent: vec![0, 5],
        rate: 200.0,
        connections: 8,
        streams: 1,
        duration: Duration::from_secs(2),
        protocol: Protocol::Http1,
        targets: if have_haproxy {
            vec![Target::Peer]
        } else {
            vec![]
        },
        haproxy_threads: 1,
        bulk_duration: Duration::from_millis(500),
        quic_toml: String::new(),
        ztunnel_bin: None,
    };
    let outcome = loss::run(settings, None, bench_bin(), None)
        .await
        .expect("loss scenario");
    let LossOutcome::Done(report) = outcome else {
        panic!("prerequisites were checked above");
    };
    let paths = if have_haproxy { 2 } else { 1 };
    assert_eq!(report.runs.len(), 2 * paths, "{:#?}", report.runs);
    for r in &report.runs {
        assert!(r.summary.ok > 0, "{r:?}");
        // Bulk under the same loss ran on every path (all carry raw TCP) and moved bytes.
        assert!(r.bulk.is_some_and(|b| b.bytes > 0), "{r:?}");
        if r.loss_percent == 0 {
            assert_eq!(r.summary.error_count(), 0, "{r:?}");
            assert!(r.summary.ok >= 390, "{r:?}");
        }
    }
}

/// `controller-bench --propagation` in small: 20 watchers, 3 rounds; its JSON line says every round
/// reached all of them, with figures that are times.
/// Runs `controller-bench ARGS` within `limit`; its output and its last line (the JSON figures).
/// Fails the test when it exits unsuccessfully.
async fn controller_bench(args: &[&str], limit: Duration) -> (String, serde_json::Value) {
    let out = tokio::time::timeout(
        limit,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_controller-bench"))
            .args(args)
            .output(),
    )
    .await
    .expect("in time")
    .expect("run controller-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().expect("output");
    let v = serde_json::from_str(last).expect("json line");
    (stdout, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_bench_propagation_smoke() {
    let (stdout, v) = controller_bench(
        &["--propagation", "--watchers", "20", "--rounds", "3"],
        Duration::from_secs(25),
    )
    .await;
    assert_eq!(v["bench"], "propagation", "{v}");
    assert_eq!(v["watchers"], 20, "{v}");
    let p50 = v["all_watchers_p50_ms"].as_f64().expect("p50");
    let p99 = v["all_watchers_p99_ms"].as_f64().expect("p99");
    assert!(p50 > 0.0 && p99 >= p50, "{v}");
    assert!(
        !stdout.contains("certify:"),
        "no issuance in propagation mode: {stdout}"
    );
}

/// `controller-bench --reporters` in small: 20 proxies of 10 services reporting every second for
/// 4 s; the bench itself fails unless `GetStats` holds exactly what they sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_bench_reporters_smoke() {
    let (_, v) = controller_bench(
        &[
            "--reporters",
            "20",
            "--report-services",
            "10",
            "--report-interval",
            "1s",
            "--report-seconds",
            "4",
            "--report-idle-seconds",
            "1",
        ],
        Duration::from_secs(40),
    )
    .await;
    assert_eq!(v["bench"], "reporters", "{v}");
    assert_eq!(v["totals_match"], true, "{v}");
    assert_eq!(v["reports_refused"], 0, "{v}");
    assert_eq!(
        v["edges"], 60,
        "10 services calling 3 each, counted at both ends: {v}"
    );
    // Each proxy reports about once a second for 4 s.
    let reports = v["reports"].as_u64().expect("reports");
    assert!((60..=100).contains(&reports), "{v}");
    assert!(
        v["cpu_per_report_us"].as_f64().is_some_and(|c| c >= 0.0),
        "{v}"
    );
}
