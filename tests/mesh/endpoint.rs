//! The QUIC endpoint under attack and after a restart, with processes: the proxies are the built
//! binaries; the attackers are independent of quinn (`tests/peers/hostile_quic.py`: aioquic and raw UDP).
//!
//! - A flood of unanswered Initials and eight authenticated connections that open every stream they may
//!   without sending a header: the proxy's memory stays bounded, a well-behaved client's latency holds,
//!   and the memory comes back down afterwards.
//! - kill -9 and restart of a server proxy under steady traffic: the client's pooled connection is
//!   found dead at once (stateless reset from the restarted endpoint) and traffic resumes.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use crate::support::*;

/// The slim sidecar binary, as deployed.
const SLIM: &str = env!("CARGO_BIN_EXE_quicmesh-proxy");
const PEERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/hostile_quic.py");

/// Whether python3 with aioquic is here; prints why not otherwise (the caller skips).
fn aioquic_available() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import aioquic"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "SKIPPED: needs python3 with aioquic (pip install aioquic) for an independent QUIC peer"
        );
    }
    ok
}

/// Resident set of a process, bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmRSS")
}

const MB: f64 = 1024.0 * 1024.0;

fn p99(samples: &mut [Duration]) -> Duration {
    assert!(!samples.is_empty(), "no samples");
    samples.sort();
    samples[(samples.len() * 99 / 100).min(samples.len() - 1)]
}

/// One short request through the client proxy; its latency.
async fn request(target: SocketAddr) -> Result<Duration, String> {
    let started = Instant::now();
    let back = roundtrip(target, b"ping-pong", Duration::from_secs(5))
        .await
        .map_err(|e| e.to_string())?;
    if back != b"ping-pong" {
        return Err(format!("echo differs: {back:?}"));
    }
    Ok(started.elapsed())
}

/// Starts a hostile peer; stdout lines are returned as they come.
fn hostile(
    args: &[&str],
) -> (
    Child,
    tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
) {
    let mut child = Command::new("python3")
        .arg(PEERS)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn python3");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(l)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str(&l) {
                let _ = tx.send(v);
            }
        }
    });
    (child, rx)
}

fn server_config(pki: &Pki, listen: &str, app: SocketAddr) -> PathBuf {
    pki.config(
        "server",
        &format!(
            "[inbound]\nlisten = \"{listen}\"\nports = [{{ port = 7, app = \"{app}\" }}]\nheader_timeout = \"2s\"\n"
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_flood_and_headerless_streams_keep_the_proxy_bounded() {
    if !aioquic_available() {
        return;
    }
    let _heavy = heavy().await;
    let pki = Pki::new();
    pki.issue("server", "echo");
    pki.issue("client", "client");
    // An authenticated but hostile workload of the same trust domain.
    pki.issue("hostile", "hostile");
    let echo = echo_server().await;
    let log = pki.path().join("server.log");
    let cfg = server_config(&pki, "127.0.0.1:0", echo);
    let cfg = cfg.display().to_string();
    let (server, ready) = spawn_ready_with(SLIM, &["--config", &cfg], &log).await;
    let pid = server.id().expect("pid");
    let inbound = ready_addr(&ready, "/inbound");
    let admin = ready_addr(&ready, "/admin");
    let client = client_proxy(&pki, "client", &[inbound], "").await;
    let target = client.outbound(0);

    for _ in 0..50 {
        request(target).await.expect("warm-up request");
    }
    let start_rss = rss(pid);
    let mut before = Vec::new();
    for _ in 0..200 {
        before.push(request(target).await.expect("request before the flood"));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let port = inbound.port().to_string();
    let (mut initials, mut initials_out) = hostile(&[
        "initials",
        "--port",
        &port,
        "--count",
        "10000",
        "--seconds",
        "10",
    ]);
    let cert = pki.path().join("hostile.pem").display().to_string();
    let key = pki.path().join("hostile.key").display().to_string();
    let (mut streams, mut streams_out) = hostile(&[
        "streams",
        "--port",
        &port,
        "--cert",
        &cert,
        "--key",
        &key,
        "--connections",
        "8",
        "--streams",
        "8192",
        "--hold",
        "8",
    ]);

    // A well-behaved client keeps making requests while the flood lasts (bounded at 25 s).
    let mut during = Vec::new();
    let mut peak = start_rss;
    let until = Instant::now() + Duration::from_secs(25);
    let (mut initials_done, mut streams_done) = (None, None);
    while (initials_done.is_none() || streams_done.is_none()) && Instant::now() < until {
        during.push(request(target).await.expect("request during the flood"));
        peak = peak.max(rss(pid));
        tokio::time::sleep(Duration::from_millis(5)).await;
        if initials_done.is_none()
            && let Ok(Some(s)) = initials.try_wait()
        {
            initials_done = Some(s);
        }
        if streams_done.is_none()
            && let Ok(Some(s)) = streams.try_wait()
        {
            streams_done = Some(s);
        }
    }
    assert!(
        initials_done.is_some_and(|s| s.success()),
        "initials peer: {initials_done:?}"
    );
    assert!(
        streams_done.is_some_and(|s| s.success()),
        "streams peer: {streams_done:?}"
    );
    let flood = initials_out.recv().await.expect("initials summary");
    let mut opened = serde_json::Value::Null;
    while let Some(v) = streams_out.recv().await {
        if v["event"] == "opened" {
            opened = v;
        }
    }
    eprintln!("initials: {flood}\nstreams: {opened}");
    assert_eq!(flood["sent"], 10_000, "{flood}");
    assert_eq!(opened["connections"], 8, "{opened}");
    assert_eq!(opened["streams"], 8 * 8192, "{opened}");

    let metrics = scrape(admin, "/metrics").await.1;
    let retried = metric(&metrics, "quicmesh_inbound_admissions_total", &["retry"]);
    let accepted = metric(&metrics, "quicmesh_inbound_admissions_total", &["accept"]);
    let header_timeouts = metric(&metrics, "quicmesh_protocol_errors_total", &["timeout"]);
    assert!(
        retried >= 9_000.0,
        "a busy endpoint asks Initials to prove their address: {retried} retried, {accepted} accepted"
    );
    assert!(
        header_timeouts >= 2_048.0,
        "headerless streams are timed out: {header_timeouts}"
    );

    // The hostile connections close (their peers sent CONNECTION_CLOSE; bounded wait), then the memory
    // comes back down (bounded wait).
    let closed = eventually(Duration::from_secs(10), || async {
        metric(
            &scrape(admin, "/metrics").await.1,
            "quicmesh_quic_connections",
            &[],
        ) <= 1.0
    })
    .await;
    assert!(closed, "the hostile connections are still open");
    let settle_until = Instant::now() + Duration::from_secs(15);
    let mut after = rss(pid);
    while after > start_rss + (16 << 20) && Instant::now() < settle_until {
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = rss(pid);
    }
    let (p99_before, p99_during) = (p99(&mut before), p99(&mut during));
    eprintln!(
        "RSS start {:.1} MB, peak {:.1} MB, after {:.1} MB; p99 before {p99_before:?} ({} requests), during {p99_during:?} ({} requests); {retried} Initials retried, {accepted} accepted",
        start_rss as f64 / MB,
        peak as f64 / MB,
        after as f64 / MB,
        before.len(),
        during.len(),
    );
    assert!(
        peak < 100 << 20,
        "peak RSS {:.1} MB is over the 100 MB bound",
        peak as f64 / MB
    );
    // glibc keeps part of what was freed resident (ARCHITECTURE.md, "Memory bounds"): a bound, not
    // the start itself.
    assert!(
        after <= start_rss + (16 << 20),
        "RSS stayed at {:.1} MB after the flood (start {:.1} MB)",
        after as f64 / MB,
        start_rss as f64 / MB
    );
    // The flood runs on the same two cores as the proxy and this client, and in the suite beside other
    // tests' meshes (22 ms against 5 ms seen there once): a stated factor plus 25 ms of scheduling
    // noise. What this guards against is an event loop stalled by handshakes, hundreds of ms.
    assert!(
        p99_during <= p99_before * 3 + Duration::from_millis(25),
        "p99 during the flood {p99_during:?} against {p99_before:?} before"
    );
    client.shutdown().await;
}

/// Keeps making one request every 100 ms in the background; each is recorded with when it started
/// and ended and whether it succeeded.
struct Ticker {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<Outcome>>,
}

/// When a request started, when it ended, and its latency or error.
type Outcome = (Instant, Instant, Result<Duration, String>);

impl Ticker {
    fn start(target: SocketAddr) -> Self {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut requests = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            // Bounded: 600 requests at most (60 s).
            for _ in 0..600 {
                tick.tick().await;
                if *rx.borrow() {
                    break;
                }
                requests.push(tokio::spawn(async move {
                    let started = Instant::now();
                    let r = request(target).await;
                    (started, Instant::now(), r)
                }));
            }
            let mut out = Vec::new();
            for r in requests {
                out.push(r.await.expect("request task"));
            }
            out
        });
        Self { stop: tx, task }
    }

    async fn finish(self) -> Vec<Outcome> {
        let _ = self.stop.send(true);
        self.task.await.expect("ticker")
    }
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free port")
        .port()
}

async fn start_server(cfg: &Path, log: &Path) -> (Child, Instant) {
    let cfg = cfg.display().to_string();
    let (child, _) = spawn_ready_with(SLIM, &["--config", &cfg], log).await;
    (child, Instant::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_proxy_is_found_at_once() {
    restart_under_traffic(false).await;
}

/// With a new key file the restarted proxy cannot recognise the old connection IDs and sends no
/// stateless reset: the client finds the connection dead because nothing comes back to a stream header
/// within its handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_proxy_with_a_new_key_is_found_within_the_handshake_timeout() {
    restart_under_traffic(true).await;
}

async fn restart_under_traffic(new_key: bool) {
    let pki = Pki::new();
    pki.issue("server", "echo");
    pki.issue("client", "client");
    let echo = echo_server().await;
    let port = free_udp_port();
    let cfg = server_config(&pki, &format!("127.0.0.1:{port}"), echo);
    let log = pki.path().join("server.log");
    let (mut server, _) = start_server(&cfg, &log).await;
    let inbound = SocketAddr::from(([127, 0, 0, 1], port));
    let client_cfg = pki.config(
        "client",
        &format!(
            "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"echo\"\nport = 7\nendpoints = [\"{inbound}\"]\nhandshake_timeout = \"500ms\"\n"
        ),
    );
    let client_cfg = client_cfg.display().to_string();
    let (_client, client_ready) = spawn_ready(
        &["proxy", "--config", &client_cfg],
        &pki.path().join("client.log"),
    )
    .await;
    let target = ready_addr(&client_ready, "/outbound/0");
    let client_admin = ready_addr(&client_ready, "/admin");
    request(target).await.expect("first request");

    let ticker = Ticker::start(target);
    // Let the pooled connection carry traffic for a second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed = Instant::now();
    server.start_kill().expect("kill -9");
    let _ = server.wait().await;
    if new_key {
        pki.issue("server", "echo");
    }
    let (_server, ready) = start_server(&cfg, &log).await;
    // Traffic for three more seconds after the new ready line.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let requests = ticker.finish().await;

    let after_ready: Vec<_> = requests.iter().filter(|(s, ..)| *s >= ready).collect();
    let failed_after: Vec<_> = after_ready
        .iter()
        .filter_map(|(s, _, r)| r.as_ref().err().map(|e| (s.duration_since(ready), e)))
        .collect();
    let first_ok = requests
        .iter()
        .filter(|(_, end, r)| r.is_ok() && *end >= ready)
        .map(|(_, end, _)| *end)
        .min()
        .expect("a request succeeded after the restart");
    let recovery = first_ok.saturating_duration_since(ready);
    let failed_before = requests
        .iter()
        .filter(|(s, _, r)| *s < ready && r.is_err())
        .count();
    let metrics = scrape(client_admin, "/metrics").await.1;
    let dead = metric(&metrics, "quicmesh_pool_dead_connections_total", &[]);
    eprintln!(
        "new key: {new_key}; restart took {:?} (kill to ready); first success {recovery:?} after the ready line; {} requests after it, {} failed; {failed_before} failed before it; {dead} dead connections found",
        ready.duration_since(killed),
        after_ready.len(),
        failed_after.len(),
    );
    assert!(
        failed_after.is_empty(),
        "requests started after the new ready line failed: {failed_after:?}"
    );
    assert!(
        after_ready.len() >= 25,
        "{} requests after the restart",
        after_ready.len()
    );
    // A stateless reset is recognised at once; without one, the handshake timeout (500 ms) decides.
    let bound = if new_key {
        Duration::from_secs(2)
    } else {
        Duration::from_millis(500)
    };
    assert!(
        recovery <= bound,
        "first success {recovery:?} after the ready line"
    );
    assert!(
        dead >= 1.0,
        "the client found its pooled connection dead: {dead}"
    );
}
