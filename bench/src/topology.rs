//! The paths a request can take, and the processes that make them: `direct` (client → server), `peer`
//! (client → HAProxy → mTLS TCP → HAProxy → server, one TLS connection per client connection, as a user
//! would deploy without a mesh) and `quicmesh` (client → sidecar → QUIC → sidecar → server).
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
}

impl Target {
    /// Report name.
    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Quicmesh => "quicmesh",
            Target::Peer => "peer-haproxy",
        }
    }
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
}

impl Proc {
    /// Process id (the proxy itself: `ip netns exec` execs in place).
    pub fn pid(&self) -> u32 {
        self.pid
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
    /// Where the load generator connects (inside the client namespace if there is one).
    pub entry: SocketAddr,
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
            procs: Vec::new(),
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

fn command(ns: &Option<String>, program: &FsPath) -> Command {
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

fn spawn(name: &str, mut cmd: Command, dir: &FsPath, stdout: Stdio) -> anyhow::Result<Proc> {
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

/// Connects to `addr` until it accepts, backing off from 1 ms to 50 ms between attempts.
pub async fn probe(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_millis(1);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("nothing listens on {addr} after {timeout:?}");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(50));
    }
}

/// HAProxy settings shared by both sides.
fn haproxy_global(threads: usize) -> String {
    format!(
        "global\n  maxconn 8000\n  nbthread {threads}\n\
defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n"
    )
}

/// Starts the HAProxy pair: server side terminating mTLS in front of the app, client side originating it.
pub async fn haproxy_pair(
    placement: &Placement,
    certs: &Certs,
    dir: &FsPath,
) -> anyhow::Result<Path> {
    let bin = which("haproxy").ok_or_else(|| {
        anyhow::anyhow!("haproxy not found on PATH (Debian: apt-get install -y haproxy)")
    })?;
    let server_port = port_in(&placement.server_ns)?;
    let server_listen = SocketAddr::new(placement.server_ip, server_port);
    let global = haproxy_global(placement.haproxy_threads.max(1));
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
    let server_path = dir.join("haproxy-server.cfg");
    let client_path = dir.join("haproxy-client.cfg");
    std::fs::write(&server_path, server_cfg)?;
    std::fs::write(&client_path, client_cfg)?;
    let mut procs = Vec::new();
    for (name, ns, cfg, addr) in [
        (
            "haproxy-server",
            &placement.server_ns,
            &server_path,
            server_listen,
        ),
        (
            "haproxy-client",
            &placement.client_ns,
            &client_path,
            client_listen,
        ),
    ] {
        let mut cmd = command(ns, &bin);
        cmd.arg("-db").arg("-f").arg(cfg);
        let mut p = spawn(name, cmd, dir, Stdio::null())?;
        wait_listening(
            ns,
            addr,
            &placement.bench_bin,
            &mut p,
            Duration::from_secs(10),
        )
        .await?;
        procs.push(p);
    }
    procs.reverse();
    Ok(Path {
        target: Target::Peer,
        entry: client_listen,
        procs,
    })
}

#[derive(Debug, Deserialize)]
struct Ready {
    event: String,
    inbound: Option<SocketAddr>,
    #[serde(default)]
    outbound: Vec<SocketAddr>,
}

async fn start_quicmesh(
    name: &str,
    bin: &FsPath,
    ns: &Option<String>,
    config: &str,
    dir: &FsPath,
) -> anyhow::Result<(Proc, Ready)> {
    let cfg_path = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg_path, config)?;
    // The slim sidecar binary when it was built next to `quicmesh` (what a deployment runs), else the
    // `proxy` subcommand of `quicmesh` itself.
    let slim = bin.with_file_name("quicmesh-proxy");
    let mut cmd = if slim.is_file() {
        command(ns, &slim)
    } else {
        let mut c = command(ns, bin);
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
    let ready = tokio::time::timeout(Duration::from_secs(20), async {
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
            "{name} printed no ready line within 20 s; log tail:\n{}",
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
        procs: vec![client, server],
    })
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
