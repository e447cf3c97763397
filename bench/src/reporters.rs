//! `controller-bench --reporters N`: the controller's memory and CPU while N proxies send it traffic
//! reports (`ProxyApi.Report`), and a check that `Admin.GetStats` then holds exactly what they sent.
//!
//! Why simulated proxies: a thousand real proxy processes do not fit a test machine, and the
//! controller cannot tell the difference. Each simulated proxy is what the controller sees of a
//! real one: its own key and certificate (a CSR certified with its service account's join token), its
//! own mTLS connection, a Watch stream with an interest (reports from an identity that is not watching
//! are refused), and every interval a report built by the proxy's own code: traffic is counted into a
//! [`EdgeTable`] as the data plane counts it, turned into deltas by [`report::summary`] and split by
//! [`report::split`], so the edges, latency histograms and sizes have the real shape.
//!
//! The mesh: `--report-services` services `svc-<j>` in namespace `bench`, proxy `i` serving `svc-<i
//! mod S>` under that service account (replicas share an identity, as in Kubernetes), calling the next
//! `--report-calls` services and called by the previous ones ([`Plan`]). Every fifth service is
//! opaque TCP (its edges count connections and bytes), the others HTTP (requests by class, latency).
//! Proxies start their intervals spread over the first interval, like proxies started at different
//! times.
//!
//! Measured on the controller process alone (a child of controller-bench): resident memory before
//! the proxies connect, once they watch, and after the reports; CPU (utime + stime from
//! `/proc/PID/stat`) per second while the proxies only watch (the baseline) and while they report,
//! and per report. The bench fails when a report is refused or fails, or when `GetStats` (1 h window,
//! edges) differs from the sum of what was sent by one request, one byte or one latency quantile.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use quicmesh_controller::client;
use quicmesh_proto::controller as pb;
use quicmesh_transport::{
    control::report,
    identity::{SpiffeId, ca::generate_csr},
    metrics::{Direction, EdgeTable, LatencyBuckets, RequestClass},
};

type AnyError = Box<dyn std::error::Error + Send + Sync>;

/// Trust domain and namespace of the simulated mesh (the bench controller's trust domain).
const TD: &str = "bench.mesh";
const NS: &str = "bench";
/// Bound on each gRPC call of a simulated proxy.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Certify calls in flight while the proxies get their certificates.
const CERTIFY_CONCURRENCY: usize = 32;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Options {
    /// Simulated proxies.
    pub reporters: usize,
    /// Services (and service accounts) they serve.
    pub services: usize,
    /// Services each one calls.
    pub calls: usize,
    /// Report interval (the proxy's default is 5 s).
    pub interval: Duration,
    /// How long they report.
    pub seconds: u64,
    /// How long they only watch first (the CPU baseline).
    pub idle_seconds: u64,
    /// Mean requests (or TCP connections) per second on each edge a proxy counts.
    pub edge_rps: f64,
}

/// The controller under test: a child process.
#[derive(Debug, Clone)]
pub struct Target {
    /// Its process id (for `/proc`).
    pub pid: u32,
    /// gRPC address.
    pub addr: String,
    /// Admin token.
    pub token: String,
    /// Trust bundle, PEM.
    pub bundle: Vec<String>,
}

/// Who serves and calls what: service `j` calls `j+1 ..= j+calls` (mod services).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Services.
    pub services: usize,
    /// Calls per service (at most services - 1: no service calls itself).
    pub calls: usize,
}

impl Plan {
    /// `services` services (at least 2), each calling `calls` others.
    pub fn new(services: usize, calls: usize) -> Self {
        let services = services.max(2);
        Self {
            services,
            calls: calls.clamp(1, services - 1),
        }
    }

    /// The service proxy `i` serves.
    pub fn serves(&self, proxy: usize) -> usize {
        proxy % self.services
    }

    /// The services `j` calls.
    pub fn calls(&self, j: usize) -> Vec<usize> {
        (1..=self.calls).map(|d| (j + d) % self.services).collect()
    }

    /// The services that call `j`.
    pub fn callers(&self, j: usize) -> Vec<usize> {
        (1..=self.calls)
            .map(|d| (j + self.services - d) % self.services)
            .collect()
    }

    /// Whether service `j` is opaque TCP (every fifth), else HTTP.
    pub fn is_tcp(j: usize) -> bool {
        j % 5 == 4
    }

    /// Distinct edges the controller holds when every service has a proxy: each call counted by
    /// the caller (outbound) and by the destination (inbound).
    pub fn edges(&self) -> usize {
        2 * self.services * self.calls
    }
}

/// Service `j`'s name.
pub fn service_name(j: usize) -> String {
    format!("svc-{j}")
}

/// Service `j` as the controller and the reports name it (`name.namespace`).
pub fn service_key(j: usize) -> String {
    format!("svc-{j}.{NS}")
}

/// The identity of service `j`'s proxies.
pub fn identity(j: usize) -> String {
    format!("spiffe://{TD}/ns/{NS}/sa/svc-{j}")
}

/// An edge as `GetStats` lists it: service, source identity, `inbound` or `outbound`.
pub type EdgeName = (String, String, &'static str);

/// What was sent on one edge, summed over every report and replica.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sent {
    /// Requests, successes, and failures by class (timeout, unavailable, server, grpc).
    pub requests: u64,
    /// Successes.
    pub successes: u64,
    /// Failures by class.
    pub failures: [u64; 4],
    /// TCP connections opened.
    pub tcp_opened: u64,
    /// Bytes both ways.
    pub bytes: u64,
    /// Latency histogram, all buckets.
    pub latency: Vec<u64>,
}

impl Sent {
    /// Adds one reported edge.
    pub fn add(&mut self, e: &pb::EdgeSummary) {
        self.requests += e.requests;
        self.successes += e.successes;
        for (a, b) in self.failures.iter_mut().zip([
            e.failures_timeout,
            e.failures_unavailable,
            e.failures_server,
            e.failures_grpc,
        ]) {
            *a += b;
        }
        self.tcp_opened += e.tcp_opened;
        self.bytes += e.bytes_to_destination + e.bytes_from_destination;
        if self.latency.is_empty() {
            self.latency = vec![0; LatencyBuckets::COUNT];
        }
        let off = e.latency_offset as usize;
        for (i, c) in e.latency_counts.iter().enumerate() {
            if let Some(b) = self.latency.get_mut(off + i) {
                *b += c;
            }
        }
    }
}

/// The edge a report's entry from a proxy of `identity` lands on at the controller.
pub fn edge_name(reporter: &str, e: &pb::EdgeSummary) -> EdgeName {
    if e.direction == pb::EdgeDirection::Outbound as i32 {
        (e.service.clone(), reporter.to_owned(), "outbound")
    } else {
        (e.service.clone(), e.source.clone(), "inbound")
    }
}

/// Every difference between what was sent and what `GetStats` lists (empty: they agree). Latency
/// quantiles are compared too: the controller merges the same buckets, so they must be equal.
pub fn differences(sent: &BTreeMap<EdgeName, Sent>, got: &[pb::TrafficStats]) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen = 0;
    for g in got {
        let key = (g.service.clone(), g.source.clone(), g.direction.as_str());
        let Some((k, s)) = sent.get_key_value(&key) else {
            out.push(format!("{key:?}: listed, never sent"));
            continue;
        };
        seen += 1;
        let pairs = [
            ("requests", g.requests, s.requests),
            ("successes", g.successes, s.successes),
            ("failures_timeout", g.failures_timeout, s.failures[0]),
            (
                "failures_unavailable",
                g.failures_unavailable,
                s.failures[1],
            ),
            ("failures_server", g.failures_server, s.failures[2]),
            ("failures_grpc", g.failures_grpc, s.failures[3]),
            ("tcp_opened", g.tcp_opened, s.tcp_opened),
            ("bytes", g.bytes, s.bytes),
        ];
        for (what, got, want) in pairs {
            if got != want {
                out.push(format!("{k:?}: {what} {got}, sent {want}"));
            }
        }
        for (what, got, q) in [("p50", g.p50_ms, 0.5), ("p99", g.p99_ms, 0.99)] {
            let want = LatencyBuckets::quantile(&s.latency, q) * 1000.0;
            if (got - want).abs() > 1e-9 * want.max(1.0) {
                out.push(format!("{k:?}: {what} {got} ms, sent {want} ms"));
            }
        }
    }
    if seen != sent.len() {
        out.push(format!("{} edges sent, {seen} of them listed", sent.len()));
    }
    out
}

/// utime + stime of a process, in clock ticks, from the text of `/proc/PID/stat` (fields 14 and 15;
/// the command name before them may hold spaces and parentheses, so fields count from the last `)`).
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    // After the name: state (field 3) ... utime is field 14, the 12th here.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `/proc` reports CPU times in USER_HZ, which Linux fixes at 100 for user space.
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds the process has used.
fn cpu_seconds(pid: u32) -> Result<f64, AnyError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let ticks = cpu_ticks(&stat).ok_or("unreadable /proc/PID/stat")?;
    Ok(ticks as f64 / TICKS_PER_SECOND)
}

/// Resident and peak resident memory, MB.
fn rss_mb(pid: u32) -> Result<(f64, f64), AnyError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .ok_or(format!("{key} in /proc/{pid}/status"))
    };
    Ok((kb("VmRSS:")? / 1024.0, kb("VmHWM:")? / 1024.0))
}

/// A latency in seconds: log-normal around `median` (σ 0.5), as service latencies roughly are.
fn latency(median: f64) -> f64 {
    // Box-Muller.
    let (u1, u2) = (rand::random::<f64>().max(1e-12), rand::random::<f64>());
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    median * (0.5 * z).exp()
}

/// Counts one interval's traffic into `table` as the data plane would: on each edge about
/// `per_edge` requests (or connections), 1% failing over the four classes.
fn simulate(table: &EdgeTable, edges: &[(Direction, String, String, bool)], per_edge: f64) {
    for (d, source, service, tcp) in edges {
        let c = table.edge(*d, source, service);
        let n = (per_edge * (0.5 + rand::random::<f64>())).round() as u64;
        for _ in 0..n {
            if *tcp {
                c.tcp_open();
                let failed = rand::random::<f64>() < 0.01;
                c.tcp_close(failed, 200 + rand::random::<u64>() % 800, 2000);
                continue;
            }
            let r = rand::random::<f64>();
            let class = match r {
                r if r < 0.99 => RequestClass::Success,
                r if r < 0.9925 => RequestClass::Timeout,
                r if r < 0.995 => RequestClass::Unavailable,
                r if r < 0.9975 => RequestClass::Server,
                _ => RequestClass::Grpc,
            };
            c.request(class, true);
            c.latency(latency(0.004));
        }
    }
}

/// Counters of the reporting phase, shared by the simulated proxies.
#[derive(Debug, Default)]
struct Tally {
    calls: AtomicU64,
    failed: AtomicU64,
    edges: AtomicU64,
    accepted_edges: AtomicU64,
    bytes: AtomicU64,
    sent: Mutex<BTreeMap<EdgeName, Sent>>,
    errors: Mutex<Vec<String>>,
}

/// Creates the services, certifies one key per proxy; the proxies' (identity, cert, key).
async fn prepare(
    o: &Options,
    plan: Plan,
    t: &Target,
    admin: &mut client::Admin,
) -> Result<Vec<(usize, String, String)>, AnyError> {
    let resources: Vec<pb::Resource> = (0..plan.services)
        .map(|j| pb::Resource {
            resource: Some(pb::resource::Resource::Service(pb::Service {
                metadata: Some(pb::Metadata {
                    name: service_name(j),
                    namespace: NS.into(),
                    ..Default::default()
                }),
                ports: vec![pb::ServicePort {
                    port: 8080,
                    protocol: if Plan::is_tcp(j) {
                        pb::PortProtocol::Tcp
                    } else {
                        pb::PortProtocol::Http
                    } as i32,
                    name: String::new(),
                }],
                // Empty: served by the service account of the same name.
                ..Default::default()
            })),
        })
        .collect();
    for chunk in resources.chunks(1000) {
        admin
            .apply_all(pb::ApplyAllRequest {
                resources: chunk.to_vec(),
            })
            .await?;
    }
    let mut tokens = Vec::with_capacity(plan.services);
    for j in 0..plan.services.min(o.reporters) {
        tokens.push(
            admin
                .create_join_token(pb::CreateJoinTokenRequest {
                    namespace: NS.into(),
                    service_account: service_name(j),
                    ttl_seconds: 3600,
                    reusable: true,
                })
                .await?
                .into_inner()
                .token,
        );
    }
    let ch = client::connect(&t.addr, &t.bundle, None, Some(CALL_TIMEOUT)).await?;
    let tokens = Arc::new(tokens);
    let sem = Arc::new(tokio::sync::Semaphore::new(CERTIFY_CONCURRENCY));
    let mut tasks = Vec::with_capacity(o.reporters);
    for i in 0..o.reporters {
        let (ch, tokens, sem) = (ch.clone(), tokens.clone(), sem.clone());
        let j = plan.serves(i);
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await?;
            // Each proxy's own key, as a proxy generates at start.
            let id = SpiffeId::new(TD, NS, &service_name(j))?;
            let (cert, key) = certify(ch, &id, tokens[j].clone()).await?;
            Ok::<_, AnyError>((j, cert, key))
        }));
    }
    let mut out = Vec::with_capacity(o.reporters);
    for task in tasks {
        out.push(task.await??);
    }
    Ok(out)
}

/// A new key for `id` and its certificate from the controller on `ch`, bought with `join_token`, as
/// a proxy gets them at start: (leaf PEM, key PEM).
pub async fn certify(
    ch: tonic::transport::Channel,
    id: &SpiffeId,
    join_token: String,
) -> Result<(String, String), AnyError> {
    let (csr, key) = generate_csr(id)?;
    let cert = client::proxy(ch)
        .certify(pb::CertifyRequest {
            csr_pem: csr,
            join_token,
            ..Default::default()
        })
        .await?
        .into_inner()
        .cert_chain_pem
        .into_iter()
        .next()
        .ok_or("no certificate")?;
    Ok((cert, key))
}

/// Runs the reporting benchmark against `t`; prints its lines and returns the summary (JSON).
pub async fn run(o: &Options, t: &Target) -> Result<serde_json::Value, AnyError> {
    if o.reporters == 0 || o.interval.is_zero() || o.seconds == 0 {
        return Err("--reporters, the interval and the duration must be positive".into());
    }
    let plan = Plan::new(o.services, o.calls);
    let ch = client::connect(&t.addr, &t.bundle, None, Some(Duration::from_secs(30))).await?;
    let mut admin = client::admin(ch, &t.token)?;
    let (rss_start, _) = rss_mb(t.pid)?;
    let proxies = prepare(o, plan, t, &mut admin).await?;

    // Every proxy connects and watches; the reports wait until all hold their first snapshot.
    let connect_started = Instant::now();
    let (watching_tx, mut watching_rx) = tokio::sync::mpsc::channel::<()>(o.reporters);
    let mut channels = Vec::with_capacity(o.reporters);
    let mut watchers = Vec::with_capacity(o.reporters);
    for (i, (j, cert, key)) in proxies.iter().enumerate() {
        let ch = connect_with_retries(t, cert, key).await?;
        let mut stream = client::proxy(ch.clone())
            .watch(pb::WatchRequest {
                proxy_name: format!("reporter-{i}"),
                deltas: true,
                interest: Some(pb::Interest {
                    calls: plan.calls(*j).into_iter().map(service_name).collect(),
                }),
                ..Default::default()
            })
            .await?
            .into_inner();
        let tx = watching_tx.clone();
        watchers.push(tokio::spawn(async move {
            let mut first = true;
            while let Ok(Some(_)) = stream.message().await {
                if first {
                    first = false;
                    let _ = tx.send(()).await;
                }
            }
        }));
        channels.push(ch);
    }
    for _ in 0..o.reporters {
        tokio::time::timeout(Duration::from_secs(60), watching_rx.recv())
            .await
            .map_err(|_| "not every proxy got its first snapshot within 60 s")?
            .ok_or("a watch ended")?;
    }
    let connect_s = connect_started.elapsed().as_secs_f64();
    let (rss_watching, _) = rss_mb(t.pid)?;

    // Baseline: the same proxies watching, not reporting.
    let cpu0 = cpu_seconds(t.pid)?;
    let idle_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(o.idle_seconds)).await;
    let idle_s = idle_started.elapsed().as_secs_f64();
    let cpu1 = cpu_seconds(t.pid)?;

    // Reporting: each proxy every interval, starting spread over the first one.
    let tally = Arc::new(Tally::default());
    let per_edge = o.edge_rps * o.interval.as_secs_f64();
    let started = Instant::now();
    let stop = started + Duration::from_secs(o.seconds);
    let mut tasks = Vec::with_capacity(o.reporters);
    for (i, ((j, _, _), ch)) in proxies.iter().zip(&channels).enumerate() {
        let (tally, ch, j, interval) = (tally.clone(), ch.clone(), *j, o.interval);
        let offset = interval.mul_f64(i as f64 / o.reporters as f64);
        let me = identity(j);
        let mut edges: Vec<(Direction, String, String, bool)> = plan
            .calls(j)
            .into_iter()
            .map(|c| {
                (
                    Direction::Outbound,
                    String::new(),
                    service_key(c),
                    Plan::is_tcp(c),
                )
            })
            .collect();
        edges.extend(plan.callers(j).into_iter().map(|c| {
            (
                Direction::Inbound,
                identity(c),
                service_key(j),
                Plan::is_tcp(j),
            )
        }));
        // One QUIC connection per peer proxy, as a proxy reports them: dialed to the services it
        // calls, accepted from the ones calling it.
        let links: Vec<pb::PeerSummary> = plan
            .calls(j)
            .into_iter()
            .map(|c| (pb::EdgeDirection::Outbound, c))
            .chain(
                plan.callers(j)
                    .into_iter()
                    .map(|c| (pb::EdgeDirection::Inbound, c)),
            )
            .map(|(d, c)| pb::PeerSummary {
                direction: d as i32,
                peer: identity(c),
                address: format!("10.{}.{}.{}:4433", (c >> 16) & 255, (c >> 8) & 255, c & 255),
                rtt_us: 800,
                cwnd_bytes: 38_400,
                sent_packets: (per_edge * 4.0) as u64,
                lost_packets: 1,
            })
            .collect();
        tasks.push(tokio::spawn(async move {
            let table = EdgeTable::default();
            let mut last = HashMap::new();
            let mut proxy = client::proxy(ch);
            tokio::time::sleep_until((started + offset).into()).await;
            let mut begun = Instant::now();
            for n in 1u32.. {
                // The last report is the one due before the end (no wait past it).
                let at = started + offset + interval * n;
                if at > stop {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
                simulate(&table, &edges, per_edge);
                let now = Instant::now();
                let s = report::summary(&table.all(), &mut last, now, now - begun);
                begun = now;
                for (k, part) in
                    report::split(&s.edges, report::MAX_EDGES_PER_CALL, report::MAX_CALL_BYTES)
                        .into_iter()
                        .enumerate()
                {
                    let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
                    // The peer connections travel with the first call of a summary.
                    let mut req = pb::ReportRequest {
                        edges: part,
                        peers: if k == 0 { links.clone() } else { Vec::new() },
                        ..Default::default()
                    };
                    req.interval_ms = ms(s.interval);
                    req.age_ms = ms(s.ended.elapsed());
                    let len = prost::Message::encoded_len(&req) as u64;
                    tally.calls.fetch_add(1, Ordering::Relaxed);
                    match tokio::time::timeout(CALL_TIMEOUT, proxy.report(req.clone())).await {
                        Ok(Ok(r)) => {
                            tally
                                .edges
                                .fetch_add(req.edges.len() as u64, Ordering::Relaxed);
                            tally
                                .accepted_edges
                                .fetch_add(u64::from(r.into_inner().accepted), Ordering::Relaxed);
                            tally.bytes.fetch_add(len, Ordering::Relaxed);
                            let mut sent = tally.sent.lock().unwrap_or_else(|p| p.into_inner());
                            for e in &req.edges {
                                sent.entry(edge_name(&me, e)).or_default().add(e);
                            }
                        }
                        Ok(Err(e)) => {
                            tally.failed.fetch_add(1, Ordering::Relaxed);
                            let mut errors = tally.errors.lock().unwrap_or_else(|p| p.into_inner());
                            if errors.len() < 5 {
                                errors.push(format!("{:?}: {}", e.code(), e.message()));
                            }
                        }
                        Err(_) => {
                            tally.failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }));
    }
    let mut rss_peak_reporting: f64 = 0.0;
    let mut sampler = tokio::time::interval(Duration::from_secs(1));
    for task in tasks {
        let mut task = task;
        loop {
            tokio::select! {
                r = &mut task => { r?; break; }
                _ = sampler.tick() => rss_peak_reporting = rss_peak_reporting.max(rss_mb(t.pid)?.0),
            }
        }
    }
    let report_s = started.elapsed().as_secs_f64();
    let cpu2 = cpu_seconds(t.pid)?;
    let (rss_end, rss_hwm) = rss_mb(t.pid)?;
    rss_peak_reporting = rss_peak_reporting.max(rss_end);

    let asked = Instant::now();
    let stats = admin
        .get_stats(pb::StatsRequest {
            window_seconds: 3600,
            edges: true,
            peers: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let get_stats_ms = asked.elapsed().as_secs_f64() * 1000.0;
    for w in watchers {
        w.abort();
    }

    let calls = tally.calls.load(Ordering::Relaxed);
    let failed = tally.failed.load(Ordering::Relaxed);
    let ok_calls = calls - failed;
    let sent = tally.sent.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let requests: u64 = sent.values().map(|s| s.requests).sum();
    let connections: u64 = sent.values().map(|s| s.tcp_opened).sum();
    let idle_cpu_per_s = (cpu1 - cpu0) / idle_s;
    let cpu_per_s = (cpu2 - cpu1) / report_s;
    let cpu_per_report_us = (cpu2 - cpu1) / ok_calls.max(1) as f64 * 1e6;
    // What reporting costs on top of watching, per report.
    let extra_per_report_us =
        ((cpu2 - cpu1) - idle_cpu_per_s * report_s) / ok_calls.max(1) as f64 * 1e6;
    println!(
        "reporters: {} proxies ({} services, {} calls each, {} edges) connected and watching in {connect_s:.1}s; controller RSS {rss_start:.0} MB before, {rss_watching:.0} MB watching",
        o.reporters,
        plan.services,
        plan.calls,
        plan.edges(),
    );
    println!(
        "reports: {ok_calls} in {report_s:.1}s ({:.0}/s, every {:?}), {failed} failed, {} edges sent ({} accepted), {:.0} bytes each; {requests} requests and {connections} connections counted",
        ok_calls as f64 / report_s,
        o.interval,
        tally.edges.load(Ordering::Relaxed),
        tally.accepted_edges.load(Ordering::Relaxed),
        tally.bytes.load(Ordering::Relaxed) as f64 / ok_calls.max(1) as f64,
    );
    println!(
        "controller CPU: {:.2}% of a core watching ({idle_s:.0}s), {:.2}% reporting = {cpu_per_report_us:.0} us per report ({extra_per_report_us:.0} us above watching); RSS {rss_end:.0} MB after (peak while reporting {rss_peak_reporting:.0} MB, process peak {rss_hwm:.0} MB)",
        idle_cpu_per_s * 100.0,
        cpu_per_s * 100.0,
    );
    println!(
        "GetStats (1 h, {} edges, {} peer links) answered in {get_stats_ms:.1} ms: {} reports accepted, {} refused, {} edges held of {}",
        stats.edges.len(),
        stats.peers.len(),
        stats.reports_accepted,
        stats.reports_refused,
        stats.edges_held,
        stats.edges_max
    );
    let mut problems = differences(&sent, &stats.edges);
    if failed > 0 {
        let errors = tally.errors.lock().unwrap_or_else(|p| p.into_inner());
        problems.push(format!("{failed} report calls failed: {errors:?}"));
    }
    if stats.reports_refused > 0 {
        problems.push(format!("{} reports refused", stats.reports_refused));
    }
    if stats.reports_accepted != ok_calls {
        problems.push(format!(
            "{} reports accepted, {ok_calls} answered",
            stats.reports_accepted
        ));
    }
    if tally.accepted_edges.load(Ordering::Relaxed) != tally.edges.load(Ordering::Relaxed) {
        problems.push("edges refused (edges_full?)".into());
    }
    if stats.peers.is_empty() || stats.peers.iter().any(|p| p.sent_packets == 0) {
        problems.push(format!(
            "{} peer links held, some without the packets sent",
            stats.peers.len()
        ));
    }
    if ok_calls == 0 {
        problems.push("no report was sent: is --report-seconds longer than the interval?".into());
    }
    let services_requests: u64 = stats.services.iter().map(|s| s.requests).sum();
    let outbound_requests: u64 = sent
        .iter()
        .filter(|(k, _)| k.2 == "outbound")
        .map(|(_, s)| s.requests)
        .sum();
    if services_requests != outbound_requests {
        problems.push(format!(
            "services list {services_requests} requests, the callers sent {outbound_requests}"
        ));
    }
    if !problems.is_empty() {
        for p in problems.iter().take(20) {
            eprintln!("mismatch: {p}");
        }
        return Err(format!(
            "GetStats does not hold what the proxies sent ({} differences)",
            problems.len()
        )
        .into());
    }
    println!(
        "GetStats totals match what was sent: every edge's requests, classes, connections, bytes, p50 and p99"
    );
    Ok(serde_json::json!({
        "bench": "reporters",
        "reporters": o.reporters,
        "services": plan.services,
        "calls": plan.calls,
        "edges": stats.edges_held,
        "interval_s": o.interval.as_secs_f64(),
        "report_seconds": report_s,
        "reports": ok_calls,
        "reports_per_sec": ok_calls as f64 / report_s,
        "reports_failed": failed,
        "reports_refused": stats.reports_refused,
        "bytes_per_report": tally.bytes.load(Ordering::Relaxed) as f64 / ok_calls.max(1) as f64,
        "requests_counted": requests,
        "connect_s": connect_s,
        "rss_start_mb": rss_start,
        "rss_watching_mb": rss_watching,
        "rss_end_mb": rss_end,
        "rss_peak_reporting_mb": rss_peak_reporting,
        "rss_process_peak_mb": rss_hwm,
        "cpu_watching_cores": idle_cpu_per_s,
        "cpu_reporting_cores": cpu_per_s,
        "cpu_per_report_us": cpu_per_report_us,
        "cpu_per_report_above_watching_us": extra_per_report_us,
        "get_stats_ms": get_stats_ms,
        "totals_match": true,
    }))
}

/// A proxy's mTLS channel, retried with backoff as proxies do when many connect at once.
async fn connect_with_retries(
    t: &Target,
    cert: &str,
    key: &str,
) -> Result<tonic::transport::Channel, AnyError> {
    let mut failures = 0u32;
    loop {
        match client::connect(&t.addr, &t.bundle, Some((cert, key)), Some(CALL_TIMEOUT)).await {
            Ok(ch) => return Ok(ch),
            Err(e) if failures >= 10 => return Err(e.into()),
            Err(_) => {
                failures += 1;
                tokio::time::sleep(Duration::from_millis(100 * u64::from(failures))).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_call_is_counted_by_both_ends() {
        let p = Plan::new(10, 3);
        assert_eq!(p.calls(8), vec![9, 0, 1]);
        assert_eq!(p.callers(1), vec![0, 9, 8]);
        for j in 0..10 {
            for c in p.calls(j) {
                assert!(p.callers(c).contains(&j), "{j} calls {c}");
                assert_ne!(c, j, "no service calls itself");
            }
        }
        assert_eq!(p.edges(), 60);
        assert_eq!(p.serves(23), 3);
        // Fewer services than calls: each calls every other one once.
        let small = Plan::new(3, 5);
        assert_eq!(small.calls, 2);
        assert_eq!(small.calls(2), vec![0, 1]);
    }

    #[test]
    fn cpu_ticks_count_from_after_the_command_name() {
        let stat = "4242 (quic mesh) (x)) S 1 4242 4242 0 -1 4194560 4600 0 0 0 \
                    123 45 0 0 20 0 9 0 12345 98765 4321 18446744073709551615";
        assert_eq!(cpu_ticks(stat), Some(168));
        assert_eq!(cpu_ticks("4242 (short) S 1"), None);
        assert_eq!(cpu_ticks("no parenthesis"), None);
    }

    fn edge(direction: pb::EdgeDirection, source: &str, requests: u64) -> pb::EdgeSummary {
        pb::EdgeSummary {
            direction: direction as i32,
            source: source.into(),
            service: "svc-1.bench".into(),
            requests,
            successes: requests,
            latency_offset: 40,
            latency_counts: vec![requests],
            ..Default::default()
        }
    }

    #[test]
    fn the_stats_must_hold_every_edge_exactly() {
        let mut sent = BTreeMap::new();
        for (reporter, e) in [
            (identity(0), edge(pb::EdgeDirection::Outbound, "", 10)),
            (identity(0), edge(pb::EdgeDirection::Outbound, "", 5)),
            (
                identity(1),
                edge(pb::EdgeDirection::Inbound, &identity(0), 15),
            ),
        ] {
            sent.entry(edge_name(&reporter, &e))
                .or_insert_with(Sent::default)
                .add(&e);
        }
        let p = LatencyBuckets::quantile(&sent.values().next().expect("one").latency, 0.5) * 1e3;
        let row = |direction: &str, requests| pb::TrafficStats {
            service: "svc-1.bench".into(),
            source: identity(0),
            direction: direction.into(),
            requests,
            successes: requests,
            p50_ms: p,
            p99_ms: p,
            ..Default::default()
        };
        let good = [row("outbound", 15), row("inbound", 15)];
        assert_eq!(differences(&sent, &good), Vec::<String>::new());
        // One request short.
        let short = [row("outbound", 14), row("inbound", 15)];
        assert_eq!(
            differences(&sent, &short).len(),
            2,
            "requests and successes"
        );
        // An edge missing, or one never sent.
        assert_eq!(differences(&sent, &good[..1]).len(), 1);
        let mut stranger = good.to_vec();
        stranger.push(pb::TrafficStats {
            source: identity(7),
            ..row("inbound", 15)
        });
        assert_eq!(differences(&sent, &stranger).len(), 1);
        // Another latency.
        let slow = [
            pb::TrafficStats {
                p99_ms: p * 2.0,
                ..row("outbound", 15)
            },
            row("inbound", 15),
        ];
        assert_eq!(differences(&sent, &slow).len(), 1);
    }

    #[test]
    fn simulated_traffic_reads_back_as_a_proxy_reports_it() {
        let table = EdgeTable::default();
        let edges = vec![
            (Direction::Outbound, String::new(), service_key(1), false),
            (Direction::Inbound, identity(4), service_key(0), false),
            (Direction::Outbound, String::new(), service_key(4), true),
        ];
        let mut last = HashMap::new();
        let now = Instant::now();
        simulate(&table, &edges, 100.0);
        let s = report::summary(&table.all(), &mut last, now, Duration::from_secs(5));
        assert_eq!(s.edges.len(), 3);
        for e in &s.edges {
            let failures =
                e.failures_timeout + e.failures_unavailable + e.failures_server + e.failures_grpc;
            assert_eq!(e.successes + failures, e.requests);
            if e.service == service_key(4) {
                assert!(e.requests == 0 && e.tcp_opened >= 50 && e.tcp_closed == e.tcp_opened);
            } else {
                assert!((50..=150).contains(&e.requests), "{e:?}");
                let counted: u64 = e.latency_counts.iter().sum();
                assert_eq!(counted, e.requests);
            }
        }
        // The next summary holds only what came after.
        let s = report::summary(&table.all(), &mut last, now, Duration::from_secs(5));
        assert!(s.edges.iter().all(|e| e.requests == 0 && e.tcp_opened == 0));
    }
}
