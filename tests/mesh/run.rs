//! `quicmesh run -- CMD ARGS` as a user runs it: the built binary with a real sidecar and real child
//! processes (`sh`, `python3`). Exit codes pass through, signals reach the app, the app's traffic goes
//! through the sidecar's outbound listener to a real server-side proxy, and a sidecar that cannot become
//! ready fails the command before the app starts.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, BufReader},
    process::Command,
};

use crate::support::*;

/// Runs `quicmesh run --config cfg [extra] -- app...` to completion (bounded by `limit`): exit code,
/// stdout, stderr.
async fn run(
    cfg: &Path,
    extra: &[&str],
    app: &[&str],
    limit: Duration,
) -> (Option<i32>, String, String) {
    let child = Command::new(QUICMESH)
        .arg("run")
        .arg("--config")
        .arg(cfg)
        .args(extra)
        .arg("--")
        .args(app)
        .env("QUICMESH_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn quicmesh run");
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("quicmesh run -- {app:?} did not finish within {limit:?}"))
        .expect("wait");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A static-mode sidecar configuration with identity `app`, and `body` appended.
fn sidecar(pki: &Pki, body: &str) -> PathBuf {
    pki.issue("app", "app");
    pki.config_with("app", "drain_grace = \"2s\"", "", body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_passes_the_apps_exit_code_after_the_sidecar_drained() {
    let pki = Pki::new();
    let cfg = sidecar(&pki, "");
    for code in [0, 3] {
        let (got, out, err) = run(
            &cfg,
            &[],
            &[
                "sh",
                "-c",
                &format!("echo admin=$QUICMESH_ADMIN; exit {code}"),
            ],
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(got, Some(code), "stdout {out}\nstderr {err}");
        // The app ran only once the sidecar was up: it was given the bound admin address.
        assert!(out.starts_with("admin=127.0.0.1:"), "{out}");
        let stopped = err.find("proxy stopped").expect("the sidecar drained");
        let exited = err.find("the app exited").expect("the app's exit logged");
        assert!(exited < stopped, "{err}");
    }
    // A command that does not exist: 127, as a shell says, and the sidecar still drains.
    let (got, _, err) = run(
        &cfg,
        &[],
        &["/nonexistent/quicmesh-app"],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(got, Some(127), "{err}");
    assert!(err.contains("proxy stopped"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_forwards_signals_to_the_app() {
    let pki = Pki::new();
    let cfg = sidecar(&pki, "");
    // (app, exit code expected after SIGTERM): an app that traps it and exits 7, one that dies of it.
    let cases = [
        (
            "trap 'echo got-term; exit 7' TERM; echo started; i=0; while [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; exit 1",
            7,
        ),
        ("echo started; exec sleep 20", 128 + 15),
    ];
    for (script, want) in cases {
        let mut child = Command::new(QUICMESH)
            .args(["run", "--config"])
            .arg(&cfg)
            .args(["--", "sh", "-c", script])
            .env("QUICMESH_LOG", "warn")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn quicmesh run");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the app started within 30 s")
            .expect("read");
        assert_eq!(first.as_deref(), Some("started"));
        sigterm(child.id().expect("running"));
        let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .expect("exited within 15 s of SIGTERM")
            .expect("wait");
        let mut rest = String::new();
        let _ = lines.get_mut().read_to_string(&mut rest).await;
        assert_eq!(status.code(), Some(want), "{script}: {rest}");
        if want == 7 {
            assert!(rest.contains("got-term"), "the app's trap ran: {rest}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_reaches_a_mesh_service_through_its_sidecar() {
    if !python3_available() {
        eprintln!("skipped: python3 is not installed");
        return;
    }
    let pki = Pki::new();
    let echo = echo_server().await;
    let server = server_proxy(&pki, echo).await;
    let cfg = sidecar(
        &pki,
        &format!(
            "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"echo\"\nport = 7\nendpoints = [\"{}\"]\n",
            server.inbound()
        ),
    );
    // The app finds the outbound listener in its environment, sends 64 KiB through the mesh and
    // checks the echo; its exit code says whether it came back whole.
    let client = r#"
import os, socket, sys
host, port = os.environ["QUICMESH_OUTBOUND_0"].rsplit(":", 1)
data = bytes(range(256)) * 256
s = socket.create_connection((host, int(port)), timeout=10)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
back = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    back += chunk
print("echoed", len(back))
sys.exit(0 if back == data else 5)
"#;
    let (code, out, err) = run(
        &cfg,
        &[],
        &["python3", "-c", client],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(code, Some(0), "stdout {out}\nstderr {err}");
    assert_eq!(out.trim(), "echoed 65536");
    // The bytes crossed the server-side proxy, from the app's sidecar identity.
    let m = server.metrics().await;
    assert_eq!(
        metric(
            &m,
            "quicmesh_tunnel_opened_total",
            &[
                "direction=\"inbound\"",
                "spiffe://mesh.local/ns/default/sa/app"
            ]
        ),
        1.0,
        "{m}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_that_cannot_become_ready_fails_before_the_app_starts() {
    let pki = Pki::new();
    let dir = pki.path();
    let marker = dir.join("app-ran");
    let app = format!("touch {}", marker.display());

    // No controller listens: the wait is bounded and the reason given.
    std::fs::write(dir.join("token"), "qmj_unused").expect("token");
    let cfg = dir.join("nocontroller.toml");
    std::fs::write(
        &cfg,
        format!(
            "[controller]\naddress = \"127.0.0.1:9\"\ntrust_bundle = \"ca.pem\"\njoin_token_file = \"token\"\nidentity = \"spiffe://{TD}/ns/default/sa/app\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n"
        ),
    )
    .expect("config");
    let (code, _, err) = run(
        &cfg,
        &["--ready-timeout", "2s"],
        &["sh", "-c", &app],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("the sidecar is not ready, the app was not started: not ready within 2s"),
        "{err}"
    );
    assert!(err.contains("CA unavailable"), "the last reason: {err}");
    assert!(!marker.exists(), "the app must not have run");

    // A port already taken: the configuration error names the key.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr");
    let cfg = sidecar(
        &pki,
        &format!(
            "[[outbound]]\nlisten = \"{port}\"\nservice = \"echo\"\nport = 7\nendpoints = [\"127.0.0.1:9\"]\n"
        ),
    );
    let (code, _, err) = run(&cfg, &[], &["sh", "-c", &app], Duration::from_secs(30)).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("outbound[0].listen: cannot bind"), "{err}");
    assert!(!marker.exists(), "the app must not have run");
}

fn python3_available() -> bool {
    std::process::Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
