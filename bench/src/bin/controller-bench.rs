//! Controller benchmark: certificates issued per second, and the time for a policy change to reach N
//! watching proxies (simulated in this process, each with its own mTLS connection and Watch stream).
//!
//! A program, not a test: it prints what it measured, one JSON line at the end. The controller runs in a
//! child process (this program again, with `--serve`) on 127.0.0.1:0 over a real sled directory (or the
//! etcd given with `--store`) and real TLS, exactly as `quicmesh controller` does: its resident memory
//! is measured apart from the simulated proxies', and each process needs one file descriptor per
//! watcher (`ulimit -n`). All watchers connect at the same instant, as after a controller restart.
//!
//! `--propagation` measures policy propagation instead: no issuance; each round applies an
//! authorization policy of 100 rules, and each simulated proxy turns every snapshot (rebuilt from a
//! delta as a proxy does) into the state it would enforce (`MeshState::from_snapshot`, what a proxy
//! builds before it swaps the state in) and records when it holds the new version: the time from
//! `Apply` to enforced, per proxy and for all.
//!
//! `--controllers N` (with `--store`) runs N controller processes on the same etcd, as a replicated
//! control plane: watchers and Certify connections are spread over them round-robin, the timed change
//! is applied through the first, and each controller's resident memory is reported.
//!
//! `--reporters N` measures traffic reports instead (`quicmesh_bench::reporters`): N simulated
//! proxies watch and report, and the controller's memory, CPU and `GetStats` totals are checked.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use hdrhistogram::Histogram;
use quicmesh_controller::{Controller, client, state::StateOptions};
use quicmesh_proto::controller as pb;
use quicmesh_transport::{
    control::failover,
    identity::{SpiffeId, ca::generate_csr},
};
use tokio::sync::watch;

#[derive(Debug, Parser)]
#[command(
    about = "Benchmark the quicmesh controller: certificate issuance and config push latency"
)]
struct Args {
    /// Seconds of certificate issuance.
    #[arg(long, default_value_t = 10)]
    cert_seconds: u64,
    /// Concurrent Certify callers.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// gRPC connections shared by the callers.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Reusable join tokens the callers spread over (caller i spends token i mod N): with one, every
    /// certificate counts a use of the same token record, the worst case for controllers sharing a
    /// store (they conflict over it); proxies usually hold tokens of their own.
    #[arg(long, default_value_t = 1)]
    tokens: usize,
    /// Distinct CSRs generated up front (callers reuse them; key generation is the proxy's cost).
    #[arg(long, default_value_t = 64)]
    csrs: usize,
    /// Simulated proxies watching the config.
    #[arg(long, default_value_t = 2000)]
    watchers: usize,
    /// Policy changes to time.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// The controller's state on etcd (`etcd://host:port,...`, a prefix no other run used) instead of
    /// sled in a tempdir.
    #[arg(long)]
    store: Option<String>,
    /// etcd key prefix with --store.
    #[arg(long, default_value = "/quicmesh-bench/")]
    etcd_prefix: String,
    /// Policy propagation only: skip issuance, apply a 100-rule authorization policy each round, and
    /// time it until every watcher has built the state it enforces.
    #[arg(long)]
    propagation: bool,
    /// Services created before the watchers connect (a mesh of realistic size for the bytes per change).
    #[arg(long, default_value_t = 0)]
    services: usize,
    /// Watchers ask for whole snapshots only (no deltas), as proxies before incremental Watch.
    #[arg(long)]
    whole: bool,
    /// Watchers declare an interest, as proxies do: each calls `cart` and one of the `--services`
    /// (watcher i: `svc-<i mod services>`), so it receives only those (without it: the whole mesh).
    #[arg(long)]
    interest: bool,
    /// Changes to other services per round before the timed one (round-robin over `--services`): the
    /// mesh's other traffic, which a watcher with an interest mostly does not receive.
    #[arg(long, default_value_t = 0)]
    background: usize,
    /// Traffic reports instead: this many simulated proxies (each its own key, certificate, mTLS
    /// connection and Watch) report every `--report-interval` for `--report-seconds`; measures the
    /// controller's memory and CPU and checks `GetStats` against what was sent (`reporters` module).
    #[arg(long)]
    reporters: Option<usize>,
    /// With --reporters: services the proxies serve (replicas of one service share its identity).
    #[arg(long, default_value_t = 100)]
    report_services: usize,
    /// With --reporters: services each service calls (each call is an edge at both ends).
    #[arg(long, default_value_t = 3)]
    report_calls: usize,
    /// With --reporters: how often each proxy reports (the proxy's default).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    report_interval: Duration,
    /// With --reporters: seconds of reporting.
    #[arg(long, default_value_t = 60)]
    report_seconds: u64,
    /// With --reporters: seconds the proxies only watch first (the CPU baseline).
    #[arg(long, default_value_t = 10)]
    report_idle_seconds: u64,
    /// With --reporters: mean requests (or TCP connections) a second on each edge of each proxy.
    #[arg(long, default_value_t = 20.0)]
    report_edge_rps: f64,
    /// Controller processes on the same `--store` (etcd), sharing one key-encryption key; watchers and
    /// Certify connections are spread over them, changes are applied through the first.
    #[arg(long, default_value_t = 1)]
    controllers: usize,
    /// Internal: the key-encryption key (base64) of a `--serve` controller.
    #[arg(long, hide = true)]
    kek: Option<String>,
    /// Internal: be the controller (prints `{"addr","token","bundle"}`, serves until stdin closes).
    #[arg(long, hide = true)]
    serve: bool,
}

/// The policy of propagation round `round`: deny by default and 100 allow rules, one of them changed.
fn authz_policy(round: usize) -> pb::Resource {
    let allow = (0..100)
        .map(|i| pb::AuthzRule {
            from_identities: vec![format!("spiffe://bench.mesh/ns/team-{i}/sa/caller")],
            from_namespaces: vec![],
            methods: vec!["GET".into()],
            path_prefixes: vec![format!("/api/{i}/r{}/", if i == 0 { round } else { 0 })],
        })
        .collect();
    pb::Resource {
        resource: Some(pb::resource::Resource::Policy(pb::Policy {
            metadata: Some(pb::Metadata {
                name: "access".into(),
                namespace: "bench".into(),
                ..Default::default()
            }),
            target_service: "cart".into(),
            kind: Some(pb::policy::Kind::Authorization(pb::Authorization {
                mode: pb::AuthzMode::Enforce as i32,
                default_action: pb::AuthzAction::Deny as i32,
                allow,
            })),
        })),
    }
}

/// Service `bench/svc-<i>` with one HTTP `port` and two versions.
fn bench_service(i: usize, port: u32) -> pb::Resource {
    pb::Resource {
        resource: Some(pb::resource::Resource::Service(pb::Service {
            metadata: Some(pb::Metadata {
                name: format!("svc-{i}"),
                namespace: "bench".into(),
                ..Default::default()
            }),
            ports: vec![pb::ServicePort {
                port,
                protocol: pb::PortProtocol::Http as i32,
                name: String::new(),
            }],
            versions: vec!["v1".into(), "v2".into()],
            identities: vec![],
        })),
    }
}

/// Resident and peak resident memory of process `pid` in MB (Linux `/proc`), if readable.
fn rss_mb(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
    };
    Some((kb("VmRSS:")? / 1024.0, kb("VmHWM:")? / 1024.0))
}

/// The controller process: binds, prints where it is, serves until stdin closes.
async fn serve(args: &Args) -> Result<(), AnyError> {
    let dir = tempfile::tempdir()?;
    let controller = Controller::bind(
        StateOptions {
            trust_domain: Some("bench.mesh".into()),
            leaf_ttl: Some(Duration::from_secs(3600)),
            // Every simulated proxy watches with the same certificate: lift the per-identity bound.
            max_watches_per_identity: args.watchers.max(1),
            // Every watcher connects at the same instant (a reconnect storm): let them all handshake.
            limits: quicmesh_controller::tls::Limits {
                max_handshakes: args.watchers.max(1024),
                max_connections: (args.watchers + 1024).max(8192),
                handshake_timeout: Duration::from_secs(30),
            },
            etcd: match &args.store {
                Some(url) => {
                    let mut o = quicmesh_controller::store::etcd::EtcdOptions::from_url(url)?;
                    o.prefix = args.etcd_prefix.clone();
                    Some(o)
                }
                None => None,
            },
            kek: args.kek.clone(),
            ..StateOptions::new(dir.path())
        },
        "127.0.0.1:0".parse()?,
    )
    .await?;
    println!(
        "{}",
        serde_json::json!({
            "addr": controller.addr().to_string(),
            // Only the controller that created the mesh has it; the others join with none.
            "token": controller.admin_token(),
            "bundle": controller.state().bundle(),
        })
    );
    tokio::spawn(controller.serve(std::future::pending()));
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while tokio::io::AsyncReadExt::read(&mut stdin, &mut buf).await? > 0 {}
    Ok(())
}

/// One controller process: the child, its address, admin token (the first of a mesh only), trust
/// bundle.
struct Spawned {
    child: tokio::process::Child,
    addr: String,
    token: Option<String>,
    bundle: Vec<String>,
}

/// Starts a controller process, with key-encryption key `kek` when it shares a store.
async fn spawn_controller(args: &Args, kek: Option<&str>) -> Result<Spawned, AnyError> {
    use tokio::io::AsyncBufReadExt;
    let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
    cmd.args(["--serve", "--watchers", &args.watchers.to_string()]);
    if let Some(s) = &args.store {
        cmd.args(["--store", s, "--etcd-prefix", &args.etcd_prefix]);
    }
    if let Some(k) = kek {
        cmd.args(["--kek", k]);
    }
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let line = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::io::BufReader::new(out).lines().next_line(),
    )
    .await
    .map_err(|_| "the controller was not ready in 60 s")??
    .ok_or("the controller exited before it was ready")?;
    let v: serde_json::Value = serde_json::from_str(&line)?;
    let addr = v["addr"]
        .as_str()
        .map(str::to_owned)
        .ok_or(format!("addr in {line}"))?;
    let token = v["token"].as_str().map(str::to_owned);
    let bundle = v["bundle"]
        .as_array()
        .ok_or("bundle")?
        .iter()
        .filter_map(|b| b.as_str().map(str::to_owned))
        .collect();
    Ok(Spawned {
        child,
        addr,
        token,
        bundle,
    })
}

/// CPU seconds (user and system, of every thread it ran, exited ones included) of process `pid`
/// (`"self"` for this one), from `/proc/PID/stat` in 10 ms ticks; `None` where it is unreadable.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields are counted after the command name's closing parenthesis: utime and stime are the
    // 12th and 13th there (fields 14 and 15 of proc(5)).
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

type AnyError = Box<dyn std::error::Error + Send + Sync>;

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

#[tokio::main]
async fn main() -> Result<(), AnyError> {
    let mut args = Args::parse();
    if args.serve {
        return serve(&args).await;
    }
    if let Some(n) = args.reporters {
        // The controller's connection and per-identity Watch bounds follow --watchers.
        args.watchers = n;
    }
    if args.controllers > 1 && (args.store.is_none() || args.reporters.is_some()) {
        return Err("--controllers above 1 needs --store (etcd), and not --reporters".into());
    }
    // Controllers sharing a store share the key-encryption key of its root.
    let kek = (args.controllers > 1).then(|| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
    });
    // One after the other: the first creates the mesh (and prints the admin token), the rest join it.
    let mut spawned = Vec::new();
    for _ in 0..args.controllers.max(1) {
        spawned.push(spawn_controller(&args, kek.as_deref()).await?);
    }
    let pids: Vec<u32> = spawned
        .iter()
        .map(|s| s.child.id().ok_or("controller pid"))
        .collect::<Result<_, _>>()?;
    let addrs: Vec<String> = spawned.iter().map(|s| s.addr.clone()).collect();
    let token = spawned[0]
        .token
        .clone()
        .ok_or("the first controller made no admin token: use an --etcd-prefix no run used")?;
    let bundle = spawned[0].bundle.clone();
    let (pid, addr) = (pids[0], addrs[0].clone());
    let cpu = || -> Option<f64> { pids.iter().map(|p| cpu_seconds(&p.to_string())).sum() };
    // Resident and peak resident memory of each controller.
    let rss = || -> Vec<(f64, f64)> {
        pids.iter()
            .map(|p| rss_mb(*p).unwrap_or_default())
            .collect()
    };
    if let Some(reporters) = args.reporters {
        let o = quicmesh_bench::reporters::Options {
            reporters,
            services: args.report_services,
            calls: args.report_calls,
            interval: args.report_interval,
            seconds: args.report_seconds,
            idle_seconds: args.report_idle_seconds,
            edge_rps: args.report_edge_rps,
        };
        let t = quicmesh_bench::reporters::Target {
            pid,
            addr,
            token,
            bundle,
        };
        let summary = quicmesh_bench::reporters::run(&o, &t).await?;
        println!("{summary}");
        drop(spawned);
        return Ok(());
    }
    let mut admin = client::admin(
        client::connect(&addr, &bundle, None, Some(Duration::from_secs(30))).await?,
        &token,
    )?;

    // ----- certificates per second -----
    let mut joins = Vec::new();
    for _ in 0..args.tokens.max(1) {
        joins.push(
            admin
                .create_join_token(pb::CreateJoinTokenRequest {
                    namespace: "bench".into(),
                    service_account: "proxy".into(),
                    ttl_seconds: 3600,
                    reusable: true,
                })
                .await?
                .into_inner()
                .token,
        );
    }
    let join = joins[0].clone();
    let id = SpiffeId::new("bench.mesh", "bench", "proxy")?;
    let csrs: Arc<Vec<String>> = Arc::new(
        (0..args.csrs.max(1))
            .map(|_| generate_csr(&id).map(|(csr, _)| csr))
            .collect::<Result<_, _>>()?,
    );
    let mut channels = Vec::new();
    for c in 0..args.connections.max(1) {
        let to = &addrs[c % addrs.len()];
        channels.push(client::connect(to, &bundle, None, Some(Duration::from_secs(30))).await?);
    }
    let issued = Arc::new(AtomicU64::new(0));
    let cert_seconds = if args.propagation {
        0
    } else {
        args.cert_seconds
    };
    let stop_at = Instant::now() + Duration::from_secs(cert_seconds);
    let started = Instant::now();
    let cpu_before = (cpu(), cpu_seconds("self"));
    let mut tasks = Vec::new();
    for i in 0..args.concurrency.max(1) {
        let mut proxy = client::proxy(channels[i % channels.len()].clone());
        let csrs = csrs.clone();
        let join = joins[i % joins.len()].clone();
        let issued = issued.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let mut n = i;
            while Instant::now() < stop_at {
                let t = Instant::now();
                let r = proxy
                    .certify(pb::CertifyRequest {
                        csr_pem: csrs[n % csrs.len()].clone(),
                        join_token: join.clone(),
                        ..Default::default()
                    })
                    .await;
                if let Err(e) = r {
                    eprintln!("certify failed: {e}");
                    break;
                }
                let _ = hist.record(t.elapsed().as_micros() as u64);
                issued.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
            hist
        }));
    }
    let mut cert_hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for t in tasks {
        cert_hist.add(t.await?)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let certs = issued.load(Ordering::Relaxed);
    let certs_per_sec = certs as f64 / elapsed;
    // CPU per certificate, the controller apart from the callers (this process): a figure that
    // depends less on what else the machine runs than certificates per second does.
    let per_cert_ms = |before: Option<f64>, after: Option<f64>| match (before, after) {
        (Some(b), Some(a)) if certs > 0 => (a - b) * 1000.0 / certs as f64,
        _ => f64::NAN,
    };
    let controller_cpu_ms = per_cert_ms(cpu_before.0, cpu());
    let callers_cpu_ms = per_cert_ms(cpu_before.1, cpu_seconds("self"));
    if !args.propagation {
        println!(
            "certify: {certs} certificates in {elapsed:.1}s = {certs_per_sec:.0}/s; latency ms p50 {:.2} p99 {:.2} max {:.2} ({} callers, {} connections, {} controllers)",
            ms(&cert_hist, 0.5),
            ms(&cert_hist, 0.99),
            cert_hist.max() as f64 / 1000.0,
            args.concurrency,
            args.connections,
            pids.len()
        );
        println!(
            "certify CPU per certificate: controller {controller_cpu_ms:.3} ms, callers {callers_cpu_ms:.3} ms"
        );
    }

    // ----- config push to N watchers -----
    let (cert, key) =
        quicmesh_bench::reporters::certify(channels[0].clone(), &id, join.clone()).await?;
    for i in 0..args.services {
        admin.apply(bench_service(i, 8080)).await?;
    }
    // Each watcher reports the newest version it received and when.
    let (seen_tx, _) = watch::channel(());
    let seen_tx = Arc::new(seen_tx);
    let latest: Arc<Vec<AtomicU64>> =
        Arc::new((0..args.watchers).map(|_| AtomicU64::new(0)).collect());
    let arrival_us: Arc<Vec<AtomicU64>> =
        Arc::new((0..args.watchers).map(|_| AtomicU64::new(0)).collect());
    let epoch = Instant::now();
    let connect_started = Instant::now();
    let retries = Arc::new(AtomicU64::new(0));
    let first_bytes = Arc::new(AtomicU64::new(0));
    let change_bytes = Arc::new(AtomicU64::new(0));
    let mut connecting = Vec::new();
    for w in 0..args.watchers {
        let addr = addrs[w % addrs.len()].clone();
        let (bundle, cert, key) = (bundle.clone(), cert.clone(), key.clone());
        let (latest, arrival_us, seen_tx) = (latest.clone(), arrival_us.clone(), seen_tx.clone());
        let enforce = args.propagation;
        let retries = retries.clone();
        let (first_bytes, change_bytes, whole) =
            (first_bytes.clone(), change_bytes.clone(), args.whole);
        let interest = args.interest.then(|| pb::Interest {
            calls: std::iter::once("cart".to_owned())
                .chain((args.services > 0).then(|| format!("svc-{}", w % args.services)))
                .collect(),
        });
        connecting.push(tokio::spawn(async move {
            // As a proxy does: a failed attempt (connect or handshake deadline in the storm) is
            // retried after the jittered delay of `failover::retry_delay`.
            let mut failures = 0u32;
            let mut stream = loop {
                let attempt = async {
                    let ch = client::connect(&addr, &bundle, Some((&cert, &key)), None).await?;
                    let stream = client::proxy(ch)
                        .watch(pb::WatchRequest {
                            proxy_name: format!("bench-{w}"),
                            spiffe_ids: vec![],
                            deltas: !whole,
                            interest: interest.clone(),
                            ..Default::default()
                        })
                        .await?
                        .into_inner();
                    Ok::<_, AnyError>(stream)
                };
                match attempt.await {
                    Ok(s) => break s,
                    Err(e) if failures >= 20 => return Err(e),
                    Err(_) => {
                        failures += 1;
                        retries.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(failover::retry_delay(failures, 1, rand::random()))
                            .await;
                    }
                }
            };
            tokio::spawn(async move {
                let mut first = true;
                let mut held: Option<pb::Snapshot> = None;
                while let Ok(Some(snap)) = stream.message().await {
                    let len = prost::Message::encoded_len(&snap) as u64;
                    let snap = if enforce {
                        // A proxy rebuilds the whole snapshot from a delta before it builds state.
                        let Ok(whole) =
                            quicmesh_transport::control::delta::apply(held.as_ref(), &snap)
                        else {
                            break;
                        };
                        let state = quicmesh_transport::state::MeshState::from_snapshot(&whole);
                        std::hint::black_box(&state);
                        held = Some(whole.clone());
                        whole
                    } else {
                        snap
                    };

                    if first {
                        first_bytes.fetch_add(len, Ordering::Relaxed);
                        first = false;
                    } else {
                        change_bytes.fetch_add(len, Ordering::Relaxed);
                    }
                    arrival_us[w].store(epoch.elapsed().as_micros() as u64, Ordering::Relaxed);
                    latest[w].store(snap.version, Ordering::Release);
                    seen_tx.send_replace(());
                }
            });
            Ok::<_, AnyError>(())
        }));
    }
    for c in connecting {
        c.await??;
    }
    let mut seen_rx = seen_tx.subscribe();
    let all_at = |v: u64| latest.iter().all(|l| l.load(Ordering::Acquire) >= v);
    while !all_at(1) {
        seen_rx.changed().await?;
    }
    let connect_s = connect_started.elapsed().as_secs_f64();
    let rss_connected = rss();
    println!(
        "watch: {} watchers connected at once to {} controllers and holding the first snapshot in {connect_s:.1}s ({} retried attempts); controller RSS {} MB",
        args.watchers,
        pids.len(),
        retries.load(Ordering::Relaxed),
        rss_connected
            .iter()
            .map(|(r, _)| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(" + "),
    );
    let mut last_receipt = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;

    let mut rounds = Vec::new();
    // Propagation: Apply → enforced for every (watcher, round), and for all watchers of each round.
    let mut each = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut background = 0usize;
    for round in 0..args.rounds {
        // Each pass over the services moves them to the next port (a real change every time).
        for _ in 0..args.background {
            let (Some(pass), Some(i)) = (
                background.checked_div(args.services),
                background.checked_rem(args.services),
            ) else {
                break;
            };
            let port = 8081 + (pass % 1000) as u32;
            admin.apply(bench_service(i, port)).await?;
            background += 1;
        }
        let sent_us = epoch.elapsed().as_micros() as u64;
        let change = if args.propagation {
            authz_policy(round)
        } else {
            pb::Resource {
                resource: Some(pb::resource::Resource::Policy(pb::Policy {
                    metadata: Some(pb::Metadata {
                        name: "split".into(),
                        namespace: "bench".into(),
                        ..Default::default()
                    }),
                    target_service: "cart".into(),
                    kind: Some(pb::policy::Kind::TrafficSplit(pb::TrafficSplit {
                        backends: vec![
                            pb::SplitBackend {
                                service_version: "v1".into(),
                                weight: 100 - round as u32 % 100,
                            },
                            pb::SplitBackend {
                                service_version: "v2".into(),
                                weight: round as u32 % 100 + 1,
                            },
                        ],
                    })),
                })),
            }
        };
        let applied = admin.apply(change).await?.into_inner();
        let version = match applied.resource {
            Some(pb::resource::Resource::Policy(p)) => p.metadata.map(|m| m.version).unwrap_or(0),
            _ => 0,
        };
        if version == 0 {
            return Err("Apply answered without a version".into());
        }
        let acked_us = epoch.elapsed().as_micros() as u64;
        let wait = tokio::time::timeout(Duration::from_secs(60), async {
            while !all_at(version) {
                if seen_rx.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        if wait.is_err() {
            return Err("not every watcher got the change within 60 s".into());
        }
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        for a in arrival_us.iter() {
            h.record(a.load(Ordering::Relaxed).saturating_sub(sent_us).max(1))?;
        }
        each.add(&h)?;
        last_receipt.record(h.max().max(1))?;
        println!(
            "push round {round}: version {version}, write acknowledged after {:.1} ms; reached watchers p50 {:.1} ms, p99 {:.1} ms, all {} in {:.1} ms",
            (acked_us - sent_us) as f64 / 1000.0,
            ms(&h, 0.5),
            ms(&h, 0.99),
            args.watchers,
            h.max() as f64 / 1000.0
        );
        rounds.push(serde_json::json!({
            "version": version,
            "ack_ms": (acked_us - sent_us) as f64 / 1000.0,
            "p50_ms": ms(&h, 0.5),
            "p99_ms": ms(&h, 0.99),
            "all_ms": h.max() as f64 / 1000.0,
        }));
    }
    if args.propagation {
        let summary = serde_json::json!({
            "bench": "propagation",
            "store": if args.store.is_some() { "etcd" } else { "sled" },
            "watchers": args.watchers,
            "rounds": args.rounds,
            "rules": 100,
            "per_watcher_p50_ms": ms(&each, 0.5),
            "per_watcher_p99_ms": ms(&each, 0.99),
            "per_watcher_max_ms": each.max() as f64 / 1000.0,
            "all_watchers_p50_ms": ms(&last_receipt, 0.5),
            "all_watchers_p99_ms": ms(&last_receipt, 0.99),
            "all_watchers_max_ms": last_receipt.max() as f64 / 1000.0,
            "goal_p99_under_1s": ms(&last_receipt, 0.99) < 1000.0,
        });
        println!(
            "propagation: Apply -> enforced by each of {} watchers p50 {:.1} ms, p99 {:.1} ms; by all of them p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} rounds",
            args.watchers,
            ms(&each, 0.5),
            ms(&each, 0.99),
            ms(&last_receipt, 0.5),
            ms(&last_receipt, 0.99),
            last_receipt.max() as f64 / 1000.0,
            args.rounds
        );
        println!("{summary}");
        return Ok(());
    }
    let after = rss();
    let largest = |f: fn(&(f64, f64)) -> f64| after.iter().map(f).fold(0.0, f64::max);
    let (rss, rss_peak) = (largest(|r| r.0), largest(|r| r.1));
    let watchers = args.watchers.max(1) as f64;
    let first_per_watcher = first_bytes.load(Ordering::Relaxed) as f64 / watchers;
    let changes = args.rounds.max(1)
        * (1 + if args.services > 0 {
            args.background
        } else {
            0
        });
    let change_per_watcher =
        change_bytes.load(Ordering::Relaxed) as f64 / watchers / changes as f64;
    println!(
        "bytes sent per watcher: first snapshot {first_per_watcher:.0}, per change {change_per_watcher:.0} ({}{}; {} services, {changes} changes)",
        if args.whole {
            "whole snapshots"
        } else {
            "deltas"
        },
        if args.interest { ", interest" } else { "" },
        args.services,
    );
    println!(
        "apply to the last watcher's receipt over {} rounds: p50 {:.1} ms, p99 {:.1} ms; controller RSS {rss:.0} MB (peak {rss_peak:.0} MB){}",
        args.rounds,
        ms(&last_receipt, 0.5),
        ms(&last_receipt, 0.99),
        if pids.len() > 1 {
            format!(
                ", the largest of {} controllers ({} MB in all)",
                pids.len(),
                after.iter().map(|r| r.0).sum::<f64>().round()
            )
        } else {
            String::new()
        },
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "controller",
            "store": args.store.as_deref().unwrap_or("sled"),
            "controllers": pids.len(),
            "connect_s": connect_s,
            "deltas": !args.whole,
            "interest": args.interest,
            "services": args.services,
            "changes": changes,
            "first_snapshot_bytes": first_per_watcher,
            "bytes_per_change": change_per_watcher,
            "connect_retries": retries.load(Ordering::Relaxed),
            "last_receipt_p50_ms": ms(&last_receipt, 0.5),
            "last_receipt_p99_ms": ms(&last_receipt, 0.99),
            "controller_rss_mb": rss,
            "controller_rss_peak_mb": rss_peak,
            "controllers_rss_mb": after.iter().map(|r| r.0).collect::<Vec<_>>(),
            "certs": certs,
            "cert_seconds": elapsed,
            "certs_per_sec": certs_per_sec,
            "certify_p50_ms": ms(&cert_hist, 0.5),
            "certify_p99_ms": ms(&cert_hist, 0.99),
            "certify_controller_cpu_ms": controller_cpu_ms,
            "certify_callers_cpu_ms": callers_cpu_ms,
            "concurrency": args.concurrency,
            "tokens": args.tokens,
            "watchers": args.watchers,
            "push": rounds,
        })
    );
    drop(spawned);
    Ok(())
}
