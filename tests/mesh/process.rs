//! Process tier: the built `quicmesh` and `quicmesh-proxy` binaries, run as a user runs them, with static
//! configuration files.

use std::{
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_quicmesh");
/// The slim sidecar binary: same proxy, without the controller, CLI and harness.
const SLIM: &str = env!("CARGO_BIN_EXE_quicmesh-proxy");

/// A `quicmesh proxy` child process, killed on drop.
struct ProxyProcess {
    child: Child,
    ready: serde_json::Value,
}

impl ProxyProcess {
    /// Starts `quicmesh proxy` and waits for its `ready` line on stdout.
    fn start(config: &Path) -> Self {
        Self::start_with(BIN, &["proxy"], config)
    }

    /// Starts `program args... --config config` and waits for its `ready` line on stdout.
    fn start_with(program: &str, args: &[&str], config: &Path) -> Self {
        let mut child = Command::new(program)
            .args(args)
            .arg("--config")
            .arg(config)
            .env("QUICMESH_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn quicmesh proxy");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read ready line");
        let ready: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("ready line {line:?}: {e}"));
        assert_eq!(ready["event"], "ready");
        Self { child, ready }
    }

    fn addr(&self, key: &str) -> SocketAddr {
        ready_addr(&self.ready, &format!("/{key}"))
    }

    fn outbound(&self) -> SocketAddr {
        ready_addr(&self.ready, "/outbound/0")
    }

    fn terminate(&mut self) {
        sigterm(self.child.id());
    }

    /// Waits for exit, up to `limit`.
    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let until = std::time::Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(
                std::time::Instant::now() < until,
                "proxy did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_binaries_move_data_and_drain_on_sigterm() {
    let pki = Pki::new();
    // The development CA of the CLI issues the certificates.
    std::fs::write(pki.path().join("ca.key"), pki.ca.key_pem()).expect("ca key");
    for (name, sa) in [("server", "echo"), ("client", "client")] {
        let st = Command::new(BIN)
            .args(["ca", "issue", "--dir"])
            .arg(pki.path())
            .args([
                "--id",
                &format!("spiffe://mesh.local/ns/default/sa/{sa}"),
                "--out",
            ])
            .arg(pki.path().join(name))
            .stdout(Stdio::null())
            .status()
            .expect("run ca issue");
        assert!(st.success());
    }

    let echo = echo_server().await;
    let server_cfg = pki.config(
        "server",
        &format!(
            "[inbound]\nlisten = \"127.0.0.1:0\"\nports = [{{ port = 7, app = \"{echo}\" }}]\n"
        ),
    );
    // The server side runs the slim `quicmesh-proxy`, the client side `quicmesh proxy`.
    let mut server = ProxyProcess::start_with(SLIM, &[], &server_cfg);
    let client_cfg = pki.config_with(
        "client",
        "drain_grace = \"20s\"",
        "",
        &format!(
            "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"echo\"\nport = 7\nendpoints = [\"{}\"]\n",
            server.addr("inbound")
        ),
    );
    let mut client = ProxyProcess::start(&client_cfg);
    let target = client.outbound();

    let payload: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
    let back = roundtrip(target, &payload, Duration::from_secs(30))
        .await
        .expect("roundtrip");
    assert!(back == payload, "echo differs");
    assert_eq!(scrape(client.addr("admin"), "/ready").await.0, 200);

    // Drain: an open tunneled connection keeps working after SIGTERM; new ones are refused.
    let mut open = tokio::net::TcpStream::connect(target)
        .await
        .expect("connect");
    open.write_all(b"before").await.expect("write");
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).await.expect("read");
    client.terminate();
    assert!(
        eventually(Duration::from_secs(5), || async {
            tokio::net::TcpStream::connect(target).await.is_err()
        })
        .await,
        "listener still accepting after SIGTERM"
    );
    open.write_all(b"after!")
        .await
        .expect("write after SIGTERM");
    open.read_exact(&mut buf).await.expect("read after SIGTERM");
    assert_eq!(&buf, b"after!");
    drop(open);
    let st = client.wait(Duration::from_secs(10));
    assert!(st.success(), "client proxy exit {st:?}");
    server.terminate();
    assert!(server.wait(Duration::from_secs(10)).success());
}

fn startup_error(config_text: &str, files: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    for (n, t) in files {
        std::fs::write(dir.path().join(n), t).expect("write");
    }
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(&cfg, config_text).expect("write config");
    let mut child = Command::new(BIN)
        .args(["proxy", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    let st = child.wait().expect("wait");
    assert!(!st.success(), "start-up should fail:\n{err}");
    assert!(
        err.contains(&cfg.display().to_string()),
        "error does not name the file:\n{err}"
    );
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_stops_startup_naming_file_key_and_problem() {
    let pki = Pki::new();
    pki.issue("p", "p");
    let cert = pki.path().join("p.pem").display().to_string();
    let key = pki.path().join("p.key").display().to_string();
    let ca = pki.path().join("ca.pem").display().to_string();
    let identity = format!(
        "[identity]\ncert = \"{cert}\"\nkey = \"{key}\"\ntrust_bundle = \"{ca}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n"
    );

    let err = startup_error(
        &format!(
            "{identity}[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"127.0.0.1:1\"\nsevices = []\n"
        ),
        &[],
    );
    assert!(
        err.contains("inbound.sevices") && err.contains("unknown field `sevices`"),
        "{err}"
    );

    let missing = identity.replace(&cert, "/nonexistent/p.pem");
    let err = startup_error(&missing, &[]);
    assert!(
        err.contains("identity.cert")
            && err.contains("/nonexistent/p.pem")
            && err.contains("No such file"),
        "{err}"
    );

    let err = startup_error(
        &identity.replace(&cert, "bad.pem"),
        &[("bad.pem", "not a certificate")],
    );
    assert!(
        err.contains("identity.cert") && err.contains("no PEM certificate"),
        "{err}"
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let err = startup_error(
        &format!(
            "{identity}[[outbound]]\nlisten = \"127.0.0.1:{port}\"\nservice = \"s\"\nport = 1\nendpoints = [\"127.0.0.1:1\"]\n"
        ),
        &[],
    );
    assert!(
        err.contains("outbound[0].listen") && err.contains("in use"),
        "{err}"
    );
}

#[test]
fn quick_start_runs_traffic_through_the_mesh() {
    let out = Command::new(BIN)
        .args(["up", "--duration", "1s", "--connections", "4"])
        .env("QUICMESH_LOG", "warn")
        .output()
        .expect("run quicmesh up");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "quicmesh up failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("failures        0"), "{stdout}");
    assert!(stdout.contains("quicmesh_tunnel_opened_total"), "{stdout}");
}

/// What became of one client connection while the proxy had no file descriptor left.
#[derive(Debug, PartialEq, Eq)]
enum Fate {
    Echoed,
    Refused,
    Hung,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_refuses_excess_clients_at_once_and_recovers() {
    raise_fd_limit();
    let pki = Pki::new();
    let echo = echo_server().await;
    let server = server_proxy(&pki, echo).await;
    pki.issue("client", "client");
    let cfg = pki.config(
        "client",
        &format!(
            "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"echo\"\nport = 7\nendpoints = [\"{}\"]\n",
            server.inbound()
        ),
    );
    // 64 descriptors: room for a few dozen tunneled connections, not for 150.
    let script = "ulimit -n 64 && exec \"$0\" proxy \"$@\"";
    let client = ProxyProcess::start_with("sh", &["-c", script, BIN], &cfg);
    let target = client.outbound();

    let mut set = tokio::task::JoinSet::new();
    for _ in 0..150 {
        set.spawn(async move {
            let mut s = match tokio::net::TcpStream::connect(target).await {
                Ok(s) => s,
                Err(_) => return (Fate::Refused, None),
            };
            let exchange = async {
                s.write_all(b"ping").await?;
                let mut buf = [0u8; 4];
                s.read_exact(&mut buf).await?;
                std::io::Result::Ok(buf)
            };
            let fate = match tokio::time::timeout(Duration::from_secs(5), exchange).await {
                Ok(Ok(b)) if &b == b"ping" => Fate::Echoed,
                Ok(_) => Fate::Refused,
                Err(_) => Fate::Hung,
            };
            // Held open until every connection has its fate, so the descriptors stay taken.
            (fate, Some(s))
        });
    }
    let mut fates = Vec::new();
    let mut held = Vec::new();
    while let Some(r) = set.join_next().await {
        let (fate, s) = r.expect("task");
        fates.push(fate);
        held.extend(s);
    }
    let count = |f: Fate| fates.iter().filter(|x| **x == f).count();
    assert_eq!(count(Fate::Hung), 0, "no client may hang: {fates:?}");
    assert!(count(Fate::Echoed) >= 20, "{fates:?}");
    assert!(count(Fate::Refused) >= 1, "{fates:?}");
    let m = scrape(client.addr("admin"), "/metrics").await.1;
    assert!(
        metric(
            &m,
            "quicmesh_tunnel_failures_total",
            &["reason=\"out_of_file_descriptors\""]
        ) >= 1.0,
        "{m}"
    );
    drop(held);
    // Descriptors freed: new clients are served again.
    let ok = eventually(Duration::from_secs(10), || async {
        roundtrip(target, b"again", Duration::from_secs(2))
            .await
            .is_ok_and(|b| b == b"again")
    })
    .await;
    assert!(ok, "the proxy serves again once descriptors are free");
    server.shutdown().await;
}
