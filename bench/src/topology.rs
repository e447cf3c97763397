//! The paths a request can take, and the processes that make them: `direct` (client → server), `peer`
//! (client → HAProxy → mTLS TCP → HAProxy → server, one TLS connection per client connection, as a user
//! would deploy without a mesh) and `quicmesh` (client → sidecar → QUIC → sidecar → server), each carrying
//! bytes without looking at them; and their HTTP-aware (L7) counterparts: `peer-http` (the HAProxy pair in
//! `mode http`, HTTP/1.1 or h2 on each hop as the app speaks) and `quicmesh-l7` (the same sidecars with the
//! service's ports declared `http` and `grpc`, so each request is its own QUIC stream).
//!
//! An L7 path has one entry per protocol family (HTTP/1.1, HTTP/2, gRPC) and none for raw TCP, which it
//! cannot carry: [`Path::entry_for`] says where a protocol goes in, or that the path does not take it.
//!
//! A path is placed either on loopback or across two network namespaces (the loss scenario): the client
//! side (load generator and client-side proxy) in one, the server side in the other.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path as FsPath, PathBuf},
    process::Stdio,
    sync::atomic::{AtomicU16, Ordering},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    time::Instant,
};

use crate::{
    certs::Certs,
    client::Protocol,
    machine::{self, ProcSample},
};

/// One way from the load generator to the application server.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// No proxy: the floor.
    Direct,
    /// Two quicmesh sidecars.
    Quicmesh,
    /// Two HAProxy processes speaking mTLS over TCP.
    Peer,
    /// The quicmesh sidecars with the ports declared `http` / `grpc`: HTTP-aware, a stream per request.
    #[value(name = "quicmesh-l7")]
    #[serde(rename = "quicmesh-l7")]
    QuicmeshL7,
    /// `quicmesh-l7` with policies the server side enforces on every request: 100 authorization rules
    /// (deny by default, the caller allowed by the last one) and a rate limit that never triggers. Run
    /// next to `quicmesh-l7`, it gives the cost of policy enforcement.
    #[value(name = "quicmesh-l7-policy")]
    #[serde(rename = "quicmesh-l7-policy")]
    QuicmeshL7Policy,
    /// Two HAProxy processes in `mode http`, mTLS between them.
    #[value(name = "peer-http", alias = "peer-haproxy-http")]
    PeerHttp,
    /// Istio's ztunnel (HTTP/2 CONNECT over mTLS), built by hand and given with `--ztunnel`; see
    /// [`crate::ztunnel`].
    Ztunnel,
}

impl Target {
    /// Report name.
    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Quicmesh => "quicmesh",
            Target::Peer => "peer-haproxy",
            Target::QuicmeshL7 => "quicmesh-l7",
            Target::QuicmeshL7Policy => "quicmesh-l7-policy",
            Target::PeerHttp => "peer-haproxy-http",
            Target::Ztunnel => "ztunnel",
        }
    }

    /// Whether the path understands HTTP (and so cannot carry raw TCP).
    pub fn is_l7(self) -> bool {
        matches!(
            self,
            Target::QuicmeshL7 | Target::QuicmeshL7Policy | Target::PeerHttp
        )
    }
}

/// Where each protocol enters an L7 path.
#[derive(Debug, Clone, Copy)]
pub struct L7Entries {
    /// HTTP/1.1 clients.
    pub http1: SocketAddr,
    /// HTTP/2 (prior knowledge) clients.
    pub http2: SocketAddr,
    /// gRPC clients.
    pub grpc: SocketAddr,
}

/// Where the two sides of a path live.
#[derive(Debug, Clone)]
pub struct Placement {
    /// Network namespace of the client side (`None`: this one).
    pub client_ns: Option<String>,
    /// Network namespace of the server side.
    pub server_ns: Option<String>,
    /// The server side's address as the client side reaches it.
    pub server_ip: IpAddr,
    /// The application server's address, as seen from the server side.
    pub app: SocketAddr,
    /// The harness binary, for probes run inside a namespace.
    pub bench_bin: PathBuf,
    /// HAProxy `nbthread` of each peer proxy.
    pub haproxy_threads: usize,
    /// Lines of a `[quic]` section given to every quicmesh proxy (empty: the proxy's defaults), to
    /// measure transport settings side by side with the peers.
    pub quic_toml: String,
    /// Sections appended to every quicmesh proxy's configuration as they are (e.g. `[tracing]`).
    pub proxy_toml: String,
    /// A command every proxy (quicmesh and HAProxy) runs under, e.g. valgrind's callgrind (empty:
    /// none). Start-up deadlines grow tenfold with one.
    pub wrapper: Vec<String>,
    /// The ztunnel binary, or why the ztunnel path is skipped (see [`crate::ztunnel::resolve`]).
    pub ztunnel: Result<PathBuf, String>,
}

impl Placement {
    /// `program` in `ns`, under the wrapper if there is one.
    fn proxy_command(&self, ns: &Option<String>, program: &FsPath) -> Command {
        match self.wrapper.split_first() {
            None => command(ns, program),
            Some((first, rest)) => {
                let mut c = command(ns, FsPath::new(first));
                c.args(rest).arg(program);
                c
            }
        }
    }

    /// How long a proxy may take to come up.
    fn start_timeout(&self, base: Duration) -> Duration {
        if self.wrapper.is_empty() {
            base
        } else {
            base * 10
        }
    }
}

impl Placement {
    /// Both sides on this namespace's loopback.
    pub fn loopback(app: SocketAddr, bench_bin: PathBuf) -> Self {
        Self {
            client_ns: None,
            server_ns: None,
            server_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            app,
            bench_bin,
            haproxy_threads: 1,
            quic_toml: String::new(),
            proxy_toml: String::new(),
            wrapper: Vec::new(),
            ztunnel: Err("no ztunnel binary given".to_owned()),
        }
    }
}

/// A child process of the harness (a proxy), killed when dropped.
#[derive(Debug)]
pub struct Proc {
    /// Role, e.g. `quicmesh-client`.
    pub name: String,
    child: Child,
    pid: u32,
    log: PathBuf,
    /// Rules made for this process (a traffic redirect), removed after it is killed.
    cleanup: Option<crate::ztunnel::NftTable>,
}

impl Proc {
    /// Process id (the proxy itself: `ip netns exec` execs in place).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Keeps `table` until this process is dropped.
    pub(crate) fn attach(&mut self, table: crate::ztunnel::NftTable) {
        self.cleanup = Some(table);
    }

    /// CPU and memory now.
    pub fn sample(&self) -> ProcSample {
        machine::sample(self.pid).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            anyhow::bail!(
                "{} exited ({status}); log tail:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }
}

/// A path with its proxies running.
#[derive(Debug)]
pub struct Path {
    /// Which path.
    pub target: Target,
    /// Where the load generator connects (inside the client namespace if there is one); on an L7 path
    /// the HTTP/1.1 entry.
    pub entry: SocketAddr,
    /// On an L7 path, the entry of each protocol.
    pub l7: Option<L7Entries>,
    /// The proxy processes, client side first.
    pub procs: Vec<Proc>,
}

impl Path {
    /// The direct path.
    pub fn direct(placement: &Placement) -> Self {
        let entry = if placement.client_ns.is_some() {
            SocketAddr::new(placement.server_ip, placement.app.port())
        } else {
            placement.app
        };
        Self {
            target: Target::Direct,
            entry,
            l7: None,
            procs: Vec::new(),
        }
    }

    /// Where a client of `protocol` connects; `None` when the path cannot carry it (raw TCP on an L7
    /// path).
    pub fn entry_for(&self, protocol: Protocol) -> Option<SocketAddr> {
        match (&self.l7, protocol) {
            (None, _) => Some(self.entry),
            (Some(_), Protocol::Tcp) => None,
            (Some(e), Protocol::Http1) => Some(e.http1),
            (Some(e), Protocol::Http2) => Some(e.http2),
            (Some(e), Protocol::GrpcUnary | Protocol::GrpcStream) => Some(e.grpc),
        }
    }

    /// Samples every proxy process.
    pub fn samples(&self) -> Vec<ProcSample> {
        self.procs.iter().map(Proc::sample).collect()
    }

    /// Resets the peak RSS of every proxy.
    pub fn reset_peaks(&self) {
        for p in &self.procs {
            machine::reset_peak(p.pid);
        }
    }

    /// Fails if any proxy has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        self.procs.iter_mut().try_for_each(Proc::check_alive)
    }
}

static NEXT_NS_PORT: AtomicU16 = AtomicU16::new(17100);

/// A port to listen on in `ns`: a free ephemeral port on this namespace's loopback, or a fixed port from
/// a private counter inside a namespace the harness created (where nothing else listens).
fn port_in(ns: &Option<String>) -> anyhow::Result<u16> {
    if ns.is_some() {
        return Ok(NEXT_NS_PORT.fetch_add(1, Ordering::Relaxed));
    }
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

pub(crate) fn command(ns: &Option<String>, program: &FsPath) -> Command {
    let mut c = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    };
    c.kill_on_drop(true).stdin(Stdio::null());
    c
}

pub(crate) fn spawn(
    name: &str,
    mut cmd: Command,
    dir: &FsPath,
    stdout: Stdio,
) -> anyhow::Result<Proc> {
    let log = dir.join(format!("{name}.log"));
    let file = std::fs::File::create(&log)?;
    cmd.stdout(stdout).stderr(Stdio::from(file));
    let child = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {name}: {e}"))?;
    let pid = child
        .id()
        .ok_or_else(|| anyhow::anyhow!("{name} exited at once"))?;
    Ok(Proc {
        name: name.to_owned(),
        child,
        pid,
        log,
        cleanup: None,
    })
}

/// Waits until `addr` accepts TCP connections in `ns` (probing from inside the namespace through the
/// harness binary when there is one), up to `timeout`.
pub async fn wait_listening(
    ns: &Option<String>,
    addr: SocketAddr,
    bench_bin: &FsPath,
    proc_: &mut Proc,
    timeout: Duration,
) -> anyhow::Result<()> {
    if ns.is_some() {
        let status = command(ns, bench_bin)
            .args(["bench", "probe", "--addr", &addr.to_string(), "--timeout"])
            .arg(format!("{}ms", timeout.as_millis()))
            .status()
            .await?;
        if !status.success() {
            proc_.check_alive()?;
            anyhow::bail!("{} did not listen on {addr} within {timeout:?}", proc_.name);
        }
        return Ok(());
    }
    probe(addr, timeout).await.map_err(|e| {
        let alive = proc_.check_alive();
        match alive {
            Err(dead) => dead,
            Ok(()) => e,
        }
    })
}

/// Waits until `GET path` on `addr` in `ns` answers 200 (a proxy's readiness endpoint), probing from
/// inside the namespace through the harness binary when there is one, up to `timeout`.
pub async fn wait_http_ok(
    ns: &Option<String>,
    addr: SocketAddr,
    path: &str,
    bench_bin: &FsPath,
    proc_: &mut Proc,
    timeout: Duration,
) -> anyhow::Result<()> {
    let outcome = if ns.is_some() {
        let status = command(ns, bench_bin)
            .args([
                "bench",
                "probe",
                "--addr",
                &addr.to_string(),
                "--http-path",
                path,
            ])
            .arg("--timeout")
            .arg(format!("{}ms", timeout.as_millis()))
            .status()
            .await?;
        if status.success() {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "GET {path} on {addr} gave no 200 within {timeout:?}"
            ))
        }
    } else {
        probe_http(addr, path, timeout).await
    };
    outcome.map_err(|e| match proc_.check_alive() {
        Err(dead) => dead,
        Ok(()) => anyhow::anyhow!("{}: {e}; log tail:\n{}", proc_.name, proc_.log_tail()),
    })
}

/// `GET path` on `addr` (HTTP/1.1, one connection each attempt) until the status is 200, backing off
/// from 1 ms to 50 ms between attempts, up to `timeout`.
pub async fn probe_http(addr: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<()> {
    use http_body_util::Empty;
    use hyper_util::rt::TokioIo;
    let attempt = || async move {
        let io = TokioIo::new(tokio::net::TcpStream::connect(addr).await?);
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<bytes::Bytes>::new())?;
        let status = send.send_request(req).await?.status();
        anyhow::ensure!(status == hyper::StatusCode::OK, "status {status}");
        Ok(())
    };
    retry(timeout, attempt).await.map_err(|last| {
        anyhow::anyhow!("GET {path} on {addr} gave no 200 within {timeout:?} (last: {last})")
    })
}

/// Connects to `addr` until it accepts, backing off from 1 ms to 50 ms between attempts.
pub async fn probe(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    retry(timeout, || async move {
        tokio::net::TcpStream::connect(addr).await?;
        Ok(())
    })
    .await
    .map_err(|_| anyhow::anyhow!("nothing listens on {addr} after {timeout:?}"))
}

/// Runs `attempt` (each bounded to 1 s) until it succeeds or `timeout` passes, backing off from 1 ms
/// to 50 ms between attempts; the last error if none succeeded.
async fn retry<F, Fut>(timeout: Duration, mut attempt: F) -> Result<(), anyhow::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_millis(1);
    loop {
        let last = match tokio::time::timeout(Duration::from_secs(1), attempt()).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e,
            Err(_) => anyhow::anyhow!("no answer within 1 s"),
        };
        if Instant::now() >= deadline {
            return Err(last);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(50));
    }
}

/// HAProxy settings shared by both sides, in `mode` (`tcp` or `http`).
fn haproxy_global(threads: usize, mode: &str) -> String {
    let http = if mode == "http" {
        "  timeout http-request 10s\n  timeout http-keep-alive 120s\n"
    } else {
        ""
    };
    format!(
        "global\n  maxconn 8000\n  nbthread {threads}\n\
defaults\n  mode {mode}\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n{http}"
    )
}

/// Starts one HAProxy per side with the given configurations (server side first, awaited on each of its
/// listen addresses); returns them client side first.
async fn start_haproxies(
    placement: &Placement,
    dir: &FsPath,
    server: (String, Vec<SocketAddr>),
    client: (String, Vec<SocketAddr>),
) -> anyhow::Result<Vec<Proc>> {
    let bin = which("haproxy").ok_or_else(|| {
        anyhow::anyhow!("haproxy not found on PATH (Debian: apt-get install -y haproxy)")
    })?;
    let mut procs = Vec::new();
    for (name, ns, (cfg, addrs)) in [
        ("haproxy-server", &placement.server_ns, server),
        ("haproxy-client", &placement.client_ns, client),
    ] {
        let path = dir.join(format!("{name}.cfg"));
        std::fs::write(&path, cfg)?;
        let mut cmd = placement.proxy_command(ns, &bin);
        cmd.arg("-db").arg("-f").arg(&path);
        let mut p = spawn(name, cmd, dir, Stdio::null())?;
        for addr in addrs {
            wait_listening(
                ns,
                addr,
                &placement.bench_bin,
                &mut p,
                placement.start_timeout(Duration::from_secs(10)),
            )
            .await?;
        }
        procs.push(p);
    }
    procs.reverse();
    Ok(procs)
}

/// Starts the HAProxy pair: server side terminating mTLS in front of the app, client side originating it.
pub async fn haproxy_pair(
    placement: &Placement,
    certs: &Certs,
    dir: &FsPath,
) -> anyhow::Result<Path> {
    let server_port = port_in(&placement.server_ns)?;
    let server_listen = SocketAddr::new(placement.server_ip, server_port);
    let global = haproxy_global(placement.haproxy_threads.max(1), "tcp");
    let server_cfg = format!(
        "{global}frontend mtls_in\n  bind {server_listen} ssl crt {} ca-file {} verify required\n  default_backend app\n\
backend app\n  server app {}\n",
        certs.server.combined.display(),
        certs.ca.display(),
        placement.app
    );
    let client_port = port_in(&placement.client_ns)?;
    let client_listen = SocketAddr::from((Ipv4Addr::LOCALHOST, client_port));
    let client_cfg = format!(
        "{global}frontend plain_in\n  bind {client_listen}\n  default_backend mtls_out\n\
backend mtls_out\n  server peer {server_listen} ssl crt {} ca-file {} verify required\n",
        certs.client.combined.display(),
        certs.ca.display()
    );
    let procs = start_haproxies(
        placement,
        dir,
        (server_cfg, vec![server_listen]),
        (client_cfg, vec![client_listen]),
    )
    .await?;
    Ok(Path {
        target: Target::Peer,
        entry: client_listen,
        l7: None,
        procs,
    })
}

/// Starts the HAProxy pair in `mode http`: each side parses every request. Two lanes, so each hop speaks
/// what the app speaks: HTTP/1.1 clients → h1 over mTLS (ALPN http/1.1) → h1 to the app; h2 clients (HTTP/2
/// and gRPC, prior knowledge) → h2 over mTLS (ALPN h2) → h2 to the app (`proto h2`). HAProxy's defaults
/// otherwise (connection reuse `safe`, 100 concurrent streams per h2 connection).
pub async fn haproxy_http_pair(
    placement: &Placement,
    certs: &Certs,
    dir: &FsPath,
) -> anyhow::Result<Path> {
    let global = haproxy_global(placement.haproxy_threads.max(1), "http");
    let s_h1 = SocketAddr::new(placement.server_ip, port_in(&placement.server_ns)?);
    let s_h2 = SocketAddr::new(placement.server_ip, port_in(&placement.server_ns)?);
    let tls_in = format!(
        "ssl crt {} ca-file {} verify required",
        certs.server.combined.display(),
        certs.ca.display()
    );
    let app = placement.app;
    let server_cfg = format!(
        "{global}frontend mtls_in_h1\n  bind {s_h1} {tls_in} alpn http/1.1\n  default_backend app_h1\n\
frontend mtls_in_h2\n  bind {s_h2} {tls_in} alpn h2\n  default_backend app_h2\n\
backend app_h1\n  server app {app}\n\
backend app_h2\n  server app {app} proto h2\n"
    );
    let c_h1 = SocketAddr::from((Ipv4Addr::LOCALHOST, port_in(&placement.client_ns)?));
    let c_h2 = SocketAddr::from((Ipv4Addr::LOCALHOST, port_in(&placement.client_ns)?));
    let tls_out = format!(
        "ssl crt {} ca-file {} verify required",
        certs.client.combined.display(),
        certs.ca.display()
    );
    let client_cfg = format!(
        "{global}frontend plain_in_h1\n  bind {c_h1}\n  default_backend mtls_out_h1\n\
frontend plain_in_h2\n  bind {c_h2} proto h2\n  default_backend mtls_out_h2\n\
backend mtls_out_h1\n  server peer {s_h1} {tls_out} alpn http/1.1\n\
backend mtls_out_h2\n  server peer {s_h2} {tls_out} alpn h2\n"
    );
    let procs = start_haproxies(
        placement,
        dir,
        (server_cfg, vec![s_h1, s_h2]),
        (client_cfg, vec![c_h1, c_h2]),
    )
    .await?;
    Ok(Path {
        target: Target::PeerHttp,
        entry: c_h1,
        l7: Some(L7Entries {
            http1: c_h1,
            http2: c_h2,
            grpc: c_h2,
        }),
        procs,
    })
}

#[derive(Debug, Deserialize)]
pub(crate) struct Ready {
    event: String,
    pub(crate) inbound: Option<SocketAddr>,
    #[serde(default)]
    pub(crate) outbound: Vec<SocketAddr>,
    #[serde(default)]
    ingress: Option<SocketAddr>,
}

pub(crate) async fn start_quicmesh(
    name: &str,
    bin: &FsPath,
    placement: &Placement,
    ns: &Option<String>,
    config: &str,
    dir: &FsPath,
) -> anyhow::Result<(Proc, Ready)> {
    let cfg_path = dir.join(format!("{name}.toml"));
    let quic = placement.quic_toml.trim();
    let mut full = format!("{config}\n{}\n", placement.proxy_toml);
    if !quic.is_empty() {
        full.push_str(&format!("[quic]\n{quic}\n"));
    }
    std::fs::write(&cfg_path, full)?;
    // The slim sidecar binary when it was built next to `quicmesh` (what a deployment runs), else the
    // `proxy` subcommand of `quicmesh` itself.
    let slim = bin.with_file_name("quicmesh-proxy");
    let mut cmd = if slim.is_file() {
        placement.proxy_command(ns, &slim)
    } else {
        let mut c = placement.proxy_command(ns, bin);
        c.arg("proxy");
        c
    };
    cmd.arg("--config").arg(&cfg_path);
    let mut p = spawn(name, cmd, dir, Stdio::piped())?;
    let stdout = p
        .child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("{name}: no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let deadline = placement.start_timeout(Duration::from_secs(20));
    let ready = tokio::time::timeout(deadline, async {
        while let Some(line) = lines.next_line().await? {
            if let Ok(r) = serde_json::from_str::<Ready>(&line)
                && r.event == "ready"
            {
                return anyhow::Ok(Some(r));
            }
            tracing::debug!(proxy = name, "{line}");
        }
        Ok(None)
    })
    .await;
    let ready = match ready {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) | Ok(Err(_)) => {
            p.check_alive()?;
            anyhow::bail!(
                "{name} closed stdout without a ready line; log tail:\n{}",
                p.log_tail()
            )
        }
        Err(_) => anyhow::bail!(
            "{name} printed no ready line within {deadline:?}; log tail:\n{}",
            p.log_tail()
        ),
    };
    // Keep draining stdout so the proxy never blocks on a full pipe.
    let name_owned = name.to_owned();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::debug!(proxy = %name_owned, "{line}");
        }
    });
    Ok((p, ready))
}

/// Starts the quicmesh sidecar pair: the server side first (its inbound QUIC address goes into the client
/// side's configuration), each awaited through its `ready` line.
pub async fn quicmesh_pair(
    placement: &Placement,
    certs: &Certs,
    bin: &FsPath,
    dir: &FsPath,
) -> anyhow::Result<Path> {
    let q = |p: &FsPath| format!("{:?}", p.display().to_string());
    let server_cfg = format!(
        "[identity]\ncert = {}\nkey = {}\ntrust_bundle = {}\n\n[inbound]\nlisten = \"{}\"\napp = \"{}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        q(&certs.server.cert),
        q(&certs.server.key),
        q(&certs.ca),
        SocketAddr::new(placement.server_ip, 0),
        placement.app,
    );
    let (server, ready) = start_quicmesh(
        "quicmesh-server",
        bin,
        placement,
        &placement.server_ns,
        &server_cfg,
        dir,
    )
    .await?;
    let inbound = ready
        .inbound
        .ok_or_else(|| anyhow::anyhow!("quicmesh-server's ready line has no inbound address"))?;
    let client_cfg = format!(
        "[identity]\ncert = {}\nkey = {}\ntrust_bundle = {}\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"bench\"\nport = {}\nendpoints = [\"{inbound}\"]\nconnect_timeout = \"5s\"\n\
server_identities = [\"server\"]\n",
        q(&certs.client.cert),
        q(&certs.client.key),
        q(&certs.ca),
        placement.app.port(),
    );
    let (client, ready) = start_quicmesh(
        "quicmesh-client",
        bin,
        placement,
        &placement.client_ns,
        &client_cfg,
        dir,
    )
    .await?;
    let entry = *ready
        .outbound
        .first()
        .ok_or_else(|| anyhow::anyhow!("quicmesh-client's ready line has no outbound address"))?;
    Ok(Path {
        target: Target::Quicmesh,
        entry,
        l7: None,
        procs: vec![client, server],
    })
}

/// Service ports of the L7 quicmesh path: HTTP (HTTP/1.1 and h2c) and gRPC, both served by the one app.
const L7_HTTP_PORT: u16 = 80;
const L7_GRPC_PORT: u16 = 81;

/// Starts the quicmesh sidecars as an HTTP-aware path: the server side serves service ports 80 and 81
/// from the app; the client side's mesh file declares service `bench` with port 80 `http` and port 81
/// `grpc` and the server side as its endpoint, and it listens once per port. Each request then crosses as
/// its own QUIC stream. With `policy`, both sides read a mesh file with [`bench_policies`] too, which the
/// server side enforces (authorization and rate limits are decided by the destination).
pub async fn quicmesh_l7_pair(
    placement: &Placement,
    certs: &Certs,
    bin: &FsPath,
    dir: &FsPath,
    policy: bool,
) -> anyhow::Result<Path> {
    let q = |p: &FsPath| format!("{:?}", p.display().to_string());
    let app = placement.app;
    let (target, name) = if policy {
        (Target::QuicmeshL7Policy, "quicmesh-l7-policy")
    } else {
        (Target::QuicmeshL7, "quicmesh-l7")
    };
    let ns = "bench";
    let service = format!(
        "kind: Service\nmetadata: {{name: bench, namespace: {ns}}}\n\
spec: {{ports: [{{port: {L7_HTTP_PORT}, protocol: http}}, {{port: {L7_GRPC_PORT}, protocol: grpc}}], identities: [server]}}\n"
    );
    let policies = if policy {
        bench_policies(ns, 100)
    } else {
        String::new()
    };
    let server_mesh = if policy {
        let p = dir.join(format!("{name}-server-mesh.yaml"));
        std::fs::write(&p, format!("{service}{policies}"))?;
        format!("mesh = {}\n\n", q(&p))
    } else {
        String::new()
    };
    let server_cfg = format!(
        "{server_mesh}[identity]\ncert = {}\nkey = {}\ntrust_bundle = {}\n\n[inbound]\nlisten = \"{}\"\n\
ports = [{{ port = {L7_HTTP_PORT}, app = \"{app}\" }}, {{ port = {L7_GRPC_PORT}, app = \"{app}\" }}]\n\n\
[admin]\nlisten = \"127.0.0.1:0\"\n",
        q(&certs.server.cert),
        q(&certs.server.key),
        q(&certs.ca),
        SocketAddr::new(placement.server_ip, 0),
    );
    let (server, ready) = start_quicmesh(
        &format!("{name}-server"),
        bin,
        placement,
        &placement.server_ns,
        &server_cfg,
        dir,
    )
    .await?;
    let inbound = ready
        .inbound
        .ok_or_else(|| anyhow::anyhow!("{name}-server's ready line has no inbound address"))?;
    let mesh = format!(
        "{service}---\nkind: Endpoint\nmetadata: {{name: bench-0, namespace: {ns}}}\n\
spec: {{service: bench, address: \"{inbound}\", spiffe_id: \"spiffe://{}/ns/{ns}/sa/server\"}}\n{policies}",
        crate::certs::TRUST_DOMAIN
    );
    let mesh_path = dir.join(format!("{name}-mesh.yaml"));
    std::fs::write(&mesh_path, mesh)?;
    let outbound = |port: u16| {
        format!(
            "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"bench\"\nport = {port}\nconnect_timeout = \"5s\"\n"
        )
    };
    let client_cfg = format!(
        "mesh = {}\n\n[identity]\ncert = {}\nkey = {}\ntrust_bundle = {}\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n{}\n{}",
        q(&mesh_path),
        q(&certs.client.cert),
        q(&certs.client.key),
        q(&certs.ca),
        outbound(L7_HTTP_PORT),
        outbound(L7_GRPC_PORT),
    );
    let (client, ready) = start_quicmesh(
        &format!("{name}-client"),
        bin,
        placement,
        &placement.client_ns,
        &client_cfg,
        dir,
    )
    .await?;
    let [http, grpc] = ready.outbound[..] else {
        anyhow::bail!(
            "{name}-client's ready line lists {} outbound addresses, want 2",
            ready.outbound.len()
        );
    };
    Ok(Path {
        target,
        entry: http,
        l7: Some(L7Entries {
            http1: http,
            http2: http,
            grpc,
        }),
        procs: vec![client, server],
    })
}

/// An ingress of the ingress benchmark: its processes and the address outside clients load.
#[derive(Debug)]
pub struct Ingress {
    /// The processes, killed when dropped.
    pub procs: Vec<Proc>,
    /// Where clients connect (UDP for HTTP/3, TCP for HTTP/2 over TLS).
    pub entry: SocketAddr,
}

/// The quicmesh ingress on the server side: a server proxy in front of the app (service `bench` port
/// 80, declared `http`) and a gateway proxy whose HTTP/3 `[ingress]` routes [`crate::certs::INGRESS_HOST`]
/// to it, each request its own QUIC stream between the two, under the gateway's own identity.
pub async fn quicmesh_ingress(
    placement: &Placement,
    certs: &Certs,
    bin: &FsPath,
    dir: &FsPath,
) -> anyhow::Result<Ingress> {
    let q = |p: &FsPath| format!("{:?}", p.display().to_string());
    let app = placement.app;
    let ns = &placement.server_ns;
    let server_cfg = format!(
        "[identity]\ncert = {}\nkey = {}\ntrust_bundle = {}\n\n[inbound]\nlisten = \"127.0.0.1:0\"\n\
ports = [{{ port = {L7_HTTP_PORT}, app = \"{app}\" }}]\n\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        q(&certs.server.cert),
        q(&certs.server.key),
        q(&certs.ca),
    );
    let (server, ready) =
        start_quicmesh("ingress-server", bin, placement, ns, &server_cfg, dir).await?;
    let inbound = ready
        .inbound
        .ok_or_else(|| anyhow::anyhow!("ingress-server's ready line has no inbound address"))?;
    let mesh = format!(
        "kind: Service\nmetadata: {{name: bench, namespace: bench}}\n\
spec: {{ports: [{{port: {L7_HTTP_PORT}, protocol: http}}], identities: [server]}}\n---\n\
kind: Endpoint\nmetadata: {{name: bench-0, namespace: bench}}\n\
spec: {{service: bench, address: \"{inbound}\", spiffe_id: \"spiffe://{}/ns/bench/sa/server\"}}\n",
        crate::certs::TRUST_DOMAIN
    );
    let mesh_path = dir.join("ingress-gateway-mesh.yaml");
    std::fs::write(&mesh_path, mesh)?;
    let gateway_cfg = format!(
        "mesh = {}\n\n[identity]\ncert = {}\nkey = {}\ntrust_bundle = {}\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
[ingress]\nlisten = \"{}\"\ncert = {}\nkey = {}\n\n[[ingress.routes]]\nhost = \"{}\"\nservice = \"bench\"\nport = {L7_HTTP_PORT}\n",
        q(&mesh_path),
        q(&certs.client.cert),
        q(&certs.client.key),
        q(&certs.ca),
        SocketAddr::new(placement.server_ip, 0),
        q(&certs.ingress.cert),
        q(&certs.ingress.key),
        crate::certs::INGRESS_HOST,
    );
    let (gateway, ready) =
        start_quicmesh("ingress-gateway", bin, placement, ns, &gateway_cfg, dir).await?;
    let entry = ready
        .ingress
        .ok_or_else(|| anyhow::anyhow!("ingress-gateway's ready line has no ingress address"))?;
    Ok(Ingress {
        procs: vec![gateway, server],
        entry,
    })
}

/// The ingress users would otherwise deploy: HAProxy in `mode http` terminating HTTP/2 over TLS
/// (ALPN h2, the same serving certificate) and speaking h2 to the app.
pub async fn haproxy_ingress(
    placement: &Placement,
    certs: &Certs,
    dir: &FsPath,
) -> anyhow::Result<Ingress> {
    let bin = which("haproxy").ok_or_else(|| {
        anyhow::anyhow!("haproxy not found on PATH (Debian: apt-get install -y haproxy)")
    })?;
    let global = haproxy_global(placement.haproxy_threads.max(1), "http");
    let entry = SocketAddr::new(placement.server_ip, port_in(&placement.server_ns)?);
    let cfg = format!(
        "{global}frontend h2_tls\n  bind {entry} ssl crt {} alpn h2\n  default_backend app_h2\n\
backend app_h2\n  server app {} proto h2\n",
        certs.ingress.combined.display(),
        placement.app
    );
    let path = dir.join("haproxy-ingress.cfg");
    std::fs::write(&path, cfg)?;
    let mut cmd = placement.proxy_command(&placement.server_ns, &bin);
    cmd.arg("-db").arg("-f").arg(&path);
    let mut p = spawn("haproxy-ingress", cmd, dir, Stdio::null())?;
    wait_listening(
        &placement.server_ns,
        entry,
        &placement.bench_bin,
        &mut p,
        placement.start_timeout(Duration::from_secs(10)),
    )
    .await?;
    Ok(Ingress {
        procs: vec![p],
        entry,
    })
}

/// The policies of the `quicmesh-l7-policy` path, for service `bench` in `ns`: deny by default with `rules`
/// allow rules, of which only the last admits the bench client (each request is checked against all of
/// them: the worst case), and a service rate limit far above any rate the bench reaches.
pub fn bench_policies(ns: &str, rules: usize) -> String {
    let td = crate::certs::TRUST_DOMAIN;
    let mut allow = String::new();
    for i in 0..rules.saturating_sub(1) {
        allow.push_str(&format!(
            "      - {{from_identities: [\"spiffe://{td}/ns/other-{i}/sa/caller-{i}\"], methods: [GET, POST], path_prefixes: [/api/v{i}/]}}\n"
        ));
    }
    allow.push_str(&format!(
        "      - {{from_identities: [\"spiffe://{td}/ns/{ns}/sa/client\"]}}\n"
    ));
    format!(
        "---\nkind: Policy\nmetadata: {{name: bench-authz, namespace: {ns}}}\nspec:\n  target_service: bench\n  authorization:\n    mode: enforce\n    default_action: deny\n    allow:\n{allow}\
---\nkind: Policy\nmetadata: {{name: bench-limit, namespace: {ns}}}\nspec: {{target_service: bench, rate_limit: {{requests_per_second: 10000000, burst: 1000000}}}}\n"
    )
}

/// Starts the path for `target` (direct needs no process).
pub async fn start(
    target: Target,
    placement: &Placement,
    certs: &Certs,
    quicmesh_bin: Option<&FsPath>,
    dir: &FsPath,
) -> anyhow::Result<Path> {
    let need_bin = || {
        quicmesh_bin.ok_or_else(|| {
            anyhow::anyhow!(
                "no quicmesh binary (build it with `cargo build --release -p quicmesh`, or pass --quicmesh-bin)"
            )
        })
    };
    match target {
        Target::Direct => Ok(Path::direct(placement)),
        Target::Peer => haproxy_pair(placement, certs, dir).await,
        Target::PeerHttp => haproxy_http_pair(placement, certs, dir).await,
        Target::Quicmesh => quicmesh_pair(placement, certs, need_bin()?, dir).await,
        Target::QuicmeshL7 => quicmesh_l7_pair(placement, certs, need_bin()?, dir, false).await,
        Target::QuicmeshL7Policy => {
            quicmesh_l7_pair(placement, certs, need_bin()?, dir, true).await
        }
        Target::Ztunnel => match &placement.ztunnel {
            Ok(bin) => crate::ztunnel::start(placement, bin, dir).await,
            Err(why) => anyhow::bail!("{why}"),
        },
    }
}

/// Finds `name` on PATH (and /usr/sbin, where Debian puts haproxy and nft).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Finds the quicmesh binary: the given path, else `target/release/quicmesh`, else next to this
/// executable.
pub fn find_quicmesh(given: Option<&FsPath>) -> Option<PathBuf> {
    if let Some(p) = given {
        return p.is_file().then(|| p.to_path_buf());
    }
    let mut candidates = vec![PathBuf::from("target/release/quicmesh")];
    if let Ok(exe) = std::env::current_exe() {
        if exe.file_name().is_some_and(|n| n == "quicmesh") {
            candidates.insert(0, exe.clone());
        }
        if let Some(d) = exe.parent() {
            candidates.push(d.join("quicmesh"));
            if let Some(up) = d.parent() {
                candidates.push(up.join("quicmesh"));
            }
        }
    }
    candidates.into_iter().find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    #[test]
    fn opaque_paths_take_every_protocol_at_one_entry_and_l7_paths_no_raw_tcp() {
        let opaque = Path {
            target: Target::Quicmesh,
            entry: addr(1),
            l7: None,
            procs: Vec::new(),
        };
        for p in Protocol::ALL {
            assert_eq!(opaque.entry_for(p), Some(addr(1)), "{p:?}");
        }
        let l7 = Path {
            target: Target::QuicmeshL7,
            entry: addr(1),
            l7: Some(L7Entries {
                http1: addr(1),
                http2: addr(2),
                grpc: addr(3),
            }),
            procs: Vec::new(),
        };
        assert_eq!(l7.entry_for(Protocol::Tcp), None);
        assert_eq!(l7.entry_for(Protocol::Http1), Some(addr(1)));
        assert_eq!(l7.entry_for(Protocol::Http2), Some(addr(2)));
        assert_eq!(l7.entry_for(Protocol::GrpcUnary), Some(addr(3)));
        assert_eq!(l7.entry_for(Protocol::GrpcStream), Some(addr(3)));
        assert!(Target::QuicmeshL7.is_l7() && Target::PeerHttp.is_l7());
        assert!(!Target::Quicmesh.is_l7() && !Target::Peer.is_l7());
    }

    #[test]
    fn target_names_on_the_command_line() {
        use clap::ValueEnum;
        for (arg, t) in [
            ("quicmesh-l7", Target::QuicmeshL7),
            ("quicmesh-l7-policy", Target::QuicmeshL7Policy),
            ("peer-http", Target::PeerHttp),
            ("peer-haproxy-http", Target::PeerHttp),
            ("peer", Target::Peer),
        ] {
            assert_eq!(Target::from_str(arg, false), Ok(t), "{arg}");
        }
    }

    #[test]
    fn bench_policies_admit_the_bench_client_only_at_the_last_of_100_rules() {
        use quicmesh_transport::{
            identity::SpiffeId,
            model,
            state::{Admission, MeshState, Request, ServiceRef},
        };
        let td = crate::certs::TRUST_DOMAIN;
        let yaml = format!(
            "kind: Service\nmetadata: {{name: bench, namespace: bench}}\nspec: {{ports: [{{port: 80, protocol: http}}]}}\n{}",
            bench_policies("bench", 100)
        );
        let resources = model::parse_yaml_documents(&yaml).expect("yaml");
        for r in &resources {
            r.validate(td).expect("valid");
        }
        let policies = resources
            .iter()
            .filter_map(|r| match r {
                model::Resource::Policy(p) => Some(p),
                _ => None,
            })
            .collect::<Vec<_>>();
        let rules = policies
            .iter()
            .find_map(|p| p.spec.authorization.as_ref())
            .map(|a| a.allow.len());
        assert_eq!(rules, Some(100));
        assert!(policies.iter().any(|p| p.spec.rate_limit.is_some()));
        let state = MeshState::from_resources(1, td, resources, []);
        let service = ServiceRef::parse("bench", "bench");
        let admit = |sa: &str, path: &str| {
            let peer = SpiffeId::new(td, "bench", sa).expect("id");
            state.admit(&Request {
                peer: &peer,
                service: &service,
                port: 80,
                method: Some("GET"),
                path: Some(path),
            })
        };
        assert!(matches!(
            admit("client", "/x"),
            Admission::Admit { audit: None }
        ));
        assert!(!matches!(admit("server", "/x"), Admission::Admit { .. }));
    }
}
