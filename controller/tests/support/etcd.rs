//! A real etcd cluster for tests: `n` members of Debian's `etcd` on loopback ports in a temp dir, each
//! announced ready by its own log line ("serving client traffic ...", which etcd 3.4 prints once the
//! member has published itself through a cluster with a leader), killed on drop. Short raft timers keep start-up and
//! elections fast. At most [`MAX_CLUSTERS`] run at once in one test process (two cores).

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Condvar, Mutex, mpsc},
    time::{Duration, Instant},
};

/// Clusters running at once in one test process.
pub const MAX_CLUSTERS: usize = 2;
/// Time for every member to be ready.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// etcd's transaction limit in tests: room for the API's largest batch (1,000 resources).
pub const MAX_TXN_OPS: usize = 2048;

static RUNNING: Mutex<usize> = Mutex::new(0);
static FREED: Condvar = Condvar::new();

struct Slot;

impl Slot {
    fn take() -> Slot {
        let mut n = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        while *n >= MAX_CLUSTERS {
            n = FREED.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        *n += 1;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *RUNNING.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        FREED.notify_one();
    }
}

/// Why etcd cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    match Command::new("etcd").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!("`etcd --version` failed: {}", o.status)),
        Err(e) => Some(format!(
            "no etcd binary ({e}); install Debian's etcd-server"
        )),
    }
}

/// Why `etcdctl` (Debian's etcd-client) cannot run here, if it cannot.
#[allow(dead_code)]
pub fn etcdctl_unavailable() -> Option<String> {
    match Command::new("etcdctl").arg("version").output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!("`etcdctl version` failed: {}", o.status)),
        Err(e) => Some(format!(
            "no etcdctl binary ({e}); install Debian's etcd-client"
        )),
    }
}

struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

/// A running etcd cluster.
pub struct EtcdCluster {
    members: Vec<Member>,
    _dir: tempfile::TempDir,
    _slot: Slot,
}

/// A port free now, below the ephemeral range (so no outgoing connection takes it before etcd binds
/// it); a collision with another test is caught by the member exiting, and the cluster starts again.
fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = 20_000 + rand::random::<u16>() % 12_000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32000")
}

enum Event {
    Ready(usize),
    Exited(usize),
}

/// TLS for the members' client port: their certificate and key, and the CA whose client certificates
/// they require (PEM files).
#[allow(dead_code)]
pub struct ServerTls {
    /// Certificate for 127.0.0.1.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// CA of the client certificates.
    pub client_ca: PathBuf,
}

impl EtcdCluster {
    /// Starts `n` members and waits until each is ready. Panics with the members' last log lines if
    /// they are not ready in time.
    pub fn start(n: usize) -> EtcdCluster {
        Self::start_with(n, None)
    }

    /// As [`EtcdCluster::start`], the client port serving TLS and requiring client certificates.
    pub fn start_with(n: usize, tls: Option<&ServerTls>) -> EtcdCluster {
        let slot = Slot::take();
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Self::launch(n, tls) {
                Ok((members, dir)) => {
                    return EtcdCluster {
                        members,
                        _dir: dir,
                        _slot: slot,
                    };
                }
                Err(e) => failures.push(e),
            }
        }
        panic!(
            "etcd did not start three times:\n{}",
            failures.join("\n---\n")
        );
    }

    /// One attempt: the members, ready, or why not (every member killed).
    fn launch(
        n: usize,
        tls: Option<&ServerTls>,
    ) -> Result<(Vec<Member>, tempfile::TempDir), String> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let dir = tempfile::tempdir().expect("tempdir");
        let mut members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                child: None,
            })
            .collect();
        let initial: Vec<String> = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect();
        let initial = initial.join(",");
        let token = format!("quicmesh-test-{}", members[0].peer);
        let (ready_tx, ready_rx) = mpsc::channel::<Event>();
        let logs: std::sync::Arc<Mutex<Vec<String>>> = Default::default();
        for (i, m) in members.iter_mut().enumerate() {
            let data: PathBuf = dir.path().join(&m.name);
            let mut cmd = Command::new("etcd");
            if let Some(t) = tls {
                cmd.arg("--cert-file")
                    .arg(&t.cert)
                    .arg("--key-file")
                    .arg(&t.key)
                    .arg("--trusted-ca-file")
                    .arg(&t.client_ca)
                    .arg("--client-cert-auth");
            }
            let mut child = cmd
                .args(["--name", &m.name])
                .arg("--data-dir")
                .arg(&data)
                .args([
                    "--listen-client-urls",
                    &format!("{scheme}://127.0.0.1:{}", m.client),
                    "--advertise-client-urls",
                    &format!("{scheme}://127.0.0.1:{}", m.client),
                    "--listen-peer-urls",
                    &format!("http://127.0.0.1:{}", m.peer),
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{}", m.peer),
                    "--initial-cluster",
                    &initial,
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    &token,
                    "--heartbeat-interval",
                    "25",
                    "--election-timeout",
                    "250",
                    "--max-txn-ops",
                    &MAX_TXN_OPS.to_string(),
                    "--max-request-bytes",
                    "10485760",
                    "--logger",
                    "zap",
                    "--log-outputs",
                    "stderr",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn etcd");
            let stderr = child.stderr.take().expect("stderr");
            let tx = ready_tx.clone();
            let logs = logs.clone();
            let name = m.name.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("serving client traffic") {
                        let _ = tx.send(Event::Ready(i));
                    }
                    let mut l = logs.lock().unwrap_or_else(|e| e.into_inner());
                    if l.len() >= 200 {
                        l.remove(0);
                    }
                    l.push(format!("{name}: {line}"));
                }
                let _ = tx.send(Event::Exited(i));
            });
            m.child = Some(child);
        }
        let deadline = Instant::now() + READY_WITHIN;
        let mut ready = vec![false; n];
        let fail = |members: &mut Vec<Member>, why: String| {
            for m in members.iter_mut() {
                if let Some(mut c) = m.child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
            let l = logs.lock().unwrap_or_else(|e| e.into_inner());
            Err(format!("{why}\n{}", l.join("\n")))
        };
        while ready.iter().any(|r| !r) {
            let left = deadline.saturating_duration_since(Instant::now());
            match ready_rx.recv_timeout(left) {
                Ok(Event::Ready(i)) => ready[i] = true,
                Ok(Event::Exited(i)) => {
                    return fail(
                        &mut members,
                        format!("etcd member m{i} exited while starting"),
                    );
                }
                Err(_) => {
                    return fail(
                        &mut members,
                        format!("etcd members not ready within {READY_WITHIN:?}: {ready:?}"),
                    );
                }
            }
        }
        Ok((members, dir))
    }

    /// `etcd://127.0.0.1:A,127.0.0.1:B,...` for `--store`.
    pub fn url(&self) -> String {
        let eps: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client))
            .collect();
        format!("etcd://{}", eps.join(","))
    }

    /// Runs `etcdctl` on the cluster with `args`, `stdin` as its input; its output, or why it failed.
    #[allow(dead_code)]
    pub fn etcdctl(&self, args: &[&str], stdin: &str) -> Result<String, String> {
        use std::io::Write;
        let eps: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client))
            .collect();
        let mut child = Command::new("etcdctl")
            .arg(format!("--endpoints={}", eps.join(",")))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("etcdctl: {e}"))?;
        if let Some(mut i) = child.stdin.take() {
            i.write_all(stdin.as_bytes())
                .map_err(|e| format!("etcdctl stdin: {e}"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("etcdctl: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!(
                "etcdctl {args:?}: {}: {text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// `kill -9` of member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// The member that reports itself leader (the `etcd_server_is_leader` gauge of its `/metrics`, served
/// on the client port), by index.
#[allow(dead_code)]
pub async fn leader(etcd: &EtcdCluster) -> usize {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = etcd.url();
    let eps: Vec<&str> = url.trim_start_matches("etcd://").split(',').collect();
    for (i, ep) in eps.iter().enumerate() {
        let mut c = tokio::net::TcpStream::connect(ep).await.expect("connect");
        c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .await
            .expect("request");
        let mut page = String::new();
        c.read_to_string(&mut page).await.expect("metrics");
        assert!(
            page.contains("etcd_server_is_leader"),
            "{ep}: no leader gauge"
        );
        if page.lines().any(|l| l == "etcd_server_is_leader 1") {
            return i;
        }
    }
    panic!("no leader among {eps:?}");
}
