//! In-process tests of the controller's gRPC APIs: a real TLS gRPC server on 127.0.0.1:0 over a real sled
//! directory in a tempdir, driven by the same client code `quicmesh ctl` uses.

use std::time::Duration;

use std::sync::Arc;

use quicmesh_controller::{
    Controller,
    client::{self, Admin},
    state::{State, StateOptions},
    store::etcd::EtcdOptions,
};
use quicmesh_proto::controller as pb;
use quicmesh_transport::identity::{SpiffeId, ca::generate_csr, inspect::CertInfo};
use tonic::Code;

const TD: &str = "test.mesh";

#[path = "support/etcd.rs"]
mod etcd_cluster;
#[path = "support/resources.rs"]
mod resources;
use resources::service;

/// The store a test runs on: every test here runs on both.
#[derive(Clone, Copy)]
enum Backend {
    Sled,
    Etcd,
}

struct Harness {
    state: Arc<State>,
    addr: String,
    token: String,
    bundle: Vec<String>,
    admin: Admin,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
    _etcd: Option<etcd_cluster::EtcdCluster>,
}

impl Harness {
    async fn start(store: Backend, leaf_ttl: Duration) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let (etcd, cluster) = match store {
            Backend::Sled => (None, None),
            Backend::Etcd => {
                let cluster = tokio::task::spawn_blocking(|| etcd_cluster::EtcdCluster::start(3))
                    .await
                    .expect("etcd start");
                let mut o = EtcdOptions::from_url(&cluster.url()).expect("url");
                o.max_txn_ops = etcd_cluster::MAX_TXN_OPS;
                (Some(o), Some(cluster))
            }
        };
        let opts = StateOptions {
            trust_domain: Some(TD.into()),
            leaf_ttl: Some(leaf_ttl),
            etcd,
            ..StateOptions::new(dir.path())
        };
        let c = Controller::bind(opts, "127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = c.addr().to_string();
        let token = c
            .admin_token()
            .expect("first start prints a token")
            .to_owned();
        let bundle = c.state().bundle();
        let state = c.state().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            c.serve(async {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
        });
        let channel = client::connect(&addr, &bundle, None, Some(Duration::from_secs(10)))
            .await
            .expect("connect");
        let admin = client::admin(channel, &token).expect("admin");
        Harness {
            state,
            addr,
            token,
            bundle,
            admin,
            stop: Some(stop),
            server: Some(server),
            _dir: dir,
            _etcd: cluster,
        }
    }

    async fn proxy_anon(&self) -> pb::proxy_api_client::ProxyApiClient<tonic::transport::Channel> {
        let ch = client::connect(
            &self.addr,
            &self.bundle,
            None,
            Some(Duration::from_secs(10)),
        )
        .await
        .expect("connect");
        client::proxy(ch)
    }

    async fn proxy_mtls(
        &self,
        cert: &str,
        key: &str,
    ) -> pb::proxy_api_client::ProxyApiClient<tonic::transport::Channel> {
        let ch = client::connect(&self.addr, &self.bundle, Some((cert, key)), None)
            .await
            .expect("connect mtls");
        client::proxy(ch)
    }

    async fn token(&mut self, ns: &str, sa: &str, ttl: u64, reusable: bool) -> String {
        self.admin
            .create_join_token(pb::CreateJoinTokenRequest {
                namespace: ns.into(),
                service_account: sa.into(),
                ttl_seconds: ttl,
                reusable,
            })
            .await
            .expect("create token")
            .into_inner()
            .token
    }

    /// The store revision, a witness that nothing was written.
    async fn revision(&mut self) -> u64 {
        self.admin
            .list(pb::ListRequest {
                kind: pb::Kind::Service as i32,
                namespace: String::new(),
            })
            .await
            .expect("list")
            .into_inner()
            .store_version
    }

    async fn issued(&mut self) -> usize {
        self.admin
            .list_issued_certificates(pb::ListIssuedCertificatesRequest { limit: 1000 })
            .await
            .expect("issued")
            .into_inner()
            .certificates
            .len()
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
        }
    }
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).expect("id")
}

fn split_policy(ns: &str, v1: u32, v2: u32) -> pb::Resource {
    pb::Resource {
        resource: Some(pb::resource::Resource::Policy(pb::Policy {
            metadata: Some(pb::Metadata {
                name: "cart-split".into(),
                namespace: ns.into(),
                ..Default::default()
            }),
            target_service: "cart".into(),
            kind: Some(pb::policy::Kind::TrafficSplit(pb::TrafficSplit {
                backends: vec![
                    pb::SplitBackend {
                        service_version: "v1".into(),
                        weight: v1,
                    },
                    pb::SplitBackend {
                        service_version: "v2".into(),
                        weight: v2,
                    },
                ],
            })),
        })),
    }
}

async fn next(stream: &mut tonic::Streaming<pb::Snapshot>) -> pb::Snapshot {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("snapshot in time")
        .expect("stream ok")
        .expect("stream open")
}

async fn bootstrap_watch_register_and_renew(store: Backend) {
    let mut h = Harness::start(store, Duration::from_secs(600)).await;
    h.admin
        .apply(service("shop", "cart", 8080))
        .await
        .expect("service");
    let token = h.token("shop", "cart", 0, false).await;

    // Bootstrap: join token + CSR over TLS without a client certificate.
    let (csr, key) = generate_csr(&id("shop", "cart")).expect("csr");
    let resp = h
        .proxy_anon()
        .await
        .certify(pb::CertifyRequest {
            csr_pem: csr.clone(),
            join_token: token,
            ..Default::default()
        })
        .await
        .expect("certify")
        .into_inner();
    assert_eq!(resp.spiffe_id, id("shop", "cart").as_str());
    assert_eq!(resp.trust_bundle_pem, h.bundle);
    let info = CertInfo::from_pem(&resp.cert_chain_pem[0]).expect("leaf");
    assert_eq!(info.spiffe_id, id("shop", "cart"));
    assert_eq!(info.not_after.unix_timestamp(), resp.not_after_unix);
    let life = resp.not_after_unix - time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((590..=601).contains(&life), "leaf lifetime {life}");

    // After bootstrap the proxy speaks mTLS with the certificate it got.
    let mut proxy = h.proxy_mtls(&resp.cert_chain_pem[0], &key).await;
    let mut stream = proxy
        .watch(pb::WatchRequest {
            proxy_name: "cart-0".into(),
            spiffe_ids: vec![],
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let first = next(&mut stream).await;
    assert_eq!(first.trust_domain, TD);
    assert_eq!(first.services.len(), 1);
    assert_eq!(first.trust_bundle_pem, h.bundle);

    // A policy change reaches the watcher as a newer snapshot.
    h.admin
        .apply(split_policy("shop", 90, 10))
        .await
        .expect("policy");
    let second = next(&mut stream).await;
    assert!(second.version > first.version);
    assert_eq!(second.policies.len(), 1);

    // Endpoint registration takes identity and namespace from the certificate.
    let reg = proxy
        .register_endpoint(pb::RegisterEndpointRequest {
            endpoint: Some(pb::Endpoint {
                metadata: Some(pb::Metadata {
                    name: "cart-0".into(),
                    ..Default::default()
                }),
                service: "cart".into(),
                address: "127.0.0.1:4433".into(),
                spiffe_id: String::new(),
                service_version: "v1".into(),
                weight: 0,
            }),
        })
        .await
        .expect("register")
        .into_inner();
    let third = next(&mut stream).await;
    assert_eq!(third.version, reg.version);
    assert_eq!(third.endpoints[0].spiffe_id, id("shop", "cart").as_str());
    assert_eq!(
        third.endpoints[0]
            .metadata
            .as_ref()
            .expect("meta")
            .namespace,
        "shop"
    );

    // A service that does not exist (here in another namespace) is refused.
    let err = proxy
        .register_endpoint(pb::RegisterEndpointRequest {
            endpoint: Some(pb::Endpoint {
                metadata: Some(pb::Metadata {
                    name: "evil".into(),
                    namespace: "bank".into(),
                    ..Default::default()
                }),
                service: "vault".into(),
                address: "127.0.0.1:4433".into(),
                ..Default::default()
            }),
        })
        .await
        .expect_err("other namespace");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().contains("bank/vault"), "{}", err.message());

    // The proxy is listed with the config version it was sent and its certificate expiry.
    let proxies = h
        .admin
        .list_proxies(pb::ListProxiesRequest {})
        .await
        .expect("proxies")
        .into_inner()
        .proxies;
    assert_eq!(proxies.len(), 1);
    assert_eq!(proxies[0].proxy_name, "cart-0");
    assert_eq!(proxies[0].config_version, third.version);
    assert_eq!(proxies[0].cert_not_after_unix, resp.not_after_unix);

    // Renewal over mTLS, no token: a new key, same identity.
    let (csr2, _key2) = generate_csr(&id("shop", "cart")).expect("csr");
    let renewed = proxy
        .certify(pb::CertifyRequest {
            csr_pem: csr2,
            join_token: String::new(),
            ..Default::default()
        })
        .await
        .expect("renew")
        .into_inner();
    assert_eq!(renewed.spiffe_id, id("shop", "cart").as_str());
    assert_ne!(renewed.serial_hex, resp.serial_hex);
    let audit = h
        .admin
        .list_issued_certificates(pb::ListIssuedCertificatesRequest { limit: 10 })
        .await
        .expect("audit")
        .into_inner()
        .certificates;
    assert_eq!(audit.len(), 2);
    assert_eq!(audit[0].credential, "mtls");
    assert!(audit[1].credential.starts_with("join-token:"));

    // Watch needs a mesh certificate.
    let err = h
        .proxy_anon()
        .await
        .watch(pb::WatchRequest::default())
        .await
        .expect_err("anonymous watch");
    assert_eq!(err.code(), Code::Unauthenticated);
    drop(stream);
    h.stop().await;
}

async fn bad_join_tokens_and_csrs_are_refused_and_nothing_is_stored(store: Backend) {
    let mut h = Harness::start(store, Duration::from_secs(3600)).await;
    let good = h.token("shop", "cart", 0, false).await;
    let short = h.token("shop", "cart", 1, true).await;
    let revoked = h.token("shop", "cart", 0, true).await;
    let revoked_id = revoked
        .strip_prefix("qmt_")
        .and_then(|r| r.split_once('.'))
        .map(|(id, _)| id.to_owned())
        .expect("id");
    h.admin
        .revoke_join_token(pb::RevokeJoinTokenRequest { id: revoked_id })
        .await
        .expect("revoke");
    let (csr, _) = generate_csr(&id("shop", "cart")).expect("csr");
    let (other_csr, _) = generate_csr(&id("shop", "admin")).expect("csr");
    let mut anon = h.proxy_anon().await;

    let rev0 = h.revision().await;
    let wrong_secret = format!("{}.AAAA", good.rsplit_once('.').expect("dot").0);
    // Expiry: the 1-second token is past its TTL once two seconds have gone by.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for (token, csr_pem, code, needle) in [
        (
            "",
            csr.as_str(),
            Code::Unauthenticated,
            "join_token or a mesh client certificate",
        ),
        (
            "not-a-token",
            csr.as_str(),
            Code::Unauthenticated,
            "join_token",
        ),
        (
            "qmt_0123456789ab.secret",
            csr.as_str(),
            Code::Unauthenticated,
            "not valid",
        ),
        (
            wrong_secret.as_str(),
            csr.as_str(),
            Code::Unauthenticated,
            "not valid",
        ),
        (
            short.as_str(),
            csr.as_str(),
            Code::Unauthenticated,
            "expired",
        ),
        (
            revoked.as_str(),
            csr.as_str(),
            Code::Unauthenticated,
            "revoked",
        ),
        (
            good.as_str(),
            other_csr.as_str(),
            Code::PermissionDenied,
            "grants spiffe://test.mesh/ns/shop/sa/cart",
        ),
        (
            good.as_str(),
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            Code::InvalidArgument,
            "csr_pem",
        ),
        (good.as_str(), "", Code::InvalidArgument, "csr_pem"),
    ] {
        let err = anon
            .certify(pb::CertifyRequest {
                csr_pem: csr_pem.into(),
                join_token: token.into(),
                ..Default::default()
            })
            .await
            .expect_err(token);
        assert_eq!(err.code(), code, "{token}: {}", err.message());
        assert!(err.message().contains(needle), "{token}: {}", err.message());
    }
    assert_eq!(
        h.revision().await,
        rev0,
        "a refused Certify stored something"
    );
    assert_eq!(h.issued().await, 0);

    // The good token was not consumed by the refused attempts; it works once, then is spent.
    anon.certify(pb::CertifyRequest {
        csr_pem: csr.clone(),
        join_token: good.clone(),
        ..Default::default()
    })
    .await
    .expect("first use");
    let rev1 = h.revision().await;
    let err = anon
        .certify(pb::CertifyRequest {
            csr_pem: csr,
            join_token: good,
            ..Default::default()
        })
        .await
        .expect_err("reuse");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("already used"), "{}", err.message());
    assert_eq!(h.revision().await, rev1);
    assert_eq!(h.issued().await, 1);
    h.stop().await;
}

async fn admin_api_needs_the_token_and_validates_every_field(store: Backend) {
    let mut h = Harness::start(store, Duration::from_secs(3600)).await;
    let rev0 = h.revision().await;

    // No credentials, or wrong ones: refused before anything runs.
    let ch = client::connect(&h.addr, &h.bundle, None, Some(Duration::from_secs(10)))
        .await
        .expect("connect");
    let mut bare = pb::admin_client::AdminClient::new(ch.clone());
    let err = bare
        .apply(service("shop", "cart", 80))
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("missing admin credentials"),
        "{}",
        err.message()
    );
    let mut wrong = client::admin(ch, "qma_wrong").expect("client");
    let err = wrong
        .apply(service("shop", "cart", 80))
        .await
        .expect_err("bad token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = wrong
        .create_join_token(pb::CreateJoinTokenRequest {
            namespace: "shop".into(),
            service_account: "cart".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad token");
    assert_eq!(err.code(), Code::Unauthenticated);

    // Malformed resources: INVALID_ARGUMENT naming the field.
    let mut no_port = service("shop", "cart", 80);
    if let Some(pb::resource::Resource::Service(s)) = &mut no_port.resource {
        s.ports[0].protocol = 0;
    }
    let cases = [
        (service("shop", "cart", 0), "spec.ports[0].port"),
        (service("Shop", "cart", 80), "metadata.namespace"),
        (service("shop", "", 80), "metadata.name"),
        (no_port, "spec.ports[0].protocol"),
        (split_policy("shop", 0, 0), "spec.traffic_split.backends"),
        (pb::Resource { resource: None }, "resource"),
    ];
    for (r, field) in cases {
        let err = h.admin.apply(r).await.expect_err(field);
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{field}: {}",
            err.message()
        );
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    let err = h
        .admin
        .create_join_token(pb::CreateJoinTokenRequest {
            namespace: "quicmesh-system".into(),
            service_account: "controller".into(),
            ..Default::default()
        })
        .await
        .expect_err("reserved");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("namespace"), "{}", err.message());
    assert_eq!(h.revision().await, rev0, "a refused call stored something");

    // CRUD with optimistic concurrency.
    let created = h
        .admin
        .create(service("shop", "cart", 80))
        .await
        .expect("create")
        .into_inner();
    let err = h
        .admin
        .create(service("shop", "cart", 80))
        .await
        .expect_err("exists");
    assert_eq!(err.code(), Code::AlreadyExists);
    let mut stale = service("shop", "cart", 81);
    if let Some(pb::resource::Resource::Service(s)) = &mut stale.resource {
        s.metadata.as_mut().expect("meta").version = 1;
    }
    let err = h.admin.update(stale).await.expect_err("stale");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let version = match created.resource {
        Some(pb::resource::Resource::Service(s)) => s.metadata.expect("meta").version,
        _ => panic!("not a service"),
    };
    let mut fresh = service("shop", "cart", 81);
    if let Some(pb::resource::Resource::Service(s)) = &mut fresh.resource {
        s.metadata.as_mut().expect("meta").version = version;
    }
    h.admin.update(fresh).await.expect("update at version");
    let got = h
        .admin
        .get(pb::ResourceRef {
            kind: pb::Kind::Service as i32,
            namespace: "shop".into(),
            name: "cart".into(),
        })
        .await
        .expect("get")
        .into_inner();
    match got.resource {
        Some(pb::resource::Resource::Service(s)) => assert_eq!(s.ports[0].port, 81),
        _ => panic!("not a service"),
    }
    h.admin
        .delete(pb::ResourceRef {
            kind: pb::Kind::Service as i32,
            namespace: "shop".into(),
            name: "cart".into(),
        })
        .await
        .expect("delete");
    let err = h
        .admin
        .get(pb::ResourceRef {
            kind: pb::Kind::Service as i32,
            namespace: "shop".into(),
            name: "cart".into(),
        })
        .await
        .expect_err("gone");
    assert_eq!(err.code(), Code::NotFound);
    let _ = &h.token;
    h.stop().await;
}

async fn revoked_identity_gets_no_certificate_and_loses_its_watch(store: Backend) {
    let mut h = Harness::start(store, Duration::from_secs(3600)).await;
    let token = h.token("shop", "cart", 0, false).await;
    let (csr, key) = generate_csr(&id("shop", "cart")).expect("csr");
    let resp = h
        .proxy_anon()
        .await
        .certify(pb::CertifyRequest {
            csr_pem: csr.clone(),
            join_token: token,
            ..Default::default()
        })
        .await
        .expect("certify")
        .into_inner();
    let mut proxy = h.proxy_mtls(&resp.cert_chain_pem[0], &key).await;
    let mut stream = proxy
        .watch(pb::WatchRequest::default())
        .await
        .expect("watch")
        .into_inner();
    next(&mut stream).await;
    h.admin
        .revoke_identity(pb::RevokeIdentityRequest {
            namespace: "shop".into(),
            service_account: "cart".into(),
        })
        .await
        .expect("revoke");
    let end = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("in time")
        .expect_err("stream ends with an error");
    assert_eq!(end.code(), Code::PermissionDenied);
    let err = proxy
        .certify(pb::CertifyRequest {
            csr_pem: csr,
            join_token: String::new(),
            ..Default::default()
        })
        .await
        .expect_err("revoked renewal");
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = h
        .admin
        .create_join_token(pb::CreateJoinTokenRequest {
            namespace: "shop".into(),
            service_account: "cart".into(),
            ..Default::default()
        })
        .await
        .expect_err("token for revoked identity");
    assert_eq!(err.code(), Code::FailedPrecondition);
    h.stop().await;
}

/// A service `name` in `ns` served by `identities` (empty: the account named like the service).
fn service_for(ns: &str, name: &str, identities: &[&str]) -> pb::Resource {
    let mut r = service(ns, name, 80);
    if let Some(pb::resource::Resource::Service(s)) = &mut r.resource {
        s.identities = identities.iter().map(|s| s.to_string()).collect();
    }
    r
}

fn endpoint_for(name: &str, service: &str, spiffe_id: &str) -> pb::Endpoint {
    pb::Endpoint {
        metadata: Some(pb::Metadata {
            name: name.into(),
            namespace: "shop".into(),
            ..Default::default()
        }),
        service: service.into(),
        address: "127.0.0.1:4433".into(),
        spiffe_id: spiffe_id.into(),
        service_version: String::new(),
        weight: 0,
    }
}

impl Harness {
    /// A certificate for `ns/sa` and an mTLS proxy client presenting it.
    async fn joined(
        &mut self,
        ns: &str,
        sa: &str,
    ) -> (
        pb::proxy_api_client::ProxyApiClient<tonic::transport::Channel>,
        String,
        String,
    ) {
        let token = self.token(ns, sa, 0, false).await;
        let (csr, key) = generate_csr(&id(ns, sa)).expect("csr");
        let resp = self
            .proxy_anon()
            .await
            .certify(pb::CertifyRequest {
                csr_pem: csr,
                join_token: token,
                ..Default::default()
            })
            .await
            .expect("certify")
            .into_inner();
        let cert = resp.cert_chain_pem[0].clone();
        (self.proxy_mtls(&cert, &key).await, cert, key)
    }
}

async fn secure_naming_only_allowed_identities_register_endpoints(store: Backend) {
    let mut h = Harness::start(store, Duration::from_secs(3600)).await;
    h.admin
        .apply(service_for("shop", "web", &["web"]))
        .await
        .expect("web");
    h.admin
        .apply(service_for("shop", "api", &[]))
        .await
        .expect("api");
    let (mut evil, _, _) = h.joined("shop", "evil").await;
    let (mut web, _, _) = h.joined("shop", "web").await;
    let rev0 = h.revision().await;

    // An impostor in the same namespace: not for `web` (identities: [web]), not for `api` (empty: the
    // account named `api`), not for a service that does not exist.
    for (service, code, needles) in [
        (
            "web",
            Code::PermissionDenied,
            &["shop/web", "spiffe://test.mesh/ns/shop/sa/web"][..],
        ),
        (
            "api",
            Code::PermissionDenied,
            &["shop/api", "spiffe://test.mesh/ns/shop/sa/api"][..],
        ),
        (
            "ghost",
            Code::FailedPrecondition,
            &["shop/ghost", "does not exist"][..],
        ),
    ] {
        let err = evil
            .register_endpoint(pb::RegisterEndpointRequest {
                endpoint: Some(endpoint_for("evil-0", service, "")),
            })
            .await
            .expect_err(service);
        assert_eq!(err.code(), code, "{service}: {}", err.message());
        for n in needles {
            assert!(err.message().contains(n), "{service}: {}", err.message());
        }
    }
    assert_eq!(
        h.revision().await,
        rev0,
        "a refused registration stored something"
    );

    // The legitimate server registers; the snapshot serves it.
    let mut watch = web
        .watch(pb::WatchRequest::default())
        .await
        .expect("watch")
        .into_inner();
    next(&mut watch).await;
    web.register_endpoint(pb::RegisterEndpointRequest {
        endpoint: Some(endpoint_for("web-0", "web", "")),
    })
    .await
    .expect("legitimate registration");
    let snap = next(&mut watch).await;
    assert_eq!(snap.endpoints.len(), 1);
    assert_eq!(snap.endpoints[0].spiffe_id, id("shop", "web").as_str());
    assert_eq!(
        snap.services
            .iter()
            .find(|s| s.metadata.as_ref().is_some_and(|m| m.name == "web"))
            .expect("web")
            .identities,
        vec!["web"]
    );

    // The impostor cannot withdraw it either; an unknown endpoint is not an error.
    let rev = h.revision().await;
    let err = evil
        .deregister_endpoint(pb::DeregisterEndpointRequest {
            namespace: "shop".into(),
            name: "web-0".into(),
        })
        .await
        .expect_err("impostor withdrawal");
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(err.message().contains("shop/web-0"), "{}", err.message());
    let none = evil
        .deregister_endpoint(pb::DeregisterEndpointRequest {
            namespace: String::new(),
            name: "nothing-here".into(),
        })
        .await
        .expect("unknown endpoint")
        .into_inner();
    assert_eq!(none.version, 0);
    assert_eq!(
        h.revision().await,
        rev,
        "a refused withdrawal changed something"
    );

    // Admin-created endpoints follow the same rule: identity required and allowed, service existing.
    let as_resource = |e: pb::Endpoint| pb::Resource {
        resource: Some(pb::resource::Resource::Endpoint(e)),
    };
    for (e, code, needle) in [
        (
            endpoint_for("a", "web", ""),
            Code::InvalidArgument,
            "spec.spiffe_id",
        ),
        (
            endpoint_for("a", "web", "spiffe://test.mesh/ns/shop/sa/evil"),
            Code::PermissionDenied,
            "may not serve",
        ),
        (
            endpoint_for("a", "ghost", "spiffe://test.mesh/ns/shop/sa/ghost"),
            Code::FailedPrecondition,
            "does not exist",
        ),
    ] {
        let err = h.admin.apply(as_resource(e)).await.expect_err(needle);
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(err.message().contains(needle), "{}", err.message());
    }

    // Narrowing the Service's identities withdraws the endpoint from snapshots; the record stays.
    h.admin
        .apply(service_for("shop", "web", &["web-v2"]))
        .await
        .expect("narrow");
    let snap = next(&mut watch).await;
    assert!(snap.endpoints.is_empty(), "{:?}", snap.endpoints);
    h.admin
        .apply(service_for("shop", "web", &["web"]))
        .await
        .expect("widen");
    assert_eq!(next(&mut watch).await.endpoints.len(), 1);
    // Deleting the service withdraws it too.
    h.admin
        .delete(pb::ResourceRef {
            kind: pb::Kind::Service as i32,
            namespace: "shop".into(),
            name: "web".into(),
        })
        .await
        .expect("delete");
    assert!(next(&mut watch).await.endpoints.is_empty());
    h.stop().await;
}

async fn apply_all_stores_a_whole_batch_or_nothing(store: Backend) {
    let mut h = Harness::start(store, Duration::from_secs(3600)).await;
    let rev0 = h.revision().await;
    let batch = |third_port: u32| pb::ApplyAllRequest {
        resources: vec![
            service("shop", "a", 80),
            service("shop", "b", 80),
            service("shop", "c", third_port),
        ],
    };
    let err = h
        .admin
        .apply_all(batch(0))
        .await
        .expect_err("third invalid");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .starts_with("resources[2] (Service shop/c): spec.ports[0].port"),
        "{}",
        err.message()
    );
    assert_eq!(h.revision().await, rev0, "documents 1-2 were stored");
    let listed = h
        .admin
        .list(pb::ListRequest {
            kind: pb::Kind::Service as i32,
            namespace: String::new(),
        })
        .await
        .expect("list")
        .into_inner();
    assert!(listed.items.is_empty());

    // Twice the same resource.
    let err = h
        .admin
        .apply_all(pb::ApplyAllRequest {
            resources: vec![service("shop", "a", 80), service("shop", "a", 81)],
        })
        .await
        .expect_err("duplicate");
    assert!(err.message().contains("resources[0]"), "{}", err.message());
    assert_eq!(h.revision().await, rev0);

    // A valid batch is one revision; an endpoint may come with its service in the same batch.
    let mut all = batch(80);
    all.resources.push(pb::Resource {
        resource: Some(pb::resource::Resource::Endpoint(endpoint_for(
            "c-0",
            "c",
            "spiffe://test.mesh/ns/shop/sa/c",
        ))),
    });
    let resp = h.admin.apply_all(all).await.expect("batch").into_inner();
    assert_eq!(resp.version, rev0 + 1);
    assert_eq!(resp.resources.len(), 4);
    assert_eq!(h.revision().await, rev0 + 1);
    h.stop().await;
}

async fn watch_streams_are_bounded_per_identity(store: Backend) {
    let mut h = Harness::start(store, Duration::from_secs(3600)).await;
    let (proxy, _, _) = h.joined("shop", "cart").await;
    let attempts = (0..300).map(|i| {
        let mut p = proxy.clone();
        async move {
            p.watch(pb::WatchRequest {
                proxy_name: format!("p{i}"),
                spiffe_ids: vec![],
                ..Default::default()
            })
            .await
        }
    });
    let results = futures_join_all(attempts).await;
    let (mut ok, mut exhausted, mut streams) = (0, 0, Vec::new());
    for r in results {
        match r {
            Ok(s) => {
                ok += 1;
                streams.push(s.into_inner());
            }
            Err(e) if e.code() == Code::ResourceExhausted => exhausted += 1,
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    assert_eq!((ok, exhausted), (8, 292));
    // Another identity is not affected; a released stream frees a slot.
    let (mut other, _, _) = h.joined("shop", "web").await;
    other
        .watch(pb::WatchRequest::default())
        .await
        .expect("other identity");
    drop(streams.pop());
    let mut p = proxy.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match p.watch(pb::WatchRequest::default()).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::ResourceExhausted => {
                assert!(tokio::time::Instant::now() < deadline, "slot never freed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    h.stop().await;
}

/// Certificates are signed in parallel and committed in groups: a single-use token sent by many callers
/// at once still buys exactly one certificate, and a reusable one as many, each with its own audit
/// record.
async fn concurrent_certify_is_grouped_and_spends_a_token_once(store: Backend) {
    const CALLERS: usize = 24;
    let mut h = Harness::start(store, Duration::from_secs(3600)).await;
    for reusable in [false, true] {
        let token = h.token("shop", "cart", 600, reusable).await;
        let proxy = h.proxy_anon().await;
        let before = h.revision().await;
        let attempts = (0..CALLERS).map(|_| {
            let mut p = proxy.clone();
            let token = token.clone();
            let (csr, _) = generate_csr(&id("shop", "cart")).expect("csr");
            async move {
                p.certify(pb::CertifyRequest {
                    csr_pem: csr,
                    join_token: token,
                    ..Default::default()
                })
                .await
            }
        });
        let mut serials = std::collections::BTreeSet::new();
        let mut refused = 0;
        for r in futures_join_all(attempts).await {
            match r {
                Ok(c) => assert!(serials.insert(c.into_inner().serial_hex), "serial twice"),
                Err(e) if e.code() == Code::Unauthenticated => {
                    assert!(e.message().contains("already used"), "{}", e.message());
                    refused += 1;
                }
                Err(e) => panic!("unexpected: {e}"),
            }
        }
        let expected = if reusable { CALLERS } else { 1 };
        assert_eq!(
            (serials.len(), refused),
            (expected, CALLERS - expected),
            "reusable {reusable}"
        );
        if reusable {
            // One store revision per group: calls arriving together share groups (the committer
            // waits for a fuller group while calls come in), far fewer than one per certificate.
            let groups = h.revision().await - before;
            assert!(
                (1..=CALLERS as u64 / 2).contains(&groups),
                "{CALLERS} certificates in {groups} groups"
            );
        }
        let audit = h
            .admin
            .list_issued_certificates(pb::ListIssuedCertificatesRequest { limit: 1000 })
            .await
            .expect("audit")
            .into_inner()
            .certificates;
        for s in &serials {
            assert_eq!(
                audit.iter().filter(|a| &a.serial_hex == s).count(),
                1,
                "one audit record per certificate"
            );
        }
    }
    let audit = h
        .admin
        .list_issued_certificates(pb::ListIssuedCertificatesRequest { limit: 1000 })
        .await
        .expect("audit")
        .into_inner()
        .certificates;
    assert_eq!(
        audit.len(),
        CALLERS + 1,
        "nothing recorded for refused attempts"
    );
    h.stop().await;
}

/// A Watch that asks for deltas gets the whole snapshot first, then only what changed (and what was
/// removed), each on the version it was last sent; applied in turn they equal the whole snapshots a
/// plain Watch receives.
async fn watch_with_deltas_sends_what_changed(store: Backend) {
    use quicmesh_transport::control::delta;
    let mut h = Harness::start(store, Duration::from_secs(3600)).await;
    for name in ["a", "b", "c"] {
        h.admin
            .apply(service("shop", name, 80))
            .await
            .expect("service");
    }
    let (mut proxy, _, _) = h.joined("shop", "cart").await;
    let mut deltas = proxy
        .watch(pb::WatchRequest {
            proxy_name: "deltas".into(),
            deltas: true,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let mut whole = proxy
        .watch(pb::WatchRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let first = next(&mut deltas).await;
    assert_eq!(first.base_version, 0, "the first is whole");
    assert_eq!(first.services.len(), 3);
    assert_eq!(next(&mut whole).await, first);
    let mut held = first;

    h.admin
        .apply(service("shop", "b", 81))
        .await
        .expect("change b");
    let d = next(&mut deltas).await;
    assert_eq!(d.base_version, held.version);
    assert_eq!(d.services.len(), 1, "only the changed service: {d:?}");
    assert_eq!(
        d.services[0].metadata.as_ref().map(|m| m.name.as_str()),
        Some("b")
    );
    assert!(
        d.trust_bundle_pem.is_empty(),
        "an unchanged bundle is left out"
    );
    held = delta::apply(Some(&held), &d).expect("applies");
    assert_eq!(held, next(&mut whole).await);

    h.admin
        .delete(pb::ResourceRef {
            kind: pb::Kind::Service as i32,
            namespace: "shop".into(),
            name: "c".into(),
        })
        .await
        .expect("delete c");
    let d = next(&mut deltas).await;
    assert_eq!(d.base_version, held.version);
    assert!(d.services.is_empty(), "{d:?}");
    assert_eq!(d.removed_services, vec!["shop/c".to_owned()]);
    held = delta::apply(Some(&held), &d).expect("applies");
    assert_eq!(held, next(&mut whole).await);
    h.stop().await;
}

fn service_names(snap: &pb::Snapshot) -> Vec<String> {
    snap.services
        .iter()
        .filter_map(|s| s.metadata.as_ref().map(|m| m.name.clone()))
        .collect()
}

/// A Watch that declares an interest gets the services its identity serves and those it calls, not
/// the rest of the mesh; a change to the rest sends it nothing, and a Watch declaring that service too
/// gets it. A bad declaration is refused naming the field.
async fn watch_with_interest_sends_only_what_the_proxy_needs(store: Backend) {
    use quicmesh_transport::control::delta;
    let mut h = Harness::start(store, Duration::from_secs(3600)).await;
    for name in ["cart", "x", "y"] {
        h.admin
            .apply(service("shop", name, 80))
            .await
            .expect("service");
    }
    // The proxy of shop/cart serves cart (the default identity rule) and calls y.
    let (mut proxy, _, _) = h.joined("shop", "cart").await;
    let watch = |calls: &[&str]| pb::WatchRequest {
        proxy_name: "interest".into(),
        deltas: true,
        interest: Some(pb::Interest {
            calls: calls.iter().map(|c| (*c).to_owned()).collect(),
        }),
        ..Default::default()
    };
    let mut a = proxy
        .watch(watch(&["y"]))
        .await
        .expect("watch")
        .into_inner();
    let first = next(&mut a).await;
    assert_eq!(service_names(&first), ["cart", "y"], "{first:?}");
    assert!(!first.trust_bundle_pem.is_empty());

    // x is neither served nor called: its change sends nothing, y's change is the next message,
    // a delta on the version the proxy holds.
    h.admin
        .apply(service("shop", "x", 81))
        .await
        .expect("change x");
    h.admin
        .apply(service("shop", "y", 81))
        .await
        .expect("change y");
    let d = next(&mut a).await;
    assert_eq!(d.base_version, first.version, "{d:?}");
    assert_eq!(service_names(&d), ["y"], "{d:?}");
    let held = delta::apply(Some(&first), &d).expect("applies");
    assert_eq!(service_names(&held), ["cart", "y"]);

    // Declaring x (by its full name) brings it.
    let mut b = proxy
        .watch(watch(&["y", "x.shop"]))
        .await
        .expect("watch")
        .into_inner();
    let got = next(&mut b).await;
    assert_eq!(service_names(&got), ["cart", "x", "y"], "{got:?}");
    assert_eq!(got.version, d.version);

    let e = proxy
        .watch(watch(&["y", "Not A Name"]))
        .await
        .expect_err("bad call");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("interest.calls[1]"), "{}", e.message());
    h.stop().await;
}

/// Runs every future concurrently (each on its own task) and collects the outputs in order.
async fn futures_join_all<F>(fs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

async fn revocation_closes_watch_streams_and_tls_connections(store: Backend) {
    let mut h = Harness::start(store, Duration::from_secs(3600)).await;
    let (mut watcher, cert, key) = h.joined("shop", "cart").await;
    let mut stream = watcher
        .watch(pb::WatchRequest::default())
        .await
        .expect("watch")
        .into_inner();
    next(&mut stream).await;
    // A second connection of the same identity, idle after one call.
    let mut idle = h.proxy_mtls(&cert, &key).await;
    idle.register_endpoint(pb::RegisterEndpointRequest {
        endpoint: Some(endpoint_for("x", "nope", "")),
    })
    .await
    .expect_err("no such service, but the connection is up");
    let cart = id("shop", "cart");
    assert_eq!(
        h.state.registry().open_of(&cart),
        3,
        "two connections and a stream"
    );

    h.admin
        .revoke_identity(pb::RevokeIdentityRequest {
            namespace: "shop".into(),
            service_account: "cart".into(),
        })
        .await
        .expect("revoke");
    let end = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("in time")
        .expect_err("stream ends");
    assert_eq!(end.code(), Code::PermissionDenied, "{}", end.message());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while h.state.registry().open_of(&cart) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections still open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Calls on the old connections and on new ones fail.
    let err = idle
        .register_endpoint(pb::RegisterEndpointRequest {
            endpoint: Some(endpoint_for("x", "nope", "")),
        })
        .await
        .expect_err("after revocation");
    assert_ne!(err.code(), Code::FailedPrecondition, "{err}");
    let mut fresh = h.proxy_mtls(&cert, &key).await;
    assert!(fresh.watch(pb::WatchRequest::default()).await.is_err());
    h.stop().await;
}

async fn dead_tokens_and_old_audit_records_are_pruned_after_the_retention(store: Backend) {
    let mut h = Harness::start(store, Duration::from_secs(3600)).await;
    let (_p, _, _) = h.joined("shop", "cart").await; // one spent single-use token, one audit record
    let _live = h.token("shop", "web", 30 * 24 * 3600, true).await;
    let revoked = h.token("shop", "db", 0, true).await;
    let revoked_id = revoked[4..16].to_owned();
    h.admin
        .revoke_join_token(pb::RevokeJoinTokenRequest { id: revoked_id })
        .await
        .expect("revoke token");
    let tokens = |h: &mut Harness| {
        let mut a = h.admin.clone();
        async move {
            a.list_join_tokens(pb::ListJoinTokensRequest {})
                .await
                .expect("tokens")
                .into_inner()
                .tokens
                .len()
        }
    };
    assert_eq!(tokens(&mut h).await, 3);
    let now = time::OffsetDateTime::now_utc();
    let pruned = h.state.prune(now).await.expect("prune now");
    assert_eq!((pruned.tokens, pruned.audit), (0, 0));
    // A day later (the default token retention), the spent and the revoked token go; the live one stays.
    let pruned = h
        .state
        .prune(now + time::Duration::hours(24) + time::Duration::minutes(1))
        .await
        .expect("prune");
    assert_eq!((pruned.tokens, pruned.audit), (2, 0));
    assert_eq!(tokens(&mut h).await, 1);
    assert_eq!(h.issued().await, 1);
    // 30 days after the certificate expired, its audit record goes.
    let pruned = h
        .state
        .prune(
            now + time::Duration::hours(1) + time::Duration::days(30) + time::Duration::minutes(1),
        )
        .await
        .expect("prune");
    assert_eq!(pruned.audit, 1);
    assert_eq!(h.issued().await, 0);
    h.stop().await;
}

async fn root_rotation_keeps_old_leaves_trusted_until_they_expire(store: Backend) {
    let mut h = Harness::start(store, Duration::from_secs(2)).await;
    let token = h.token("shop", "cart", 0, true).await;
    let (csr, key) = generate_csr(&id("shop", "cart")).expect("csr");
    let old = h
        .proxy_anon()
        .await
        .certify(pb::CertifyRequest {
            csr_pem: csr.clone(),
            join_token: token.clone(),
            ..Default::default()
        })
        .await
        .expect("certify")
        .into_inner();
    let status = h
        .admin
        .rotate_root(pb::RotateRootRequest {})
        .await
        .expect("rotate")
        .into_inner();
    assert_eq!(status.roots.len(), 2);
    assert_eq!(status.roots.iter().filter(|r| r.active).count(), 1);

    // A proxy holding a leaf of the old root still connects (the bundle has both roots) and renews from the
    // new root.
    let bundle_both: Vec<String> = {
        let mut p = h.proxy_mtls(&old.cert_chain_pem[0], &key).await;
        let renewed = p
            .certify(pb::CertifyRequest {
                csr_pem: csr.clone(),
                join_token: String::new(),
                ..Default::default()
            })
            .await
            .expect("renew across rotation")
            .into_inner();
        assert_eq!(renewed.trust_bundle_pem.len(), 2);
        renewed.trust_bundle_pem
    };
    let active = status
        .roots
        .iter()
        .find(|r| r.active)
        .expect("active")
        .fingerprint
        .clone();
    let audit = h
        .admin
        .list_issued_certificates(pb::ListIssuedCertificatesRequest { limit: 2 })
        .await
        .expect("audit")
        .into_inner()
        .certificates;
    assert_eq!(
        audit[0].root_fingerprint, active,
        "renewal signed by the new root"
    );
    assert_ne!(
        audit[1].root_fingerprint, active,
        "bootstrap signed by the old root"
    );
    assert_ne!(bundle_both[0], old.trust_bundle_pem[0]);
    assert_eq!(bundle_both[1], old.trust_bundle_pem[0]);

    // Once every leaf of the old root has expired (2 s lifetime) it leaves the bundle.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let status = h
            .admin
            .ca_status(pb::CaStatusRequest {})
            .await
            .expect("status")
            .into_inner();
        if status.roots.len() == 1 {
            assert!(status.roots[0].active);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "old root never retired: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    h.stop().await;
}

async fn health_service_answers_without_credentials(store: Backend) {
    let h = Harness::start(store, Duration::from_secs(3600)).await;
    let ch = client::connect(&h.addr, &h.bundle, None, Some(Duration::from_secs(10)))
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    for service in [
        "",
        "quicmesh.controller.v1.Admin",
        "quicmesh.controller.v1.ProxyApi",
    ] {
        let resp = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health")
            .into_inner();
        assert_eq!(
            resp.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service}"
        );
    }
    h.stop().await;
}

async fn reflection_lists_the_controller_services(store: Backend) {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let h = Harness::start(store, Duration::from_secs(3600)).await;
    let ch = client::connect(&h.addr, &h.bundle, None, Some(Duration::from_secs(10)))
        .await
        .expect("connect");
    let mut refl = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection")
        .into_inner();
    let resp = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "quicmesh.controller.v1.Admin",
        "quicmesh.controller.v1.ProxyApi",
    ] {
        assert!(names.iter().any(|n| n == want), "{names:?}");
    }
    h.stop().await;
}

/// openssl, or why not.
fn openssl() -> Result<(), String> {
    std::process::Command::new("openssl")
        .arg("version")
        .output()
        .map_err(|e| format!("openssl: {e}"))
        .and_then(|o| {
            if o.status.success() {
                Ok(())
            } else {
                Err("openssl version failed".into())
            }
        })
}

/// A CSR for `id` made by the openssl CLI with `newkey` (e.g. `rsa:2048`, `ed25519`) and `opts`:
/// `(csr_pem, key_pem)`.
fn openssl_csr(
    dir: &std::path::Path,
    tag: &str,
    newkey: &str,
    opts: &[&str],
    id: &str,
) -> (String, String) {
    let key = dir.join(format!("{tag}.key"));
    let csr = dir.join(format!("{tag}.csr"));
    let out = std::process::Command::new("openssl")
        .args(["req", "-new", "-nodes", "-newkey", newkey])
        .args(opts)
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr)
        .args([
            "-subj",
            "/CN=workload",
            "-addext",
            &format!("subjectAltName=URI:{id}"),
        ])
        .output()
        .expect("openssl req");
    assert!(
        out.status.success(),
        "openssl req {newkey}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        std::fs::read_to_string(csr).expect("csr"),
        std::fs::read_to_string(key).expect("key"),
    )
}

async fn csrs_are_signed_only_for_p256_keys_and_others_are_named(store: Backend) {
    if let Err(why) = openssl() {
        eprintln!(
            "SKIPPED csrs_are_signed_only_for_p256_keys_and_others_are_named: needs the openssl CLI: {why}"
        );
        return;
    }
    let mut h = Harness::start(store, Duration::from_secs(3600)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cart = id("shop", "cart");
    let token = h.token("shop", "cart", 0, true).await;
    let mut anon = h.proxy_anon().await;
    for (tag, newkey, opts, name) in [
        (
            "p384",
            "ec",
            &["-pkeyopt", "ec_paramgen_curve:P-384"][..],
            "ECDSA P-384",
        ),
        (
            "k256",
            "ec",
            &["-pkeyopt", "ec_paramgen_curve:secp256k1"][..],
            "ECDSA secp256k1",
        ),
        ("rsa1024", "rsa:1024", &[][..], "RSA-1024"),
        ("rsa2048", "rsa:2048", &[][..], "RSA-2048"),
        ("ed25519", "ed25519", &[][..], "Ed25519"),
    ] {
        let (csr, _) = openssl_csr(dir.path(), tag, newkey, opts, cart.as_str());
        let err = anon
            .certify(pb::CertifyRequest {
                csr_pem: csr,
                join_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect_err(name);
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{name}: {}",
            err.message()
        );
        assert!(
            err.message()
                .contains(&format!("key type {name} is not supported")),
            "{name}: {}",
            err.message()
        );
    }
    assert_eq!(h.issued().await, 0, "nothing was signed");

    // A P-256 key made by openssl: signed, with exactly its key, and usable in a real mTLS handshake.
    let (csr, key) = openssl_csr(
        dir.path(),
        "p256",
        "ec",
        &["-pkeyopt", "ec_paramgen_curve:P-256"],
        cart.as_str(),
    );
    let resp = anon
        .certify(pb::CertifyRequest {
            csr_pem: csr,
            join_token: token,
            ..Default::default()
        })
        .await
        .expect("P-256 is signed")
        .into_inner();
    let info = CertInfo::from_pem(&resp.cert_chain_pem[0]).expect("leaf");
    assert_eq!(info.spiffe_id, cart);
    let mut p = h.proxy_mtls(&resp.cert_chain_pem[0], &key).await;
    let mut stream = p
        .watch(pb::WatchRequest::default())
        .await
        .expect("mTLS with the openssl key")
        .into_inner();
    assert_eq!(next(&mut stream).await.trust_domain, TD);
    h.stop().await;
}

/// Runs each named test on sled (`sled::NAME`) and on a 3-member etcd (`etcd::NAME`, skipped with a
/// printed reason without the `etcd` binary).
fn policy(ns: &str, name: &str, kind: pb::policy::Kind) -> pb::Resource {
    pb::Resource {
        resource: Some(pb::resource::Resource::Policy(pb::Policy {
            metadata: Some(pb::Metadata {
                name: name.into(),
                namespace: ns.into(),
                ..Default::default()
            }),
            target_service: "cart".into(),
            kind: Some(kind),
        })),
    }
}

/// Policy rules that span resources are checked at apply time, naming the field; nothing is stored.
async fn policies_that_conflict_or_name_unknown_versions_are_refused(store: Backend) {
    let mut h = Harness::start(store, Duration::from_secs(3600)).await;
    h.admin
        .apply(service("shop", "cart", 80))
        .await
        .expect("service with versions v1, v2");
    let authz = || {
        pb::policy::Kind::Authorization(pb::Authorization {
            mode: pb::AuthzMode::Enforce as i32,
            default_action: pb::AuthzAction::Deny as i32,
            allow: vec![],
        })
    };
    h.admin
        .apply(policy("shop", "first", authz()))
        .await
        .expect("the first authorization policy");
    h.admin
        .apply(policy("shop", "first", authz()))
        .await
        .expect("changing it");
    let rev = h.revision().await;
    let split = pb::policy::Kind::TrafficSplit(pb::TrafficSplit {
        backends: vec![
            pb::SplitBackend {
                service_version: "v1".into(),
                weight: 90,
            },
            pb::SplitBackend {
                service_version: "v3".into(),
                weight: 10,
            },
        ],
    });
    let timeouts = pb::policy::Kind::Timeouts(pb::Timeouts {
        request_timeout_ms: 1000,
        connect_timeout_ms: 0,
        retry: Some(pb::RetryPolicy {
            max_retries: 2,
            per_try_timeout_ms: 2000,
            budget_percent: 20,
            retry_on: vec![],
        }),
    });
    for (r, field, says) in [
        (
            policy("shop", "second", authz()),
            "spec.authorization",
            "first",
        ),
        (
            policy("shop", "canary", split),
            "spec.traffic_split.backends[1].service_version",
            "v3",
        ),
        (
            policy("shop", "slow", timeouts),
            "spec.timeouts.retry.per_try_timeout_ms",
            "1000",
        ),
    ] {
        let err = h.admin.apply(r).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(
            err.message().starts_with(field) && err.message().contains(says),
            "{field}: {}",
            err.message()
        );
    }
    assert_eq!(h.revision().await, rev, "a refused policy stored something");
}

/// Names of the endpoints a snapshot serves.
fn endpoint_names(snap: &pb::Snapshot) -> Vec<String> {
    let mut v: Vec<String> = snap
        .endpoints
        .iter()
        .filter_map(|e| e.metadata.as_ref().map(|m| m.name.clone()))
        .collect();
    v.sort();
    v
}

/// Waits for a snapshot whose endpoints are `want`.
async fn until_endpoints(stream: &mut tonic::Streaming<pb::Snapshot>, want: &[&str]) {
    loop {
        if endpoint_names(&next(stream).await) == want {
            return;
        }
    }
}

async fn an_endpoint_lives_while_the_connection_that_registered_it_is_open(store: Backend) {
    let mut h = Harness::start(store, Duration::from_secs(3600)).await;
    let grace = h.state.endpoint_grace();
    h.admin
        .apply(service_for("shop", "web", &["web"]))
        .await
        .expect("web");
    let (mut observer, _, _) = h.joined("shop", "observer").await;
    let mut snaps = observer
        .watch(pb::WatchRequest::default())
        .await
        .expect("watch")
        .into_inner();
    next(&mut snaps).await;
    // Two proxies of one identity, each registering its endpoint on its own connection.
    let (mut a, cert, key) = h.joined("shop", "web").await;
    let mut b = h.proxy_mtls(&cert, &key).await;
    for (client, name) in [(&mut a, "web-a"), (&mut b, "web-b")] {
        client
            .register_endpoint(pb::RegisterEndpointRequest {
                endpoint: Some(endpoint_for(name, "web", "")),
            })
            .await
            .expect("register");
    }
    until_endpoints(&mut snaps, &["web-a", "web-b"]).await;
    // An impostor, connected all along, may not register (and so hold) `web-a`.
    let (mut evil, _, _) = h.joined("shop", "evil").await;
    let err = evil
        .register_endpoint(pb::RegisterEndpointRequest {
            endpoint: Some(endpoint_for("web-a", "web", "")),
        })
        .await
        .expect_err("impostor");
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());

    // Proxy a goes away without a word (its connection closes): `web-a` is withdrawn after the grace,
    // not before; `web-b`, held by the same identity's other connection, stays.
    let gone = tokio::time::Instant::now();
    drop(a);
    tokio::time::timeout(
        Duration::from_secs(10),
        until_endpoints(&mut snaps, &["web-b"]),
    )
    .await
    .expect("web-a withdrawn within 10 s");
    assert!(
        gone.elapsed() >= grace,
        "withdrawn after {:?}",
        gone.elapsed()
    );
    let get = |name: &str| pb::ResourceRef {
        kind: pb::Kind::Endpoint as i32,
        namespace: "shop".into(),
        name: name.into(),
    };
    let err = h.admin.get(get("web-a")).await.expect_err("record deleted");
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());

    // Compare-and-set: `web-b` is written again elsewhere (as another controller would when the proxy
    // re-registers there), then b's connection goes. The record b registered is no longer there, so
    // nothing is withdrawn, whatever the time.
    let mut again = endpoint_for("web-b", "web", id("shop", "web").as_str());
    again.address = "127.0.0.1:5544".into();
    h.admin
        .apply(pb::Resource {
            resource: Some(pb::resource::Resource::Endpoint(again)),
        })
        .await
        .expect("rewrite");
    drop(b);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !h
        .state
        .registry()
        .held_endpoints()
        .iter()
        .all(|(_, held)| held.lost_at.is_some())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b's connection not seen closing"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let far = std::time::Instant::now() + Duration::from_secs(3600);
    assert_eq!(h.state.expire_endpoints(far).await.expect("expire"), 0);
    assert!(h.state.registry().held_endpoints().is_empty());
    let kept = h
        .admin
        .get(get("web-b"))
        .await
        .expect("web-b kept")
        .into_inner();
    match kept.resource {
        Some(pb::resource::Resource::Endpoint(e)) => assert_eq!(e.address, "127.0.0.1:5544"),
        r => panic!("{r:?}"),
    }

    // A proxy that reconnects and registers again holds its endpoint anew.
    let mut c = h.proxy_mtls(&cert, &key).await;
    c.register_endpoint(pb::RegisterEndpointRequest {
        endpoint: Some(endpoint_for("web-a", "web", "")),
    })
    .await
    .expect("register again");
    until_endpoints(&mut snaps, &["web-a", "web-b"]).await;
    assert_eq!(h.state.expire_endpoints(far).await.expect("expire"), 0);
    // Withdrawn by its proxy (a drain): no longer tracked.
    c.deregister_endpoint(pb::DeregisterEndpointRequest {
        namespace: String::new(),
        name: "web-a".into(),
    })
    .await
    .expect("deregister");
    assert!(h.state.registry().held_endpoints().is_empty());
    drop(evil);
    h.stop().await;
}

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sled {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::Sled).await
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test]
                async fn $name() {
                    if let Some(why) = super::etcd_cluster::unavailable() {
                        eprintln!("SKIPPED etcd::{}: {why}", stringify!($name));
                        return;
                    }
                    super::$name(super::Backend::Etcd).await
                }
            )*
        }
    };
}

on_both_stores!(
    bootstrap_watch_register_and_renew,
    an_endpoint_lives_while_the_connection_that_registered_it_is_open,
    policies_that_conflict_or_name_unknown_versions_are_refused,
    bad_join_tokens_and_csrs_are_refused_and_nothing_is_stored,
    admin_api_needs_the_token_and_validates_every_field,
    revoked_identity_gets_no_certificate_and_loses_its_watch,
    secure_naming_only_allowed_identities_register_endpoints,
    apply_all_stores_a_whole_batch_or_nothing,
    watch_streams_are_bounded_per_identity,
    revocation_closes_watch_streams_and_tls_connections,
    dead_tokens_and_old_audit_records_are_pruned_after_the_retention,
    root_rotation_keeps_old_leaves_trusted_until_they_expire,
    health_service_answers_without_credentials,
    reflection_lists_the_controller_services,
    csrs_are_signed_only_for_p256_keys_and_others_are_named,
    concurrent_certify_is_grouped_and_spends_a_token_once,
    watch_with_deltas_sends_what_changed,
    watch_with_interest_sends_only_what_the_proxy_needs,
);

fn edge(dir: pb::EdgeDirection, source: &str, service: &str, ok: u64) -> pb::EdgeSummary {
    pb::EdgeSummary {
        direction: dir as i32,
        source: source.into(),
        service: service.into(),
        requests: ok,
        successes: ok,
        mtls_requests: ok,
        ..Default::default()
    }
}

fn report(edges: Vec<pb::EdgeSummary>) -> pb::ReportRequest {
    pb::ReportRequest {
        interval_ms: 1000,
        age_ms: 0,
        edges,
        peers: Vec::new(),
    }
}

/// Traffic reports are taken only from connected proxies, and only for edges they are part of;
/// everything else is refused with a status naming why, and counted. Stats are in memory, so one
/// store is enough.
#[tokio::test]
async fn reports_come_only_from_connected_proxies_about_their_own_edges() {
    let mut h = Harness::start(Backend::Sled, Duration::from_secs(3600)).await;
    h.admin
        .apply(service_for("shop", "web", &[]))
        .await
        .expect("service");
    let outbound = || edge(pb::EdgeDirection::Outbound, "", "web.shop", 10);
    // No client certificate.
    let e = h
        .proxy_anon()
        .await
        .report(report(vec![outbound()]))
        .await
        .expect_err("anonymous");
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    // A mesh identity without a Watch stream is not a connected proxy.
    let (mut client, _, _) = h.joined("shop", "client").await;
    let e = client
        .report(report(vec![outbound()]))
        .await
        .expect_err("not watching");
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let _watch = client
        .watch(pb::WatchRequest::default())
        .await
        .expect("watch");
    let r = client
        .report(report(vec![outbound()]))
        .await
        .expect("report")
        .into_inner();
    assert_eq!(r.accepted, 1);
    // The client may not speak for web's inbound side, name another source outbound, report a
    // service that does not exist, or send counts that do not add up.
    let client_id = format!("spiffe://{TD}/ns/shop/sa/client");
    let mut bad_sum = outbound();
    bad_sum.successes = 3;
    for (what, e) in [
        (
            "inbound for a service it does not serve",
            edge(pb::EdgeDirection::Inbound, &client_id, "web.shop", 1),
        ),
        (
            "outbound with a source",
            edge(pb::EdgeDirection::Outbound, &client_id, "web.shop", 1),
        ),
        (
            "unknown service",
            edge(pb::EdgeDirection::Outbound, "", "pay.shop", 1),
        ),
        ("counts that do not add up", bad_sum),
    ] {
        let err = client.report(report(vec![e])).await.expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err}");
    }
    let mut many = report(vec![outbound(); 513]);
    many.interval_ms = 1;
    assert_eq!(
        client.report(many).await.expect_err("too many").code(),
        Code::InvalidArgument
    );
    // A peer connection that is not a SPIFFE ID and address refuses the whole report.
    let web_id = format!("spiffe://{TD}/ns/shop/sa/web");
    let link = pb::PeerSummary {
        direction: pb::EdgeDirection::Inbound as i32,
        peer: client_id.clone(),
        address: "127.0.0.1:40000".into(),
        rtt_us: 1_500,
        cwnd_bytes: 12_000,
        sent_packets: 400,
        lost_packets: 4,
    };
    let mut bad_peer = report(vec![outbound()]);
    bad_peer.peers = vec![pb::PeerSummary {
        peer: "web".into(),
        ..link.clone()
    }];
    let err = client.report(bad_peer).await.expect_err("bad peer");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("peers[0]"), "{err}");
    // web's own proxy may report its inbound side, and its connection from the client's proxy.
    let (mut web, _, _) = h.joined("shop", "web").await;
    let _web_watch = web.watch(pb::WatchRequest::default()).await.expect("watch");
    let mut inbound = report(vec![edge(
        pb::EdgeDirection::Inbound,
        &client_id,
        "web.shop",
        10,
    )]);
    inbound.peers = vec![link];
    web.report(inbound).await.expect("inbound report");

    let stats = h
        .admin
        .get_stats(pb::StatsRequest {
            window_seconds: 60,
            service: "web".into(),
            edges: true,
            peers: true,
        })
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(stats.services.len(), 1);
    assert_eq!(stats.services[0].requests, 10);
    assert_eq!(stats.services[0].direction, "outbound");
    assert_eq!(stats.edges.len(), 2, "{:?}", stats.edges);
    assert!(stats.edges.iter().all(|e| e.source == client_id));
    assert_eq!(stats.reports_accepted, 2);
    assert_eq!(stats.reports_refused, 8);
    let p = &stats.peers;
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(
        (p[0].reporter.as_str(), p[0].peer.as_str()),
        (web_id.as_str(), client_id.as_str())
    );
    assert_eq!(
        (
            p[0].direction.as_str(),
            p[0].sent_packets,
            p[0].lost_packets
        ),
        ("inbound", 400, 4)
    );
    assert!((p[0].loss_rate - 0.01).abs() < 1e-9 && (p[0].rtt_ms - 1.5).abs() < 1e-9);
    let e = h
        .admin
        .get_stats(pb::StatsRequest {
            window_seconds: 120,
            ..Default::default()
        })
        .await
        .expect_err("no such window");
    assert_eq!(e.code(), Code::InvalidArgument);
    h.stop().await;
}
