//! The controller as a user runs it: the built `quicmesh controller` process, `quicmesh ctl`, and a proxy's
//! bootstrap over the network. Readiness is the controller's JSON ready line, never a sleep.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use quicmesh_controller::client;
use quicmesh_proto::controller as pb;
use quicmesh_transport::identity::{SpiffeId, ca::generate_csr};
use tokio::process::{Child, Command};

use crate::support::{QUICMESH as BIN, spawn_ready};

struct Proc {
    child: Child,
    addr: String,
    token: Option<String>,
    bundle: PathBuf,
}

/// Starts `quicmesh controller` on port 0 and waits for its ready line.
async fn start(dir: &Path, extra: &[&str]) -> Proc {
    let data = dir.join("data");
    let mut args = vec![
        "controller",
        "--data-dir",
        data.to_str().expect("utf8 path"),
        "--listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let (child, ready) = spawn_ready(&args, &dir.join("controller.log")).await;
    Proc {
        child,
        addr: ready["grpc"].as_str().expect("grpc").to_owned(),
        token: ready["admin_token"].as_str().map(str::to_owned),
        bundle: PathBuf::from(ready["trust_bundle"].as_str().expect("bundle")),
    }
}

impl Proc {
    async fn admin(&self, token: &str) -> client::Admin {
        let bundle = std::fs::read_to_string(&self.bundle).expect("bundle file");
        let ch = client::connect(&self.addr, &[bundle], None, Some(Duration::from_secs(10)))
            .await
            .expect("connect");
        client::admin(ch, token).expect("admin client")
    }

    /// Runs `quicmesh ctl ARGS` against this controller.
    async fn ctl(&self, token: Option<&str>, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(BIN);
        cmd.arg("ctl")
            .args(["--controller", &self.addr])
            .arg("--ca")
            .arg(&self.bundle)
            .args(args)
            .env_remove("QUICMESH_ADMIN_TOKEN")
            .env("QUICMESH_LOG", "warn");
        if let Some(t) = token {
            cmd.env("QUICMESH_ADMIN_TOKEN", t);
        }
        tokio::time::timeout(Duration::from_secs(30), cmd.output())
            .await
            .expect("ctl in time")
            .expect("run ctl")
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn controller_process_bootstrap_ctl_and_bad_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = start(
        dir.path(),
        &["--trust-domain", "proc.test", "--leaf-ttl", "30s"],
    )
    .await;
    let token = c.token.clone().expect("first start prints the admin token");

    // apply -f with several documents.
    let good = dir.path().join("good.yaml");
    std::fs::write(
        &good,
        "kind: Service\nmetadata: {name: cart, namespace: shop}\nspec: {ports: [{port: 8080, protocol: http}], versions: [v1, v2]}\n---\nkind: Policy\nmetadata: {name: split, namespace: shop}\nspec: {target_service: cart, traffic_split: {backends: [{service_version: v1, weight: 1}]}}\n",
    )
    .expect("write");
    let out = c
        .ctl(Some(&token), &["apply", "-f", good.to_str().expect("utf8")])
        .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("service/shop/cart applied"),
        "{}",
        text(&out.stdout)
    );

    let out = c
        .ctl(Some(&token), &["get", "services", "-o", "json"])
        .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(listed[0]["metadata"]["name"], "cart");
    let version_before = listed[0]["metadata"]["version"].as_u64().expect("version");

    // A malformed resource: refused with the field named, nothing stored.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "kind: Service\nmetadata: {name: cart, namespace: shop}\nspec: {ports: [{port: 70000, protocol: http}]}\n",
    )
    .expect("write");
    let out = c
        .ctl(Some(&token), &["apply", "-f", bad.to_str().expect("utf8")])
        .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("spec.ports[0].port"),
        "{}",
        text(&out.stderr)
    );
    let typo = dir.path().join("typo.yaml");
    std::fs::write(
        &typo,
        "kind: Service\nmetadata: {name: cart, namespace: shop}\nspec: {prots: []}\n",
    )
    .expect("write");
    let out = c
        .ctl(Some(&token), &["apply", "-f", typo.to_str().expect("utf8")])
        .await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("prots"), "{}", text(&out.stderr));

    // Missing or wrong admin credentials: refused.
    let out = c
        .ctl(None, &["apply", "-f", good.to_str().expect("utf8")])
        .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no admin token"),
        "{}",
        text(&out.stderr)
    );
    let out = c
        .ctl(
            Some("qma_not-the-token"),
            &["apply", "-f", good.to_str().expect("utf8")],
        )
        .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("Unauthenticated"),
        "{}",
        text(&out.stderr)
    );

    let out = c
        .ctl(Some(&token), &["get", "services", "-o", "json"])
        .await;
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        listed[0]["metadata"]["version"].as_u64(),
        Some(version_before),
        "a refused write changed the service"
    );

    // A proxy bootstraps with a join token from `ctl tokens create`.
    let out = c
        .ctl(
            Some(&token),
            &["tokens", "create", "shop", "cart", "-o", "json"],
        )
        .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let join = created["token"].as_str().expect("token").to_owned();
    let bundle = std::fs::read_to_string(&c.bundle).expect("bundle");
    let ch = client::connect(
        &c.addr,
        std::slice::from_ref(&bundle),
        None,
        Some(Duration::from_secs(10)),
    )
    .await
    .expect("connect");
    let mut proxy = client::proxy(ch);
    let id = SpiffeId::new("proc.test", "shop", "cart").expect("id");
    let (csr, _key) = generate_csr(&id).expect("csr");
    let resp = proxy
        .certify(pb::CertifyRequest {
            csr_pem: csr.clone(),
            join_token: join.clone(),
            ..Default::default()
        })
        .await
        .expect("certify")
        .into_inner();
    assert_eq!(resp.spiffe_id, id.as_str());
    assert!(
        resp.not_after_unix - resp.not_before_unix <= 60,
        "leaf lifetime follows --leaf-ttl"
    );
    let err = proxy
        .certify(pb::CertifyRequest {
            csr_pem: csr,
            join_token: join,
            ..Default::default()
        })
        .await
        .expect_err("reused token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    let out = c.ctl(Some(&token), &["certs", "-o", "json"]).await;
    let certs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(certs["issued"].as_array().map(Vec::len), Some(1));
    let out = c.ctl(Some(&token), &["check"]).await;
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[tokio::test]
async fn controller_kill_9_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = start(dir.path(), &[]).await;
    let token = c.token.clone().expect("token");
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..8 {
        let mut admin = c.admin(&token).await;
        let acked = acked.clone();
        let count = count.clone();
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let name = format!("svc-{w}-{i}");
                let r = pb::Resource {
                    resource: Some(pb::resource::Resource::Service(pb::Service {
                        metadata: Some(pb::Metadata {
                            name: name.clone(),
                            namespace: "load".into(),
                            ..Default::default()
                        }),
                        ports: vec![pb::ServicePort {
                            port: 80,
                            protocol: pb::PortProtocol::Tcp as i32,
                            name: String::new(),
                        }],
                        ..Default::default()
                    })),
                };
                match admin.create(r).await {
                    Ok(_) => {
                        acked.lock().expect("lock").push(name);
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    // The controller died: stop writing.
                    Err(_) => return,
                }
            }
        }));
    }
    // Kill in the middle of the stream of writes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while count.load(Ordering::Relaxed) < 300 {
        assert!(tokio::time::Instant::now() < deadline, "writes too slow");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.child.start_kill().expect("kill -9");
    let status = c.child.wait().await.expect("wait");
    assert!(!status.success());
    for w in writers {
        tokio::time::timeout(Duration::from_secs(30), w)
            .await
            .expect("writers stop")
            .expect("writer task");
    }
    let acked = acked.lock().expect("lock").clone();
    assert!(acked.len() >= 300);

    // Restart on the same directory: it opens cleanly, keeps the admin token, and has every acknowledged write.
    let c2 = start(dir.path(), &[]).await;
    assert!(c2.token.is_none(), "the admin token is created once");
    let mut admin = c2.admin(&token).await;
    let listed = admin
        .list(pb::ListRequest {
            kind: pb::Kind::Service as i32,
            namespace: "load".into(),
        })
        .await
        .expect("list after restart")
        .into_inner();
    let names: std::collections::HashSet<String> = listed
        .items
        .into_iter()
        .filter_map(|r| match r.resource {
            Some(pb::resource::Resource::Service(s)) => s.metadata.map(|m| m.name),
            _ => None,
        })
        .collect();
    let missing: Vec<&String> = acked.iter().filter(|n| !names.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged writes lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    eprintln!(
        "{} acknowledged writes before kill -9, {} present after restart",
        acked.len(),
        names.len()
    );
}
