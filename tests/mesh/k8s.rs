//! Kubernetes bootstrap without a cluster: a `quicmesh controller` process given a JWKS file of test
//! keys (an ES256 key made here with ring, an RS256 key made and used by the `openssl` CLI, an
//! independent signer) verifies projected service-account tokens at `Certify`. Valid tokens get exactly
//! their account's identity; expired, wrong-audience, wrong-issuer, forged, `alg: none` tokens and a
//! token for another account than the one requested are refused with the reason. A real proxy (`quicmesh
//! run`) bootstraps from a token file, and one holding a token for another account fails before its app
//! starts.

use std::{path::Path, process::Stdio, time::Duration};

use base64::Engine;
use quicmesh_controller::client;
use quicmesh_proto::controller as pb;
use quicmesh_transport::identity::{SpiffeId, ca::generate_csr};
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair},
};

use crate::{controller_mode::spawn, support::*};

const ISS: &str = "https://kubernetes.default.svc.cluster.local";

fn enc(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Claims of a projected token for `ns/sa`, valid for 10 minutes, for audience `aud`.
fn claims(ns: &str, sa: &str, aud: &str) -> serde_json::Value {
    let t = now();
    serde_json::json!({
        "iss": ISS,
        "aud": [aud],
        "exp": t + 600,
        "iat": t - 5,
        "nbf": t - 5,
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "8f1c"}},
    })
}

fn signing_input(header: &serde_json::Value, claims: &serde_json::Value) -> String {
    format!(
        "{}.{}",
        enc(header.to_string().as_bytes()),
        enc(claims.to_string().as_bytes())
    )
}

/// An ES256 signer (ring).
struct Es256(EcdsaKeyPair);

impl Es256 {
    fn new() -> Self {
        let rng = SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("key");
        Self(
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
                .expect("pair"),
        )
    }

    fn jwk(&self, kid: &str) -> serde_json::Value {
        let p = self.0.public_key().as_ref();
        serde_json::json!({"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": enc(&p[1..33]), "y": enc(&p[33..])})
    }

    fn token(&self, kid: &str, claims: &serde_json::Value) -> String {
        let msg = signing_input(&serde_json::json!({"alg": "ES256", "kid": kid}), claims);
        let sig = self
            .0
            .sign(&SystemRandom::new(), msg.as_bytes())
            .expect("sign");
        format!("{msg}.{}", enc(sig.as_ref()))
    }
}

/// An RS256 key made and used by the `openssl` CLI; `None` (with a printed reason) without it.
struct Rs256 {
    key: std::path::PathBuf,
}

impl Rs256 {
    fn new(dir: &Path) -> Option<Self> {
        let key = dir.join("rsa.pem");
        let ok = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&key)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("RS256 part skipped: the openssl CLI is not available");
            return None;
        }
        Some(Self { key })
    }

    fn jwk(&self, kid: &str) -> serde_json::Value {
        let out = std::process::Command::new("openssl")
            .args(["rsa", "-noout", "-modulus", "-in"])
            .arg(&self.key)
            .output()
            .expect("openssl rsa");
        let text = String::from_utf8_lossy(&out.stdout);
        let hex = text.trim().trim_start_matches("Modulus=");
        let n: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex"))
            .collect();
        serde_json::json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid, "n": enc(&n), "e": "AQAB"})
    }

    fn token(&self, kid: &str, claims: &serde_json::Value) -> String {
        let msg = signing_input(&serde_json::json!({"alg": "RS256", "kid": kid}), claims);
        let dir = self.key.parent().expect("dir");
        let input = dir.join("jws-input");
        std::fs::write(&input, &msg).expect("input");
        let out = std::process::Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(&self.key)
            .arg(&input)
            .output()
            .expect("openssl dgst");
        assert!(out.status.success());
        format!("{msg}.{}", enc(&out.stdout))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_tokens_bootstrap_exactly_their_identity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let es = Es256::new();
    let rs = Rs256::new(d);
    let mut keys = vec![es.jwk("es-1")];
    keys.extend(rs.as_ref().map(|r| r.jwk("rs-1")));
    let jwks = d.join("jwks.json");
    std::fs::write(&jwks, serde_json::json!({ "keys": keys }).to_string()).expect("jwks");

    let data = d.join("data");
    let controller = spawn(
        &[
            "controller",
            "--data-dir",
            data.to_str().expect("utf8"),
            "--listen",
            "127.0.0.1:0",
            "--trust-domain",
            TD,
            "--k8s-jwks",
            jwks.to_str().expect("utf8"),
            "--k8s-issuer",
            ISS,
            "--k8s-audience",
            "quicmesh",
        ],
        &d.join("controller.log"),
    )
    .await;
    let addr = controller.addr("grpc");
    let bundle = controller.trust_bundle();
    let pem = std::fs::read_to_string(&bundle).expect("bundle");
    let ch = client::connect(
        &addr.to_string(),
        &[pem],
        None,
        Some(Duration::from_secs(10)),
    )
    .await
    .expect("connect");
    let mut api = client::proxy(ch);
    let web = SpiffeId::new(TD, "default", "web").expect("id");
    let (csr, _) = generate_csr(&web).expect("csr");
    let mut certify = async |csr: &str, token: String| {
        api.certify(pb::CertifyRequest {
            csr_pem: csr.to_owned(),
            service_account_token: token,
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
    };

    // Valid tokens, ES256 and RS256: exactly the account's identity.
    let ok = certify(
        &csr,
        es.token("es-1", &claims("default", "web", "quicmesh")),
    )
    .await
    .expect("a valid ES256 token");
    assert_eq!(ok.spiffe_id, web.as_str());
    if let Some(rs) = &rs {
        let ok = certify(
            &csr,
            rs.token("rs-1", &claims("default", "web", "quicmesh")),
        )
        .await
        .expect("a valid RS256 token signed by openssl");
        assert_eq!(ok.spiffe_id, web.as_str());
    }

    // Each refusal says why, and nothing is issued.
    let mut expired = claims("default", "web", "quicmesh");
    expired["exp"] = (now() - 120).into();
    let mut wrong_iss = claims("default", "web", "quicmesh");
    wrong_iss["iss"] = "https://evil.example".into();
    let unsigned = format!(
        "{}.",
        signing_input(
            &serde_json::json!({"alg": "none"}),
            &claims("default", "web", "quicmesh")
        )
    );
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            es.token("es-1", &expired),
            "service_account_token: expired",
        ),
        (
            "wrong audience",
            es.token(
                "es-1",
                &claims("default", "web", "https://kubernetes.default.svc"),
            ),
            "is not this controller's",
        ),
        (
            "wrong issuer",
            es.token("es-1", &wrong_iss),
            "is not the configured one",
        ),
        (
            "forged signature",
            Es256::new().token("es-1", &claims("default", "web", "quicmesh")),
            "signature does not verify",
        ),
        ("alg none", unsigned, "\"none\" is not accepted"),
        ("not a JWT", "qmt_0123456789ab.x".into(), "malformed token"),
    ];
    for (what, token, reason) in cases {
        let e = certify(&csr, token).await.expect_err(what);
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{what}: {e:?}");
        assert!(e.message().contains(reason), "{what}: {}", e.message());
    }
    // A valid token of another account, asked for web's identity: refused.
    let e = certify(
        &csr,
        es.token("es-1", &claims("default", "admin", "quicmesh")),
    )
    .await
    .expect_err("another account");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message()
            .contains("credential grants spiffe://mesh.local/ns/default/sa/admin"),
        "{}",
        e.message()
    );

    // A real proxy bootstraps from its token file and runs its app; the token is read from the file.
    let proxy_config = |name: &str, token: &str| {
        std::fs::write(d.join(format!("{name}.token")), token).expect("token");
        let path = d.join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "[controller]\naddress = \"{addr}\"\ntrust_bundle = \"{}\"\nservice_account_token_file = \"{name}.token\"\nidentity = \"{web}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n",
                bundle.display()
            ),
        )
        .expect("config");
        path
    };
    let run = async |cfg: &Path| {
        let out = tokio::time::timeout(
            Duration::from_secs(40),
            tokio::process::Command::new(QUICMESH)
                .args(["run", "--ready-timeout", "20s", "--config"])
                .arg(cfg)
                .args(["--", "sh", "-c", "echo app-ran"])
                .env("QUICMESH_LOG", "info")
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("quicmesh run finished")
        .expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let cfg = proxy_config(
        "web",
        &es.token("es-1", &claims("default", "web", "quicmesh")),
    );
    let (code, out, err) = run(&cfg).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), "app-ran");
    assert!(err.contains("certificate installed"), "{err}");

    let cfg = proxy_config(
        "impostor",
        &es.token("es-1", &claims("default", "admin", "quicmesh")),
    );
    let (code, out, err) = run(&cfg).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(out.is_empty(), "the app must not have run: {out}");
    assert!(
        err.contains("the controller refused the bootstrap")
            && err.contains("credential grants spiffe://mesh.local/ns/default/sa/admin"),
        "{err}"
    );
}

/// A CA and a server certificate for 127.0.0.1 made by the `openssl` CLI (the cluster CA and the API
/// server's serving certificate), plus an unrelated CA; false (with the reason printed) without it.
fn openssl_server_certs(d: &Path) -> bool {
    let run = |args: &[&str]| {
        std::process::Command::new("openssl")
            .args(args)
            .current_dir(d)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let ca = |name: &str| {
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "1",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ])
    };
    std::fs::write(
        d.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    let ok = ca("cluster-ca")
        && ca("other-ca")
        && run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=kube-apiserver",
        ])
        && run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "cluster-ca.pem",
            "-CAkey",
            "cluster-ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "server.ext",
        ]);
    if !ok {
        eprintln!(
            "SKIP: the openssl CLI is not available (or failed) to make the issuer's certificates"
        );
    }
    ok
}

/// `tests/peers/oidc_issuer.py` serving `root` over HTTPS with `token` required: its port and its
/// request lines; None (reason printed) without python3.
async fn oidc_issuer(
    d: &Path,
    root: &Path,
    token: &str,
) -> Option<(
    tokio::process::Child,
    u16,
    tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
)> {
    let (cert, key) = (d.join("server.pem"), d.join("server.key"));
    python_peer(
        "oidc_issuer.py",
        &[
            "--root".as_ref(),
            root.as_os_str(),
            "--cert".as_ref(),
            cert.as_os_str(),
            "--key".as_ref(),
            key.as_os_str(),
            "--token".as_ref(),
            token.as_ref(),
            "--max-seconds".as_ref(),
            "120".as_ref(),
        ],
    )
    .await
}

/// Request lines received so far.
fn drain_requests(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
) -> Vec<serde_json::Value> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_keys_come_from_the_discovery_document_and_follow_a_rotation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    if !openssl_server_certs(d) {
        return;
    }
    let root = d.join("www");
    for sub in [
        ".well-known",
        "openid/v1",
        "other/.well-known",
        "big/.well-known",
    ] {
        std::fs::create_dir_all(root.join(sub)).expect("dirs");
    }
    let Some((_server, port, mut requests)) = oidc_issuer(d, &root, "reader-token").await else {
        return;
    };
    let issuer = format!("https://127.0.0.1:{port}");
    let write = |rel: &str, v: &serde_json::Value| {
        std::fs::write(root.join(rel), v.to_string()).expect("write")
    };
    let discovery = |iss: &str, jwks: &str| serde_json::json!({"issuer": iss, "jwks_uri": jwks});
    write(
        ".well-known/openid-configuration",
        &discovery(&issuer, &format!("{issuer}/openid/v1/jwks")),
    );
    let (es1, es2) = (Es256::new(), Es256::new());
    write(
        "openid/v1/jwks",
        &serde_json::json!({"keys": [es1.jwk("es-1")]}),
    );
    // A document for another issuer, and a JWKS over the 1 MiB bound.
    write(
        "other/.well-known/openid-configuration",
        &discovery("https://evil.example", &format!("{issuer}/openid/v1/jwks")),
    );
    write(
        "big/.well-known/openid-configuration",
        &discovery(&format!("{issuer}/big"), &format!("{issuer}/big/jwks")),
    );
    std::fs::write(root.join("big/jwks"), vec![b' '; 2 << 20]).expect("big");
    std::fs::write(d.join("reader.token"), "reader-token\n").expect("token");
    std::fs::write(d.join("wrong.token"), "not-the-token").expect("token");

    let tok = |pair: &Es256, kid: &str| {
        let mut c = claims("default", "web", "quicmesh");
        c["iss"] = issuer.as_str().into();
        pair.token(kid, &c)
    };
    let web = SpiffeId::new(TD, "default", "web").expect("id");
    let (csr, _) = generate_csr(&web).expect("csr");
    let start = async |name: &str, iss: &str, ca: &str, token_file: &str| {
        let data = d.join(name);
        let controller = spawn(
            &[
                "controller",
                "--data-dir",
                data.to_str().expect("utf8"),
                "--listen",
                "127.0.0.1:0",
                "--trust-domain",
                TD,
                "--k8s-discovery",
                "--k8s-issuer",
                iss,
                "--k8s-discovery-ca",
                d.join(ca).to_str().expect("utf8"),
                "--k8s-discovery-token-file",
                d.join(token_file).to_str().expect("utf8"),
                "--k8s-discovery-refresh",
                "2s",
            ],
            &d.join(format!("{name}.log")),
        )
        .await;
        let pem = std::fs::read_to_string(controller.trust_bundle()).expect("bundle");
        let ch = client::connect(
            &controller.addr("grpc").to_string(),
            &[pem],
            None,
            Some(Duration::from_secs(15)),
        )
        .await
        .expect("connect");
        (controller, client::proxy(ch))
    };
    let certify =
        async |api: &mut pb::proxy_api_client::ProxyApiClient<tonic::transport::Channel>,
               token: String| {
            api.certify(pb::CertifyRequest {
                csr_pem: csr.clone(),
                service_account_token: token,
                ..Default::default()
            })
            .await
            .map(tonic::Response::into_inner)
        };

    let (_a, mut api) = start("a", &issuer, "cluster-ca.pem", "reader.token").await;
    let ok = certify(&mut api, tok(&es1, "es-1"))
        .await
        .expect("a token of the discovered key");
    assert_eq!(ok.spiffe_id, web.as_str());

    // The cluster rotates its key: the old one is gone, tokens of the new one are accepted once the
    // controller fetched again (a token naming an unknown key triggers it, the 2 s cool-down bounds it).
    write(
        "openid/v1/jwks",
        &serde_json::json!({"keys": [es2.jwk("es-2")]}),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match certify(&mut api, tok(&es2, "es-2")).await {
            Ok(r) => {
                assert_eq!(r.spiffe_id, web.as_str());
                break;
            }
            Err(e) => {
                assert!(
                    e.message().contains("no issuer key for kid \"es-2\""),
                    "{}",
                    e.message()
                );
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "rotation not followed in 15 s"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let e = certify(&mut api, tok(&es1, "es-1"))
        .await
        .expect_err("the retired key");
    assert!(
        e.message().contains("no issuer key for kid \"es-1\""),
        "{}",
        e.message()
    );

    // Tokens with made-up key ids do not make the controller hammer the issuer: 40 of them in a
    // burst cost at most two JWKS fetches (one cool-down may end inside the burst).
    let before = drain_requests(&mut requests);
    assert!(before.iter().all(|r| r["authorized"] == true), "{before:?}");
    let t0 = std::time::Instant::now();
    for i in 0..40 {
        let e = certify(&mut api, tok(&es2, &format!("made-up-{i}")))
            .await
            .expect_err("unknown kid");
        assert!(e.message().contains("no issuer key"), "{}", e.message());
    }
    let burst = t0.elapsed();
    let fetched = drain_requests(&mut requests)
        .iter()
        .filter(|r| r["path"] == "/openid/v1/jwks")
        .count();
    let allowed = 1 + usize::try_from(burst.as_secs() / 2).unwrap_or(usize::MAX);
    assert!(
        fetched <= allowed,
        "{fetched} JWKS fetches for 40 made-up kids in {burst:?}"
    );

    // The issuer breaks (a document for another issuer): the last good keys stay in use.
    write(
        ".well-known/openid-configuration",
        &discovery("https://evil.example", &format!("{issuer}/openid/v1/jwks")),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        certify(&mut api, tok(&es2, "es-2"))
            .await
            .expect("last good keys kept");
        if drain_requests(&mut requests)
            .iter()
            .any(|r| r["path"] == "/.well-known/openid-configuration")
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no refetch in 15 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    certify(&mut api, tok(&es2, "es-2"))
        .await
        .expect("still the last good keys");
    let log = std::fs::read_to_string(d.join("a.log")).expect("log");
    assert!(
        log.contains("names issuer \\\"https://evil.example\\\"")
            || log.contains("names issuer \"https://evil.example\""),
        "{log}"
    );

    // Controllers that never got keys refuse tokens and say why; each stays up.
    let cases = [
        (
            "other",
            format!("{issuer}/other"),
            "cluster-ca.pem",
            "reader.token",
            "names issuer \"https://evil.example\"",
        ),
        (
            "untrusted",
            issuer.clone(),
            "other-ca.pem",
            "reader.token",
            "TLS: invalid peer certificate",
        ),
        (
            "big",
            format!("{issuer}/big"),
            "cluster-ca.pem",
            "reader.token",
            "length limit exceeded",
        ),
        (
            "unauthorized",
            issuer.clone(),
            "cluster-ca.pem",
            "wrong.token",
            "status 401",
        ),
    ];
    for (name, iss, ca, token_file, reason) in cases {
        let (_c, mut api) = start(name, &iss, ca, token_file).await;
        let e = certify(&mut api, tok(&es2, "es-2")).await.expect_err(name);
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{name}: {e:?}");
        assert!(
            e.message().contains("issuer keys unavailable") && e.message().contains(reason),
            "{name}: {}",
            e.message()
        );
    }
}
