//! Proxy failover between controllers, as processes: three `quicmesh controller`s on one real 3-member
//! etcd, two proxies configured with all three addresses and traffic through their tunnel. The
//! controller the client proxy watches is killed with SIGKILL: both proxies must be watching a live
//! controller within 5 s, a change applied through another controller must reach them, and not one
//! tunneled request may fail. Then the etcd leader is killed too: writes through the live controllers
//! go on with none acknowledged and lost, changes still reach the proxies, and still no request fails.
//! Skips with a printed reason without the `etcd` binary.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use quicmesh_proto::controller as pb;

use crate::{
    controller_mode::{Proc, admin_client, create_service, exchange, join_token, spawn},
    support::*,
};

#[allow(dead_code)]
#[path = "../../controller/tests/support/etcd.rs"]
mod etcd_cluster;

async fn start_controller(dir: &Path, n: usize, store: &str, kek: &Path, leaf_ttl: &str) -> Proc {
    let data = dir.join(format!("c{n}"));
    spawn(
        &[
            "controller",
            "--store",
            store,
            "--etcd-prefix",
            "/failover/",
            "--data-dir",
            data.to_str().expect("utf8"),
            "--kek-file",
            kek.to_str().expect("utf8"),
            "--listen",
            "127.0.0.1:0",
            "--trust-domain",
            TD,
            "--leaf-ttl",
            leaf_ttl,
        ],
        &dir.join(format!("controller{n}.log")),
    )
    .await
}

fn proxy_config(
    dir: &Path,
    name: &str,
    addrs: &[SocketAddr],
    bundle: &Path,
    token: &str,
    body: &str,
) -> PathBuf {
    std::fs::write(dir.join(format!("{name}.token")), token).expect("token file");
    let list: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    let text = format!(
        "[controller]\naddresses = [{}]\ntrust_bundle = \"{}\"\njoin_token_file = \"{name}.token\"\n\
         identity = \"spiffe://{TD}/ns/default/sa/{name}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n{body}",
        list.join(", "),
        bundle.display()
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("config");
    path
}

/// Index of the live controller (among `live`) whose proxy list shows `proxy`, if exactly one does.
async fn watched_by(
    addrs: &[SocketAddr],
    live: &[usize],
    bundle: &Path,
    admin: &str,
    proxy: &str,
) -> Option<usize> {
    let mut found = Vec::new();
    for &i in live {
        let mut a = admin_client(addrs[i], bundle, admin).await;
        let Ok(list) = a.list_proxies(pb::ListProxiesRequest::default()).await else {
            continue;
        };
        if list
            .into_inner()
            .proxies
            .iter()
            .any(|p| p.proxy_name == proxy)
        {
            found.push(i);
        }
    }
    (found.len() == 1).then(|| found[0])
}

fn logs(dir: &Path) -> String {
    [
        "controller0",
        "controller1",
        "controller2",
        "echo",
        "client",
    ]
    .iter()
    .map(|n| {
        let text = std::fs::read_to_string(dir.join(format!("{n}.log"))).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(12).collect();
        format!(
            "--- {n}.log\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    })
    .collect::<Vec<_>>()
    .join("\n")
}

/// Three controllers on a 3-member etcd, an echo proxy serving `echo` and a client proxy calling it,
/// both given the three addresses.
struct EtcdMesh {
    etcd: etcd_cluster::EtcdCluster,
    dir: tempfile::TempDir,
    controllers: Vec<Proc>,
    addrs: Vec<SocketAddr>,
    admin: String,
    bundle: PathBuf,
    server: Proc,
    client: Proc,
}

impl EtcdMesh {
    /// Starts it with leaves living `leaf_ttl`, and checks one exchange through the tunnel.
    async fn start(leaf_ttl: &str) -> EtcdMesh {
        let etcd = tokio::task::spawn_blocking(|| etcd_cluster::EtcdCluster::start(3))
            .await
            .expect("etcd start");
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let kek = d.join("kek");
        // The first controller creates the mesh (and the KEK file); the others find it.
        let mut controllers = vec![start_controller(d, 0, &etcd.url(), &kek, leaf_ttl).await];
        for n in 1..3 {
            controllers.push(start_controller(d, n, &etcd.url(), &kek, leaf_ttl).await);
        }
        let addrs: Vec<SocketAddr> = controllers.iter().map(|c| c.addr("grpc")).collect();
        let admin = controllers[0].admin_token();
        let bundle = controllers[0].trust_bundle();

        let echo = echo_server().await;
        create_service(addrs[0], &bundle, &admin, "echo", 7).await;
        let token = join_token(addrs[1], &bundle, &admin, "echo").await;
        let cfg = proxy_config(
            d,
            "echo",
            &addrs,
            &bundle,
            &token,
            &format!(
                "[inbound]\nlisten = \"127.0.0.1:0\"\nports = [{{ port = 7, app = \"{echo}\" }}]\nservices = [\"echo\"]\n"
            ),
        );
        let server = spawn(
            &["proxy", "--config", cfg.to_str().expect("utf8")],
            &d.join("echo.log"),
        )
        .await;
        let token = join_token(addrs[2], &bundle, &admin, "client").await;
        let cfg = proxy_config(
            d,
            "client",
            &addrs,
            &bundle,
            &token,
            "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"echo\"\nport = 7\n",
        );
        let client = spawn(
            &["proxy", "--config", cfg.to_str().expect("utf8")],
            &d.join("client.log"),
        )
        .await;
        exchange(client.outbound(), b"first")
            .await
            .unwrap_or_else(|e| panic!("first exchange: {e}\n{}", logs(d)));
        EtcdMesh {
            etcd,
            dir,
            controllers,
            addrs,
            admin,
            bundle,
            server,
            client,
        }
    }
}

/// Tunneled exchanges from four workers until [`Traffic::finish`].
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    workers: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Traffic {
    fn start(target: SocketAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let mut workers = Vec::new();
        for w in 0..4u8 {
            let (stop, ok) = (stop.clone(), ok.clone());
            workers.push(tokio::spawn(async move {
                let mut errors = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match exchange(target, &[w; 512]).await {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => errors.push(e),
                    }
                }
                errors
            }));
        }
        Traffic { stop, ok, workers }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Whether 20 more exchanges succeed within 5 s.
    async fn flowing(&self) -> bool {
        let after = self.ok();
        eventually(Duration::from_secs(5), || async { self.ok() > after + 20 }).await
    }

    /// Stops the workers: successful exchanges, and the errors.
    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut errors = Vec::new();
        for w in self.workers {
            errors.extend(w.await.expect("worker"));
        }
        (self.ok.load(Ordering::Relaxed), errors)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_fail_over_to_another_controller_without_failed_requests() {
    if let Some(why) = etcd_cluster::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    raise_fd_limit();
    let _heavy = heavy().await;
    let EtcdMesh {
        mut etcd,
        dir,
        mut controllers,
        addrs,
        admin,
        bundle,
        server,
        client,
    } = EtcdMesh::start("1h").await;
    let d = dir.path();
    // Traffic through the tunnel for the whole test.
    let traffic = Traffic::start(client.outbound());

    let all = [0, 1, 2];
    let watched = poll(Duration::from_secs(15), || {
        watched_by(&addrs, &all, &bundle, &admin, "client")
    })
    .await;
    let Some(victim) = watched else {
        panic!("the client proxy watches no controller\n{}", logs(d));
    };
    let live: Vec<usize> = all.into_iter().filter(|&i| i != victim).collect();
    let before = traffic.ok();
    controllers[victim].stop().await;
    let killed = Instant::now();

    // Both proxies watch a live controller within 5 s.
    let moved = poll(Duration::from_secs(5), || async {
        let client = watched_by(&addrs, &live, &bundle, &admin, "client").await?;
        watched_by(&addrs, &live, &bundle, &admin, "echo").await?;
        Some(client)
    })
    .await;
    let took = killed.elapsed();
    let Some(moved_to) = moved else {
        panic!(
            "the proxies did not move to a live controller within 5 s\n{}",
            logs(d)
        );
    };
    eprintln!(
        "failover: controller {victim} killed, client proxy watching controller {moved_to} after {took:?}"
    );

    // A change applied through a live controller reaches both proxies: one to the service the client
    // calls and the echo proxy serves (a change to another service would not concern them, and
    // proxies receive only what concerns them).
    let applied = admin_client(addrs[live[0]], &bundle, &admin)
        .await
        .apply(tcp_service("echo", &[7, 8]))
        .await
        .expect("apply through a live controller")
        .into_inner();
    let version = applied_version(applied);
    assert!(version > 0);
    let client_admin = client.addr("admin");
    let server_admin = server.addr("admin");
    for (who, at) in [("client", client_admin), ("echo", server_admin)] {
        assert!(
            eventually(Duration::from_secs(5), || async {
                metric(
                    &scrape(at, "/metrics").await.1,
                    "quicmesh_controller_snapshot_version",
                    &[],
                ) >= version as f64
            })
            .await,
            "{who} proxy did not receive version {version} after the failover\n{}",
            logs(d)
        );
    }
    // Traffic kept flowing across the failover.
    assert!(
        traffic.flowing().await,
        "traffic stalled after the failover"
    );

    // Then the etcd leader dies too (kill -9; two members of three remain): writes through both live
    // controllers go on (some may be refused during the election, none acknowledged and lost), a
    // change still reaches the proxies, and traffic does not notice.
    let member = etcd_cluster::leader(&etcd).await;
    etcd.kill(member);
    let killed = Instant::now();
    let mut acked = Vec::new();
    let mut refused = 0;
    let mut admins = Vec::new();
    for &i in &live {
        admins.push(admin_client(addrs[i], &bundle, &admin).await);
    }
    for n in 0..20usize {
        if killed.elapsed() > Duration::from_secs(20) {
            break;
        }
        let name = format!("after-etcd-{n}");
        let svc = tcp_service(&name, &[80]);
        let via = n % admins.len();
        match admins[via].apply(svc).await {
            Ok(_) => acked.push(name),
            Err(s) => {
                assert!(
                    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Aborted),
                    "write {n} refused with {s:?}"
                );
                refused += 1;
            }
        }
    }
    eprintln!(
        "etcd member {member} (leader) killed: {} writes acknowledged, {refused} refused, in {:?}",
        acked.len(),
        killed.elapsed()
    );
    assert!(
        acked.len() >= 10,
        "only {} writes acknowledged",
        acked.len()
    );
    for (a, &i) in admins.iter().zip(&live) {
        let complete = eventually(Duration::from_secs(5), || {
            let mut a = a.clone();
            let acked = acked.clone();
            async move {
                let Ok(list) = a
                    .list(pb::ListRequest {
                        kind: pb::Kind::Service as i32,
                        namespace: "default".into(),
                    })
                    .await
                else {
                    return false;
                };
                let names: Vec<String> = list
                    .into_inner()
                    .items
                    .into_iter()
                    .filter_map(|r| match r.resource {
                        Some(pb::resource::Resource::Service(s)) => s.metadata.map(|m| m.name),
                        _ => None,
                    })
                    .collect();
                acked.iter().all(|n| names.contains(n))
            }
        })
        .await;
        assert!(
            complete,
            "controller {i} lacks acknowledged writes\n{}",
            logs(d)
        );
    }
    let applied = admins[0]
        .apply(tcp_service("echo", &[7, 9]))
        .await
        .expect("apply with one etcd member down")
        .into_inner();
    let version = applied_version(applied);
    for (who, at) in [("client", client_admin), ("echo", server_admin)] {
        assert!(
            eventually(Duration::from_secs(5), || async {
                metric(
                    &scrape(at, "/metrics").await.1,
                    "quicmesh_controller_snapshot_version",
                    &[],
                ) >= version as f64
            })
            .await,
            "{who} proxy did not receive version {version} with an etcd member down\n{}",
            logs(d)
        );
    }
    assert!(
        traffic.flowing().await,
        "traffic stalled after the etcd member was killed"
    );
    let (total, errors) = traffic.finish().await;
    eprintln!(
        "failover: {total} tunneled requests ok ({} during/after the kill), {} failed",
        total - before,
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "{} failed tunneled requests, e.g. {:?}\n{}",
        errors.len(),
        &errors[..errors.len().min(5)],
        logs(d)
    );
    assert!(total > 50, "too little traffic: {total}");
    drop(etcd);
}

/// The active root of the mesh, as controller `addr` sees it.
async fn active_root(
    addr: SocketAddr,
    bundle: &Path,
    admin: &str,
) -> Option<(String, Vec<String>)> {
    let status = admin_client(addr, bundle, admin)
        .await
        .ca_status(pb::CaStatusRequest {})
        .await
        .ok()?
        .into_inner();
    let active = status.roots.iter().find(|r| r.active)?.fingerprint.clone();
    Some((
        active,
        status.roots.into_iter().map(|r| r.fingerprint).collect(),
    ))
}

/// Root rotation through one of three controllers under traffic, with 5 s leaves: every controller signs
/// with the new root and keeps the old one in the bundle, both proxies renew with leaves of the new
/// root while the other may still hold an old one (so each trusts both), and no tunneled request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_through_one_of_three_controllers_under_traffic() {
    if let Some(why) = etcd_cluster::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    raise_fd_limit();
    let _heavy = heavy().await;
    let mesh = EtcdMesh::start("5s").await;
    let d = mesh.dir.path();
    let (bundle, admin) = (&mesh.bundle, mesh.admin.as_str());
    let traffic = Traffic::start(mesh.client.outbound());
    let (old, _) = active_root(mesh.addrs[0], bundle, admin)
        .await
        .expect("CA status");
    let status = admin_client(mesh.addrs[1], bundle, admin)
        .await
        .rotate_root(pb::RotateRootRequest {})
        .await
        .expect("rotate")
        .into_inner();
    let rotated = Instant::now();
    let new = status
        .roots
        .iter()
        .find(|r| r.active)
        .map(|r| r.fingerprint.clone())
        .expect("an active root");
    assert_ne!(new, old);
    for (i, &addr) in mesh.addrs.iter().enumerate() {
        assert!(
            eventually(Duration::from_secs(5), || async {
                active_root(addr, bundle, admin)
                    .await
                    .is_some_and(|(active, all)| active == new && all.contains(&old))
            })
            .await,
            "controller {i} did not follow the rotation\n{}",
            logs(d)
        );
    }
    for who in ["echo", "client"] {
        let id = format!("spiffe://{TD}/ns/default/sa/{who}");
        let renewed = eventually(Duration::from_secs(15), || async {
            let Ok(list) = admin_client(mesh.addrs[2], bundle, admin)
                .await
                .list_issued_certificates(pb::ListIssuedCertificatesRequest { limit: 1000 })
                .await
            else {
                return false;
            };
            list.into_inner()
                .certificates
                .iter()
                .any(|c| c.spiffe_id == id && c.root_fingerprint == new)
        })
        .await;
        assert!(
            renewed,
            "the {who} proxy holds no leaf of the new root\n{}",
            logs(d)
        );
    }
    let took = rotated.elapsed();
    assert!(
        traffic.flowing().await,
        "traffic stalled after the rotation"
    );
    let (total, errors) = traffic.finish().await;
    eprintln!(
        "root rotation: both proxies renewed with the new root within {took:?}; {total} tunneled requests ok, {} failed",
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "{} failed tunneled requests, e.g. {:?}\n{}",
        errors.len(),
        &errors[..errors.len().min(5)],
        logs(d)
    );
}

/// A TCP service in `default` with `ports`.
fn tcp_service(name: &str, ports: &[u32]) -> pb::Resource {
    pb::Resource {
        resource: Some(pb::resource::Resource::Service(pb::Service {
            metadata: Some(pb::Metadata {
                name: name.into(),
                namespace: "default".into(),
                ..Default::default()
            }),
            ports: ports
                .iter()
                .map(|&port| pb::ServicePort {
                    port,
                    protocol: pb::PortProtocol::Tcp as i32,
                    name: String::new(),
                })
                .collect(),
            versions: vec![],
            identities: vec![],
        })),
    }
}

/// The version an `Apply` of a service answered with.
fn applied_version(applied: pb::Resource) -> u64 {
    match applied.resource {
        Some(pb::resource::Resource::Service(s)) => s.metadata.map_or(0, |m| m.version),
        other => panic!("apply answered {other:?}"),
    }
}
