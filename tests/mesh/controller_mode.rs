//! Proxies in controller mode, as processes: `quicmesh controller`, sidecars bootstrapped with join tokens,
//! an echo service, traffic through the tunnel; certificate rotation under load; a controller outage.
//! Readiness is each binary's JSON ready line (a proxy prints it once it holds a certificate and its first
//! configuration snapshot); later state is read from the proxies' metrics.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use quicmesh_controller::client;
use quicmesh_proto::controller as pb;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    process::Child,
};

use crate::support::*;

/// A child process killed on drop, with the JSON ready line it printed.
pub(crate) struct Proc {
    child: Child,
    pub(crate) ready: serde_json::Value,
}

pub(crate) async fn spawn(args: &[&str], log: &Path) -> Proc {
    let (child, ready) = spawn_ready(args, log).await;
    Proc { child, ready }
}

impl Proc {
    /// The admin token a controller prints on its first start (the one that creates the mesh).
    pub(crate) fn admin_token(&self) -> String {
        self.ready["admin_token"]
            .as_str()
            .expect("a first start prints the admin token")
            .to_owned()
    }

    /// The trust bundle a controller's ready line names.
    pub(crate) fn trust_bundle(&self) -> PathBuf {
        PathBuf::from(self.ready["trust_bundle"].as_str().expect("bundle"))
    }

    pub(crate) fn addr(&self, key: &str) -> SocketAddr {
        ready_addr(&self.ready, &format!("/{key}"))
    }

    pub(crate) fn outbound(&self) -> SocketAddr {
        ready_addr(&self.ready, "/outbound/0")
    }

    pub(crate) async fn metrics(&self) -> String {
        scrape(self.addr("admin"), "/metrics").await.1
    }

    /// Sends SIGTERM (the proxy drains).
    pub(crate) fn terminate(&self) {
        sigterm(self.child.id().expect("running"));
    }

    /// Waits for the process to exit.
    pub(crate) async fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().await.expect("wait")
    }

    /// Sends SIGKILL: the process ends without a word to anyone.
    pub(crate) fn kill(&mut self) {
        self.child.start_kill().expect("kill");
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub(crate) async fn stop(&mut self) {
        self.child.start_kill().expect("kill");
        let _ = self.child.wait().await;
    }
}

/// A controller, its admin token and two proxies (echo server side, client side) joined through it.
struct Mesh {
    dir: tempfile::TempDir,
    controller: Proc,
    controller_addr: SocketAddr,
    admin_token: String,
    bundle: PathBuf,
    server: Proc,
    client: Proc,
}

pub(crate) async fn start_controller(dir: &Path, listen: &str, leaf_ttl: &str) -> Proc {
    let data = dir.join("data");
    spawn(
        &[
            "controller",
            "--data-dir",
            data.to_str().expect("utf8"),
            "--listen",
            listen,
            "--trust-domain",
            TD,
            "--leaf-ttl",
            leaf_ttl,
        ],
        &dir.join("controller.log"),
    )
    .await
}

pub(crate) async fn admin_client(addr: SocketAddr, bundle: &Path, admin: &str) -> client::Admin {
    let pem = std::fs::read_to_string(bundle).expect("bundle");
    let ch = client::connect(
        &addr.to_string(),
        &[pem],
        None,
        Some(Duration::from_secs(10)),
    )
    .await
    .expect("connect to the controller");
    client::admin(ch, admin).expect("admin client")
}

/// Creates the Service `name` in `default` (served, by default, by the account named like it): secure
/// naming lets an endpoint register only for an existing service whose identities allow it.
pub(crate) async fn create_service(
    addr: SocketAddr,
    bundle: &Path,
    admin: &str,
    name: &str,
    port: u32,
) {
    admin_client(addr, bundle, admin)
        .await
        .apply(pb::Resource {
            resource: Some(pb::resource::Resource::Service(pb::Service {
                metadata: Some(pb::Metadata {
                    name: name.into(),
                    namespace: "default".into(),
                    ..Default::default()
                }),
                ports: vec![pb::ServicePort {
                    port,
                    protocol: pb::PortProtocol::Tcp as i32,
                    name: String::new(),
                }],
                versions: vec![],
                identities: vec![],
            })),
        })
        .await
        .expect("create service");
}

pub(crate) async fn join_token(addr: SocketAddr, bundle: &Path, admin: &str, sa: &str) -> String {
    let mut admin = admin_client(addr, bundle, admin).await;
    admin
        .create_join_token(pb::CreateJoinTokenRequest {
            namespace: "default".into(),
            service_account: sa.into(),
            ttl_seconds: 600,
            reusable: false,
        })
        .await
        .expect("create join token")
        .into_inner()
        .token
}

/// Where and how a proxy joins the mesh.
pub(crate) struct Join<'a> {
    pub(crate) controller: SocketAddr,
    pub(crate) bundle: &'a Path,
    pub(crate) token: String,
    pub(crate) sa: &'a str,
}

/// Writes a controller-mode proxy configuration: top-level keys `top`, then the tables, then `body`.
pub(crate) fn proxy_config(dir: &Path, name: &str, j: &Join<'_>, top: &str, body: &str) -> PathBuf {
    let (controller, bundle, sa) = (j.controller, j.bundle, j.sa);
    std::fs::write(dir.join(format!("{name}.token")), &j.token).expect("token file");
    let text = format!(
        "{top}\n[controller]\naddress = \"{controller}\"\ntrust_bundle = \"{}\"\njoin_token_file = \"{name}.token\"\nidentity = \"spiffe://{TD}/ns/default/sa/{sa}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n{body}",
        bundle.display()
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("config");
    path
}

impl Mesh {
    /// Controller on `listen` with `leaf_ttl`, an echo service, and the two proxies, all ready.
    async fn start(listen: &str, leaf_ttl: &str) -> Self {
        raise_fd_limit();
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let controller = start_controller(d, listen, leaf_ttl).await;
        let controller_addr = controller.addr("grpc");
        let admin_token = controller.admin_token();
        let bundle = controller.trust_bundle();

        let echo = echo_server().await;
        let join = |sa| Join {
            controller: controller_addr,
            bundle: &bundle,
            token: String::new(),
            sa,
        };
        create_service(controller_addr, &bundle, &admin_token, "echo", 7).await;
        let mut j = join("echo");
        j.token = join_token(controller_addr, &bundle, &admin_token, "echo").await;
        let cfg = proxy_config(
            d,
            "server",
            &j,
            "",
            &format!(
                "[inbound]\nlisten = \"127.0.0.1:0\"\nports = [{{ port = 7, app = \"{echo}\" }}]\nservices = [\"echo\"]\n"
            ),
        );
        let server = spawn(
            &["proxy", "--config", cfg.to_str().expect("utf8")],
            &d.join("server.log"),
        )
        .await;
        // No static endpoints: the client learns the echo endpoint from the controller.
        let mut j = join("client");
        j.token = join_token(controller_addr, &bundle, &admin_token, "client").await;
        let cfg = proxy_config(
            d,
            "client",
            &j,
            "drain_grace = \"1s\"",
            "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"echo\"\nport = 7\n",
        );
        let client = spawn(
            &["proxy", "--config", cfg.to_str().expect("utf8")],
            &d.join("client.log"),
        )
        .await;
        Self {
            dir,
            controller,
            controller_addr,
            admin_token,
            bundle,
            server,
            client,
        }
    }

    fn logs(&self) -> String {
        ["controller", "server", "client"]
            .iter()
            .map(|n| {
                let text = std::fs::read_to_string(self.dir.path().join(format!("{n}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                format!(
                    "--- {n}.log (last lines)\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// One request/response on a fresh tunneled connection.
pub(crate) async fn exchange(target: SocketAddr, payload: &[u8]) -> Result<(), String> {
    let back = roundtrip(target, payload, Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    if back == payload {
        Ok(())
    } else {
        Err(format!(
            "echo differs: {} bytes back of {}",
            back.len(),
            payload.len()
        ))
    }
}

/// A tunneled connection kept open; each `ping` is one echo exchange on it.
struct Held(TcpStream);

impl Held {
    async fn open(target: SocketAddr) -> Self {
        Self(TcpStream::connect(target).await.expect("connect"))
    }

    async fn ping(&mut self, msg: &[u8]) -> Result<(), String> {
        tokio::time::timeout(Duration::from_secs(5), async {
            self.0.write_all(msg).await.map_err(|e| e.to_string())?;
            let mut back = vec![0u8; msg.len()];
            self.0
                .read_exact(&mut back)
                .await
                .map_err(|e| e.to_string())?;
            if back == msg {
                Ok(())
            } else {
                Err("echo differs".to_string())
            }
        })
        .await
        .map_err(|_| "held connection timed out".to_string())?
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_mode_end_to_end_with_processes() {
    let mesh = Mesh::start("127.0.0.1:0", "1h").await;
    assert_eq!(
        mesh.client.ready["id"],
        format!("spiffe://{TD}/ns/default/sa/client"),
        "the ready line names the certified identity"
    );
    let target = mesh.client.outbound();
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    exchange(target, &payload)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", mesh.logs()));
    for i in 0..20u8 {
        exchange(target, &[i; 100]).await.expect("small exchange");
    }
    assert_eq!(scrape(mesh.client.addr("admin"), "/ready").await.0, 200);

    let client = mesh.client.metrics().await;
    let server = mesh.server.metrics().await;
    assert_eq!(
        metric(&client, "quicmesh_identity_certify_total", &["ok"]),
        1.0
    );
    assert_eq!(metric(&client, "quicmesh_controller_connected", &[]), 1.0);
    assert!(metric(&client, "quicmesh_identity_cert_expiry_seconds", &[]) > 0.0);
    assert_eq!(
        metric(
            &server,
            "quicmesh_tunnel_opened_total",
            &["inbound", "sa/client"]
        ),
        21.0,
        "the server saw the client's mesh identity"
    );

    // The controller lists both proxies and the endpoint the server registered.
    let pem = std::fs::read_to_string(&mesh.bundle).expect("bundle");
    let ch = client::connect(
        &mesh.controller_addr.to_string(),
        &[pem],
        None,
        Some(Duration::from_secs(10)),
    )
    .await
    .expect("connect");
    let mut admin = client::admin(ch, &mesh.admin_token).expect("admin");
    let eps = admin
        .list(pb::ListRequest {
            kind: pb::Kind::Endpoint as i32,
            namespace: "default".into(),
        })
        .await
        .expect("list endpoints")
        .into_inner();
    assert_eq!(eps.items.len(), 1, "{eps:?}");
    let proxies = admin
        .list_proxies(pb::ListProxiesRequest::default())
        .await
        .expect("list proxies")
        .into_inner();
    assert_eq!(proxies.proxies.len(), 2, "{proxies:?}");

    // SIGTERM stops the controller although both proxies hold Watch streams open: calls get a
    // short drain, then it exits cleanly (as Kubernetes and Compose expect before their SIGKILL).
    let mut controller = mesh.controller;
    let stopping = std::time::Instant::now();
    controller.terminate();
    let status = tokio::time::timeout(Duration::from_secs(15), controller.wait())
        .await
        .expect("the controller exits within 15 s of SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "{:?}",
        stopping.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_failed_connections() {
    const RUN: Duration = Duration::from_secs(60);
    const WORKERS: usize = 16;
    let mesh = Mesh::start("127.0.0.1:0", "10s").await;
    let target = mesh.client.outbound();
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let until = tokio::time::Instant::now() + RUN;
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let (ok, failed) = (ok.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let payload = vec![w as u8; 2048];
            let mut errors = Vec::new();
            while tokio::time::Instant::now() < until {
                match exchange(target, &payload).await {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        errors.push(e);
                    }
                }
            }
            errors
        }));
    }
    // Two tunneled connections held open across every rotation.
    let mut held = vec![Held::open(target).await, Held::open(target).await];
    let mut held_pings = 0u64;
    while tokio::time::Instant::now() < until {
        for h in &mut held {
            h.ping(b"still here")
                .await
                .unwrap_or_else(|e| panic!("held connection: {e}"));
            held_pings += 1;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut errors = Vec::new();
    for t in tasks {
        errors.extend(t.await.expect("worker"));
    }
    let client = mesh.client.metrics().await;
    let server = mesh.server.metrics().await;
    let renewals_client = metric(&client, "quicmesh_identity_certify_total", &["ok"]);
    let renewals_server = metric(&server, "quicmesh_identity_certify_total", &["ok"]);
    let seen_by_server = metric(
        &server,
        "quicmesh_peer_certificates_seen_total",
        &["inbound"],
    );
    let seen_by_client = metric(
        &client,
        "quicmesh_peer_certificates_seen_total",
        &["outbound"],
    );
    let handshakes = metric(&server, "quicmesh_peer_handshakes_total", &["inbound"]);
    let rotated = metric(&client, "quicmesh_pool_rotated_connections_total", &[]);
    eprintln!(
        "rotation under load ({RUN:?}, leaf 10 s, {WORKERS} workers): {} tunneled connections ok, {} failed, \
         {held_pings} pings on 2 held connections; certificates obtained: client {renewals_client}, server \
         {renewals_server}; distinct client certificates seen by the server {seen_by_server} over {handshakes} \
         handshakes; distinct server certificates seen by the client {seen_by_client}; pooled connections \
         replaced after rotation {rotated}",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    assert!(
        errors.is_empty(),
        "{} failed connections, e.g. {:?}\n{}",
        errors.len(),
        &errors[..errors.len().min(5)],
        mesh.logs()
    );
    assert_eq!(metric(&client, "quicmesh_tunnel_failures_total", &[]), 0.0);
    assert!(ok.load(Ordering::Relaxed) > 1000, "too little traffic");
    assert!(
        renewals_client >= 6.0 && renewals_server >= 6.0,
        "renewed every 5–7 s"
    );
    assert!(
        seen_by_server >= 5.0,
        "the server saw the client's certificate change several times"
    );
    assert!(
        seen_by_client >= 3.0,
        "the client saw the server's certificate change"
    );
    assert_eq!(
        metric(&client, "quicmesh_identity_certify_total", &["error"]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_outage_keeps_traffic_flowing_and_proxies_recover() {
    // A fixed port so the restarted controller is where the proxies look for it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut mesh = Mesh::start(&listen, "10s").await;
    let target = mesh.client.outbound();
    let mut held = Held::open(target).await;
    held.ping(b"before").await.expect("held before");

    mesh.controller.stop().await;
    let client_admin = mesh.client.addr("admin");
    assert!(
        eventually(Duration::from_secs(15), || async {
            metric(
                &scrape(client_admin, "/metrics").await.1,
                "quicmesh_controller_connected",
                &[],
            ) == 0.0
        })
        .await,
        "the client did not notice the outage"
    );
    // Renewal fails while the controller is down; the proxies keep their certificates and serve.
    assert!(
        eventually(Duration::from_secs(15), || async {
            metric(
                &scrape(client_admin, "/metrics").await.1,
                "quicmesh_identity_certify_total",
                &["error"],
            ) >= 1.0
        })
        .await,
        "no renewal was attempted during the outage"
    );
    held.ping(b"during")
        .await
        .expect("held connection during the outage");
    for i in 0..20u8 {
        exchange(target, &[i; 512])
            .await
            .unwrap_or_else(|e| panic!("new connection during the outage: {e}\n{}", mesh.logs()));
    }
    assert_eq!(
        scrape(client_admin, "/ready").await.0,
        200,
        "still ready without the controller"
    );
    let before = metric(
        &mesh.client.metrics().await,
        "quicmesh_identity_certify_total",
        &["ok"],
    );
    let server_before = metric(
        &mesh.server.metrics().await,
        "quicmesh_identity_certify_total",
        &["ok"],
    );

    // Same data directory, same port.
    mesh.controller = start_controller(mesh.dir.path(), &listen, "10s").await;
    let server_admin = mesh.server.addr("admin");
    for (who, admin, was) in [
        ("client", client_admin, before),
        ("server", server_admin, server_before),
    ] {
        assert!(
            eventually(Duration::from_secs(20), || async {
                let m = scrape(admin, "/metrics").await.1;
                metric(&m, "quicmesh_controller_connected", &[]) == 1.0
                    && metric(&m, "quicmesh_identity_certify_total", &["ok"]) > was
            })
            .await,
            "{who} did not reconnect and renew\n{}",
            mesh.logs()
        );
    }
    held.ping(b"after!")
        .await
        .expect("held connection after the restart");
    for i in 0..20u8 {
        exchange(target, &[i; 512])
            .await
            .expect("new connection after the restart");
    }
    let m = mesh.client.metrics().await;
    eprintln!(
        "controller outage: client certify ok {} error {}, watch failures {}, snapshots {}",
        metric(&m, "quicmesh_identity_certify_total", &["ok"]),
        metric(&m, "quicmesh_identity_certify_total", &["error"]),
        metric(&m, "quicmesh_controller_watch_failures_total", &[]),
        metric(&m, "quicmesh_controller_snapshots_total", &[]),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_expired_during_an_outage_recovers_with_a_fresh_join_token() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut mesh = Mesh::start(&listen, "3s").await;
    let client_admin = mesh.client.addr("admin");
    mesh.controller.stop().await;
    // Down for longer than the leaves live: the client's certificate expires.
    let expiry = |m: &str| metric(m, "quicmesh_identity_cert_expiry_seconds", &[]);
    let expired_at = expiry(&scrape(client_admin, "/metrics").await.1);
    assert!(
        eventually(Duration::from_secs(15), || async {
            (time::OffsetDateTime::now_utc().unix_timestamp() as f64) > expired_at + 1.0
        })
        .await
    );
    // Back, same data and port; the spent token in the file is refused, a fresh one lets it rejoin.
    mesh.controller = start_controller(mesh.dir.path(), &listen, "3s").await;
    let before = metric(
        &scrape(client_admin, "/metrics").await.1,
        "quicmesh_identity_certify_total",
        &["ok"],
    );
    for (name, sa) in [("client", "client"), ("server", "echo")] {
        let token = join_token(mesh.controller_addr, &mesh.bundle, &mesh.admin_token, sa).await;
        std::fs::write(mesh.dir.path().join(format!("{name}.token")), token).expect("fresh token");
    }
    let t = std::time::Instant::now();
    assert!(
        eventually(Duration::from_secs(30), || async {
            let m = scrape(client_admin, "/metrics").await.1;
            metric(&m, "quicmesh_identity_certify_total", &["ok"]) > before
                && expiry(&m) > time::OffsetDateTime::now_utc().unix_timestamp() as f64
        })
        .await,
        "the client never rejoined\n{}",
        mesh.logs()
    );
    eprintln!(
        "expired certificate: rejoined {:?} after the fresh token was written",
        t.elapsed()
    );
    let target = mesh.client.outbound();
    assert!(
        eventually(Duration::from_secs(30), || async {
            exchange(target, b"after expiry").await.is_ok()
        })
        .await,
        "no traffic after rejoining\n{}",
        mesh.logs()
    );
}
