//! Secure naming: a workload of the same namespace and trust domain that is not allowed to serve a
//! service receives none of its traffic, whether the caller's proxy learnt the endpoints from a static
//! file or from the controller. Each app counts the connections it accepted; the impostor's must stay 0.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

use crate::support::*;

/// An app that counts accepted connections and answers each with `tag` once the client half-closes.
pub async fn tagged_app(tag: &'static str) -> (SocketAddr, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let addr = l.local_addr().expect("addr");
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
                let _ = s.write_all(tag.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, accepted)
}

/// One request through `target`: what the app answered, or the error.
async fn ask(target: SocketAddr) -> Result<String, String> {
    let fut = async {
        let mut s = TcpStream::connect(target).await?;
        s.write_all(b"who are you").await?;
        s.shutdown().await?;
        let mut back = String::new();
        s.read_to_string(&mut back).await?;
        std::io::Result::Ok(back)
    };
    match tokio::time::timeout(Duration::from_secs(20), fut).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// `n` requests through `target`, 50 at a time: the answers, counted by text.
pub async fn ask_many(target: SocketAddr, n: usize) -> std::collections::BTreeMap<String, usize> {
    let mut answers = std::collections::BTreeMap::new();
    let mut set = JoinSet::new();
    let mut started = 0;
    while started < n || !set.is_empty() {
        while started < n && set.len() < 50 {
            set.spawn(ask(target));
            started += 1;
        }
        let Some(r) = set.join_next().await else {
            break;
        };
        let a = match r.expect("task") {
            Ok(text) => text,
            Err(e) => format!("error: {e}"),
        };
        *answers.entry(a).or_default() += 1;
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_mode_impostor_of_the_same_namespace_gets_no_connection() {
    raise_fd_limit();
    let pki = Pki::new();
    let (web_app, web_seen) = tagged_app("web").await;
    let (evil_app, evil_seen) = tagged_app("evil").await;
    pki.issue("web", "web");
    pki.issue("evil", "evil");
    let inbound = |app: SocketAddr, services: &str| {
        format!(
            "[inbound]\nlisten = \"127.0.0.1:0\"\nports = [{{ port = 7, app = \"{app}\" }}]\nservices = [{services}]\n"
        )
    };
    let web = start_proxy(&pki.config("web", &inbound(web_app, "\"web\""))).await;
    // The impostor claims the service too, and would take any other.
    let evil = start_proxy(&pki.config("evil", &inbound(evil_app, ""))).await;
    pki.issue("client", "client");
    let outbound = |extra: &str| {
        format!(
            "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"web\"\nport = 7\nendpoints = [\"{}\", \"{}\"]\nconnect_timeout = \"10s\"\n{extra}\n",
            web.inbound(),
            evil.inbound()
        )
    };
    let client = start_proxy(&pki.config("client", &outbound(""))).await;

    let answers = ask_many(client.outbound(0), 1000).await;
    assert_eq!(
        answers.get("web"),
        Some(&1000),
        "every request reached web: {answers:?}"
    );
    assert_eq!(evil_seen.load(Ordering::Relaxed), 0, "the impostor's app");
    assert_eq!(web_seen.load(Ordering::Relaxed), 1000);
    let m = client.metrics().await;
    assert!(
        metric(
            &m,
            "quicmesh_peer_refusals_total",
            &["direction=\"outbound\"", "reason=\"wrong_server_identity\""]
        ) >= 1.0,
        "the impostor was counted:\n{m}"
    );
    assert_eq!(
        metric(&m, "quicmesh_tunnel_failures_total", &[]),
        0.0,
        "{m}"
    );
    // The impostor never saw a stream, only handshakes.
    let em = evil.metrics().await;
    assert_eq!(
        metric(&em, "quicmesh_tunnel_opened_total", &[]),
        0.0,
        "{em}"
    );
    client.shutdown().await;

    // An explicit list replaces the default: naming "evil" sends everything there and nothing to web.
    let pinned = start_proxy(&pki.config(
        "client",
        &outbound("server_identities = [\"spiffe://mesh.local/ns/default/sa/evil\"]"),
    ))
    .await;
    let answers = ask_many(pinned.outbound(0), 20).await;
    assert_eq!(answers.get("evil"), Some(&20), "{answers:?}");
    assert_eq!(web_seen.load(Ordering::Relaxed), 1000);
    pinned.shutdown().await;
    web.shutdown().await;
    evil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_mode_impostor_of_the_same_namespace_gets_no_connection() {
    use crate::controller_mode::{Join, join_token, proxy_config, spawn, start_controller};
    raise_fd_limit();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let controller = start_controller(d, "127.0.0.1:0", "1h").await;
    let addr = controller.addr("grpc");
    let admin = controller.admin_token();
    let bundle = controller.trust_bundle();
    let ctl_apply = |yaml: String| {
        let file = d.join(format!("apply-{}.yaml", rand::random::<u32>()));
        std::fs::write(&file, yaml).expect("yaml");
        let out = std::process::Command::new(QUICMESH)
            .args(["ctl", "--controller", &addr.to_string(), "--ca"])
            .arg(&bundle)
            .args(["apply", "-f"])
            .arg(&file)
            .env("QUICMESH_ADMIN_TOKEN", &admin)
            .env("QUICMESH_LOG", "warn")
            .output()
            .expect("run ctl");
        assert!(
            out.status.success(),
            "ctl apply: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ctl_apply(
        "kind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  ports: [{port: 7, protocol: tcp}]\n  identities: [web]\n"
            .into(),
    );
    let (web_app, web_seen) = tagged_app("web").await;
    let (evil_app, evil_seen) = tagged_app("evil").await;
    let mut procs = Vec::new();
    for (name, app) in [("web", web_app), ("evil", evil_app)] {
        let j = Join {
            controller: addr,
            bundle: &bundle,
            token: join_token(addr, &bundle, &admin, name).await,
            sa: name,
        };
        // Both claim the service; the controller refuses the impostor's registration.
        let cfg = proxy_config(
            d,
            name,
            &j,
            "",
            &format!(
                "[inbound]\nlisten = \"127.0.0.1:0\"\nports = [{{ port = 7, app = \"{app}\" }}]\nservices = [\"web\"]\n"
            ),
        );
        let log = d.join(format!("{name}.log"));
        procs.push(spawn(&["proxy", "--config", cfg.to_str().expect("utf8")], &log).await);
    }
    // An endpoint record that names web's identity but points at the impostor's address (a stale
    // record, or an address taken over): only the caller's own check can catch this one.
    let evil_addr = procs[1].addr("inbound");
    ctl_apply(format!(
        "kind: Endpoint\nmetadata: {{name: hijack, namespace: default}}\nspec:\n  service: web\n  address: \"{evil_addr}\"\n  spiffe_id: spiffe://{TD}/ns/default/sa/web\n"
    ));
    let j = Join {
        controller: addr,
        bundle: &bundle,
        token: join_token(addr, &bundle, &admin, "client").await,
        sa: "client",
    };
    let cfg = proxy_config(
        d,
        "client",
        &j,
        "",
        "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"web\"\nport = 7\nconnect_timeout = \"10s\"\n",
    );
    let client = spawn(
        &["proxy", "--config", cfg.to_str().expect("utf8")],
        &d.join("client.log"),
    )
    .await;

    let answers = ask_many(client.outbound(), 1000).await;
    assert_eq!(
        answers.get("web"),
        Some(&1000),
        "every request reached web: {answers:?}"
    );
    assert_eq!(evil_seen.load(Ordering::Relaxed), 0, "the impostor's app");
    assert_eq!(web_seen.load(Ordering::Relaxed), 1000);
    let m = client.metrics().await;
    assert!(
        metric(
            &m,
            "quicmesh_peer_refusals_total",
            &["direction=\"outbound\"", "reason=\"wrong_server_identity\""]
        ) >= 1.0,
        "the hijacked endpoint was tried and refused:\n{m}"
    );
    assert_eq!(
        metric(&m, "quicmesh_tunnel_failures_total", &[]),
        0.0,
        "{m}"
    );
}
