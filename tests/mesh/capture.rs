//! Transparent capture in a network namespace the test creates (root, `ip` and `nft` needed; skipped with
//! a printed reason otherwise). Everything runs inside it as processes: an echo app (python3), a
//! server-side proxy, a client-side proxy with a capture listener, and an app that dials the service's
//! real address (10.96.0.10:80, where nothing listens). `quicmesh capture install` makes that connection
//! reach the echo through the mesh, with the client proxy's identity seen by the server proxy; `capture
//! remove` leaves no rule behind, and the address is unreachable again.

use std::{path::Path, process::Stdio, time::Duration};

use crate::support::*;

/// A network namespace, deleted on drop.
pub(crate) struct Netns(pub(crate) String);

impl Netns {
    fn create() -> Result<Self, String> {
        let ns = Self::named(&format!("qm-capture-{}", std::process::id()))?;
        ns.sh("ip addr add 10.96.0.10/32 dev lo")?;
        Ok(ns)
    }

    /// A new namespace `name` with its loopback up; Err with the reason when the test cannot make one
    /// (not root, a tool missing).
    pub(crate) fn named(name: &str) -> Result<Self, String> {
        if !rustix_is_root() {
            return Err("not root".into());
        }
        for tool in ["ip", "nft", "python3", "curl"] {
            let ok = std::process::Command::new(tool)
                .arg(if tool == "nft" { "--version" } else { "-V" })
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok();
            if !ok {
                return Err(format!("{tool} is not installed"));
            }
        }
        let st = std::process::Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .map_err(|e| e.to_string())?;
        if !st.success() {
            return Err("ip netns add failed".into());
        }
        let ns = Self(name.to_owned());
        ns.sh("ip link set lo up")?;
        Ok(ns)
    }

    /// `ip netns exec NS prog args...`, as arguments for a spawn.
    pub(crate) fn exec<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["netns", "exec", self.0.as_str()];
        v.extend_from_slice(args);
        v
    }

    /// Runs a shell command inside; Err with its stderr on failure.
    pub(crate) fn sh(&self, cmd: &str) -> Result<String, String> {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.0, "sh", "-c", cmd])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{cmd}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

fn rustix_is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The app: one echo exchange with the service's real address; prints what came back.
const APP: &str = r#"
import socket, sys
s = socket.create_connection(("10.96.0.10", 80), timeout=5)
s.sendall(b"through the mesh")
s.shutdown(socket.SHUT_WR)
back = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    back += chunk
print(back.decode())
"#;

/// A one-connection-at-a-time echo server on 127.0.0.1:7007, bounded to 60 s.
const ECHO: &str = r#"
import socket, time
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", 7007))
l.listen(16)
l.settimeout(60)
print("listening", flush=True)
end = time.time() + 60
while time.time() < end:
    try:
        c, _ = l.accept()
    except socket.timeout:
        break
    c.settimeout(5)
    data = b""
    while True:
        chunk = c.recv(4096)
        if not chunk:
            break
        data += chunk
    c.sendall(data)
    c.close()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_dialing_a_service_address_is_captured_into_the_mesh() {
    let ns = match Netns::create() {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("skipped: transparent capture needs root, ip, nft, python3 and curl ({why})");
            return;
        }
    };
    let pki = Pki::new();
    let d = pki.path();
    pki.issue("server", "echo");
    pki.issue("client", "client");
    // The tempdir is readable by the processes inside the namespace (same user, root).
    let log = d.join("procs.log");

    let (mut echo, server, ready) = echo_behind_server_proxy(&ns, &pki, &log).await;
    let server_inbound = ready_addr(&ready, "/inbound");
    let server_admin = ready_addr(&ready, "/admin");

    let client_cfg = pki.config(
        "client",
        &format!(
            "[capture]\nlisten = \"127.0.0.1:15001\"\n\n[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"echo\"\nport = 7\nendpoints = [\"{server_inbound}\"]\ncapture = \"10.96.0.10:80\"\n"
        ),
    );
    let (client, ready) = spawn_ready_with(
        "ip",
        &ns.exec(&[
            QUICMESH,
            "proxy",
            "--config",
            client_cfg.to_str().expect("utf8"),
        ]),
        &log,
    )
    .await;
    // The namespace is new: the fixed port is free.
    assert_eq!(ready_addr(&ready, "/capture").port(), 15001);

    // Before capture: nothing listens on the service address.
    assert!(ns.sh(&format!("python3 -c '{APP}'")).is_err());

    quicmesh_in(&ns, &["capture", "install", "--config", path(&client_cfg)])
        .expect("capture install");
    let rules = ns.sh("nft list table inet quicmesh").expect("table");
    assert!(
        rules.contains("10.96.0.10") && rules.contains(":15001"),
        "{rules}"
    );
    // Installing again replaces the table (a stale one from a crash is cleaned the same way).
    quicmesh_in(&ns, &["capture", "install", "--config", path(&client_cfg)])
        .expect("capture install again");

    let out = ns
        .sh(&format!("python3 -c '{APP}'"))
        .expect("the app reaches the service through capture");
    assert_eq!(out.trim(), "through the mesh");
    // mTLS: the server proxy saw the stream from the client proxy's certificate identity.
    let m = ns
        .sh(&format!("curl -s http://{server_admin}/metrics"))
        .expect("scrape");
    assert_eq!(
        metric(
            &m,
            "quicmesh_tunnel_opened_total",
            &[
                "direction=\"inbound\"",
                "spiffe://mesh.local/ns/default/sa/client"
            ]
        ),
        1.0,
        "{m}"
    );

    // A connection for an address no service claims (here: straight to the listener) is refused and
    // counted, never passed through.
    let direct = APP.replace("\"10.96.0.10\", 80", "\"127.0.0.1\", 15001");
    assert!(
        ns.sh(&format!("python3 -c '{direct}'"))
            .map_or(true, |out| out.trim().is_empty()),
        "nothing comes back from an unclaimed destination"
    );
    let client_admin = ready_addr(&ready, "/admin");
    let m = ns
        .sh(&format!("curl -s http://{client_admin}/metrics"))
        .expect("scrape");
    assert_eq!(
        metric(
            &m,
            "quicmesh_tunnel_failures_total",
            &["reason=\"capture_unknown_destination\""]
        ),
        1.0,
        "{m}"
    );

    quicmesh_in(&ns, &["capture", "remove"]).expect("capture remove");
    let all = ns.sh("nft list ruleset").expect("ruleset");
    assert!(!all.contains("quicmesh"), "no rule left behind: {all}");
    quicmesh_in(&ns, &["capture", "remove"]).expect("remove is idempotent");
    assert!(
        ns.sh(&format!("python3 -c '{APP}'")).is_err(),
        "unreachable again"
    );

    drop((server, client));
    let _ = echo.kill().await;
}

/// The echo app (ready when it says so) and a server proxy serving it as port 7, both inside `ns`:
/// the echo, the proxy and its ready line.
async fn echo_behind_server_proxy(
    ns: &Netns,
    pki: &Pki,
    log: &Path,
) -> (
    tokio::process::Child,
    tokio::process::Child,
    serde_json::Value,
) {
    let (echo, _) = spawn_line(&ns.exec(&["python3", "-c", ECHO]), log, "listening").await;
    let server_cfg = pki.config(
        "server",
        "[inbound]\nlisten = \"127.0.0.1:0\"\nports = [{ port = 7, app = \"127.0.0.1:7007\" }]\n",
    );
    let (server, ready) = spawn_ready_with(
        "ip",
        &ns.exec(&[QUICMESH, "proxy", "--config", path(&server_cfg)]),
        log,
    )
    .await;
    (echo, server, ready)
}

pub(crate) fn path(p: &Path) -> &str {
    p.to_str().expect("utf8")
}

/// Runs `quicmesh ARGS` inside `ns`; Err with its stderr.
pub(crate) fn quicmesh_in(ns: &Netns, args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(ns.exec(&[QUICMESH]))
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Spawns `ip ARGS` (killed on drop) and waits up to 30 s for a stdout line equal to `want`.
pub(crate) async fn spawn_line(
    args: &[&str],
    log: &Path,
    want: &str,
) -> (tokio::process::Child, String) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log");
    let mut child = tokio::process::Command::new("ip")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("ready within 30 s")
        .expect("read")
        .expect("a line");
    assert_eq!(line, want);
    (child, line)
}

/// Whether the namespace holds our nftables table.
fn has_table(ns: &Netns) -> bool {
    ns.sh("nft list tables")
        .expect("nft list tables")
        .lines()
        .any(|l| l.trim() == "table inet quicmesh")
}

/// A proxy that manages its own rules (`[capture] install = true`): they exist once it is ready, are
/// gone after SIGTERM and its drain; after a kill -9 they stay, the next start replaces them (still one
/// table, still working), and its clean exit removes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_installing_its_own_rules_removes_them_on_exit_and_replaces_stale_ones() {
    let ns = match Netns::create() {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("skipped: transparent capture needs root, ip, nft, python3 and curl ({why})");
            return;
        }
    };
    let pki = Pki::new();
    let d = pki.path();
    pki.issue("server", "echo");
    pki.issue("client", "client");
    let log = d.join("procs.log");
    let (mut echo, _server, ready) = echo_behind_server_proxy(&ns, &pki, &log).await;
    let server_inbound = ready_addr(&ready, "/inbound");
    let client_cfg = pki.config(
        "client",
        &format!(
            "[capture]\nlisten = \"127.0.0.1:15001\"\ninstall = true\n\n[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"echo\"\nport = 7\nendpoints = [\"{server_inbound}\"]\ncapture = \"10.96.0.10:80\"\n"
        ),
    );
    let start = async || {
        spawn_ready_with(
            "ip",
            &ns.exec(&[QUICMESH, "proxy", "--config", path(&client_cfg)]),
            &log,
        )
        .await
        .0
    };
    assert!(!has_table(&ns));

    // Ready means the rules are in place: the app reaches the service at once.
    let mut client = start().await;
    assert!(has_table(&ns));
    let out = ns.sh(&format!("python3 -c '{APP}'")).expect("captured");
    assert_eq!(out.trim(), "through the mesh");
    // SIGTERM: the proxy drains, exits 0 and takes its rules with it.
    sigterm(client.id().expect("pid"));
    let status = tokio::time::timeout(Duration::from_secs(20), client.wait())
        .await
        .expect("exits after its drain")
        .expect("wait");
    assert!(status.success(), "{status:?}");
    assert!(!has_table(&ns), "rules removed on exit");

    // kill -9 leaves them behind; the next start replaces them and works; its clean exit removes them.
    let mut client = start().await;
    client.kill().await.expect("kill -9");
    assert!(has_table(&ns), "a killed proxy cannot remove its rules");
    let mut client = start().await;
    let tables = ns.sh("nft list tables").expect("tables");
    assert_eq!(tables.matches("table inet quicmesh").count(), 1, "{tables}");
    let out = ns
        .sh(&format!("python3 -c '{APP}'"))
        .expect("captured again");
    assert_eq!(out.trim(), "through the mesh");
    sigterm(client.id().expect("pid"));
    tokio::time::timeout(Duration::from_secs(20), client.wait())
        .await
        .expect("exits")
        .expect("wait");
    assert!(!has_table(&ns), "the replaced rules are removed too");
    let _ = echo.kill().await;
}
