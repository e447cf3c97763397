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

async fn start_controller(dir: &Path, n: usize, store: &str, kek: &Path) -> Proc {
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
            "1h",
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

/// Polls `f` until it gives something or `limit` passes.
async fn poll<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_fail_over_to_another_controller_without_failed_requests() {
    if let Some(why) = etcd_cluster::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    raise_fd_limit();
    let _heavy = heavy().await;
    let mut etcd = tokio::task::spawn_blocking(|| etcd_cluster::EtcdCluster::start(3))
        .await
        .expect("etcd start");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let kek = d.join("kek");
    // The first controller creates the mesh (and the KEK file); the others find it.
    let mut controllers = vec![start_controller(d, 0, &etcd.url(), &kek).await];
    for n in 1..3 {
        controllers.push(start_controller(d, n, &etcd.url(), &kek).await);
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
    let target = client.outbound();
    exchange(target, b"first")
        .await
        .unwrap_or_else(|e| panic!("first exchange: {e}\n{}", logs(d)));

    // Traffic through the tunnel for the whole test.
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

    let all = [0, 1, 2];
    let watched = poll(Duration::from_secs(15), || {
        watched_by(&addrs, &all, &bundle, &admin, "client")
    })
    .await;
    let Some(victim) = watched else {
        panic!("the client proxy watches no controller\n{}", logs(d));
    };
    let live: Vec<usize> = all.into_iter().filter(|&i| i != victim).collect();
    let before = ok.load(Ordering::Relaxed);
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
    let port = |port| pb::ServicePort {
        port,
        protocol: pb::PortProtocol::Tcp as i32,
        name: String::new(),
    };
    let applied = admin_client(addrs[live[0]], &bundle, &admin)
        .await
        .apply(pb::Resource {
            resource: Some(pb::resource::Resource::Service(pb::Service {
                metadata: Some(pb::Metadata {
                    name: "echo".into(),
                    namespace: "default".into(),
                    ..Default::default()
                }),
                ports: vec![port(7), port(8)],
                versions: vec![],
                identities: vec![],
            })),
        })
        .await
        .expect("apply through a live controller")
        .into_inner();
    let version = match applied.resource {
        Some(pb::resource::Resource::Service(s)) => s.metadata.map(|m| m.version).unwrap_or(0),
        other => panic!("apply answered {other:?}"),
    };
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
    let after = ok.load(Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(5), || async {
            ok.load(Ordering::Relaxed) > after + 20
        })
        .await,
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
        let svc = pb::Resource {
            resource: Some(pb::resource::Resource::Service(pb::Service {
                metadata: Some(pb::Metadata {
                    name: name.clone(),
                    namespace: "default".into(),
                    ..Default::default()
                }),
                ports: vec![port(80)],
                versions: vec![],
                identities: vec![],
            })),
        };
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
        .apply(pb::Resource {
            resource: Some(pb::resource::Resource::Service(pb::Service {
                metadata: Some(pb::Metadata {
                    name: "echo".into(),
                    namespace: "default".into(),
                    ..Default::default()
                }),
                ports: vec![port(7), port(9)],
                versions: vec![],
                identities: vec![],
            })),
        })
        .await
        .expect("apply with one etcd member down")
        .into_inner();
    let version = match applied.resource {
        Some(pb::resource::Resource::Service(s)) => s.metadata.map(|m| m.version).unwrap_or(0),
        other => panic!("apply answered {other:?}"),
    };
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
    let after = ok.load(Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(5), || async {
            ok.load(Ordering::Relaxed) > after + 20
        })
        .await,
        "traffic stalled after the etcd member was killed"
    );
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for w in workers {
        errors.extend(w.await.expect("worker"));
    }
    let total = ok.load(Ordering::Relaxed);
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
