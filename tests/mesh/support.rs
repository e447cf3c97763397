//! Shared fixtures: a development PKI on disk, echo servers, proxies in-process, metric scraping.
//! Everything uses real sockets on loopback.

#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use quicmesh_transport::{
    Proxy, ProxyAddresses, ProxyConfig,
    identity::{CertificateAuthority, SpiffeId},
};
use time::OffsetDateTime;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};

pub const TD: &str = "mesh.local";

/// Raises the open-file limit to the hard limit, as the proxy and controller processes do at start, and
/// returns it: a test with a thousand connections holds two or more sockets for each in this process.
pub fn raise_fd_limit() -> u64 {
    quicmesh_transport::cli::raise_open_file_limit().unwrap_or(1024)
}

/// Logs of in-process proxies go to the test's captured output (shown only when a test fails), at
/// `warn` unless `RUST_LOG` says otherwise, so a failure in CI says which tunnel failed and why.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A CA and the certificates it issued, as files in a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: CertificateAuthority,
}

impl Pki {
    pub fn new() -> Self {
        Self::with_trust_domain(TD)
    }

    pub fn with_trust_domain(td: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca =
            CertificateAuthority::generate(td, OffsetDateTime::now_utc() + time::Duration::days(1))
                .expect("CA");
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).expect("write ca");
        Self { dir, ca }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Issues `name.pem`/`name.key` for `id`, valid from `nb` to `na` relative to now.
    pub fn issue_at(&self, name: &str, id: &str, nb: time::Duration, na: time::Duration) {
        let now = OffsetDateTime::now_utc();
        let id: SpiffeId = id.parse().expect("SPIFFE ID");
        let leaf = self.ca.issue(&id, now + nb, now + na).expect("issue");
        std::fs::write(self.path().join(format!("{name}.pem")), leaf.cert_pem).expect("write");
        std::fs::write(self.path().join(format!("{name}.key")), leaf.key_pem).expect("write");
    }

    pub fn issue(&self, name: &str, sa: &str) {
        self.issue_at(
            name,
            &format!("spiffe://{TD}/ns/default/sa/{sa}"),
            -time::Duration::minutes(1),
            time::Duration::hours(1),
        );
    }

    /// Copies `name.pem`/`name.key` issued by another PKI into this directory (a foreign identity).
    pub fn adopt(&self, other: &Pki, name: &str) {
        for ext in ["pem", "key"] {
            std::fs::copy(
                other.path().join(format!("{name}.{ext}")),
                self.path().join(format!("{name}.{ext}")),
            )
            .expect("copy");
        }
    }

    /// Writes a proxy configuration using identity `name`, with `body` appended.
    pub fn config(&self, name: &str, body: &str) -> PathBuf {
        self.config_with(name, "", "", body)
    }

    /// Like [`Pki::config`], with top-level keys in `top` and extra `[identity]` keys in `identity`.
    pub fn config_with(&self, name: &str, top: &str, identity: &str, body: &str) -> PathBuf {
        let text = format!(
            "{top}\n[identity]\ncert = \"{name}.pem\"\nkey = \"{name}.key\"\ntrust_bundle = \"ca.pem\"\n{identity}\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n{body}"
        );
        let path = self.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).expect("write config");
        path
    }
}

/// An in-process proxy, stopped (drained) on drop of `stop` or by `shutdown`.
pub struct Running {
    pub addrs: ProxyAddresses,
    /// The proxy's live credentials (what the controller's snapshots would update).
    pub creds: quicmesh_transport::identity::Credentials,
    /// The proxy's live mesh state (what the controller's snapshots would replace).
    pub state: quicmesh_transport::state::StateHandle,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Running {
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    pub fn inbound(&self) -> SocketAddr {
        self.addrs.inbound.expect("proxy has an inbound endpoint")
    }

    pub fn outbound(&self, i: usize) -> SocketAddr {
        self.addrs.outbound[i]
    }

    pub async fn metrics(&self) -> String {
        scrape(self.addrs.admin, "/metrics").await.1
    }
}

pub async fn start_proxy(config: &Path) -> Running {
    init_tracing();
    let cfg = ProxyConfig::load(config).expect("config");
    let proxy = Proxy::bind(&cfg, config).await.expect("bind proxy");
    let addrs = proxy.addresses().clone();
    let creds = proxy.credentials().clone();
    let state = proxy.state();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(proxy.run(async move {
        let _ = rx.await;
    }));
    Running {
        addrs,
        creds,
        state,
        stop: Some(tx),
        task: Some(task),
    }
}

/// Server-side proxy for `app`, identity `server` (sa `echo`).
pub async fn server_proxy(pki: &Pki, app: SocketAddr) -> Running {
    pki.issue("server", "echo");
    let cfg = pki.config(
        "server",
        &format!(
            "[inbound]\nlisten = \"127.0.0.1:0\"\nports = [{{ port = 7, app = \"{app}\" }}]\n"
        ),
    );
    start_proxy(&cfg).await
}

/// Client-side proxy with one outbound listener to `endpoints`, extra outbound keys in `extra`.
pub async fn client_proxy(pki: &Pki, name: &str, endpoints: &[SocketAddr], extra: &str) -> Running {
    client_proxy_with(pki, name, "", endpoints, extra).await
}

/// [`client_proxy`] with extra `[identity]` keys.
pub async fn client_proxy_with(
    pki: &Pki,
    name: &str,
    identity: &str,
    endpoints: &[SocketAddr],
    extra: &str,
) -> Running {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    let cfg = pki.config_with(
        name,
        "",
        identity,
        &format!(
            "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"echo\"\nport = 7\nendpoints = [{}]\n{extra}\n",
            eps.join(", ")
        ),
    );
    start_proxy(&cfg).await
}

/// An echo server: every byte back, FIN after the peer's FIN.
pub async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Sends `payload`, half-closes, and reads everything back until EOF, within `limit`.
pub async fn roundtrip(
    target: SocketAddr,
    payload: &[u8],
    limit: Duration,
) -> std::io::Result<Vec<u8>> {
    tokio::time::timeout(limit, async {
        let s = TcpStream::connect(target).await?;
        let (mut r, mut w) = s.into_split();
        let mut back = Vec::with_capacity(payload.len());
        let (wr, rd) = tokio::join!(
            async {
                w.write_all(payload).await?;
                w.shutdown().await
            },
            r.read_to_end(&mut back)
        );
        wr?;
        rd?;
        Ok(back)
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "roundtrip timed out"))?
}

/// A minimal HTTP/1.0 GET: (status code, body).
pub async fn scrape(addr: SocketAddr, path: &str) -> (u16, String) {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await?;
        let mut text = String::new();
        s.read_to_string(&mut text).await?;
        std::io::Result::Ok(text)
    };
    let text = tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .expect("admin answered in time")
        .expect("admin request");
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// Sum of the samples of `name` whose label text contains every one of `labels`.
pub fn metric(body: &str, name: &str, labels: &[&str]) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.iter().all(|x| rest.contains(x)))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// Held by the tests whose load would starve another test's deadlines on a 2-core machine (the
/// endpoint flood, the thousand-connection echo): they run one at a time.
pub async fn heavy() -> tokio::sync::MutexGuard<'static, ()> {
    static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    HEAVY.lock().await
}

/// Calls `f` every 20 ms until what it gives satisfies `done` or `limit` passes: whether it did, and
/// the last value (for the failure message).
pub async fn settle<T, F, Fut>(limit: Duration, mut f: F, done: impl Fn(&T) -> bool) -> (bool, T)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let until = tokio::time::Instant::now() + limit;
    loop {
        let v = f().await;
        if done(&v) {
            return (true, v);
        }
        if tokio::time::Instant::now() >= until {
            return (false, v);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `f` until it holds or `limit` passes; for state that settles asynchronously (counters).
pub async fn eventually<F, Fut>(limit: Duration, f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    settle(limit, f, |held| *held).await.0
}

/// Polls `f` until it gives something or `limit` passes.
pub async fn poll<T, F, Fut>(limit: Duration, f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    settle(limit, f, Option::is_some).await.1
}

/// The built `quicmesh` binary.
pub const QUICMESH: &str = env!("CARGO_BIN_EXE_quicmesh");

/// Spawns `quicmesh ARGS` (killed on drop), stderr appended to `log`, and waits up to 60 s for the JSON
/// ready line it prints on stdout; stdout keeps being drained so the child never blocks on the pipe.
pub async fn spawn_ready(args: &[&str], log: &Path) -> (tokio::process::Child, serde_json::Value) {
    spawn_ready_with(QUICMESH, args, log).await
}

/// [`spawn_ready`] for another program (e.g. the slim `quicmesh-proxy`).
pub async fn spawn_ready_with(
    program: &str,
    args: &[&str],
    log: &Path,
) -> (tokio::process::Child, serde_json::Value) {
    use std::process::Stdio;
    use tokio::io::{AsyncBufReadExt, BufReader};
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env("QUICMESH_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn quicmesh");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("no ready line within 60 s from {args:?}"))
        .expect("read stdout")
        .unwrap_or_else(|| panic!("{args:?} exited before it was ready"));
    let ready: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("ready line {line:?}: {e}"));
    assert_eq!(ready["event"], "ready", "{line}");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, ready)
}

/// The socket address at JSON `pointer` (e.g. `/admin`, `/outbound/0`) of a ready line.
pub fn ready_addr(ready: &serde_json::Value, pointer: &str) -> SocketAddr {
    ready
        .pointer(pointer)
        .and_then(serde_json::Value::as_str)
        .unwrap_or_else(|| panic!("{pointer} in {ready}"))
        .parse()
        .expect("socket address")
}

/// Sends SIGTERM to `pid` (a proxy or `quicmesh run` then drains).
pub fn sigterm(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -TERM {pid}");
}

/// A Python peer from `tests/peers/` that prints a JSON ready line with its `port`, then JSON lines:
/// the child (killed on drop), the port and the lines that follow. None (reason printed) without
/// python3.
pub async fn python_peer(
    script: &str,
    args: &[&std::ffi::OsStr],
) -> Option<(
    tokio::process::Child,
    u16,
    tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
)> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let path = format!("{}/tests/peers/{script}", env!("CARGO_MANIFEST_DIR"));
    let Ok(mut child) = tokio::process::Command::new("python3")
        .arg(&path)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    else {
        eprintln!("SKIP: python3 not found for {script}");
        return None;
    };
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("{script} ready in time"))
        .expect("read")
        .expect("a ready line");
    let ready: serde_json::Value = serde_json::from_str(&ready).expect("ready JSON");
    let port = u16::try_from(ready["port"].as_u64().expect("port")).expect("port");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(l)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str(&l) {
                let _ = tx.send(v);
            }
        }
    });
    Some((child, port, rx))
}
