//! The benchmark harness against the real `quicmesh` binary, short: the smoke comparison through a
//! quicmesh sidecar pair, and the loss scenario in shortened form (root only; skips with a reason
//! otherwise). The harness's own tests (direct, HAProxy, the stall test) live in `bench/tests/`.

use std::{path::PathBuf, time::Duration};

use quicmesh_bench::{
    client::Protocol,
    compare::{self, CompareEnv, CompareSettings},
    instructions::{self, InstructionOutcome, InstructionSettings},
    loss::{self, LossOutcome, LossSettings},
    topology::Target,
};

fn quicmesh() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_quicmesh"))
}

/// Every scenario of the comparison runs through two quicmesh sidecars without an error, both proxy
/// processes are measured, and the quicmesh column of the ratio table is filled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_smoke_through_quicmesh() {
    quicmesh_transport::quic::install_provider();
    let mut settings = CompareSettings::smoke(vec![Target::Quicmesh]);
    settings.duration = Duration::from_millis(250);
    settings.quic_ceiling = false;
    let env = CompareEnv {
        quicmesh_bin: Some(quicmesh()),
        bench_bin: quicmesh(),
        out: None,
    };
    let report = compare::compare(settings, env)
        .await
        .expect("smoke comparison");
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    let runs: Vec<_> = report
        .runs
        .iter()
        .filter(|r| r.target == Target::Quicmesh)
        .collect();
    assert_eq!(runs.len(), 9, "{:#?}", report.runs);
    for r in runs {
        if let Some(l) = &r.load {
            assert!(l.ok > 0, "{}: nothing got through", r.scenario);
            assert_eq!(l.error_count(), 0, "{}: {:?}", r.scenario, l.errors);
        } else {
            assert!(r.bulk.is_some_and(|b| b.bytes > 0), "{}", r.scenario);
        }
        assert_eq!(r.proxies.len(), 2);
        assert!(r.proxies.iter().all(|p| p.peak_rss_kib > 0));
    }
    let m = report
        .memory
        .iter()
        .find(|m| m.target == Target::Quicmesh)
        .expect("memory figure");
    assert_eq!(
        m.connections, 20,
        "every connection opened through the tunnel"
    );
    let (_, ratios) = compare::tables(&report);
    assert!(ratios.to_string().contains("max-http1 req/s"));
}

/// The loss scenario, shortened: 0% and 5% loss between two network namespaces, direct and quicmesh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_loss_shortened_through_quicmesh() {
    if let Some(why) = loss::missing_prerequisite() {
        println!("skipped: {why}");
        return;
    }
    let settings = LossSettings {
        loss_percent: vec![0, 5],
        rate: 200.0,
        connections: 16,
        streams: 1,
        duration: Duration::from_secs(2),
        protocol: Protocol::Http1,
        targets: vec![Target::Quicmesh],
        haproxy_threads: 1,
        bulk_duration: Duration::from_secs(1),
        quic_toml: String::new(),
        ztunnel_bin: None,
    };
    let outcome = loss::run(settings, Some(quicmesh()), quicmesh(), None)
        .await
        .expect("loss scenario");
    let LossOutcome::Done(report) = outcome else {
        panic!("prerequisites were checked above");
    };
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    assert_eq!(report.runs.len(), 4, "{:#?}", report.runs);
    for r in &report.runs {
        assert!(r.summary.ok > 0, "{r:?}");
        // Bulk under the same loss ran on every path (all carry raw TCP) and moved bytes.
        assert!(r.bulk.is_some_and(|b| b.bytes > 0), "{r:?}");
        if r.loss_percent == 0 {
            assert_eq!(r.summary.error_count(), 0, "{r:?}");
        }
    }
}

/// The ingress scenario, shortened: quicmesh's HTTP/3 gateway and an HAProxy HTTP/2-over-TLS ingress
/// loaded from another network namespace at 0% and 5% loss; both answer, none fails without loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_ingress_shortened_h3_against_haproxy_h2() {
    use quicmesh_bench::ingress::{self, Edge, IngressSettings};
    if let Some(why) = loss::missing_prerequisite() {
        println!("skipped: {why}");
        return;
    }
    let settings = IngressSettings {
        loss_percent: vec![0, 5],
        connections: 2,
        streams: 4,
        payload: 1024,
        duration: Duration::from_secs(2),
        haproxy_threads: 1,
    };
    let outcome = ingress::run(settings, Some(quicmesh()), quicmesh(), None)
        .await
        .expect("ingress scenario");
    let quicmesh_bench::report::Outcome::Done(report) = outcome else {
        panic!("prerequisites were checked above");
    };
    let haproxy = quicmesh_bench::topology::which("haproxy").is_some();
    if !haproxy {
        println!("haproxy not installed: only the quicmesh ingress ran");
    }
    let expected = if haproxy { 4 } else { 2 };
    assert_eq!(
        report.runs.len(),
        expected,
        "{:#?} {:?}",
        report.runs,
        report.skipped
    );
    for r in &report.runs {
        assert!(r.summary.requests > 0, "{r:?}");
        if r.loss_percent == 0 {
            assert_eq!(r.summary.errors, 0, "{r:?}");
        }
    }
    assert!(report.runs.iter().any(|r| r.edge == Edge::QuicmeshH3));
}

/// `bench instructions` in small: both quicmesh proxies run under callgrind, the counts of a few requests
/// and of a 1 MiB transfer come back from their dumps, and they are plausible: more than a few thousand
/// instructions per request (a tunneled exchange is at least that), and per MiB more than the bytes
/// themselves (every byte is encrypted and decrypted). Skips without valgrind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_instructions_counts_both_proxies() {
    if let Some(why) = instructions::missing_prerequisite() {
        println!("skipped: {why}");
        return;
    }
    let settings = InstructionSettings {
        targets: vec![Target::Quicmesh],
        requests: 50,
        l7_protocol: Protocol::Http1,
        streams: 1,
        connections: 2,
        payload: 128,
        bulk_mib: 1,
        keep_dumps: false,
        quic_toml: String::new(),
        tracing_percent: None,
    };
    let outcome = instructions::run(settings.clone(), Some(quicmesh()), quicmesh(), None)
        .await
        .expect("instruction count");
    let InstructionOutcome::Done(report) = outcome else {
        panic!("prerequisites were checked above");
    };
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    let [requests, bulk] = &report.runs[..] else {
        panic!("want a request run and a bulk run: {:#?}", report.runs);
    };
    assert_eq!(requests.work, "requests");
    assert!(requests.units >= 50.0, "{requests:?}");
    assert_eq!(requests.per_proxy.len(), 2, "{requests:?}");
    assert!(requests.per_unit > 5_000.0, "{requests:?}");
    assert_eq!(bulk.work, "bulk");
    assert!(bulk.per_unit > f64::from(1 << 20), "{bulk:?}");

    // The L7 path with every request traced: the spans reach the harness's OTLP collector.
    let traced = InstructionSettings {
        targets: vec![Target::QuicmeshL7],
        tracing_percent: Some(100),
        ..settings
    };
    let InstructionOutcome::Done(report) =
        instructions::run(traced, Some(quicmesh()), quicmesh(), None)
            .await
            .expect("instruction count, traced")
    else {
        panic!("prerequisites were checked above");
    };
    let [requests] = &report.runs[..] else {
        panic!("want one request run: {:#?}", report.runs);
    };
    assert!(requests.spans > Some(0), "{requests:?}");
}
