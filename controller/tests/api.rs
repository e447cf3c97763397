//! In-process tests of the controller's gRPC APIs: a real TLS gRPC server on 127.0.0.1:0 over a real sled
//! directory in a tempdir, driven by the same client code `quicmesh ctl` uses.

use std::time::Duration;

use quicmesh_controller::{
    Controller,
    client::{self, Admin},
    state::StateOptions,
};
use quicmesh_proto::controller as pb;
use quicmesh_transport::identity::{SpiffeId, ca::generate_csr, inspect::CertInfo};
use tonic::Code;

const TD: &str = "test.mesh";

struct Harness {
    addr: String,
    token: String,
    bundle: Vec<String>,
    admin: Admin,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(leaf_ttl: Duration) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = StateOptions {
            data_dir: dir.path().to_owned(),
            trust_domain: Some(TD.into()),
            leaf_ttl: Some(leaf_ttl),
            root_pem: None,
            tls_names: vec![],
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
            addr,
            token,
            bundle,
            admin,
            stop: Some(stop),
            server: Some(server),
            _dir: dir,
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

fn service(ns: &str, name: &str, port: u32) -> pb::Resource {
    pb::Resource {
        resource: Some(pb::resource::Resource::Service(pb::Service {
            metadata: Some(pb::Metadata {
                name: name.into(),
                namespace: ns.into(),
                ..Default::default()
            }),
            ports: vec![pb::ServicePort {
                port,
                protocol: pb::PortProtocol::Http as i32,
                name: String::new(),
            }],
            versions: vec!["v1".into(), "v2".into()],
            identities: vec![],
        })),
    }
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

#[tokio::test]
async fn bootstrap_watch_register_and_renew() {
    let mut h = Harness::start(Duration::from_secs(600)).await;
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

    // Another namespace is refused.
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
    assert_eq!(err.code(), Code::PermissionDenied);

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

#[tokio::test]
async fn bad_join_tokens_and_csrs_are_refused_and_nothing_is_stored() {
    let mut h = Harness::start(Duration::from_secs(3600)).await;
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
    })
    .await
    .expect("first use");
    let rev1 = h.revision().await;
    let err = anon
        .certify(pb::CertifyRequest {
            csr_pem: csr,
            join_token: good,
        })
        .await
        .expect_err("reuse");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("already used"), "{}", err.message());
    assert_eq!(h.revision().await, rev1);
    assert_eq!(h.issued().await, 1);
    h.stop().await;
}

#[tokio::test]
async fn admin_api_needs_the_token_and_validates_every_field() {
    let mut h = Harness::start(Duration::from_secs(3600)).await;
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

#[tokio::test]
async fn revoked_identity_gets_no_certificate_and_loses_its_watch() {
    let mut h = Harness::start(Duration::from_secs(3600)).await;
    let token = h.token("shop", "cart", 0, false).await;
    let (csr, key) = generate_csr(&id("shop", "cart")).expect("csr");
    let resp = h
        .proxy_anon()
        .await
        .certify(pb::CertifyRequest {
            csr_pem: csr.clone(),
            join_token: token,
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

#[tokio::test]
async fn root_rotation_keeps_old_leaves_trusted_until_they_expire() {
    let mut h = Harness::start(Duration::from_secs(2)).await;
    let token = h.token("shop", "cart", 0, true).await;
    let (csr, key) = generate_csr(&id("shop", "cart")).expect("csr");
    let old = h
        .proxy_anon()
        .await
        .certify(pb::CertifyRequest {
            csr_pem: csr.clone(),
            join_token: token.clone(),
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

#[tokio::test]
async fn health_service_answers_without_credentials() {
    let h = Harness::start(Duration::from_secs(3600)).await;
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

#[tokio::test]
async fn reflection_lists_the_controller_services() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let h = Harness::start(Duration::from_secs(3600)).await;
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
