//! Several controllers on one etcd: three real TLS gRPC controllers (in this process) on a real 3-member
//! etcd cluster (child processes on loopback), driven by the client code `quicmesh ctl` and proxies use.
//! Every test skips with a printed reason without the `etcd` binary (Debian's etcd-server).

#[path = "support/etcd.rs"]
mod etcd_cluster;
#[path = "support/resources.rs"]
mod resources;
use resources::service;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use etcd_cluster::EtcdCluster;
use quicmesh_controller::{
    Controller,
    client::{self, Admin},
    state::{State, StateOptions},
    store::etcd::{
        EtcdOptions,
        client::{self as etcd_rpc, pb::etcdserverpb::PutRequest},
    },
};
use quicmesh_proto::controller as pb;
use quicmesh_transport::identity::{SpiffeId, ca::generate_csr};
use tonic::Code;

const TD: &str = "test.mesh";
/// The key-encryption key every controller of the mesh is given (base64 of 32 bytes).
const KEK: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn skip(name: &str) -> bool {
    match etcd_cluster::unavailable() {
        Some(why) => {
            eprintln!("SKIPPED {name}: {why}");
            true
        }
        None => false,
    }
}

async fn cluster() -> EtcdCluster {
    tokio::task::spawn_blocking(|| EtcdCluster::start(3))
        .await
        .expect("etcd start")
}

fn options(url: &str, dir: &std::path::Path, kek: &str, timeout: Duration) -> StateOptions {
    let mut etcd = EtcdOptions::from_url(url).expect("url");
    etcd.max_txn_ops = etcd_cluster::MAX_TXN_OPS;
    etcd.timeout = timeout;
    StateOptions {
        trust_domain: Some(TD.into()),
        leaf_ttl: Some(Duration::from_secs(3600)),
        kek: Some(kek.into()),
        etcd: Some(etcd),
        ..StateOptions::new(dir)
    }
}

/// One running controller.
struct Node {
    state: Arc<State>,
    addr: String,
    bundle: Vec<String>,
    admin_token: Option<String>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(url: &str, kek: &str, timeout: Duration) -> Node {
        Self::start_as(url, kek, timeout, None).await
    }

    /// As [`Node::start`], authenticating to etcd as `user` (name, password).
    async fn start_as(url: &str, kek: &str, timeout: Duration, user: Option<(&str, &str)>) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut opts = options(url, dir.path(), kek, timeout);
        if let Some(e) = opts.etcd.as_mut() {
            e.user = user.map(|(u, p)| (u.to_owned(), p.to_owned()));
        }
        let c = Controller::bind(opts, "127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("controller start");
        let addr = c.addr().to_string();
        let admin_token = c.admin_token().map(str::to_owned);
        let bundle = c.state().bundle();
        let state = c.state().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = c
                .serve(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Node {
            state,
            addr,
            bundle,
            admin_token,
            stop: Some(stop),
            _dir: dir,
        }
    }

    async fn admin(&self, token: &str) -> Admin {
        let ch = client::connect(
            &self.addr,
            &self.bundle,
            None,
            Some(Duration::from_secs(10)),
        )
        .await
        .expect("connect");
        client::admin(ch, token).expect("admin")
    }

    async fn proxy(
        &self,
        mtls: Option<(&str, &str)>,
    ) -> pb::proxy_api_client::ProxyApiClient<tonic::transport::Channel> {
        let ch = client::connect(
            &self.addr,
            &self.bundle,
            mtls,
            Some(Duration::from_secs(10)),
        )
        .await
        .expect("connect");
        client::proxy(ch)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Three controllers on `url`; the first creates the mesh. Returns them and the admin token.
async fn three(url: &str) -> (Vec<Node>, String) {
    let a = Node::start(url, KEK, Duration::from_secs(5)).await;
    let token = a
        .admin_token
        .clone()
        .expect("the first controller creates the mesh");
    let b = Node::start(url, KEK, Duration::from_secs(5)).await;
    let c = Node::start(url, KEK, Duration::from_secs(5)).await;
    assert!(b.admin_token.is_none() && c.admin_token.is_none());
    assert_eq!(a.bundle, b.bundle, "one root for the mesh");
    assert_eq!(a.bundle, c.bundle);
    (vec![a, b, c], token)
}

async fn join_token(admin: &mut Admin, sa: &str) -> String {
    admin
        .create_join_token(pb::CreateJoinTokenRequest {
            namespace: "shop".into(),
            service_account: sa.into(),
            ttl_seconds: 0,
            reusable: false,
        })
        .await
        .expect("token")
        .into_inner()
        .token
}

#[tokio::test]
async fn a_write_through_one_controller_reaches_watchers_of_another_within_500ms() {
    if skip("a_write_through_one_controller_reaches_watchers_of_another_within_500ms") {
        return;
    }
    let etcd = cluster().await;
    let (nodes, token) = three(&etcd.url()).await;
    let mut admin_a = nodes[0].admin(&token).await;
    // A proxy joins through controller C and watches controller B.
    let join = join_token(&mut admin_a, "cart").await;
    let spiffe = SpiffeId::new(TD, "shop", "cart").expect("id");
    let (csr, key) = generate_csr(&spiffe).expect("csr");
    let leaf = nodes[2]
        .proxy(None)
        .await
        .certify(pb::CertifyRequest {
            csr_pem: csr,
            join_token: join,
            ..Default::default()
        })
        .await
        .expect("certify on C with a token made on A")
        .into_inner()
        .cert_chain_pem[0]
        .clone();
    let mut stream = nodes[1]
        .proxy(Some((&leaf, &key)))
        .await
        .watch(pb::WatchRequest::default())
        .await
        .expect("watch on B with a leaf from C")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("first snapshot")
        .expect("ok")
        .expect("open");
    assert!(first.services.is_empty());

    let mut worst = Duration::ZERO;
    for i in 0..5u32 {
        let name = format!("web{i}");
        let sent = Instant::now();
        admin_a
            .apply(service("shop", &name, 8080 + i))
            .await
            .expect("apply on A");
        let seen = loop {
            let snap = tokio::time::timeout(Duration::from_secs(5), stream.message())
                .await
                .expect("a snapshot in time")
                .expect("ok")
                .expect("open");
            if snap
                .services
                .iter()
                .any(|s| s.metadata.as_ref().is_some_and(|m| m.name == name))
            {
                break sent.elapsed();
            }
        };
        worst = worst.max(seen);
    }
    eprintln!("etcd: Apply on A to the snapshot on B's watch: worst of 5 {worst:?}");
    assert!(
        worst < Duration::from_millis(500),
        "a write on A reached B's watcher after {worst:?}"
    );

    // A revocation through A ends the identity's stream on B, and C gives it no certificate.
    admin_a
        .revoke_identity(pb::RevokeIdentityRequest {
            namespace: "shop".into(),
            service_account: "cart".into(),
        })
        .await
        .expect("revoke on A");
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("the stream on B ends in time")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream on B ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(end.code(), Code::PermissionDenied, "{end}");
    let (csr, _) = generate_csr(&spiffe).expect("csr");
    let e = nodes[2]
        .proxy(Some((&leaf, &key)))
        .await
        .certify(pb::CertifyRequest {
            csr_pem: csr,
            join_token: String::new(),
            ..Default::default()
        })
        .await
        .expect_err("revoked on C");
    // C drops a revoked identity's new connections after the handshake, or refuses the call.
    assert_ne!(e.code(), Code::Ok, "{e}");
}

#[tokio::test]
async fn a_join_token_spent_on_one_controller_is_refused_on_the_others() {
    if skip("a_join_token_spent_on_one_controller_is_refused_on_the_others") {
        return;
    }
    let etcd = cluster().await;
    let (nodes, token) = three(&etcd.url()).await;
    let mut admin_a = nodes[0].admin(&token).await;
    let spiffe = SpiffeId::new(TD, "shop", "cart").expect("id");

    // One after the other: spent on B, refused on C and on A.
    let join = join_token(&mut admin_a, "cart").await;
    let (csr, _key) = generate_csr(&spiffe).expect("csr");
    let certify = |n: &Node, join: String, csr: String| {
        let addr = n.addr.clone();
        let bundle = n.bundle.clone();
        async move {
            let ch = client::connect(&addr, &bundle, None, Some(Duration::from_secs(10)))
                .await
                .expect("connect");
            client::proxy(ch)
                .certify(pb::CertifyRequest {
                    csr_pem: csr,
                    join_token: join,
                    ..Default::default()
                })
                .await
        }
    };
    certify(&nodes[1], join.clone(), csr.clone())
        .await
        .expect("first use on B");
    for n in [&nodes[2], &nodes[0]] {
        let e = certify(n, join.clone(), csr.clone())
            .await
            .expect_err("second use");
        assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    }

    // At the same moment on all three, ten times: exactly one use succeeds each time.
    for round in 0..10 {
        let join = join_token(&mut admin_a, "cart").await;
        let tries: Vec<_> = nodes
            .iter()
            .map(|n| tokio::spawn(certify(n, join.clone(), csr.clone())))
            .collect();
        let mut ok = 0;
        for t in tries {
            match t.await.expect("task") {
                Ok(_) => ok += 1,
                Err(e) => assert_eq!(e.code(), Code::Unauthenticated, "round {round}: {e}"),
            }
        }
        assert_eq!(ok, 1, "round {round}: the token was spent {ok} times");
    }
    let issued = admin_a
        .list_issued_certificates(pb::ListIssuedCertificatesRequest { limit: 100 })
        .await
        .expect("audit")
        .into_inner()
        .certificates
        .len();
    assert_eq!(issued, 11, "one certificate per token");
}

/// Guarded writes (issuance) on two stores sharing one prefix, as two controllers: a write conflicts
/// only when a key it read changed, never for writes to other keys, and it still moves the store
/// revision, so a write checked on the whole state sees it.
#[test]
fn a_guarded_write_conflicts_only_over_the_keys_it_read() {
    use quicmesh_controller::store::{Op, Store, StoreError, Tree, etcd::EtcdStore};
    if skip("a_guarded_write_conflicts_only_over_the_keys_it_read") {
        return;
    }
    let etcd = EtcdCluster::start(1);
    let mut o = EtcdOptions::from_url(&etcd.url()).expect("url");
    o.prefix = "/guarded/".into();
    let a = EtcdStore::open(&o).expect("store a");
    let b = EtcdStore::open(&o).expect("store b");
    let put = |k: &str, v: &[u8]| Op::Put(Tree::Tokens, k.into(), v.to_vec());
    let read = |s: &EtcdStore, k: &str| s.get(Tree::Tokens, k).expect("get");
    let expect = |k: &str, v: Option<&[u8]>| (Tree::Tokens, k.to_owned(), v.map(<[u8]>::to_vec));

    // Created where absent; a second creation of the same key is refused.
    a.apply_if(vec![expect("t1", None)], vec![put("t1", b"uses=1")])
        .expect("create t1");
    b.catch_up().expect("catch up");
    assert!(matches!(
        b.apply_if(vec![expect("t1", None)], vec![put("t1", b"uses=1")]),
        Err(StoreError::Conflict)
    ));
    // B spends it on what it read; A, still holding the old value, conflicts, then succeeds on fresh data.
    b.apply_if(
        vec![expect("t1", Some(b"uses=1"))],
        vec![put("t1", b"uses=2")],
    )
    .expect("b spends t1");
    assert!(matches!(
        a.apply_if(
            vec![expect("t1", Some(b"uses=1"))],
            vec![put("t1", b"uses=2")]
        ),
        Err(StoreError::Conflict)
    ));
    a.catch_up().expect("catch up");
    assert_eq!(read(&a, "t1").as_deref(), Some(&b"uses=2"[..]));
    a.apply_if(
        vec![expect("t1", Some(b"uses=2"))],
        vec![put("t1", b"uses=3")],
    )
    .expect("a spends t1 on fresh data");

    // Other keys: neither store has seen the other's latest write, and neither conflicts.
    a.apply_if(vec![expect("x", None)], vec![put("x", b"1")])
        .expect("a writes x");
    b.apply_if(vec![expect("y", None)], vec![put("y", b"1")])
        .expect("b writes y without seeing x");

    // A write checked on the whole state at a revision from before B's guarded write conflicts.
    let base = a.revision();
    b.catch_up().expect("catch up");
    b.apply_if(vec![expect("y", Some(b"1"))], vec![put("y", b"2")])
        .expect("b moves y");
    assert!(matches!(
        a.apply(base, vec![put("z", b"1")]),
        Err(StoreError::Conflict)
    ));
    a.catch_up().expect("catch up");
    a.apply(a.revision(), vec![put("z", b"1")])
        .expect("a writes z on fresh data");
    b.catch_up().expect("catch up");
    for (k, v) in [("t1", "uses=3"), ("x", "1"), ("y", "2"), ("z", "1")] {
        assert_eq!(read(&b, k).as_deref(), Some(v.as_bytes()), "{k}");
    }
}

#[tokio::test]
async fn issuance_through_three_controllers_at_once_fails_no_call_and_counts_every_use() {
    if skip("issuance_through_three_controllers_at_once_fails_no_call_and_counts_every_use") {
        return;
    }
    let etcd = cluster().await;
    let (nodes, token) = three(&etcd.url()).await;
    let mut admin_a = nodes[0].admin(&token).await;
    // One reusable token: every certificate, whichever controller signs it, counts a use of the same
    // record, so the three controllers' batches meet over it (and over the root's leaf expiry).
    let join = admin_a
        .create_join_token(pb::CreateJoinTokenRequest {
            namespace: "shop".into(),
            service_account: "cart".into(),
            ttl_seconds: 0,
            reusable: true,
        })
        .await
        .expect("token")
        .into_inner()
        .token;
    let spiffe = SpiffeId::new(TD, "shop", "cart").expect("id");
    let (csr, _key) = generate_csr(&spiffe).expect("csr");
    const PER_NODE: usize = 300;
    let mut calls = Vec::new();
    for n in &nodes {
        let proxy = n.proxy(None).await;
        for _ in 0..PER_NODE {
            let (mut proxy, join, csr) = (proxy.clone(), join.clone(), csr.clone());
            calls.push(tokio::spawn(async move {
                proxy
                    .certify(pb::CertifyRequest {
                        csr_pem: csr,
                        join_token: join,
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner().cert_chain_pem[0].clone())
            }));
        }
    }
    let mut leaves = std::collections::HashSet::new();
    for c in calls {
        let leaf = c
            .await
            .expect("task")
            .expect("every call gets its certificate");
        leaves.insert(leaf);
    }
    let n = nodes.len() * PER_NODE;
    assert_eq!(leaves.len(), n, "a distinct leaf per call");
    let uses = admin_a
        .list_join_tokens(pb::ListJoinTokensRequest {})
        .await
        .expect("tokens")
        .into_inner()
        .tokens
        .iter()
        .find(|t| t.reusable)
        .map(|t| t.uses)
        .expect("the reusable token");
    assert_eq!(uses as usize, n, "no use lost between controllers");
    let serials: std::collections::HashSet<String> = admin_a
        .list_issued_certificates(pb::ListIssuedCertificatesRequest { limit: 1000 })
        .await
        .expect("audit")
        .into_inner()
        .certificates
        .into_iter()
        .map(|c| c.serial_hex)
        .collect();
    assert_eq!(
        serials.len(),
        n,
        "one audit record per certificate, none overwritten"
    );
}

#[tokio::test]
async fn a_controller_with_another_kek_refuses_to_start_and_a_newer_schema_is_refused() {
    if skip("a_controller_with_another_kek_refuses_to_start_and_a_newer_schema_is_refused") {
        return;
    }
    let etcd = cluster().await;
    let url = etcd.url();
    let _a = Node::start(&url, KEK, Duration::from_secs(5)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let other = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
    let opts = options(&url, dir.path(), other, Duration::from_secs(5));
    let e = tokio::task::spawn_blocking(move || State::open(opts).map(|_| ()))
        .await
        .expect("task")
        .expect_err("wrong KEK");
    let msg = e.to_string();
    assert!(
        msg.contains("does not decrypt") && msg.contains("QUICMESH_KEK"),
        "{msg}"
    );
    // No KEK at all: the default file is not generated over a store with sealed roots.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let mut opts = options(&url, dir2.path(), KEK, Duration::from_secs(5));
    opts.kek = None;
    let e = tokio::task::spawn_blocking(move || State::open(opts).map(|_| ()))
        .await
        .expect("task")
        .expect_err("no KEK");
    assert!(e.to_string().contains("QUICMESH_KEK"), "{e}");

    // A store written by a newer schema, under another prefix.
    let kv = etcd_rpc::Client::new(&EtcdOptions::from_url(&url).expect("url")).expect("client");
    let put = |key: &str, value: &[u8]| PutRequest {
        key: key.into(),
        value: value.into(),
    };
    kv.put(put("/newer/meta/schema", &2u64.to_be_bytes()))
        .await
        .expect("put");
    let dir3 = tempfile::tempdir().expect("tempdir");
    let mut opts = options(&url, dir3.path(), KEK, Duration::from_secs(5));
    if let Some(e) = opts.etcd.as_mut() {
        e.prefix = "/newer/".into();
    }
    let e = tokio::task::spawn_blocking(move || State::open(opts).map(|_| ()))
        .await
        .expect("task")
        .expect_err("newer schema");
    let msg = e.to_string();
    assert!(
        msg.contains("etcd prefix /newer/ has schema version 2") && msg.contains("newer quicmesh"),
        "{msg}"
    );
    // Keys under a prefix that are not a quicmesh store are not taken over.
    kv.put(put("/foreign/x", b"y")).await.expect("put");
    let dir4 = tempfile::tempdir().expect("tempdir");
    let mut opts = options(&url, dir4.path(), KEK, Duration::from_secs(5));
    if let Some(e) = opts.etcd.as_mut() {
        e.prefix = "/foreign/".into();
    }
    let e = tokio::task::spawn_blocking(move || State::open(opts).map(|_| ()))
        .await
        .expect("task")
        .expect_err("foreign prefix");
    assert!(e.to_string().contains("not a quicmesh store"), "{e}");
}

#[tokio::test]
async fn kill_9_of_the_etcd_leader_under_writes_loses_no_acknowledged_write() {
    if skip("kill_9_of_the_etcd_leader_under_writes_loses_no_acknowledged_write") {
        return;
    }
    let mut etcd = cluster().await;
    let (nodes, token) = three(&etcd.url()).await;
    let mut admins = Vec::new();
    for n in &nodes {
        admins.push(n.admin(&token).await);
    }
    // Writers on every controller, bounded in count and time; the leader dies after the first 50.
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut writers = Vec::new();
    for (w, admin) in admins.iter().enumerate() {
        let mut admin = admin.clone();
        let tx = acked_tx.clone();
        writers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, 0u32);
            for i in 0..150u32 {
                if Instant::now() > deadline {
                    break;
                }
                let name = format!("w{w}-{i}");
                match admin.apply(service("shop", &name, 80)).await {
                    Ok(_) => {
                        ok += 1;
                        let _ = tx.send(name);
                    }
                    Err(e) => {
                        assert!(
                            matches!(e.code(), Code::Unavailable | Code::Aborted),
                            "{name}: {e}"
                        );
                        failed += 1;
                    }
                }
            }
            (ok, failed)
        }));
    }
    drop(acked_tx);
    let mut acked = Vec::new();
    while acked.len() < 50 {
        acked.push(acked_rx.recv().await.expect("writes go on"));
    }
    let victim = etcd_cluster::leader(&etcd).await;
    etcd.kill(victim);
    eprintln!(
        "killed etcd member {victim} (the leader) after {} acknowledged writes",
        acked.len()
    );
    let (mut ok, mut failed) = (0, 0);
    for w in writers {
        let (o, f) = w.await.expect("writer");
        ok += o;
        failed += f;
    }
    while let Some(n) = acked_rx.recv().await {
        acked.push(n);
    }
    eprintln!("writes: {ok} acknowledged, {failed} refused (UNAVAILABLE/ABORTED) around the kill");
    assert_eq!(acked.len(), ok as usize);
    assert!(ok > 100, "writes kept going on the remaining members: {ok}");

    // Every acknowledged write is on every controller, and on a controller started after the kill.
    let late = Node::start(&etcd.url(), KEK, Duration::from_secs(5)).await;
    let mut all: Vec<&Node> = nodes.iter().collect();
    all.push(&late);
    for (i, n) in all.iter().enumerate() {
        let mut admin = n.admin(&token).await;
        let limit = Instant::now() + Duration::from_secs(10);
        loop {
            let listed: std::collections::HashSet<String> = admin
                .list(pb::ListRequest {
                    kind: pb::Kind::Service as i32,
                    namespace: "shop".into(),
                })
                .await
                .expect("list")
                .into_inner()
                .items
                .into_iter()
                .filter_map(|r| match r.resource {
                    Some(pb::resource::Resource::Service(s)) => s.metadata.map(|m| m.name),
                    _ => None,
                })
                .collect();
            let missing: Vec<&String> = acked.iter().filter(|a| !listed.contains(*a)).collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                Instant::now() < limit,
                "controller {i}: acknowledged writes missing: {missing:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn without_etcd_writes_fail_unavailable_while_reads_and_watch_serve_the_last_state() {
    if skip("without_etcd_writes_fail_unavailable_while_reads_and_watch_serve_the_last_state") {
        return;
    }
    let mut etcd = cluster().await;
    let n = Node::start(&etcd.url(), KEK, Duration::from_secs(1)).await;
    let token = n.admin_token.clone().expect("token");
    let mut admin = n.admin(&token).await;
    admin
        .apply(service("shop", "web", 80))
        .await
        .expect("apply");
    let join = join_token(&mut admin, "cart").await;
    let spiffe = SpiffeId::new(TD, "shop", "cart").expect("id");
    let (csr, key) = generate_csr(&spiffe).expect("csr");
    let leaf = n
        .proxy(None)
        .await
        .certify(pb::CertifyRequest {
            csr_pem: csr.clone(),
            join_token: join,
            ..Default::default()
        })
        .await
        .expect("certify")
        .into_inner()
        .cert_chain_pem[0]
        .clone();
    let mut watcher = n.proxy(Some((&leaf, &key))).await;
    let mut stream = watcher
        .watch(pb::WatchRequest::default())
        .await
        .expect("watch")
        .into_inner();
    stream.message().await.expect("ok").expect("first");
    let rev = n.state.revision();

    for i in 0..3 {
        etcd.kill(i);
    }
    let t = Instant::now();
    let e = admin
        .apply(service("shop", "api", 81))
        .await
        .expect_err("no etcd");
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let e = n
        .proxy(Some((&leaf, &key)))
        .await
        .certify(pb::CertifyRequest {
            csr_pem: csr,
            join_token: String::new(),
            ..Default::default()
        })
        .await
        .expect_err("no etcd");
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert_eq!(n.state.revision(), rev, "nothing half-written");
    // Reads and a new Watch serve the last state.
    let listed = admin
        .list(pb::ListRequest {
            kind: pb::Kind::Service as i32,
            namespace: String::new(),
        })
        .await
        .expect("list without etcd")
        .into_inner();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.store_version, rev);
    let mut again = watcher
        .watch(pb::WatchRequest::default())
        .await
        .expect("watch without etcd")
        .into_inner();
    let snap = again.message().await.expect("ok").expect("snapshot");
    assert_eq!(snap.services.len(), 1);
    // The first stream is still open: nothing ended it.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), stream.message())
            .await
            .is_err(),
        "the open Watch stream got something or ended"
    );
}

#[tokio::test]
async fn tls_and_client_certificates_to_etcd() {
    if skip("tls_and_client_certificates_to_etcd") {
        return;
    }
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
    let leaf = |names: Vec<String>, ip: bool| {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(names).expect("params");
        if ip {
            p.subject_alt_names
                .push(SanType::IpAddress([127, 0, 0, 1].into()));
        }
        let cert = p.signed_by(&key, &ca).expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["localhost".into()], true);
    let (client_cert, client_key) = leaf(vec!["controller".into()], false);
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p
    };
    let tls = etcd_cluster::ServerTls {
        cert: write("server.pem", &server_cert),
        key: write("server-key.pem", &server_key),
        client_ca: write("ca.pem", &ca.pem()),
    };
    let etcd = tokio::task::spawn_blocking(move || EtcdCluster::start_with(3, Some(&tls)))
        .await
        .expect("etcd start");

    let open = |identity: Option<(String, String)>| {
        let data = tempfile::tempdir().expect("tempdir");
        let mut opts = options(&etcd.url(), data.path(), KEK, Duration::from_secs(3));
        if let Some(e) = opts.etcd.as_mut() {
            e.tls = Some(quicmesh_controller::store::etcd::EtcdTls {
                ca_pem: ca.pem(),
                identity,
            });
        }
        async move {
            let r = tokio::task::spawn_blocking(move || State::open(opts).map(|(s, _)| s))
                .await
                .expect("task");
            drop(data);
            r
        }
    };
    // With the client certificate: a mesh is created and written over TLS.
    let state = open(Some((client_cert.clone(), client_key.clone())))
        .await
        .expect("controller over TLS with a client certificate");
    assert!(state.revision() > 0);
    // Without one, the members refuse the connection: a clear start-up error, no hang.
    let e = open(None).await.expect_err("no client certificate");
    assert!(e.to_string().contains("store unavailable"), "{e}");
}

#[tokio::test]
async fn controllers_starting_together_on_an_empty_store_make_one_mesh() {
    if skip("controllers_starting_together_on_an_empty_store_make_one_mesh") {
        return;
    }
    let etcd = cluster().await;
    let url = etcd.url();
    let (a, b, c) = tokio::join!(
        Node::start(&url, KEK, Duration::from_secs(5)),
        Node::start(&url, KEK, Duration::from_secs(5)),
        Node::start(&url, KEK, Duration::from_secs(5)),
    );
    let tokens: Vec<&String> = [&a, &b, &c]
        .iter()
        .filter_map(|n| n.admin_token.as_ref())
        .collect();
    assert_eq!(tokens.len(), 1, "one controller created the mesh");
    assert_eq!(a.bundle, b.bundle, "one root");
    assert_eq!(a.bundle, c.bundle, "one root");
    // The admin token works on all three.
    for n in [&a, &b, &c] {
        n.admin(tokens[0])
            .await
            .list(pb::ListRequest {
                kind: pb::Kind::Service as i32,
                namespace: String::new(),
            })
            .await
            .expect("admin token accepted");
    }
}

/// The names of the services in `shop` a controller lists.
async fn shop_services(admin: &mut Admin) -> Vec<String> {
    admin
        .list(pb::ListRequest {
            kind: pb::Kind::Service as i32,
            namespace: "shop".into(),
        })
        .await
        .expect("list")
        .into_inner()
        .items
        .into_iter()
        .filter_map(|r| match r.resource {
            Some(pb::resource::Resource::Service(s)) => s.metadata.map(|m| m.name),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn user_and_password_auth_and_a_revoked_token_is_replaced() {
    let name = "user_and_password_auth_and_a_revoked_token_is_replaced";
    if skip(name) {
        return;
    }
    if let Some(why) = etcd_cluster::etcdctl_unavailable() {
        eprintln!("SKIPPED {name}: {why}");
        return;
    }
    let mut etcd = cluster().await;
    // A user that may touch only the mesh's prefix, then auth on.
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["role", "add", "mesh"],
        &[
            "role",
            "grant-permission",
            "mesh",
            "--prefix=true",
            "readwrite",
            "/quicmesh/",
        ],
        &["user", "add", "quicmesh:s3cret"],
        &["user", "grant-role", "quicmesh", "mesh"],
        &["auth", "enable"],
    ] {
        etcd.etcdctl(args, "").expect("etcdctl");
    }
    let url = etcd.url();
    let open = |user: Option<(&str, &str)>| {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut opts = options(&url, dir.path(), KEK, Duration::from_secs(3));
        if let Some(e) = opts.etcd.as_mut() {
            e.user = user.map(|(u, p)| (u.to_owned(), p.to_owned()));
        }
        async move {
            let r = tokio::task::spawn_blocking(move || State::open(opts).map(|_| ()))
                .await
                .expect("task");
            drop(dir);
            r
        }
    };
    // Refused without a user and with a wrong password, with an error that says why.
    let e = open(None).await.expect_err("no user");
    assert!(e.to_string().contains("user name is empty"), "{e}");
    let e = open(Some(("quicmesh", "wrong")))
        .await
        .expect_err("bad password");
    assert!(
        e.to_string().contains("user name or password") && e.to_string().contains("--etcd-user"),
        "{e}"
    );

    // A controller with the right password creates the mesh and writes.
    let user = Some(("quicmesh", "s3cret"));
    let a = Node::start_as(&url, KEK, Duration::from_secs(3), user).await;
    let token = a.admin_token.clone().expect("new mesh");
    let mut admin_a = a.admin(&token).await;
    admin_a
        .apply(service("shop", "web", 80))
        .await
        .expect("apply with an etcd token");

    // A token of our own for the user works, until a password change (to the same password) revokes
    // every token of the user, the controller's too.
    use quicmesh_controller::store::etcd::client::pb::etcdserverpb::{
        AuthenticateRequest, auth_client::AuthClient, kv_client::KvClient,
    };
    let first = url
        .trim_start_matches("etcd://")
        .split(',')
        .next()
        .expect("a member");
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{first}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to etcd");
    let etcd_token = AuthClient::new(ch.clone())
        .authenticate(AuthenticateRequest {
            name: "quicmesh".into(),
            password: "s3cret".into(),
        })
        .await
        .expect("authenticate")
        .into_inner()
        .token;
    let put_with_token = || {
        let mut req = tonic::Request::new(PutRequest {
            key: b"/quicmesh/probe".to_vec(),
            value: Vec::new(),
        });
        req.metadata_mut()
            .insert("token", etcd_token.parse().expect("header"));
        let mut kv = KvClient::new(ch.clone());
        async move { kv.put(req).await }
    };
    put_with_token().await.expect("a fresh token works");
    etcd.etcdctl(
        &[
            "--user",
            "root:rootpw",
            "user",
            "passwd",
            "quicmesh",
            "--interactive=false",
        ],
        "s3cret\n",
    )
    .expect("passwd");
    // Refused as revoked, or (member 0 not yet past the change) as issued before it.
    let e = put_with_token().await.expect_err("revoked token");
    assert!(
        e.message().contains("invalid auth token")
            || e.message().contains("revision of auth store is old"),
        "{e}"
    );

    // The member A watches through dies: A watches again with its revoked token, is refused, and
    // authenticates again; a write through controller B then reaches A.
    etcd.kill(0);
    let b = Node::start_as(&url, KEK, Duration::from_secs(3), user).await;
    b.admin(&token)
        .await
        .apply(service("shop", "api", 81))
        .await
        .expect("apply on B");
    let limit = Instant::now() + Duration::from_secs(10);
    while !shop_services(&mut admin_a)
        .await
        .contains(&"api".to_owned())
    {
        assert!(Instant::now() < limit, "B's write never reached A's mirror");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And A writes with its new token.
    let before = a.state.revision();
    admin_a
        .apply(service("shop", "cart", 82))
        .await
        .expect("apply on A after its token was revoked");
    assert!(a.state.revision() > before);
}

/// Endpoint liveness across controllers: a proxy that registered its endpoint through A and then again
/// through B (it failed over) loses its connection to A. A's withdrawal is a compare-and-set on the
/// record A stored, which B has replaced: the endpoint stays. When the connection to B goes too, B
/// withdraws it after the grace.
#[tokio::test]
async fn an_endpoint_registered_again_through_another_controller_is_not_withdrawn_by_the_first() {
    if skip("an_endpoint_registered_again_through_another_controller_is_not_withdrawn_by_the_first")
    {
        return;
    }
    let etcd = cluster().await;
    let a = Node::start(&etcd.url(), KEK, Duration::from_secs(5)).await;
    let token = a.admin_token.clone().expect("a creates the mesh");
    let b = Node::start(&etcd.url(), KEK, Duration::from_secs(5)).await;
    let mut admin = a.admin(&token).await;
    admin.apply(service("shop", "web", 80)).await.expect("web");
    let join = join_token(&mut admin, "web").await;
    let (csr, key) = generate_csr(&SpiffeId::new(TD, "shop", "web").expect("id")).expect("csr");
    let leaf = a
        .proxy(None)
        .await
        .certify(pb::CertifyRequest {
            csr_pem: csr,
            join_token: join,
            ..Default::default()
        })
        .await
        .expect("certify")
        .into_inner()
        .cert_chain_pem[0]
        .clone();
    let endpoint = || pb::RegisterEndpointRequest {
        endpoint: Some(pb::Endpoint {
            metadata: Some(pb::Metadata {
                name: "web-0".into(),
                ..Default::default()
            }),
            service: "web".into(),
            address: "127.0.0.1:4433".into(),
            ..Default::default()
        }),
    };
    let mut via_a = a.proxy(Some((&leaf, &key))).await;
    let first = via_a
        .register_endpoint(endpoint())
        .await
        .expect("register through a")
        .into_inner()
        .version;
    let mut via_b = b.proxy(Some((&leaf, &key))).await;
    let second = via_b
        .register_endpoint(endpoint())
        .await
        .expect("register through b")
        .into_inner()
        .version;
    assert!(second > first);
    let get = || pb::ResourceRef {
        kind: pb::Kind::Endpoint as i32,
        namespace: "shop".into(),
        name: "web-0".into(),
    };

    // The connection to A goes: A expires its record after the grace, finds another, keeps it.
    drop(via_a);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a.state.registry().held_endpoints().is_empty() {
        assert!(Instant::now() < deadline, "a never expired its record");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let kept = admin.get(get()).await.expect("still there").into_inner();
    match kept.resource {
        Some(pb::resource::Resource::Endpoint(e)) => {
            assert_eq!(e.metadata.expect("metadata").version, second)
        }
        r => panic!("{r:?}"),
    }

    // The connection to B goes: B withdraws it.
    drop(via_b);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match admin.get(get()).await {
            Err(e) if e.code() == Code::NotFound => break,
            Err(e) => panic!("{e}"),
            Ok(_) => {
                assert!(Instant::now() < deadline, "b never withdrew it");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert!(b.state.registry().held_endpoints().is_empty());
}
