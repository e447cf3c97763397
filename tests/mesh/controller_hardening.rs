//! The controller as an attacker or a bad day meets it, with the built binary as a child process:
//! secrets at rest (file modes whatever the umask, no key material in plain text), idle TCP connections
//! that must not delay real clients, damaged storage, `ctl apply -f` that stores a whole file or
//! nothing, capped logging of peer strings, and secure naming checked by an independent gRPC client
//! (Python `grpcio`, skipped with a reason when it is not installed).

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use quicmesh_controller::client;
use quicmesh_proto::controller as pb;
use quicmesh_transport::identity::{SpiffeId, ca::generate_csr};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::{QUICMESH, raise_fd_limit};

const TD: &str = "hard.test";

/// A controller child started through `sh -c 'umask 022; exec ...'`, with its ready line.
struct Ctl {
    child: tokio::process::Child,
    addr: String,
    token: String,
    bundle: String,
    log: PathBuf,
}

async fn start(dir: &Path, extra: &[&str]) -> Ctl {
    let data = dir.join("data");
    let log = dir.join("controller.log");
    let mut args: Vec<String> = [
        "controller",
        "--data-dir",
        data.to_str().expect("utf8"),
        "--listen",
        "127.0.0.1:0",
        "--trust-domain",
        TD,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .expect("log");
    // A permissive umask: the controller must make its files owner-only anyway.
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg("umask 022; exec \"$0\" \"$@\"")
        .arg(QUICMESH)
        .args(&args)
        .env("QUICMESH_LOG", "info")
        .env_remove("QUICMESH_KEK")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(logf))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn controller");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("ready in time")
        .expect("read")
        .unwrap_or_else(|| {
            panic!(
                "controller exited: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let ready: serde_json::Value = serde_json::from_str(&line).expect("ready json");
    let bundle_path = ready["trust_bundle"].as_str().expect("bundle");
    Ctl {
        child,
        addr: ready["grpc"].as_str().expect("grpc").to_owned(),
        token: ready["admin_token"].as_str().unwrap_or_default().to_owned(),
        bundle: std::fs::read_to_string(bundle_path).expect("bundle file"),
        log,
    }
}

/// Runs `quicmesh ARGS` to completion (it must exit within 30 s): exit success and stderr.
async fn run(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = tokio::process::Command::new(QUICMESH);
    cmd.args(args)
        .env("QUICMESH_LOG", "warn")
        .env_remove("QUICMESH_KEK")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("exits in time")
        .expect("run");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl Ctl {
    async fn admin(&self) -> client::Admin {
        let ch = client::connect(
            &self.addr,
            std::slice::from_ref(&self.bundle),
            None,
            Some(Duration::from_secs(10)),
        )
        .await
        .expect("connect");
        client::admin(ch, &self.token).expect("admin")
    }

    /// A certificate for `ns/sa`: `(cert_pem, key_pem)`.
    async fn certify(&self, ns: &str, sa: &str) -> (String, String) {
        let token = self
            .admin()
            .await
            .create_join_token(pb::CreateJoinTokenRequest {
                namespace: ns.into(),
                service_account: sa.into(),
                ttl_seconds: 600,
                reusable: false,
            })
            .await
            .expect("token")
            .into_inner()
            .token;
        let ch = client::connect(
            &self.addr,
            std::slice::from_ref(&self.bundle),
            None,
            Some(Duration::from_secs(10)),
        )
        .await
        .expect("connect");
        let (csr, key) = generate_csr(&SpiffeId::new(TD, ns, sa).expect("id")).expect("csr");
        let resp = client::proxy(ch)
            .certify(pb::CertifyRequest {
                csr_pem: csr,
                join_token: token,
                ..Default::default()
            })
            .await
            .expect("certify")
            .into_inner();
        (resp.cert_chain_pem[0].clone(), key)
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            walk(&p, out);
        }
        out.push(p);
    }
}

fn pem_body_der(pem: &str) -> Vec<u8> {
    use base64::Engine;
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("pem base64")
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn secrets_at_rest_are_owner_only_and_the_root_key_is_sealed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // An operator root whose key the test knows, so it can look for it.
    let ca_dir = d.join("ca");
    let (ok, err) = run(
        &[
            "ca",
            "init",
            "--dir",
            ca_dir.to_str().expect("utf8"),
            "--trust-domain",
            TD,
        ],
        &[],
    )
    .await;
    assert!(ok, "ca init: {err}");
    let root_key_pem = std::fs::read_to_string(ca_dir.join("ca.key")).expect("root key");
    let der = pem_body_der(&root_key_pem);
    // The private scalar of an EC PKCS#8 key follows `02 01 01 04 20` (version 1, OCTET STRING 32).
    let at = der
        .windows(5)
        .position(|w| w == [2, 1, 1, 4, 32])
        .expect("EC private key in PKCS#8");
    let scalar = der[at + 5..at + 5 + 32].to_vec();
    let b64_line = root_key_pem.lines().nth(1).expect("pem line").to_owned();

    let c = start(
        d,
        &[
            "--root-cert",
            ca_dir.join("ca.pem").to_str().expect("utf8"),
            "--root-key",
            ca_dir.join("ca.key").to_str().expect("utf8"),
        ],
    )
    .await;
    // Some history: a token, a certificate, a rotation (a second root, generated here).
    c.certify("shop", "cart").await;
    c.admin()
        .await
        .rotate_root(pb::RotateRootRequest {})
        .await
        .expect("rotate");
    c.stop().await;

    let data = d.join("data");
    let mut files = Vec::new();
    walk(&data, &mut files);
    files.push(data.clone());
    assert!(files.len() > 3, "{files:?}");
    let mut scanned = 0;
    for f in &files {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(f).expect("meta");
        let mode = meta.permissions().mode() & 0o777;
        let want = if meta.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{} is {mode:o}", f.display());
        if meta.is_file() {
            let bytes = std::fs::read(f).expect("read");
            scanned += bytes.len();
            let name = f.display();
            assert!(
                !contains(&bytes, b"PRIVATE KEY"),
                "PEM private key in {name}"
            );
            assert!(!contains(&bytes, &der), "root PKCS#8 DER in {name}");
            assert!(!contains(&bytes, &scalar), "root private scalar in {name}");
            assert!(
                !contains(&bytes, b64_line.as_bytes()),
                "root key base64 in {name}"
            );
        }
    }
    eprintln!(
        "secrets at rest: {} paths owner-only, {scanned} bytes scanned",
        files.len()
    );

    // A wrong key-encryption key, or a missing one, is a clear error; nothing starts.
    let args = [
        "controller",
        "--data-dir",
        data.to_str().expect("utf8"),
        "--listen",
        "127.0.0.1:0",
    ];
    let wrong = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let (ok, err) = run(&args, &[("QUICMESH_KEK", wrong)]).await;
    assert!(!ok);
    assert!(err.contains("does not decrypt"), "{err}");
    std::fs::rename(data.join("kek"), d.join("kek.moved")).expect("move kek");
    let (ok, err) = run(&args, &[]).await;
    assert!(!ok);
    assert!(err.contains("kek") && err.contains("missing"), "{err}");
    // The KEK from a file outside the data directory works.
    let outside = d.join("kek.moved");
    let mut with_file = args.to_vec();
    with_file.extend(["--kek-file", outside.to_str().expect("utf8")]);
    let (_child, ready) = crate::support::spawn_ready(&with_file, &d.join("c2.log")).await;
    assert_eq!(ready["trust_domain"], TD);
}

#[tokio::test]
async fn idle_tcp_connections_do_not_delay_a_new_client() {
    raise_fd_limit();
    let dir = tempfile::tempdir().expect("tempdir");
    let c = start(dir.path(), &[]).await;
    let mut idle = Vec::new();
    for _ in 0..600 {
        idle.push(
            tokio::net::TcpStream::connect(&c.addr)
                .await
                .expect("idle connect"),
        );
    }
    let t = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(5), async {
        c.admin()
            .await
            .ca_status(pb::CaStatusRequest {})
            .await
            .expect("status")
    })
    .await
    .expect("a real client is served while 600 connections idle");
    let took = t.elapsed();
    assert_eq!(status.into_inner().trust_domain, TD);
    eprintln!("600 idle TCP connections: a new client's TLS handshake + call took {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    drop(idle);
    c.stop().await;
}

#[tokio::test]
async fn damaged_storage_names_the_file_and_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = start(dir.path(), &[]).await;
    c.stop().await;
    let data = dir.path().join("data");
    let args = [
        "controller",
        "--data-dir",
        data.to_str().expect("utf8"),
        "--listen",
        "127.0.0.1:0",
    ];
    let conf = data.join("db").join("conf");
    let good = std::fs::read(&conf).expect("conf");
    std::fs::write(&conf, [0xfe_u8; 40]).expect("garble conf");
    let (ok, err) = run(&args, &[]).await;
    assert!(!ok);
    assert!(
        err.contains("db/conf") && err.contains("backup") && !err.contains("0.29"),
        "{err}"
    );
    std::fs::write(&conf, good).expect("restore conf");
    let db = data.join("db").join("db");
    let len = std::fs::metadata(&db).expect("db").len() as usize;
    std::fs::write(&db, vec![0x5a_u8; len.max(4096)]).expect("garble db");
    let (ok, err) = run(&args, &[]).await;
    assert!(
        !ok,
        "a garbled database must not start (as a new mesh or otherwise)"
    );
    assert!(err.contains("db/db") && err.contains("backup"), "{err}");
}

#[tokio::test]
async fn ctl_apply_stores_a_whole_file_or_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let c = start(d, &[]).await;
    let bundle = d.join("bundle.pem");
    std::fs::write(&bundle, &c.bundle).expect("bundle");
    let ctl = |file: &Path| {
        let (addr, token, bundle, file) = (
            c.addr.clone(),
            c.token.clone(),
            bundle.clone(),
            file.to_owned(),
        );
        async move {
            let out = tokio::process::Command::new(QUICMESH)
                .args(["ctl", "--controller", &addr, "--ca"])
                .arg(&bundle)
                .args(["apply", "-f"])
                .arg(&file)
                .env("QUICMESH_ADMIN_TOKEN", &token)
                .env("QUICMESH_LOG", "warn")
                .output()
                .await
                .expect("ctl");
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let svc = |name: &str, port: u32| {
        format!(
            "kind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{ports: [{{port: {port}, protocol: tcp}}]}}\n"
        )
    };
    let services = || async {
        c.admin()
            .await
            .list(pb::ListRequest {
                kind: pb::Kind::Service as i32,
                namespace: String::new(),
            })
            .await
            .expect("list")
            .into_inner()
    };
    let rev0 = services().await.store_version;
    let cases = [
        (
            format!("{}---\n{}---\n{}", svc("a", 80), svc("b", 80), svc("c", 0)),
            "document 3",
        ),
        (
            format!("{}---\n{}", svc("a", 80), svc("a", 81)),
            "also document 1",
        ),
        (
            "kind: Service\nmetadata: [a, b]\nspec: {ports: [{port: 1, protocol: tcp}]}\n".into(),
            "mapping",
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let f = d.join(format!("bad{i}.yaml"));
        std::fs::write(&f, text).expect("write");
        let (ok, err) = ctl(&f).await;
        assert!(!ok, "case {i} was accepted");
        assert!(err.contains(needle), "case {i}: {err}");
    }
    let now = services().await;
    assert!(now.items.is_empty(), "{:?}", now.items);
    assert_eq!(now.store_version, rev0, "a refused file stored something");
    let f = d.join("good.yaml");
    std::fs::write(&f, format!("{}---\n{}", svc("a", 80), svc("b", 80))).expect("write");
    let (ok, err) = ctl(&f).await;
    assert!(ok, "{err}");
    let now = services().await;
    assert_eq!(now.items.len(), 2);
    assert_eq!(now.store_version, rev0 + 1, "one file, one revision");
    c.stop().await;
}

#[tokio::test]
async fn peer_strings_are_capped_in_logs_and_watches_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = start(dir.path(), &[]).await;
    let (cert, key) = c.certify("shop", "cart").await;
    let ch = client::connect(
        &c.addr,
        std::slice::from_ref(&c.bundle),
        Some((&cert, &key)),
        None,
    )
    .await
    .expect("mtls");
    let mut proxy = client::proxy(ch);
    let long = "x".repeat(8000);
    let err = proxy
        .register_endpoint(pb::RegisterEndpointRequest {
            endpoint: Some(pb::Endpoint {
                metadata: Some(pb::Metadata {
                    name: long.clone(),
                    ..Default::default()
                }),
                service: long.clone(),
                address: "127.0.0.1:1".into(),
                ..Default::default()
            }),
        })
        .await
        .expect_err("refused");
    assert!(err.message().len() < 1000, "{}", err.message().len());
    let mut streams = Vec::new();
    let mut exhausted = 0;
    for _ in 0..12 {
        match proxy
            .watch(pb::WatchRequest {
                proxy_name: long.clone(),
                spiffe_ids: vec![],
                ..Default::default()
            })
            .await
        {
            Ok(s) => streams.push(s.into_inner()),
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
                exhausted += 1;
            }
        }
    }
    assert_eq!((streams.len(), exhausted), (8, 4));
    drop(streams);
    let log_path = c.log.clone();
    c.stop().await;
    let log = std::fs::read_to_string(&log_path).expect("log");
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(
        !log.contains(&"x".repeat(200)),
        "a peer string was logged whole"
    );
    assert!(
        log.contains("…(8000 bytes)"),
        "capped strings say their length"
    );
    eprintln!("longest controller log line: {longest} bytes");
}

/// Python with `grpc` and `grpc_tools`, or why not.
fn python_grpc() -> Result<(), String> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import grpc, grpc_tools.protoc"])
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test]
async fn an_independent_grpc_client_cannot_register_an_impostor() {
    if let Err(why) = python_grpc() {
        eprintln!(
            "SKIPPED an_independent_grpc_client_cannot_register_an_impostor: Python grpcio and grpcio-tools are needed (pip install grpcio grpcio-tools): {why}"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let c = start(d, &[]).await;
    let mut admin = c.admin().await;
    for (name, ids) in [("web", vec!["web".to_owned()]), ("api", vec![])] {
        admin
            .apply(pb::Resource {
                resource: Some(pb::resource::Resource::Service(pb::Service {
                    metadata: Some(pb::Metadata {
                        name: name.into(),
                        namespace: "shop".into(),
                        ..Default::default()
                    }),
                    ports: vec![pb::ServicePort {
                        port: 80,
                        protocol: pb::PortProtocol::Tcp as i32,
                        name: String::new(),
                    }],
                    versions: vec![],
                    identities: ids,
                })),
            })
            .await
            .expect("service");
    }
    let write = |name: &str, text: &str| {
        let p = d.join(name);
        std::fs::write(&p, text).expect("write");
        p
    };
    let (evil_cert, evil_key) = c.certify("shop", "evil").await;
    let (web_cert, web_key) = c.certify("shop", "web").await;
    let bundle = write("bundle.pem", &c.bundle);
    let proto_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/proto");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/register_endpoint.py");
    let port = c.addr.rsplit_once(':').expect("port").1.to_owned();
    let mut results = Vec::new();
    for (who, cert, key, service) in [
        ("evil", &evil_cert, &evil_key, "web"),
        ("evil", &evil_cert, &evil_key, "api"),
        ("evil", &evil_cert, &evil_key, "ghost"),
        ("web", &web_cert, &web_key, "web"),
    ] {
        let cert = write(&format!("{who}.pem"), cert);
        let key = write(&format!("{who}.key"), key);
        let out = tokio::process::Command::new("python3")
            .arg(&script)
            .args(["--proto-dir", proto_dir.to_str().expect("utf8")])
            .args(["--out-dir", d.to_str().expect("utf8")])
            .args(["--target", &format!("localhost:{port}")])
            .arg("--ca")
            .arg(&bundle)
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .args(["--service", service, "--name", &format!("{who}-{service}")])
            .output()
            .await
            .expect("python");
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            out.status.success(),
            "{who} {service}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        results.push((who, service, stdout));
    }
    let code = |i: usize| {
        results[i]
            .2
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_owned()
    };
    assert_eq!(code(0), "PERMISSION_DENIED", "{:?}", results[0]);
    assert!(
        results[0].2.contains("shop/web") && results[0].2.contains("sa/web"),
        "{:?}",
        results[0]
    );
    assert_eq!(code(1), "PERMISSION_DENIED", "{:?}", results[1]);
    assert_eq!(code(2), "FAILED_PRECONDITION", "{:?}", results[2]);
    assert_eq!(code(3), "OK", "{:?}", results[3]);
    c.stop().await;
}
